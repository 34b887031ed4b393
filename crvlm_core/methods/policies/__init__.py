"""Composable refusal policies: YAML constraints fitted with CR-VLM calibrators and composed by priority."""
