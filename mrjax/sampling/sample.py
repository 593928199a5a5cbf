"""Logits to tokens: temperature, top-k, top-p and the per-row random keys.

Everything here is a pure function of arrays, jitted as part of the engine's programs. Sample
``s`` of prompt ``i`` (its index in the caller's list) uses, at step ``t``, one uniform from
``fold_in(fold_in(fold_in(key(seed), i), s), t)``, turned into a token by inverse-CDF sampling, so
a row's tokens do not depend on which slot, refill or device it gets.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Candidates taken by lax.top_k before applying top-p. A row whose nucleus they do not hold
# takes WIDE_CANDIDATES_FACTOR times as many (a few rows at a time); only a row whose nucleus
# those do not hold either gets its exact cut-off by bisection over the whole vocabulary.
DEFAULT_TOP_P_CANDIDATES = 64
WIDE_CANDIDATES_FACTOR = 16
# Inverse-CDF sampling walks the vocabulary in blocks of this many tokens (two cumulative sums).
SAMPLING_BLOCK = 256


class SampleParams(NamedTuple):
    """A ``SamplingConfig``'s per-call values as arrays (``SamplingConfig.params()``), so that one
    compiled program serves any seed, lengths, temperature, top-p, top-k and end-of-turn ids."""

    seed: jax.Array
    max_new: jax.Array
    min_new: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    stop_ids: jax.Array


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis, first index on ties (two fused reductions; XLA:CPU's
    variadic argmax reduction is several times slower)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, idx, x.shape[-1]), axis=-1).astype(jnp.int32)


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (for exact bisection over float values)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _unsortable(u: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(u ^ jnp.uint32(0x80000000), jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _top_p_threshold_by_bisection(scaled: jax.Array, log_norm: jax.Array, top_p: jax.Array, upper: jax.Array):
    """Largest logit value tau with P(scaled >= tau) >= top_p, per row, exact.

    ``upper`` is a value whose mass already falls short of top_p. Bisection runs over the
    order-preserving integer image of float32, so 32 halvings always land on a logit.
    """
    probs = jnp.exp(scaled - log_norm[:, None])

    def mass_at_least(tau):
        return jnp.sum(jnp.where(scaled >= tau[:, None], probs, 0.0), axis=-1)

    lo = _sortable(jnp.min(scaled, axis=-1))  # everything kept: mass 1 >= top_p
    hi = _sortable(upper)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_at_least(_unsortable(mid)) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return _unsortable(lo)


def _inverse_cdf(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Index drawn with probability proportional to ``weights`` [B, V] (>= 0), one uniform per row.

    Two levels (block sums, then within the chosen block) instead of a cumulative sum over
    the whole vocabulary.
    """
    B, V = weights.shape
    blocks = -(-V // SAMPLING_BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * SAMPLING_BLOCK - V))).reshape(B, blocks, SAMPLING_BLOCK)
    block_cum = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)
    target = uniforms * block_cum[:, -1]
    block = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=-1), blocks - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(block_cum, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, block[:, None, None], 1)[:, 0]
    inner_cum = before[:, None] + jnp.cumsum(inner, axis=-1)
    pick = jnp.sum(inner_cum <= target[:, None], axis=-1)
    # Rounding can leave the target just past the block's last token: take its last nonzero one.
    last_nonzero = SAMPLING_BLOCK - 1 - first_argmax(jnp.flip(inner > 0, axis=-1).astype(jnp.int32))
    return (block * SAMPLING_BLOCK + jnp.minimum(pick, last_nonzero)).astype(jnp.int32)


def _nucleus(cand, kth, log_norm, top_p, use_top_k, complete: bool):
    """Threshold of top-k then top-p over a descending candidate list [B, K] of the scaled logits
    (``complete``: the whole vocabulary), and whether the list holds every token at or above it,
    so that drawing from the list is exact."""
    cand_probs = jnp.where(cand >= kth[:, None], jnp.exp(cand - log_norm[:, None]), 0.0)
    mass_before = jnp.cumsum(cand_probs, axis=-1) - cand_probs
    kept = jnp.sum((mass_before < top_p) & (cand_probs > 0), axis=-1)
    top_p_cut = jnp.take_along_axis(cand, jnp.maximum(kept - 1, 0)[:, None], 1)[:, 0]
    threshold = jnp.where(top_p < 1, top_p_cut, kth)
    if complete:
        return threshold, jnp.ones(threshold.shape, bool)
    enough = use_top_k | (jnp.sum(cand_probs, axis=-1) >= top_p)
    # A token outside the list could tie with its last entry: only a cut above that entry is sure.
    return threshold, enough & (threshold > cand[:, -1])


def _top_k(x, k):
    """lax.top_k, kept as XLA:CPU's TopK kernel: without the barrier some uses of its outputs
    (slices of the values) make XLA rewrite it as a full sort of the vocabulary, 100x slower."""
    values, indices = jax.lax.top_k(x, k)
    # One barrier each: a barrier on both would take the TopK's tuple itself, which XLA's
    # TopK decomposition (used under sharding) does not expect.
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(indices)


def _draw_from_list(cand, cand_ids, threshold, uniforms):
    """Inverse-CDF draw over the candidates at or above ``threshold``, in descending order."""
    weights = jnp.where(cand >= threshold[:, None], jnp.exp(cand - cand[:, :1]), 0.0)
    return jnp.take_along_axis(cand_ids, _inverse_cdf(weights, uniforms)[:, None], 1)[:, 0].astype(jnp.int32)


def sample_logits(
    logits: jax.Array,
    uniforms: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    top_k: jax.Array | int,
    *,
    greedy: bool,
    candidates: int = 0,
) -> jax.Array:
    """One token per row of ``logits`` [B, V] (float32), given one uniform in [0, 1) per row.

    ``candidates`` (static) is the lax.top_k width used for top-k / top-p; 0 means no
    truncation (plain temperature sampling). It must be >= top_k when top_k > 0.

    Which path a row takes depends on its own logits only, so its token does not depend on the
    other rows: a row whose nucleus the ``candidates`` hold draws from them (descending order);
    else from ``WIDE_CANDIDATES_FACTOR`` times as many; else from the whole vocabulary (index
    order) after an exact bisection.
    """
    if greedy:
        return first_argmax(logits)
    B, V = logits.shape
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    if candidates == 0:
        return _inverse_cdf(jnp.exp(scaled - jnp.max(scaled, -1, keepdims=True)), uniforms)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    cand, cand_ids = _top_k(scaled, candidates)  # descending; ties: lower index first
    use_top_k = jnp.broadcast_to(top_k > 0, (B,))
    kth = jnp.where(use_top_k, cand[:, jnp.clip(top_k - 1, 0, candidates - 1)], -jnp.inf)
    # top-p is measured under the distribution renormalised over what top-k kept.
    log_norm = jax.nn.logsumexp(jnp.where(scaled >= kth[:, None], scaled, -jnp.inf), axis=-1)
    threshold, holds = _nucleus(cand, kth, log_norm, top_p, use_top_k, candidates >= V)
    token = _draw_from_list(cand, cand_ids, threshold, uniforms)
    if candidates >= V:
        return token

    wide = min(V, WIDE_CANDIDATES_FACTOR * candidates)
    per_round = max(1, B // 8)

    def widen(state):
        """The next few rows whose nucleus the candidates do not hold, with the wide list."""
        todo, whole, token = state
        rows = jnp.nonzero(todo, size=per_round, fill_value=B)[0]  # B: no row (writes dropped)
        at = jnp.minimum(rows, B - 1)
        c, ids = _top_k(scaled[at], wide)
        t, h = _nucleus(c, kth[at], log_norm[at], top_p, use_top_k[at], wide >= V)
        token = token.at[jnp.where(h, rows, B)].set(_draw_from_list(c, ids, t, uniforms[at]), mode="drop")
        whole = whole.at[jnp.where(h, B, rows)].set(True, mode="drop")
        return todo.at[rows].set(False, mode="drop"), whole, token

    _, whole, token = jax.lax.while_loop(lambda st: jnp.any(st[0]), widen, (~holds, jnp.zeros_like(holds), token))

    def by_bisection():
        # Just above the last candidate: the mass at or above it falls short of top_p.
        upper = _unsortable(_sortable(cand[:, -1]) + 1)
        cut = jnp.where(top_p < 1, _top_p_threshold_by_bisection(scaled, log_norm, top_p, upper), kth)
        weights = jnp.where(scaled >= cut[:, None], jnp.exp(scaled - jnp.max(scaled, -1, keepdims=True)), 0.0)
        return jnp.where(whole, _inverse_cdf(weights, uniforms), token)

    return jax.lax.cond(jnp.any(whole), by_bisection, lambda: token)


def row_uniforms(seed: jax.Array, prompt_index: jax.Array, sample_index: jax.Array, step: jax.Array) -> jax.Array:
    """The uniform that sample ``sample_index`` of prompt ``prompt_index`` uses at ``step``."""

    def one(p, s, t):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), p), s), t)
        return jax.random.uniform(key, (), jnp.float32)

    step = jnp.broadcast_to(step, prompt_index.shape)
    return jax.vmap(one)(prompt_index, sample_index, step)


def candidates_needed(config, vocab: int) -> int:
    """The lax.top_k width a ``SamplingConfig`` needs (0: no truncation, or greedy)."""
    if config.greedy or (config.top_p >= 1 and config.top_k == 0):
        return 0
    return min(vocab, max(config.top_k + 1, config.top_p_candidates))  # + 1: the k-th above the last


def pick(logits, step, prompt_index, sample_index, params: SampleParams, greedy: bool, candidates: int):
    """Next token and its log-probability under the unmodified model, per row at ``step`` [B]."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    # Before min_new tokens the end-of-turn ids may not be drawn (HF's min_new_tokens).
    blocked = (step < params.min_new)[:, None]
    allowed_logits = logits.at[:, params.stop_ids].set(jnp.where(blocked, -jnp.inf, logits[:, params.stop_ids]))
    u = row_uniforms(params.seed, prompt_index, sample_index, step)
    token = sample_logits(allowed_logits, u, params.temperature, params.top_p, params.top_k, greedy=greedy,
                          candidates=candidates)
    logprob = jnp.take_along_axis(logits, token[:, None], 1)[:, 0] - log_norm
    return token, logprob
