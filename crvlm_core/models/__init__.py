"""Stage 2, models: one handle for every supported model (embedded GGUF wheels, hub ids, local folders, offline VLM builders, organisms)."""
