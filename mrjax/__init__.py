"""mrjax: Meta-Rewarding self-improvement for Llama-3 models in JAX/XLA."""

__version__ = "0.1.0"


def load_pretrained(*args, **kwargs):
    """See ``mrjax.model.pretrained.load_pretrained`` (imported lazily so ``import mrjax`` stays cheap)."""
    from mrjax.model.pretrained import load_pretrained as _load

    return _load(*args, **kwargs)


__all__ = ["load_pretrained", "__version__"]
