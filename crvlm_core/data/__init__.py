"""Stage 1, data: the sample schema, JSONL loading with line-numbered errors, images, scopes, seeded splits and the bundled datasets."""
