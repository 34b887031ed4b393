"""The baselines CR-VLM is compared with: system prompt, persona, ActAdd, CAST, LoRA."""
