"""The offline pipeline: corpus -> activations -> SAEs -> safety features -> explanations -> database."""
