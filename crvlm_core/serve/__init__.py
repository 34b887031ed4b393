"""App: the OpenAI-compatible server."""
