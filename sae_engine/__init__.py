"""SAE engine: models, hook points, TopK SAEs, training, checkpoints, inference-time encoding and steering."""
