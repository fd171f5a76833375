"""The OpenAI-compatible HTTP server: the request schema (schema.py), text streaming (text.py), the one model
thread (worker.py), the engine that runs a request (generation.py), the OpenAI response shapes (responses.py),
the HTTP handler and `make_server` (http.py), and serving a target sharded across processes (sharded.py)."""
