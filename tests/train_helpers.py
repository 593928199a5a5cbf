"""Shared by the training tests: one tiny-random model per pytest process (loading it takes seconds)."""
import functools

from conftest import single_device_mesh


@functools.lru_cache(maxsize=None)
def tiny_model():
    """(model, tokenizer): tiny-random (2 layers, SmolLM2 tokenizer) on one device. Never donate its params."""
    from mrjax import load_pretrained

    return load_pretrained("tiny-random", mesh=single_device_mesh(), progress=False)
