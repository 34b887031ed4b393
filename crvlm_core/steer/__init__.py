"""Stage 5, steering: interventions on decoder-layer outputs on every token, batched generation and the refusal score."""
