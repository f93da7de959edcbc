"""prompt_tuning: soft-prompt tuning of frozen T5-family models, T5X style, in JAX/Flax."""

__version__ = '0.1.0'
