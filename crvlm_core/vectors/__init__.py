"""Stage 4, vectors: steering-vector estimators over cached activations and the saved SteeringVector."""
