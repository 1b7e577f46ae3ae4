"""Serving: `engine` (continuous batching) and `api` (the OpenAI-compatible HTTP app)."""
