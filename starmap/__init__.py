"""StarMap: see and steer the safety decisions of language models with sparse autoencoders."""

__version__ = "0.1.0"
