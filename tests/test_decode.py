"""The decode step (mrjax.model.decode) against the model's own forward (``Llama.apply``) on the same
sequences, token by token: float32 to rounding, bfloat16 within a stated tolerance; tied and untied
embeddings, GQA ratios 1, 2 and 4, Llama-3.1 RoPE scaling, and a shared prefix prefilled by the
model and read in the decode layout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import single_device_mesh
from mrjax.model.decode import decode_step, decode_weights, prefix_decode_layout
from mrjax.model.llama import KVCache, Llama, LlamaConfig, RopeScaling
from mrjax.model.pretrained import init_params

BASE = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
                   head_dim=8, rope_theta=10000.0, max_position_embeddings=256)
SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


def _decode_all(params, config, dtype, tokens, prefix_len):
    """Logits [B, T - prefix_len, V] of decoding ``tokens`` [B, T] one token per step after a shared prefix
    of ``prefix_len`` tokens (the same in every row) that the model prefills."""
    B, T = tokens.shape
    L, kh, d = config.num_layers, config.num_kv_heads, config.head_dim
    module = Llama(config, dtype=dtype, param_dtype=jnp.float32)
    C = prefix_len
    prefix = KVCache.zeros(config, 1, C, dtype)
    if C:
        _, prefix = module.apply({"params": params}, tokens[:1, :C], jnp.arange(C)[None], jnp.ones((1, C), bool),
                                 prefix, 0)
    shared = (prefix_decode_layout(prefix, L), jnp.ones((C,), bool))
    weights = decode_weights(params, config, dtype, None)
    S = T - C
    caches = [(jnp.zeros((B, kh, d, S), dtype), jnp.zeros((B, kh, S, d), dtype)) for _ in range(L)]
    step = jax.jit(lambda w, tok, pos, caches, allowed, slots, shared: decode_step(w, config, tok, pos, caches, allowed,
                                                                                  slots, shared))
    out = []
    for j in range(S):
        allowed = jnp.broadcast_to(jnp.arange(S) <= j, (B, S))
        logits, caches = step(weights, tokens[:, C + j], jnp.full((B,), C + j, jnp.int32), caches, allowed,
                              jnp.full((B,), j, jnp.int32), shared)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


def _forward(params, config, dtype, tokens):
    return np.asarray(Llama(config, dtype=dtype).apply({"params": params}, tokens)[0])


CASES = [
    pytest.param(dict(num_kv_heads=8), id="gqa1-untied"),
    pytest.param(dict(num_kv_heads=4, tie_word_embeddings=True), id="gqa2-tied"),
    pytest.param(dict(num_kv_heads=2, rope_scaling=SCALING), id="gqa4-llama31-rope"),
]


@pytest.mark.parametrize("changes", CASES)
@pytest.mark.parametrize("prefix_len", [0, 5])
def test_decode_step_equals_the_forward_in_float32(changes, prefix_len):
    config = dataclasses.replace(BASE, **changes)
    params = init_params(config, single_device_mesh(), seed=1)
    tokens = jax.random.randint(jax.random.key(2), (3, 20), 0, config.vocab_size)
    tokens = tokens.at[:, :prefix_len].set(tokens[0, :prefix_len])  # the shared prefix is the same in every row
    reference = _forward(params, config, jnp.float32, tokens)[:, prefix_len:]
    ours = _decode_all(params, config, jnp.float32, tokens, prefix_len)
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=1e-5)


# bfloat16 keeps 8 bits of mantissa: both paths round the matmul inputs and the cache to bfloat16 (the residual
# stream is float32 in both) but accumulate in other orders, so they agree to a few bfloat16 steps, not bit for bit.
# Measured: at most 0.6% of the logits' scale apart, each within 0.5% of float32; the bound leaves 3x.
BF16_TOLERANCE = 0.02  # max |decode - forward| / max |float32 logits|


@pytest.mark.parametrize("changes", CASES)
def test_decode_step_agrees_with_the_forward_in_bfloat16(changes):
    config = dataclasses.replace(BASE, **changes)
    params = init_params(config, single_device_mesh(), seed=3)
    tokens = jax.random.randint(jax.random.key(4), (3, 16), 0, config.vocab_size)
    tokens = tokens.at[:, :4].set(tokens[0, :4])
    exact = _forward(params, config, jnp.float32, tokens)[:, 4:]
    forward = _forward(params, config, jnp.bfloat16, tokens)[:, 4:]
    ours = _decode_all(params, config, jnp.bfloat16, tokens, 4)
    scale = np.abs(exact).max()
    assert np.abs(ours - forward).max() <= BF16_TOLERANCE * scale
    # Both are bfloat16 approximations of the same float32 model, equally close to it.
    assert np.abs(ours - exact).max() <= BF16_TOLERANCE * scale and np.abs(forward - exact).max() <= BF16_TOLERANCE * scale
    assert (ours.argmax(-1) == forward.argmax(-1)).mean() >= 0.9
