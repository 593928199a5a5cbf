"""The device side of the sampler: jitted programs over a pool of decode slots.

Each program is a module-level ``jax.jit`` whose static ``module`` (the model's ``Llama``, with its
config, compute dtype and mesh) picks the compiled version:

* ``prepare``: the decode step's view of the weights (once per ``generate`` call);
* ``prefill`` / ``prefill_after``: the model's own forward over prompts, alone or after a shared
  prefix's cache, returning the last hidden state and the keys/values;
* ``empty_pool``, ``pack_rows``, ``first_tokens``, ``insert``: a ``SlotPool`` of decode slots; prefilled
  rows' caches in the decode layout, their first tokens, and the rows put into free slots. Three
  programs, not one, because each compiles per fewer shapes: ``pack_rows`` per prefill shape and
  rows (cheap to compile), ``first_tokens`` per rows (the top-p sampler takes about a second to
  compile), ``insert`` per pool shape and rows (a scatter per layer);
* ``decode``: a ``lax.while_loop`` of decode steps over the pool until enough slots are free;
* ``compact``: some slots of a pool gathered into a smaller one;
* ``probe``: for finished rows, the next-token log-probs after their text (cut, then a few more
  tokens): the expected judge score or meta-judge verdict, read from the rows' own caches.

Sampling parameters are arrays (``SampleParams``), so a handful of programs serve a call; the host
side (which rows go where, and when) is ``mrjax.sampling.scheduler``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from mrjax import mesh as mesh_lib
from mrjax.model.decode import (DECODE_K_AXES, DECODE_V_AXES, decode_logits, decode_step, decode_weights,
                                prefix_decode_layout, to_decode_layout)
from mrjax.model.llama import KV_CACHE_AXES, KVCache
from mrjax.sampling.sample import SampleParams, pick


@struct.dataclass
class SlotPool:
    """The decoder's rows (one row = one sample of one prompt), every array [B, ...].

    A row's own cache holds its prompt's tokens after the shared prefix (its group prefix's, then its
    own), packed right-aligned in the first ``P`` slots (``prompt_mask`` marks them), then the tokens
    it generates. ``step`` counts the tokens generated so far; ``done`` rows (and empty slots) compute
    but record nothing until the host refills them.
    """

    caches: list  # per layer (keys [B, Kh, D, S], values [B, Kh, S, D]): the decode layout
    prompt_mask: jax.Array  # [B, P]
    prompt_len: jax.Array  # [B] full prompt length (the position of the first generated token)
    prompt_index: jax.Array  # [B] the prompt's index in the caller's list (for the row's random key)
    sample_index: jax.Array  # [B]
    token: jax.Array  # [B] the last generated token
    step: jax.Array  # [B]
    done: jax.Array  # [B]
    stopped: jax.Array  # [B] ended by an end-of-turn id
    out_tokens: jax.Array  # [B, new_capacity]
    out_logprobs: jax.Array  # [B, new_capacity]

    @property
    def rows(self) -> int:
        return self.prompt_mask.shape[0]


def _batch_axes(x) -> tuple:
    return ("batch",) + (None,) * (x.ndim - 1)


@functools.partial(jax.jit, static_argnames=("module",))
def prepare(module, params):
    """The decode step's weights: per layer, [out, in], in the compute dtype."""
    return decode_weights(params, module.config, module.dtype, module.mesh)


@functools.partial(jax.jit, static_argnames=("module",))
def prefill(module, params, tokens, positions, mask):
    """Prompts ``tokens`` [Bp, P] (left-padded; ``mask`` [Bp, Pc], Pc >= P the cache length) ->
    the last hidden state [Bp, E] and the KV cache [L, Bp, Pc, Kh, D]."""
    B, cache_len = mask.shape
    cache = KVCache(*(mesh_lib.constrain(t, module.mesh, KV_CACHE_AXES)
                      for t in KVCache.zeros(module.config, B, cache_len, module.dtype)))
    hidden, cache = module.apply({"params": params}, tokens, positions, mask, cache, jnp.int32(0), return_hidden=True)
    return hidden[:, -1], cache


@functools.partial(jax.jit, static_argnames=("module", "keep"))
def prefill_after(module, params, prefix, prefix_mask, tokens, positions, mask, *, keep: int = 0):
    """Prompt suffixes ``tokens`` [Bp, P] (left-padded) after a prefix's cache ``prefix`` [L, any, C, Kh, D]
    (row 0 is read; ``prefix_mask`` [C]) -> the last hidden state and the cache of the suffixes, after
    the prefix's last ``keep`` slots (a group prefix's own part)."""
    L = module.config.num_layers
    B, P = tokens.shape
    C = prefix_mask.shape[0]
    full_mask = jnp.concatenate([jnp.broadcast_to(prefix_mask[None], (B, C)), mask], axis=1)
    cache = KVCache(*(
        mesh_lib.constrain(jnp.pad(jnp.broadcast_to(t[:, :1], (L, B) + t.shape[2:]), ((0, 0), (0, 0), (0, P), (0, 0), (0, 0))),
                           module.mesh, KV_CACHE_AXES)
        for t in prefix
    ))
    hidden, cache = module.apply({"params": params}, tokens, positions, full_mask, cache, jnp.int32(C),
                                 return_hidden=True)
    return hidden[:, -1], KVCache(cache.k[:, :, C - keep:], cache.v[:, :, C - keep:])


@functools.partial(jax.jit, static_argnames=("module", "rows", "prompt_slots", "cache_slots", "new_capacity"))
def empty_pool(module, *, rows: int, prompt_slots: int, cache_slots: int, new_capacity: int) -> SlotPool:
    """A pool of ``rows`` empty (done) slots, each with ``cache_slots`` cache positions of which the first
    ``prompt_slots`` hold its prompt, and room for ``new_capacity`` generated tokens."""
    c, mesh = module.config, module.mesh

    def zeros(shape, dtype=jnp.int32):
        return mesh_lib.constrain(jnp.zeros(shape, dtype), mesh, ("batch",) + (None,) * (len(shape) - 1))

    caches = [
        (mesh_lib.constrain(jnp.zeros((rows, c.num_kv_heads, c.head_dim, cache_slots), module.dtype), mesh, DECODE_K_AXES),
         mesh_lib.constrain(jnp.zeros((rows, c.num_kv_heads, cache_slots, c.head_dim), module.dtype), mesh, DECODE_V_AXES))
        for _ in range(c.num_layers)
    ]
    pool = SlotPool(
        caches=caches, prompt_mask=zeros((rows, prompt_slots), bool), prompt_len=zeros((rows,)),
        prompt_index=zeros((rows,)), sample_index=zeros((rows,)), token=zeros((rows,)), step=zeros((rows,)),
        done=jnp.ones((rows,), bool), stopped=zeros((rows,), bool), out_tokens=zeros((rows, new_capacity)),
        out_logprobs=zeros((rows, new_capacity), jnp.float32),
    )
    if mesh is not None and mesh.size == 1:
        # On the mesh, as ``decode`` returns the pool: else ``insert`` compiles twice, for the empty pool
        # (one device's arrays) and for the pool after decoding (the mesh's).
        pool = jax.lax.with_sharding_constraint(pool, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return pool


@jax.jit
def pack_rows(last_hidden, cache, packing, packed_mask, row_prompt):
    """Rows ``row_prompt`` [N] of a prefill (last hidden states [Bp, E], caches [L, Bp, W, Kh, D]), ready
    for ``first_tokens`` and ``insert``: their last hidden states [N, E], their real cache slots (prefill
    row j's are ``packing[j]`` [P] where ``packed_mask[j]`` [P]) in the decode layout (keys
    [L, N, Kh, D, P], values [L, N, Kh, P, D]; every layer at once) and their prompt masks [N, P]."""
    packing = jnp.take(packing, row_prompt, axis=0)[None, :, :, None, None]
    k = jnp.take_along_axis(jnp.take(cache.k, row_prompt, axis=1), packing, axis=2)  # [L, N, P, Kh, D]
    v = jnp.take_along_axis(jnp.take(cache.v, row_prompt, axis=1), packing, axis=2)
    k, v = to_decode_layout(k, v)
    return jnp.take(last_hidden, row_prompt, axis=0), k, v, jnp.take(packed_mask, row_prompt, axis=0)


@functools.partial(jax.jit, static_argnames=("greedy", "candidates"))
def first_tokens(weights, hidden, prompt_index, sample_index, params: SampleParams, *, greedy: bool, candidates: int):
    """The first token (and its log-prob) of rows with last hidden states ``hidden`` [N, E]."""
    return pick(decode_logits(weights, hidden.astype(jnp.float32).T), jnp.zeros_like(prompt_index), prompt_index,
                sample_index, params, greedy, candidates)


@functools.partial(jax.jit, donate_argnames=("pool",))
def insert(pool: SlotPool, k, v, prompt_mask, where, prompt_len, prompt_index, sample_index, token, logprob,
           params: SampleParams) -> SlotPool:
    """Rows (``pack_rows``' caches and prompt masks, ``first_tokens``' first ``token`` and ``logprob``, all
    [N, ...]) go to slots ``where`` [N] (B = none)."""
    P, S = pool.prompt_mask.shape[1], pool.caches[0][0].shape[-1]
    # The slots after the prompt's hold the generated tokens; one scatter per layer into the pool.
    k = jnp.pad(k, ((0, 0),) * 4 + ((0, S - P),))
    v = jnp.pad(v, ((0, 0),) * 3 + ((0, S - P), (0, 0)))
    caches = [(ck.at[where].set(k[i], mode="drop"), cv.at[where].set(v[i], mode="drop"))
              for i, (ck, cv) in enumerate(pool.caches)]
    stopped = jnp.isin(token, params.stop_ids)
    put = lambda a, x: a.at[where].set(x, mode="drop")  # noqa: E731
    return SlotPool(
        caches=caches,
        prompt_mask=put(pool.prompt_mask, prompt_mask),
        prompt_len=put(pool.prompt_len, prompt_len), prompt_index=put(pool.prompt_index, prompt_index),
        sample_index=put(pool.sample_index, sample_index), token=put(pool.token, token),
        step=put(pool.step, jnp.ones_like(token)), done=put(pool.done, stopped | (params.max_new <= 1)),
        stopped=put(pool.stopped, stopped),
        out_tokens=put(pool.out_tokens, jnp.zeros((len(token), pool.out_tokens.shape[1]), jnp.int32).at[:, 0].set(token)),
        out_logprobs=put(pool.out_logprobs,
                         jnp.zeros((len(token), pool.out_logprobs.shape[1])).at[:, 0].set(logprob)),
    )


@functools.partial(jax.jit, static_argnames=("module", "greedy", "candidates"), donate_argnames=("pool",))
def decode(module, weights, prefix, prefix_mask, pool: SlotPool, params: SampleParams, refill_at, *, greedy: bool,
           candidates: int) -> SlotPool:
    """Decode steps of the whole pool until every row is done, or until ``refill_at`` slots are free
    (done), so that the host can refill them. The loop carries the pool itself (its caches updated in
    place)."""
    config = module.config
    B, P = pool.prompt_mask.shape
    rows = jnp.arange(B)
    gen_ids = jnp.arange(pool.caches[0][0].shape[-1] - P, dtype=jnp.int32)
    shared = (prefix_decode_layout(prefix, config.num_layers), prefix_mask)  # read by every row

    def cond(pool: SlotPool):
        return (jnp.sum(pool.done) < refill_at) & ~jnp.all(pool.done)

    def body(pool: SlotPool):
        step, done = pool.step, pool.done
        slots = jnp.where(done, P + len(gen_ids), P + step - 1)  # where the previous token's keys and values go
        allowed = jnp.concatenate([pool.prompt_mask, gen_ids[None] <= (step - 1)[:, None]], axis=1)
        logits, caches = decode_step(weights, config, pool.token, pool.prompt_len + step - 1, pool.caches, allowed,
                                     slots, shared)
        new_token, logprob = pick(logits, step, pool.prompt_index, pool.sample_index, params, greedy, candidates)
        record = jnp.where(done, pool.out_tokens.shape[1], step)  # finished rows record nothing
        hit_stop = ~done & jnp.isin(new_token, params.stop_ids)
        step = step + (~done).astype(jnp.int32)
        return pool.replace(
            caches=caches, token=jnp.where(done, pool.token, new_token), step=step,
            done=done | hit_stop | (step >= params.max_new), stopped=pool.stopped | hit_stop,
            out_tokens=pool.out_tokens.at[rows, record].set(new_token, mode="drop"),
            out_logprobs=pool.out_logprobs.at[rows, record].set(logprob, mode="drop"),
        )

    return jax.lax.while_loop(cond, body, pool)


@functools.partial(jax.jit, static_argnames=("module",))
def compact(module, pool: SlotPool, keep) -> SlotPool:
    """The pool of slots ``keep`` [B'], in that order."""
    take = lambda a, names: mesh_lib.constrain(jnp.take(a, keep, axis=0), module.mesh, names)  # noqa: E731
    fields = {name: take(getattr(pool, name), _batch_axes(getattr(pool, name)))
              for name in SlotPool.__dataclass_fields__ if name != "caches"}
    return SlotPool(caches=[(take(k, DECODE_K_AXES), take(v, DECODE_V_AXES)) for k, v in pool.caches], **fields)


@functools.partial(jax.jit, static_argnames=("module",))
def probe(module, weights, prefix, prefix_mask, pool: SlotPool, where, keep, feed, feed_len, candidate_ids):
    """log p(candidate | text) [N, K] for finished rows ``where`` [N], whose text is the row's prompt, its
    first ``keep`` [N] generated tokens (still in its cache) and then ``feed`` [N, T] (``feed_len`` [N] real
    tokens, each row at least one): what an expected score or verdict reads, without prefilling the
    prompt again. Works on a copy of the rows' caches; the pool is left as it is."""
    config = module.config
    take = lambda a, names: mesh_lib.constrain(jnp.take(a, where, axis=0), module.mesh, names)  # noqa: E731
    caches = [(take(k, DECODE_K_AXES), take(v, DECODE_V_AXES)) for k, v in pool.caches]
    prompt_mask = take(pool.prompt_mask, ("batch", None))
    prompt_len = take(pool.prompt_len, ("batch",))
    N, P = prompt_mask.shape
    gen_ids = jnp.arange(caches[0][0].shape[-1] - P, dtype=jnp.int32)
    shared = (prefix_decode_layout(prefix, config.num_layers), prefix_mask)

    def body(j, state):
        caches, out = state
        allowed = jnp.concatenate([prompt_mask, gen_ids[None] <= (keep + j)[:, None]], axis=1)
        logits, caches = decode_step(weights, config, feed[:, j], prompt_len + keep + j, caches, allowed, P + keep + j,
                                     shared)
        read = jnp.take(jax.nn.log_softmax(logits, axis=-1), candidate_ids, axis=-1)
        return caches, jnp.where((j == feed_len - 1)[:, None], read, out)

    out = jnp.zeros((N, candidate_ids.shape[0]), jnp.float32)
    return jax.lax.fori_loop(0, feed.shape[1], body, (caches, out))[1]


# Every program, by name (to count compilations).
PROGRAMS = {"prepare": prepare, "prefill": prefill, "prefill_after": prefill_after, "empty_pool": empty_pool,
            "pack_rows": pack_rows, "first_tokens": first_tokens, "insert": insert, "decode": decode,
            "compact": compact, "probe": probe}
