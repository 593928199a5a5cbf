"""The decode step: ``Llama``'s arithmetic for one new token per row, in the layout XLA:CPU runs fastest.

``Llama.apply`` (mrjax.model.llama) serves training and prefill. Decoding one token per row is a
small-batch problem, so this step keeps the same primitives (``rms_norm``, ``rotate``, ``swiglu``,
grouped-query attention with one softmax) and reorders them:

- weights per layer (slicing a stacked [layers, ...] parameter inside the loop makes XLA:CPU copy it
  every step), each matrix [out, in], activations feature-major [E, B]: every projection is
  ``W [out, in] . x [in, B]``, the orientation in which XLA:CPU's small-batch GEMM runs fastest;
- a row's cache as keys [B, Kh, D, S] (positions minor) and values [B, Kh, S, D] (head_dim minor),
  the layouts of the fastest batched q.k and p.v products, instead of the model's [L, B, S, Kh, D];
  ``to_decode_layout`` / ``prefix_decode_layout`` convert.

Matmuls accumulate in float32; the residual stream is float32 (``RESIDUAL_DTYPE``), as in ``Llama``
(``tests/test_decode.py`` checks the two paths against each other in float32 and bfloat16).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mrjax import mesh as mesh_lib
from mrjax.model.llama import (PARAMETER_PATHS, RESIDUAL_DTYPE, LlamaConfig, param_at, rms_norm, rope_angles,
                               rope_frequencies, rotate, swiglu, unembedding)

# Logical axes of one layer's decode-layout cache, and of the decode view of the weights.
DECODE_K_AXES = ("batch", "kv_heads", "head_dim", "seq")
DECODE_V_AXES = ("batch", "kv_heads", "seq", "head_dim")
DECODE_WEIGHT_AXES = {
    "q": ("heads", "embed"),
    "k": ("kv_heads", "embed"),
    "v": ("kv_heads", "embed"),
    "o": ("embed", "heads"),
    "gate": ("mlp", "embed"),
    "up": ("mlp", "embed"),
    "down": ("embed", "mlp"),
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
}


def decode_weights(params: dict, config: LlamaConfig, dtype, mesh: Mesh | None) -> dict:
    """Per-layer, [out, in] copies of the weights in the compute ``dtype`` (norm scales as stored); traceable."""
    c = config
    e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    # [in, ...] parameter of one layer -> [out, in] matrix
    as_matrix = {
        "q": lambda w: w.reshape(e, h * d).T,
        "k": lambda w: w.reshape(e, k * d).T,
        "v": lambda w: w.reshape(e, k * d).T,
        "o": lambda w: w.reshape(h * d, e).T,
        "gate": lambda w: w.T,
        "up": lambda w: w.T,
        "down": lambda w: w.T,
    }
    stacked = {name: param_at(params, PARAMETER_PATHS[name]) for name in DECODE_WEIGHT_AXES}
    layers = []
    for i in range(c.num_layers):
        w = {name: f(stacked[name][i]).astype(dtype) for name, f in as_matrix.items()}
        w["attn_norm"] = stacked["attn_norm"][i]
        w["mlp_norm"] = stacked["mlp_norm"][i]
        layers.append({name: mesh_lib.constrain(x, mesh, DECODE_WEIGHT_AXES[name]) for name, x in w.items()})
    return {
        "layers": layers,
        "embedding": param_at(params, PARAMETER_PATHS["embedding"]),
        "unembed": mesh_lib.constrain(unembedding(params, c).T.astype(dtype), mesh, ("vocab", "embed")),
        "final_norm": param_at(params, PARAMETER_PATHS["final_norm"]),
    }


def to_decode_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values from the model's cache layout [..., N, S, Kh, D] (one layer, or stacked layers)
    to the decode layout (keys [..., N, Kh, D, S], values [..., N, Kh, S, D])."""
    return jnp.moveaxis(k, -3, -1), jnp.swapaxes(v, -3, -2)


def prefix_decode_layout(prefix, num_layers: int) -> list[tuple[jax.Array, jax.Array]]:
    """A shared prefix's cache (the model's KVCache [L, rows, C, Kh, D]; row 0 is read) as per layer
    (keys [Kh, D, C], values [Kh, C, D]), read by every row of a decode step."""
    return [(prefix.k[i, 0].transpose(1, 2, 0), prefix.v[i, 0].transpose(1, 0, 2)) for i in range(num_layers)]


def _matmul(w, x):
    """W [out, in] . x [in, B] -> float32 [out, B] (accumulated in float32 for bfloat16 weights)."""
    return jnp.einsum("nk,kb->nb", w, x.astype(w.dtype), preferred_element_type=jnp.float32)


def decode_logits(weights, x):
    """Final-norm hidden states, feature-major [E, B] -> float32 logits [B, V]."""
    # The barrier keeps XLA from folding the transpose into the product, which would turn it
    # back into the [B, E] x [E, V] orientation that runs at about half the speed on CPU.
    return jax.lax.optimization_barrier(_matmul(weights["unembed"], x)).T


def decode_step(weights, config: LlamaConfig, tokens, positions, caches, row_allowed, slots, shared):
    """Logits [B, V] for one token per row at ``positions`` [B]; writes its keys/values at ``slots`` [B].

    Each row attends over two caches. ``shared`` = (per layer (keys [Kh, D, C], values [Kh, C, D]),
    mask [C]) is the prompt prefix every row of the call has in common, stored once and read
    once per step for all rows. ``caches`` holds per layer the row's own slots in the decode layout;
    ``row_allowed`` [B, S] says which of them a query may attend to. One softmax runs over both, so
    the arithmetic is ``Llama.apply``'s, reordered for one token. A slot index past the cache
    (finished rows) writes nothing.
    """
    c = config
    B = tokens.shape[0]
    h, kh, d = c.num_heads, c.num_kv_heads, c.head_dim
    groups = h // kh
    shared_layers, shared_mask = shared
    C = shared_mask.shape[0]
    cos, sin = rope_angles(positions, rope_frequencies(c))
    cos, sin = cos[:, None, :], sin[:, None, :]  # [B, 1, D/2]
    x = jnp.take(weights["embedding"], tokens, axis=0).astype(RESIDUAL_DTYPE).T  # [E, B]
    neg = jnp.finfo(jnp.float32).min
    mask = jnp.concatenate([jnp.broadcast_to(shared_mask[None], (B, C)), row_allowed], axis=1)[:, None, None, :]
    rows = jnp.arange(B)
    new_caches = []
    for w, (cache_k, cache_v), (prefix_k, prefix_v) in zip(weights["layers"], caches, shared_layers):
        hidden = rms_norm(x, w["attn_norm"], c.rms_norm_eps, axis=0)
        q = rotate(_matmul(w["q"], hidden).reshape(h, d, B).transpose(2, 0, 1), cos, sin)
        k = rotate(_matmul(w["k"], hidden).reshape(kh, d, B).transpose(2, 0, 1), cos, sin)
        v = _matmul(w["v"], hidden).reshape(kh, d, B).transpose(2, 0, 1)
        cache_k = cache_k.at[rows, :, :, slots].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[rows, :, slots, :].set(v.astype(cache_v.dtype), mode="drop")
        new_caches.append((cache_k, cache_v))
        q = q.reshape(B, kh, groups, d)
        # The shared prefix is one [B * groups, D] x [D, C] product per kv head (kv-head-major
        # operands: XLA:CPU runs the row-major einsum over (b, k) about 1.7x slower).
        by_head = lambda a: a.transpose(1, 0, 2, 3).reshape(kh, B * groups, a.shape[-1])  # noqa: E731
        prefix_scores = jnp.einsum("kmd,kds->kms", by_head(q), prefix_k.astype(jnp.float32))
        scores = jnp.concatenate(
            [
                prefix_scores.reshape(kh, B, groups, C).transpose(1, 0, 2, 3),
                jnp.einsum("bkgd,bkds->bkgs", q, cache_k.astype(jnp.float32)),
            ],
            axis=-1,
        ) / math.sqrt(d)
        probs = jax.nn.softmax(jnp.where(mask, scores, neg), axis=-1)
        prefix_attn = jnp.einsum("kms,ksd->kmd", by_head(probs[..., :C]), prefix_v.astype(jnp.float32))
        attn = prefix_attn.reshape(kh, B, groups, d).transpose(1, 0, 2, 3) + jnp.einsum(
            "bkgs,bksd->bkgd", probs[..., C:], cache_v.astype(jnp.float32)
        )
        x = (x + _matmul(w["o"], attn.reshape(B, h * d).T)).astype(RESIDUAL_DTYPE)
        hidden = rms_norm(x, w["mlp_norm"], c.rms_norm_eps, axis=0)
        mlp = _matmul(w["down"], swiglu(_matmul(w["gate"], hidden), _matmul(w["up"], hidden)))
        x = (x + mlp).astype(RESIDUAL_DTYPE)
    x = rms_norm(x, weights["final_norm"], c.rms_norm_eps, axis=0)
    return decode_logits(weights, x), new_caches


__all__ = ["DECODE_K_AXES", "DECODE_V_AXES", "DECODE_WEIGHT_AXES", "decode_logits", "decode_step", "decode_weights",
           "prefix_decode_layout", "to_decode_layout"]
