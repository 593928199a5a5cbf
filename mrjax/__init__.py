"""mrjax: Meta-Rewarding self-improvement for Llama-3 models in JAX/XLA."""

__version__ = "0.1.0"
