"""Stage 6, judges: refusal judges behind one interface (keyword, learned, LLM) and their validation."""
