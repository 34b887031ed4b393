"""Refusal Steering: judge-scored data, ridge-regularised vectors, layer ranking, strength search, topic gate."""
