"""Batched sampling for the actor, judge and meta-judge: a jitted prefill and a jitted
``lax.while_loop`` decoder over a KV cache, sharded over the mesh.

    from mrjax.sampling import generate, SamplingConfig
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=128, temperature=0.8, top_p=0.95, n=4, seed=0))
    out.texts        # per prompt, per sample: str

How a call runs:

* Prompts are chat-templated and tokenised. The tokens every prompt of the call starts with
  (the chat header, the judge's rubric, ...) are the *shared prefix*: it is prefilled once, and
  the decoder keeps its keys/values once and reads them once per step for all rows.
* Prompts that share a further prefix of at least ``MIN_GROUP_PREFIX`` tokens (the meta-judge's
  calls for one response: its question and response) form a *group*: the group's prefix is
  prefilled once, and each row keeps a copy of its slots in its own cache.
* Rows (one sample of one prompt) wait group by group, in order of prompt length, for a
  fixed pool of ``batch_size`` decode slots (continuous batching). A refill prefills the rest
  of each distinct waiting prompt after the prefix's (or its group's) cache (the ``n`` samples
  of a prompt share it, left-padded to a bucket: multiples of 8 up to 64, then four steps per
  doubling), puts its rows into free slots and samples their first tokens. Each slot's own
  cache reserves a prompt bucket for the call's longest prompt after the shared prefix, then
  the generated tokens; a row's keys and values fill it without the buckets' padding (keys
  carry their positions, so attention does not care where a slot is).
* The decoder is one jitted ``lax.while_loop`` over the pool: each step runs the model on one
  token per row against the caches (loop-carried, so XLA updates them in place) and samples.
  A row ends at an end-of-turn id or at ``max_new_tokens``; finished slots compute but record
  nothing, and the loop returns to the host once 1/8 of the slots are free, to refill them.
  Lengths, steps and sampling parameters are arrays, so a handful of programs serve a call.
* Randomness: sample ``s`` of prompt ``i`` (its index in the caller's list) uses, at step
  ``t``, one uniform from ``fold_in(fold_in(fold_in(key(seed), i), s), t)``, turned into a
  token by inverse-CDF sampling; nothing depends on which slot, refill or device a row gets,
  so any ``batch_size`` gives the same tokens (up to float32 rounding of near-ties).

The decode step is its own function, not ``Llama.apply``: on CPU the generic forward costs
several times more per token. It runs on a per-call copy of the weights (one array per
layer, matrices stored [out, in]), hoists RoPE out of the layer loop and keeps the cache
in a decode-friendly layout. ``tests/test_sampling.py`` checks it token for token against
HF transformers and its log-probabilities against a teacher-forced ``model`` forward.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrjax import mesh as mesh_lib
from mrjax.model.decode import (DECODE_K_AXES, DECODE_V_AXES, decode_logits, decode_step, decode_weights,
                                prefix_decode_layout, to_decode_layout)
from mrjax.model.llama import KV_CACHE_AXES, KVCache, LlamaConfig, unembedding
from mrjax.tokenizer import Prompt


FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# Candidates taken by lax.top_k before applying top-p. A row whose nucleus they do not hold
# takes WIDE_CANDIDATES_FACTOR times as many (a few rows at a time); only a row whose nucleus
# those do not hold either gets its exact cut-off by bisection over the whole vocabulary.
DEFAULT_TOP_P_CANDIDATES = 64
WIDE_CANDIDATES_FACTOR = 16
# Inverse-CDF sampling walks the vocabulary in blocks of this many tokens (two cumulative sums).
SAMPLING_BLOCK = 256
MIN_PROMPT_BUCKET = 16
# Generated-token buffers and the cache are sized to max_new_tokens rounded up to this.
NEW_TOKENS_ROUNDING = 32
# Prompts that share at least this many tokens beyond the call's prefix prefill them once as a group
# (fewer would not pay for the slots every row of the call then reserves for them).
MIN_GROUP_PREFIX = 64
# The decoder returns to the host to refill its slots once 1/REFILL_FRACTION of them are free.
REFILL_FRACTION = 8
# Once no rows wait, the pool halves (live rows gathered into a smaller one) whenever half of
# it is free, down to this many slots: finished rows stop costing decode steps.
MIN_SHRUNK_POOL = 8



class SamplingError(ValueError):
    """Bad input to ``generate``; the message says which prompt or setting."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature=0`` is greedy decoding (top_p/top_k are then ignored).

    Filters apply in HF transformers' order: temperature, then top-k (keep tokens whose
    logit is at least the k-th largest), then top-p (keep the smallest set of most likely
    tokens whose probability under the top-k-renormalised distribution reaches ``top_p``).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # end-of-turn ids cannot be drawn before this many tokens (as in HF)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt
    seed: int = 0
    batch_size: int = 32  # rows (prompts x samples) decoded together
    max_prompt_tokens: int | None = None  # default: the model's context minus max_new_tokens
    stop_ids: tuple[int, ...] | None = None  # default: the tokenizer's end-of-turn ids
    top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES

    def __post_init__(self):
        def bad(msg):
            raise SamplingError(f"SamplingConfig: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad(f"min_new_tokens must be an int in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n (samples per prompt) must be a positive int, got {self.n!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            bad(f"max_prompt_tokens must be positive, got {self.max_prompt_tokens!r}")
        if self.stop_ids is not None and not all(isinstance(i, (int, np.integer)) for i in self.stop_ids):
            bad(f"stop_ids must be token ids, got {self.stop_ids!r}")
        if self.top_p_candidates < 1:
            bad(f"top_p_candidates must be positive, got {self.top_p_candidates!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_settings(cls, settings: Any, **overrides) -> "SamplingConfig":
        """From ``mrjax.config.SamplingSettings`` (or anything with the same fields)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(settings).items() if k in fields}
        return cls(**{**values, **overrides})


@dataclasses.dataclass
class GenerationOutput:
    """Per prompt (outer list, the caller's order), per sample (inner list).

    ``token_ids`` are the generated ids, including the end-of-turn id when
    ``finish_reasons`` is ``"stop"``; ``texts`` decode them without special tokens.
    ``logprobs[i][s][t]`` is log p(token t | prompt, tokens < t) under the *unmodified*
    model distribution (temperature 1, no top-p/top-k truncation), which is what DPO and
    analysis want, whatever the sampling settings were.
    """

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    lengths: list[list[int]]
    finish_reasons: list[list[str]]
    prompt_lengths: list[int]  # prompt tokens (after the chat template)

    @property
    def num_generated_tokens(self) -> int:
        return sum(sum(row) for row in self.lengths)


# --------------------------------------------------------------------------- sampling math


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


def _needs_candidates(config: SamplingConfig, vocab: int) -> int:
    if config.greedy or (config.top_p >= 1 and config.top_k == 0):
        return 0
    return min(vocab, max(config.top_k + 1, config.top_p_candidates))  # + 1: the k-th above the last


# --------------------------------------------------------------------------- jitted programs


def _constrain(x, mesh, names):
    return mesh_lib.constrain(x, mesh, names)


class Settings(NamedTuple):
    """Sampling parameters as arrays, so one compiled program serves any values."""

    seed: jax.Array
    max_new: jax.Array
    min_new: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    stop_ids: jax.Array


class Slots(NamedTuple):
    """The decoder's pool of rows (one row = one sample of one prompt), all arrays [B, ...].

    A row's own cache holds its prompt's tokens after the shared prefix (its group prefix's,
    then its own), packed right-aligned in the first ``P`` slots (``prompt_mask`` marks them),
    then the tokens it generates.
    ``step`` counts the tokens generated so far; ``done`` rows (and empty slots) compute but
    record nothing until the host refills them.
    """

    caches: list  # per layer (keys [B, Kh, D, S], values [B, Kh, S, D])
    prompt_mask: jax.Array  # [B, P]
    prompt_len: jax.Array  # [B] full prompt length (the position of the first generated token)
    prompt_index: jax.Array  # [B] the prompt's index in the caller's list (for the key)
    sample_index: jax.Array  # [B]
    token: jax.Array  # [B] the last generated token
    step: jax.Array  # [B]
    done: jax.Array  # [B]
    stopped: jax.Array  # [B] ended by an end-of-turn id
    out_tokens: jax.Array  # [B, new_capacity]
    out_logprobs: jax.Array  # [B, new_capacity]


class Programs(NamedTuple):
    prepare: Any  # params -> decode weights (once per generate call)
    prefill: Any  # prompts -> last hidden state + KV cache (per row bucket x prompt bucket)
    prefill_after: Any  # prompt suffixes after a shared prefix's cache (per row, suffix and prefix bucket)
    empty: Any  # an empty slot pool (per pool shape)
    insert: Any  # prefilled rows -> free slots, sampling their first token (per refill shape)
    decode: Any  # the while-loop decoder over the pool (per pool shape)
    compact: Any  # some slots of a pool -> a smaller pool (per pool shape and size)


def _pick(logits, step, prompt_index, sample_index, s: Settings, greedy, candidates):
    """Next token and its log-probability under the unmodified model, per row at ``step`` [B]."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    # Before min_new tokens the end-of-turn ids may not be drawn (HF's min_new_tokens).
    blocked = (step < s.min_new)[:, None]
    allowed_logits = logits.at[:, s.stop_ids].set(jnp.where(blocked, -jnp.inf, logits[:, s.stop_ids]))
    u = row_uniforms(s.seed, prompt_index, sample_index, step)
    token = sample_logits(allowed_logits, u, s.temperature, s.top_p, s.top_k, greedy=greedy, candidates=candidates)
    logprob = jnp.take_along_axis(logits, token[:, None], 1)[:, 0] - log_norm
    return token, logprob


@functools.lru_cache(maxsize=None)
def compiled_programs(module, mesh: Mesh, dtype) -> Programs:
    """The jitted programs for one (module, mesh, dtype); cached so compilations are shared."""
    config: LlamaConfig = module.config
    L, kh, d = config.num_layers, config.num_kv_heads, config.head_dim

    def prepare(params):
        return decode_weights(params, config, dtype, mesh)

    def prefill(params, tokens, positions, mask):
        # tokens [Bp, P] (P: the prefill bucket); mask [Bp, Pc] (Pc >= P: the cache length)
        B, cache_len = mask.shape
        cache = KVCache(*(_constrain(t, mesh, KV_CACHE_AXES) for t in KVCache.zeros(config, B, cache_len, dtype)))
        hidden, cache = module.apply({"params": params}, tokens, positions, mask, cache, jnp.int32(0), return_hidden=True)
        return hidden[:, -1], cache

    def prefill_after(params, prefix, prefix_mask, tokens, positions, mask, *, keep: int = 0):
        # prefix: KVCache [L, any, C, Kh, D] (row 0 is read); tokens/positions/mask [Bp, P]: suffixes, left-padded.
        # Returns the cache of the suffixes, after the prefix's last ``keep`` slots (a group prefix's own part).
        B, P = tokens.shape
        C = prefix_mask.shape[0]
        full_mask = jnp.concatenate([jnp.broadcast_to(prefix_mask[None], (B, C)), mask], axis=1)
        cache = KVCache(
            *(
                _constrain(jnp.pad(jnp.broadcast_to(t[:, :1], (L, B) + t.shape[2:]), ((0, 0), (0, 0), (0, P), (0, 0), (0, 0))),
                           mesh, KV_CACHE_AXES)
                for t in prefix
            )
        )
        hidden, cache = module.apply({"params": params}, tokens, positions, full_mask, cache, jnp.int32(C),
                                     return_hidden=True)
        return hidden[:, -1], KVCache(cache.k[:, :, C - keep:], cache.v[:, :, C - keep:])

    def empty(rows, prompt_slots, cache_slots, new_capacity):
        zeros = lambda shape, dt=jnp.int32: _constrain(jnp.zeros(shape, dt), mesh, ("batch",) + (None,) * (len(shape) - 1))
        caches = [
            (_constrain(jnp.zeros((rows, kh, d, cache_slots), dtype), mesh, DECODE_K_AXES),
             _constrain(jnp.zeros((rows, kh, cache_slots, d), dtype), mesh, DECODE_V_AXES))
            for _ in range(L)
        ]
        return Slots(
            caches, zeros((rows, prompt_slots), bool), zeros((rows,)), zeros((rows,)), zeros((rows,)),
            zeros((rows,)), zeros((rows,)), jnp.ones((rows,), bool), zeros((rows,), bool),
            zeros((rows, new_capacity)), zeros((rows, new_capacity), jnp.float32),
        )

    def insert(weights, pool: Slots, last_hidden, cache, packing, packed_mask, where, row_prompt, prompt_len,
               prompt_index, sample_index, s: Settings, *, greedy: bool, candidates: int):
        """Rows ``row_prompt`` [N] of a prefill go to slots ``where`` [N] (B = none); each samples its first
        token. Prefill row j's real cache slots are ``packing[j]`` [P] where ``packed_mask[j]`` [P]."""
        B, P = pool.prompt_mask.shape
        S = pool.caches[0][0].shape[-1]
        packing = jnp.take(packing, row_prompt, axis=0)[None, :, :, None, None]
        k = jnp.take_along_axis(jnp.take(cache.k, row_prompt, axis=1), packing, axis=2)  # [L, N, P, Kh, D]
        v = jnp.take_along_axis(jnp.take(cache.v, row_prompt, axis=1), packing, axis=2)
        generated = (0, S - P)  # the slots after the prompt's, for the tokens the row generates
        caches = []
        for i, (ck, cv) in enumerate(pool.caches):
            dk, dv = to_decode_layout(k[i], v[i])
            caches.append((ck.at[where].set(jnp.pad(dk, ((0, 0),) * 3 + (generated,)), mode="drop"),
                           cv.at[where].set(jnp.pad(dv, ((0, 0),) * 2 + (generated, (0, 0))), mode="drop")))
        hidden = jnp.take(last_hidden, row_prompt, axis=0).astype(jnp.float32).T
        zero = jnp.zeros_like(row_prompt)
        token, logprob = _pick(decode_logits(weights, hidden), zero, prompt_index, sample_index, s, greedy, candidates)
        stopped = jnp.isin(token, s.stop_ids)
        put = lambda a, x: a.at[where].set(x, mode="drop")
        return Slots(
            caches,
            put(pool.prompt_mask, jnp.take(packed_mask, row_prompt, axis=0)),
            put(pool.prompt_len, prompt_len), put(pool.prompt_index, prompt_index),
            put(pool.sample_index, sample_index), put(pool.token, token), put(pool.step, zero + 1),
            put(pool.done, stopped | (s.max_new <= 1)), put(pool.stopped, stopped),
            put(pool.out_tokens, jnp.zeros((len(token), pool.out_tokens.shape[1]), jnp.int32).at[:, 0].set(token)),
            put(pool.out_logprobs, jnp.zeros((len(token), pool.out_logprobs.shape[1])).at[:, 0].set(logprob)),
        )

    def decode(weights, prefix, prefix_mask, pool: Slots, s: Settings, refill_at, *, greedy: bool, candidates: int):
        """Decode steps of the whole pool until every row is done, or until ``refill_at`` slots are
        free (done), so that the host can refill them."""
        B, P = pool.prompt_mask.shape
        rows = jnp.arange(B)
        gen_ids = jnp.arange(pool.caches[0][0].shape[-1] - P, dtype=jnp.int32)
        # The shared prefix in decode layout, read by every row.
        shared = (prefix_decode_layout(prefix, L), prefix_mask)

        def cond(state):
            _, _, done, *_ = state
            return (jnp.sum(done) < refill_at) & ~jnp.all(done)

        def body(state):
            token, step, done, stopped, out_tokens, out_logprobs, caches = state
            slots = jnp.where(done, P + len(gen_ids), P + step - 1)  # where the previous token's keys and values go
            allowed = jnp.concatenate([pool.prompt_mask, gen_ids[None] <= (step - 1)[:, None]], axis=1)
            logits, caches = decode_step(weights, config, token, pool.prompt_len + step - 1, caches, allowed, slots,
                                         shared)
            new_token, logprob = _pick(logits, step, pool.prompt_index, pool.sample_index, s, greedy, candidates)
            record = jnp.where(done, out_tokens.shape[1], step)  # finished rows record nothing
            out_tokens = out_tokens.at[rows, record].set(new_token, mode="drop")
            out_logprobs = out_logprobs.at[rows, record].set(logprob, mode="drop")
            hit_stop = ~done & jnp.isin(new_token, s.stop_ids)
            step = step + (~done).astype(jnp.int32)
            token = jnp.where(done, token, new_token)
            return (token, step, done | hit_stop | (step >= s.max_new), stopped | hit_stop, out_tokens, out_logprobs,
                    caches)

        state = (pool.token, pool.step, pool.done, pool.stopped, pool.out_tokens, pool.out_logprobs, pool.caches)
        token, step, done, stopped, out_tokens, out_logprobs, caches = jax.lax.while_loop(cond, body, state)
        return pool._replace(caches=caches, token=token, step=step, done=done, stopped=stopped, out_tokens=out_tokens,
                             out_logprobs=out_logprobs)

    def compact(pool: Slots, keep):
        """The pool of slots ``keep`` [B'], in that order."""
        take = lambda a, names: _constrain(jnp.take(a, keep, axis=0), mesh, names)
        caches = [(take(k, DECODE_K_AXES), take(v, DECODE_V_AXES)) for k, v in pool.caches]
        return Slots(caches, *(take(a, ("batch",) + (None,) * (a.ndim - 1)) for a in pool[1:]))

    return Programs(
        jax.jit(prepare),
        jax.jit(prefill),
        jax.jit(prefill_after, static_argnames=("keep",)),
        jax.jit(empty, static_argnums=(0, 1, 2, 3)),
        jax.jit(insert, static_argnames=("greedy", "candidates"), donate_argnums=(1,)),
        jax.jit(decode, static_argnames=("greedy", "candidates"), donate_argnums=(3,)),
        jax.jit(compact),
    )


def programs_for(model) -> Programs:
    """The jitted programs ``generate`` uses for ``model`` (e.g. to count compilations)."""
    return compiled_programs(model.module, model.mesh, model.dtype)


# --------------------------------------------------------------------------- host side


def prompt_bucket(length: int) -> int:
    """Padded prompt length for prefill: multiples of 8 up to 64, then 4 steps per doubling
    (80, 96, 112, 128, 160, ...), so padding wastes at most 1/4 of the prefill work."""
    size = MIN_PROMPT_BUCKET
    while size < length:
        size += max(8, (1 << (size.bit_length() - 1)) // 4)
    return size


def cache_bucket(length: int) -> int:
    """16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x between): ``plan``'s bound on the
    decoder's prompt slots (a prompt bucket, or a group's kept slots plus its own bucket)."""
    size = MIN_PROMPT_BUCKET
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= length:
                return candidate
        size *= 2


def _row_bucket(rows: int, ways: int) -> int:
    """Rows of a batch: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x between, as
    ``cache_bucket``), a multiple of the mesh's batch ways."""
    size = 1
    while size < rows and size * 3 // 2 < rows:
        size *= 2
    if size < rows:
        size = size * 3 // 2
    return max(ways, -(-size // ways) * ways)


# A prefill call costs about this many padded (row x token) positions besides its tokens
# (dispatch, the prefix's cache broadcast, the inserted rows' first tokens).
PREFILL_CALL_COST = 256


def prefill_chunks(lengths: Sequence[int], ways: int) -> list[tuple[int, int]]:
    """Split prompts sorted by length into consecutive runs [start, end), each one prefill of
    ``_row_bucket`` rows x the ``prompt_bucket`` of its longest, so that the padded work plus
    ``PREFILL_CALL_COST`` per run is least (one bucket for all would pad short prompts to the
    longest, and a dozen prompts to 16 rows)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[j]: least cost of the first j prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + _row_bucket(j - i, ways) * prompt_bucket(lengths[j - 1]) + PREFILL_CALL_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def _progress_bar(total: int, enabled: bool | None):
    show = enabled if enabled is not None else sys.stderr.isatty()
    if not show or total <= 1 or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="batch", leave=False)


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Chat-template and tokenise; strings become one user turn. Errors name the prompt."""
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], dict)):
        raise SamplingError("prompts must be a list of prompts (strings or chat message lists), not a single prompt")
    if len(prompts) == 0:
        raise SamplingError("no prompts: generate needs at least one")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SamplingError(f"prompt {i} is empty")
        elif not prompt:
            raise SamplingError(f"prompt {i} is an empty message list")
        else:
            for m in prompt:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise SamplingError(f"prompt {i}: each message must be a dict with 'role' and 'content', got {m!r}")
        out.append(tokenizer.encode(tokenizer.chat(prompt)))
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig = SamplingConfig(),
    *,
    progress: bool | None = None,
) -> GenerationOutput:
    """Sample ``config.n`` completions for each prompt (a user-message string or a list of
    chat messages), in the chat template with the generation prompt. See ``GenerationOutput``."""
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    stop_ids = config.stop_ids if config.stop_ids is not None else tuple(tokenizer.eos_ids)
    config = dataclasses.replace(config, stop_ids=tuple(int(i) for i in stop_ids))
    out = generate_ids(model, prompt_ids, config, progress=progress)
    stop = set(config.stop_ids)
    out.texts = [
        [tokenizer.decode([t for t in ids if t not in stop]) for ids in per_prompt] for per_prompt in out.token_ids
    ]
    return out


def generate_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    progress: bool | None = None,
) -> GenerationOutput:
    """``generate`` on already tokenised prompts (``config.stop_ids`` must be set); texts are empty."""
    if config.stop_ids is None or len(config.stop_ids) == 0:
        raise SamplingError("generate_ids needs config.stop_ids (e.g. tokenizer.eos_ids)")
    if len(prompt_ids) == 0:
        raise SamplingError("no prompts: generate needs at least one")
    c: LlamaConfig = model.config
    max_prompt = c.max_position_embeddings - config.max_new_tokens
    if config.max_prompt_tokens is not None:
        max_prompt = min(max_prompt, config.max_prompt_tokens)
    if max_prompt < 1:
        raise SamplingError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {c.max_position_embeddings} positions"
        )
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise SamplingError(f"prompt {i} has no tokens")
        if len(ids) > max_prompt:
            raise SamplingError(
                f"prompt {i} has {len(ids)} tokens, more than the limit of {max_prompt} "
                f"(max_prompt_tokens, or the model's {c.max_position_embeddings} positions minus max_new_tokens)"
            )
        bad = [t for t in ids if not 0 <= int(t) < c.vocab_size]
        if bad:
            raise SamplingError(f"prompt {i}: token id {bad[0]} is outside the vocabulary of {c.vocab_size}")
    for t in config.stop_ids:
        if not 0 <= int(t) < c.vocab_size:
            raise SamplingError(f"stop id {t} is outside the vocabulary of {c.vocab_size}")

    mesh: Mesh = model.mesh
    ways = mesh_lib.batch_ways(mesh)
    programs = programs_for(model)
    candidates = _needs_candidates(config, c.vocab_size)
    new_capacity = -(-config.max_new_tokens // NEW_TOKENS_ROUNDING) * NEW_TOKENS_ROUNDING
    n_prompts = len(prompt_ids)
    put = functools.partial(mesh_lib.put_batch, mesh)
    settings = Settings(
        seed=jnp.uint32(config.seed % 2**32),
        max_new=jnp.int32(config.max_new_tokens),
        min_new=jnp.int32(config.min_new_tokens),
        temperature=jnp.float32(config.temperature if not config.greedy else 1.0),
        top_p=jnp.float32(config.top_p),
        top_k=jnp.int32(config.top_k),
        stop_ids=jnp.asarray(config.stop_ids, jnp.int32),
    )
    weights = programs.prepare(model.params)
    C, prefix, prefix_mask = _shared_prefix(programs, model, prompt_ids, ways)
    suffixes = [ids[C:] for ids in prompt_ids]
    group, group_len = prefix_groups(suffixes)
    members = collections.defaultdict(list)
    for p in range(n_prompts):
        members[group[p]].append(p)
    own_len = [len(suffixes[p]) - group_len[p] for p in range(n_prompts)]  # prefilled per prompt

    # Rows (prompt, sample) wait group by group, in order of prompt length, so each refill
    # prefills tight buckets and a group's prefix cache lives while its rows are placed.
    group_rank = {g: (min(own_len[p] for p in ps), ps[0]) for g, ps in members.items()}
    order = sorted(range(n_prompts), key=lambda i: (group_rank[group[i]], own_len[i], i))
    waiting = collections.deque((p, s) for p in order for s in range(config.n))
    B = min(_row_bucket(len(waiting), ways), -(-config.batch_size // ways) * ways)
    P = prompt_bucket(max(map(len, suffixes)))  # each row's prompt slots hold its real tokens only
    unplaced = collections.Counter(group[p] for p, _ in waiting)
    group_caches: dict[int, tuple] = {}
    refill_at = max(1, B // REFILL_FRACTION)
    pool = programs.empty(B, P, P + new_capacity, new_capacity)
    slot_row: list[tuple[int, int] | None] = [None] * B

    token_ids: list[list[list[int]]] = [[[] for _ in range(config.n)] for _ in range(n_prompts)]
    logprobs: list[list[list[float]]] = [[[] for _ in range(config.n)] for _ in range(n_prompts)]
    finish: list[list[str]] = [[FINISH_LENGTH] * config.n for _ in range(n_prompts)]

    def refill(pool, rows, where):
        """Prefill the prompts of ``rows`` (each distinct prompt once; group by group, in runs of
        like length: ``prefill_chunks``) and put the rows in slots ``where``."""
        slot = dict(zip(rows, where))
        for g in dict.fromkeys(group[p] for p, _ in rows):
            unique = sorted({p for p, _ in rows if group[p] == g}, key=lambda p: (own_len[p], p))
            for start, end in prefill_chunks([own_len[p] for p in unique], ways):
                run = set(unique[start:end])
                mine = [row for row in rows if row[0] in run]
                pool = refill_run(pool, g, unique[start:end], mine, [slot[row] for row in mine])
                unplaced[g] -= len(mine)
            if unplaced[g] == 0:
                group_caches.pop(g, None)
        return pool

    def refill_run(pool, g, unique, rows, where):
        G = group_len[unique[0]]
        Pn = prompt_bucket(max(own_len[p] for p in unique))
        Bp = _row_bucket(len(unique), ways)
        tokens, positions, mask = _left_padded([suffixes[p][G:] for p in unique], Bp, Pn, start=C + G)
        if g not in group_caches:  # ungrouped prompts read the call's prefix and keep none of it
            group_caches[g] = (_group_prefix(programs, model, prompt_ids[unique[0]], C, G, ways) if G
                               else (prefix, prefix_mask, 0, np.zeros(0, bool)))
        group_cache, group_mask, keep, own = group_caches[g]
        last_hidden, cache = programs.prefill_after(model.params, group_cache, group_mask, put(tokens),
                                                    put(positions), put(mask), keep=keep)
        packing, packed_mask = _packed_slots(np.concatenate([np.broadcast_to(own, (Bp, keep)), mask], axis=1), P)
        N = _row_bucket(len(rows), 1)
        fields = np.zeros((5, N), np.int32)  # slot, prefill row, prompt length, prompt index, sample index
        fields[0] = B  # padding entries go nowhere
        row_of = {p: j for j, p in enumerate(unique)}
        for r, ((p, s), b) in enumerate(zip(rows, where)):
            fields[:, r] = (b, row_of[p], len(prompt_ids[p]), p, s)
        return programs.insert(weights, pool, last_hidden, cache, put(packing), put(packed_mask),
                               *(mesh_lib.put_replicated(mesh, f) for f in fields),
                               settings, greedy=config.greedy, candidates=candidates)

    bar = _progress_bar(len(waiting), progress)
    try:
        while waiting or any(r is not None for r in slot_row):
            free = [b for b, r in enumerate(slot_row) if r is None]
            if waiting and free and (len(free) >= refill_at or len(free) == B):
                rows = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                pool = refill(pool, rows, free)
                for b, row in zip(free, rows):
                    slot_row[b] = row
            size = len(slot_row)  # B, or less once the pool has shrunk
            stop_at = refill_at if waiting else size // 2 if size > MIN_SHRUNK_POOL else size + 1
            pool = programs.decode(weights, prefix, prefix_mask, pool, settings, jnp.int32(stop_at),
                                   greedy=config.greedy, candidates=candidates)
            step, done, stopped = mesh_lib.fetch((pool.step, pool.done, pool.stopped))
            finished = [b for b, r in enumerate(slot_row) if r is not None and done[b]]
            if finished:
                out_tokens, out_logprobs = mesh_lib.fetch((pool.out_tokens, pool.out_logprobs))
                for b in finished:
                    (p, s), n = slot_row[b], int(step[b])
                    token_ids[p][s] = out_tokens[b, :n].tolist()
                    logprobs[p][s] = out_logprobs[b, :n].tolist()
                    finish[p][s] = FINISH_STOP if stopped[b] else FINISH_LENGTH
                    slot_row[b] = None
                if bar is not None:
                    bar.update(len(finished))
            live = [b for b, r in enumerate(slot_row) if r is not None]
            if not waiting and live and size > MIN_SHRUNK_POOL and len(live) <= size // 2:
                size = max(_row_bucket(len(live), ways), min(MIN_SHRUNK_POOL, size // 2))
                dead = next(b for b, r in enumerate(slot_row) if r is None)  # done: pads compute, record nothing
                keep = live + [dead] * (size - len(live))
                pool = programs.compact(pool, mesh_lib.put_replicated(mesh, np.asarray(keep, np.int32)))
                slot_row = [slot_row[b] for b in live] + [None] * (size - len(live))
    finally:
        del weights, pool
        if bar is not None:
            bar.close()

    return GenerationOutput(
        texts=[[""] * config.n for _ in range(n_prompts)],
        token_ids=token_ids,
        logprobs=logprobs,
        lengths=[[len(t) for t in per] for per in token_ids],
        finish_reasons=finish,
        prompt_lengths=[len(ids) for ids in prompt_ids],
    )


def _packed_slots(mask: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """For prefill rows' cache masks [rows, W] (a group prefix's kept slots, then the row's own
    left-padded bucket): the indices [rows, P] of each row's real slots, right-aligned, and where
    they are real. The padding in between costs no decode slots (keys carry their positions)."""
    packing = np.zeros((len(mask), P), np.int32)
    packed = np.zeros((len(mask), P), bool)
    for j, row in enumerate(mask):
        real = np.flatnonzero(row)
        packing[j], packed[j, P - len(real):] = real[0], True  # unused slots read a real one, masked
        packing[j, P - len(real):] = real
    return packing, packed


def _left_padded(sequences: Sequence[Sequence[int]], rows: int, width: int, start: int = 0):
    """tokens, positions, mask [rows, width] of prefill input: each sequence right-aligned, its
    positions counted from ``start``; rows past the sequences hold one dummy token (a finite softmax)."""
    tokens = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    mask[len(sequences):, width - 1] = True
    for j, ids in enumerate(sequences):
        tokens[j, width - len(ids):] = ids
        positions[j, width - len(ids):] = np.arange(start, start + len(ids))
        mask[j, width - len(ids):] = True
    return tokens, positions, mask


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every prompt in common, leaving each prompt at least one of its own
    (whose prefill gives the first generated token)."""
    limit = min(len(ids) for ids in prompt_ids) - 1
    return min([limit] + [_common_length(prompt_ids[0], ids) for ids in prompt_ids[1:]])


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(suffixes: Sequence[Sequence[int]], min_length: int = MIN_GROUP_PREFIX) -> tuple[list[int], list[int]]:
    """Groups of prompts that share a further prefix (after the call's shared one): the
    meta-judge's calls for one response share its question, response and rubric. Returns per
    prompt its group id (-1: none, the prompts prefilled after the call's prefix alone) and the
    group prefix's length (0: none; else at least ``min_length``, leaving each prompt at least
    one token of its own).

    Prompts are sorted; a run grows while the next prompt shares at least ``min_length`` tokens
    with it, joining does not shrink the run's total of shared tokens, and a run of one is not
    left for a prompt that shares twice as much with the next one."""
    order = sorted(range(len(suffixes)), key=lambda i: (list(suffixes[i]), i))
    runs: list[tuple[list[int], int]] = []  # (members, common length)
    for at, i in enumerate(order):
        if runs:
            members, common = runs[-1]
            shared = min(common, _common_length(suffixes[members[0]], suffixes[i]))
            following = _common_length(suffixes[i], suffixes[order[at + 1]]) if at + 1 < len(order) else 0
            if shared >= min_length and shared * len(members) >= common * (len(members) - 1) and (
                    len(members) > 1 or following < 2 * shared):
                runs[-1] = (members + [i], shared)
                continue
        runs.append(([i], len(suffixes[i])))
    group, length = [0] * len(suffixes), [0] * len(suffixes)
    for g, (members, common) in enumerate(runs):
        G = min([common] + [len(suffixes[i]) - 1 for i in members]) if len(members) > 1 else 0
        for i in members:
            group[i], length[i] = (g, G) if G >= min_length else (-1, 0)
    return group, length


def _group_prefix(programs: Programs, model, prompt_ids, C: int, G: int, ways: int):
    """The cache of a group's prefix (its first C + G tokens, right-aligned in a prompt bucket), its
    mask, how many trailing slots hold the group's own part (a bucket of G) and their mask."""
    width = prompt_bucket(C + G)
    tokens, positions, mask = _left_padded([prompt_ids[:C + G]] * ways, ways, width)
    put = functools.partial(mesh_lib.put_batch, model.mesh)
    _, cache = programs.prefill(model.params, put(tokens), put(positions), put(mask))
    keep = _kept_slots(C, G)
    own = np.arange(width - keep, width) >= width - G  # the group's tokens, not the call's prefix
    return cache, mesh_lib.put_replicated(model.mesh, mask[0]), keep, own


def _kept_slots(C: int, G: int) -> int:
    """Slots of a group prefix's cache that its rows keep: a bucket of its own G tokens (0: no group)."""
    return min(prompt_bucket(G), prompt_bucket(C + G)) if G else 0


def _shared_prefix(programs: Programs, model, prompt_ids, ways: int):
    """The common prefix's length C and cache, prefilled once: a KVCache [L, ways, Cb, Kh, D] (each
    row the same) with the prefix right-aligned in Cb slots, and its mask [Cb]."""
    c: LlamaConfig = model.config
    C = shared_prefix_length(prompt_ids)
    Cb = prompt_bucket(C)
    tokens, positions, mask = _left_padded([prompt_ids[0][:C]] * ways, ways, Cb)
    if C == 0:
        shape = (c.num_layers, ways, Cb, c.num_kv_heads, c.head_dim)
        sharding = mesh_lib.named_sharding(model.mesh, KV_CACHE_AXES, shape)
        prefix = KVCache(*(mesh_lib.put(np.zeros(shape, model.dtype), sharding) for _ in range(2)))
    else:
        put = functools.partial(mesh_lib.put_batch, model.mesh)
        _, cache = programs.prefill(model.params, put(tokens), put(positions), put(mask))
        prefix = cache  # every row holds the prefix; the programs read row 0
    return C, prefix, mesh_lib.put_replicated(model.mesh, mask[0])


@functools.lru_cache(maxsize=None)
def _candidate_logprobs_program(config: LlamaConfig):
    def run(params, last_hidden, candidate_ids):
        logits = last_hidden.astype(jnp.float32) @ unembedding(params, config).astype(jnp.float32)
        return jnp.take(jax.nn.log_softmax(logits, axis=-1), candidate_ids, axis=-1)

    return jax.jit(run)


def next_token_logprobs(
    model, prompt_ids: Sequence[Sequence[int]], candidate_ids: Sequence[int], batch_size: int = 32
) -> np.ndarray:
    """log p(candidate | text) [n, len(candidate_ids)] of the token after each already tokenised
    text, under the unmodified model distribution. What the expected judge score and the expected
    meta-judge verdict read. As in ``generate``, the texts' shared prefix and group prefixes are
    prefilled once; each text's rest is prefilled after their caches, bucketed like ``generate``."""
    c: LlamaConfig = model.config
    if len(prompt_ids) == 0:
        return np.zeros((0, len(candidate_ids)), np.float32)
    for i, ids in enumerate(prompt_ids):
        if not 0 < len(ids) <= c.max_position_embeddings:
            raise SamplingError(f"text {i} has {len(ids)} tokens; it needs 1..{c.max_position_embeddings}")
    mesh: Mesh = model.mesh
    ways = mesh_lib.batch_ways(mesh)
    programs = programs_for(model)
    score = _candidate_logprobs_program(c)
    candidates = jnp.asarray(list(candidate_ids), jnp.int32)
    out = np.zeros((len(prompt_ids), len(candidate_ids)), np.float32)
    put = functools.partial(mesh_lib.put_batch, mesh)
    C, prefix, prefix_mask = _shared_prefix(programs, model, prompt_ids, ways)
    suffixes = [ids[C:] for ids in prompt_ids]
    group, group_len = prefix_groups(suffixes)
    for g in sorted(set(group)):
        members = sorted((i for i in range(len(prompt_ids)) if group[i] == g), key=lambda i: (len(suffixes[i]), i))
        G = group_len[members[0]]
        cache, mask_of_cache = _group_prefix(programs, model, prompt_ids[members[0]], C, G, ways)[:2] if G else (
            prefix, prefix_mask)
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            tokens, positions, mask = _left_padded([suffixes[i][G:] for i in rows], _row_bucket(len(rows), ways),
                                                   prompt_bucket(max(len(suffixes[i]) - G for i in rows)), start=C + G)
            last_hidden, _ = programs.prefill_after(model.params, cache, mask_of_cache, put(tokens), put(positions),
                                                    put(mask))
            out[rows] = mesh_lib.fetch(score(model.params, last_hidden, candidates))[: len(rows)]
    return out


__all__ = [
    "GenerationOutput",
    "SamplingConfig",
    "SamplingError",
    "generate",
    "generate_ids",
    "next_token_logprobs",
    "prompt_bucket",
    "programs_for",
    "sample_logits",
    "tokenize_prompts",
]
