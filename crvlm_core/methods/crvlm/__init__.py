"""CR-VLM: a teacher-forced refusal vector and a gated calibrator trained on cached activations."""
