"""The OpenAI- and Anthropic-compatible HTTP server: the request schema (schema.py), chat messages, tools and the
prompt (conversation.py), text streaming (text.py), a request's tokens to its pieces of text (pieces.py), an
answer's text, reasoning and tool calls (output.py), the one model thread, alone or batching (worker.py), the
engine that runs a request (generation.py), the OpenAI response shapes (responses.py), the Anthropic Messages API
(anthropic.py), the HTTP handler and `make_server` (http.py), and serving a target sharded across processes
(sharded.py)."""
