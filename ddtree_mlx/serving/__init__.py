"""The OpenAI-compatible HTTP server: request schema, text streaming, the worker that runs the engine, the HTTP
handler, and sharded serving."""
