"""Methods built from the stages: CR-VLM, Refusal Steering, the baselines, policies; and the kind → loader registry of artifacts."""
