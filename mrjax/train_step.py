"""Jitted, sharded DPO and SFT steps: the numeric core of training (arrays in, arrays out).

    from mrjax.train_step import dpo_loss
    loss, metrics = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps, ref_rejected_logps,
                             beta=0.1, loss_type="sigmoid", label_smoothing=0.0)

A batch is a dict of arrays with a leading micro-batch axis ``A`` (gradient
accumulation runs as a ``lax.scan`` over it inside one jitted step). Every
example is laid out as two segments (built by ``mrjax.data``):

- ``prefix_*`` [A, b, P]: the prompt without its last token, **left**-padded;
- ``tokens``/``positions``/``mask``/``targets`` [A, b*r, C]: the last prompt token
  followed by the completion, **right**-padded. ``targets`` is the next token,
  ``mask`` marks real completion targets, so a sequence log-prob is a masked sum
  over this segment only (the prompt is never scored).

Optionally ``shared_*`` [A, S]: a prompt prefix common to every row of the
micro-batch (the judge rubric of judge-format rows), left-padded; the rows'
``prefix_*`` then hold only the rest of their prompts. The step runs it once per
micro-batch and every row continues from a copy of its KV cache: the same loss
and gradients as running it in every row, at a fraction of the prompt's cost.

``r`` is the number of completions per prompt: 2 for DPO (rows interleaved
chosen, rejected, chosen, ...), 1 for SFT. With ``share_prompt`` a DPO step runs
each prompt once and both completions from its KV cache (so the prompt costs
half); otherwise the prefix is repeated and prepended, the textbook concatenated
forward. Log-probs come from the final hidden states and the output matrix a
sequence chunk at a time, so the [rows, C, vocab] float32 logits exist whole only
when they fit ``max_logits_mb``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mrjax.config import LOSS_TYPES
from mrjax.mesh import batch_ways, named_sharding, put
from mrjax.model.llama import KVCache, mixed_matmul, pack, packing, unembedding, unpack

DPO_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


# ---------------------------------------------------------------- DPO loss


def dpo_losses(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-pair DPO losses [B] (the mean is ``dpo_loss``'s loss).

    Δ = (π_c − ref_c) − (π_r − ref_r); β multiplies Δ exactly once:
      sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε = label_smoothing)
      ipo:     (Δ − 1/(2β))²                      (β is IPO's τ; pass length-normalised log-probs)
      hinge:   max(0, 1 − βΔ)
    """
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - label_smoothing * jax.nn.log_sigmoid(
            -beta * delta
        )
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def dpo_loss(
    policy_chosen_logps: Any,
    policy_rejected_logps: Any,
    ref_chosen_logps: Any,
    ref_rejected_logps: Any,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean DPO loss over pairs and the metrics TRL logs (means over pairs).

    Inputs are sequence log-probs [B] (sums over completion tokens). Rewards are
    β·(π − ref); ``rewards/accuracies`` counts chosen reward > rejected reward (ties lose).
    """
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen_logps, policy_rejected_logps,
                                                            ref_chosen_logps, ref_rejected_logps))
    losses = dpo_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    per_pair = dpo_pair_metrics(losses, beta * (pc - rc), beta * (pr - rr), pc, pr)
    metrics = {name: jnp.mean(value) for name, value in per_pair.items()}
    return metrics["loss"], metrics


def dpo_pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, jax.Array]:
    """The ``DPO_METRICS``, per pair [B] (callers take the mean or a weighted sum)."""
    values = (losses, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).astype(jnp.float32),
              chosen_rewards - rejected_rewards, chosen_logps, rejected_logps)
    return dict(zip(DPO_METRICS, values))


# ---------------------------------------------------------------- log-probs


def logits_chunk(rows: int, length: int, vocab: int, max_logits_mb: int) -> int:
    """Sequence chunk (a divisor of ``length``) so one f32 [rows, chunk, vocab] block fits the budget."""
    budget = max_logits_mb * 2**20
    for chunk in range(length, 0, -1):
        if length % chunk == 0 and rows * chunk * vocab * 4 <= budget:
            return chunk
    return 1


@jax.custom_vjp
def _gradient_kept_apart(w: jax.Array) -> jax.Array:
    """``w``, whose gradient XLA may not fold into the product that makes it. A tied unembedding is
    the embedding's transpose: folded, its bfloat16 gradient product becomes one with a transposed
    operand, which XLA:CPU's fast matmuls do not take (and its plain dot refuses in bfloat16)."""
    return w


_gradient_kept_apart.defvjp(lambda w: (w, None), lambda _, g: (jax.lax.optimization_barrier(g),))


def token_logps(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, chunk: int,
                split_weights: bool = False) -> jax.Array:
    """log p(targets) [N, C] from final hidden states [N, C, E] and the output matrix [E, V].

    Chunked over the sequence; each chunk's logits are recomputed in the backward
    pass (``jax.checkpoint``), so peak memory holds one chunk of logits. Float32 logits; from
    bfloat16 hidden states they are the layers' ``mixed_matmul`` (its backward in bfloat16 too).
    """
    n, length, embed = hidden.shape

    def chunk_logps(h, t):
        if h.dtype == jnp.bfloat16:
            logits = mixed_matmul(h.reshape(-1, embed), _gradient_kept_apart(unembed), split_weights)
            logits = logits.reshape(*h.shape[:2], -1)
        else:
            logits = jnp.einsum("nce,ev->ncv", h, unembed.astype(h.dtype), preferred_element_type=jnp.float32)
        # take_along_axis measured faster on CPU than a one-hot masked sum (its backward fuses better).
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target_logit - jax.nn.logsumexp(logits, axis=-1)

    if chunk >= length:
        return chunk_logps(hidden, targets)
    pieces = length // chunk
    h = hidden.reshape(n, pieces, chunk, embed).swapaxes(0, 1)
    t = targets.reshape(n, pieces, chunk).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda ht: chunk_logps(*ht)), (h, t))
    return out.swapaxes(0, 1).reshape(n, length)


def training_cache_dtype(dtype: Any) -> Any:
    """The dtype of a training step's KV caches (the shared prefix's, the prompts'): float32 on XLA:CPU,
    which widens a bfloat16 dynamic-update-slice to float32 over its whole buffer, so the layer loop's
    writes of each layer's bfloat16 keys into the stacked cache would copy every layer's at every layer.
    bfloat16 keys and values are exact in float32, and attention reads them back in ``dtype``."""
    return jnp.float32 if jax.default_backend() == "cpu" else dtype


def concatenated_slots(prefix_slots: jax.Array, slots: jax.Array, rows: int, prefix_len: int, length: int,
                       repeats: int) -> jax.Array:
    """The real-token slots of the prompt-then-completion rows [rows*repeats, P+C] (each prompt repeated
    for its completions), from those of the prefix [rows, P] and completion [rows*repeats, C] segments
    (``mrjax.data.make_batch``'s ``prefix_slots``, ``slots``: [S, n], flat within each of S shards)."""
    local = rows // prefix_slots.shape[0]  # prompt rows per shard
    width, spare = prefix_len + length, local * repeats * (prefix_len + length)
    row, col = prefix_slots // prefix_len, prefix_slots % prefix_len
    from_prefix = ((row * repeats)[..., None] + jnp.arange(repeats)) * width + col[..., None]
    from_prefix = jnp.where((prefix_slots < local * prefix_len)[..., None], from_prefix, spare)
    from_completion = (slots // length) * width + prefix_len + slots % length
    from_completion = jnp.where(slots < local * repeats * length, from_completion, spare)
    return jnp.concatenate([from_prefix.reshape(from_prefix.shape[0], -1), from_completion], axis=1)


def completion_hidden(module: Any, params: dict, mb: dict, repeats: int, share_prompt: bool) -> jax.Array:
    """Final hidden states [b*repeats, C] of the completion segment of a micro-batch.

    Only the completion segment's hidden states are returned, so logits are never computed over the prompt.
    With ``prefix_slots``/``slots`` (``mrjax.data.make_batch``) each model call runs its per-token work on
    the real tokens only (``mrjax.model.llama.Packing``): the same result without the padding's work.
    """
    prefix_tokens, prefix_positions, prefix_mask = mb["prefix_tokens"], mb["prefix_positions"], mb["prefix_mask"]
    b, prefix_len = prefix_tokens.shape
    length = mb["tokens"].shape[1]
    apply = lambda *a, **k: module.apply({"params": params}, *a, **k)  # noqa: E731
    packs = "slots" in mb

    def rep(x):  # rows [b, ...] -> [b*repeats, ...], each prompt next to its completions
        return x if repeats == 1 else jnp.repeat(x, repeats, axis=0)

    def grow(cache: KVCache, rows: int, slots: int) -> KVCache:
        # ``slots`` empty key slots appended, each cache row copied to rows // (its rows) rows.
        # The copy's backward sums the copies' gradients: what the rows' separate forwards would give.
        widen = ((0, 0), (0, 0), (0, slots), (0, 0), (0, 0))
        return KVCache(*(jnp.repeat(jnp.pad(c, widen), rows // c.shape[1], axis=1) for c in cache))

    # A completion slot holds a real input exactly when its target is real, so ``mask`` serves both.
    kv_mask = jnp.concatenate([rep(prefix_mask), mb["mask"]], axis=1)
    cache, done = None, 0  # the KV cache of what has already run, and its length in slots
    if "shared_tokens" in mb:
        # The prompt prefix common to the micro-batch (mrjax.data.make_batch) runs once, as one row;
        # every row then continues from (a copy of) its cache, at positions after it.
        done = mb["shared_tokens"].shape[0]
        cache = KVCache.zeros(module.config, 1, done, training_cache_dtype(module.dtype))
        _, cache = apply(mb["shared_tokens"][None], mb["shared_positions"][None], mb["shared_mask"][None], cache, 0,
                         return_hidden=True)
        kv_mask = jnp.concatenate([jnp.broadcast_to(mb["shared_mask"], (b * repeats, done)), kv_mask], axis=1)
    if share_prompt and repeats > 1:
        # The prompt once per pair: prefill a KV cache, copy it to both completions, and continue from it.
        # The prefill cache holds only the prompt (its attention spans the prompt's keys, not the
        # completions' too); it is then widened by C empty slots for the completions.
        if cache is None:
            cache = KVCache.zeros(module.config, b, prefix_len, training_cache_dtype(module.dtype))
        else:
            cache = grow(cache, b, prefix_len)
        prompt_mask = kv_mask[::repeats, : done + prefix_len]
        _, cache = apply(prefix_tokens, prefix_positions, prompt_mask, cache, done, return_hidden=True,
                         packed=packing(mb["prefix_slots"], b, prefix_len) if packs else None)
        hidden, _ = apply(mb["tokens"], mb["positions"], kv_mask, grow(cache, b * repeats, length), done + prefix_len,
                          return_hidden=True, packed=packing(mb["slots"], b * repeats, length) if packs else None)
        return hidden
    tokens = jnp.concatenate([rep(prefix_tokens), mb["tokens"]], axis=1)
    positions = jnp.concatenate([rep(prefix_positions), mb["positions"]], axis=1)
    packed = None
    if packs:
        slots = concatenated_slots(mb["prefix_slots"], mb["slots"], b, prefix_len, length, repeats)
        packed = packing(slots, b * repeats, prefix_len + length)
    if cache is not None:
        cache = grow(cache, b * repeats, prefix_len + length)
    hidden, _ = apply(tokens, positions, kv_mask, cache, done, return_hidden=True, packed=packed)
    return hidden[:, prefix_len:]


def sequence_logps(
    module: Any, params: dict, mb: dict, repeats: int, share_prompt: bool, max_logits_mb: int
) -> tuple[jax.Array, jax.Array]:
    """Summed completion log-probs and completion token counts, both [b, repeats]."""
    hidden, targets = completion_hidden(module, params, mb, repeats, share_prompt), mb["targets"]
    packed = packing(mb["slots"], *targets.shape) if "slots" in mb else None
    if packed is not None:  # the unembedding on the real completion tokens only: rows [S, n]
        hidden, targets = pack(packed, hidden), pack(packed, targets)
    rows, length = targets.shape
    chunk = logits_chunk(rows, length, module.config.vocab_size, max_logits_mb)
    per_token = token_logps(hidden, unembedding(params, module.config), targets, chunk, module.split_weights)
    if packed is not None:
        per_token = unpack(packed, per_token)
    mask = mb["mask"].astype(jnp.float32)
    sums = jnp.sum(per_token * mask, axis=-1).reshape(-1, repeats)
    counts = jnp.sum(mask, axis=-1).reshape(-1, repeats)
    return sums, counts


# ---------------------------------------------------------------- optimizer


def lr_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str = "cosine") -> optax.Schedule:
    """Linear warmup to ``peak``, then cosine or linear decay towards 0 at ``total_steps``.

    Step s (0-based) of the W = ``warmup_steps`` warmup steps uses peak·(s+1)/(W+1): every step
    learns (HF's get_{cosine,linear}_schedule_with_warmup gives step 0 a rate of 0, which wastes
    one of a short DPO run's few steps), and the ramp rises in equal parts to peak at step W.
    From step W on it is HF's: peak·decay((s−W)/(total−W)), decay = ½(1+cos πx) or 1−x.
    """
    warmup_steps, total_steps = int(warmup_steps), max(int(total_steps), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1) / (warmup_steps + 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = 1.0 - progress
        elif kind == "constant":
            decay = jnp.ones_like(progress)
        else:
            raise ValueError(f"schedule {kind!r} is not cosine, linear or constant")
        return peak * jnp.where(step < warmup_steps, warm, decay)

    return schedule


def warmup_steps_for(train: Any, total_steps: int) -> int:
    return int(math.ceil(train.warmup_ratio * total_steps))


def _decay_mask(params: dict) -> dict:
    # Norm scales are not decayed (as HF Trainer excludes LayerNorm weights).
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (float32 moments) with warmup + decay and optional global-norm clipping, from TrainSettings."""
    schedule = lr_schedule(train.learning_rate, warmup_steps_for(train, total_steps), total_steps, train.schedule)
    parts = []
    if train.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(train.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=train.adam_beta1,
            b2=train.adam_beta2,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            mask=_decay_mask,
            mu_dtype=jnp.float32,
        )
    )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------- state


class TrainState(NamedTuple):
    params: dict  # float32 master parameters
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tx: optax.GradientTransformation, param_shardings: dict, params_abstract: dict, mesh: Mesh) -> TrainState:
    """Optimizer moments shard like their parameters; counters are replicated."""
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    opt = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_abstract, param_shardings, transform_non_params=lambda _: replicated(mesh)
    )
    return TrainState(param_shardings, opt, replicated(mesh))


def init_state(params: dict, tx: optax.GradientTransformation, shardings: TrainState, donate: bool = False) -> TrainState:
    """A fresh state: float32 ``params`` and zero moments.

    Without ``donate`` the parameters are copied (outputs never alias non-donated
    inputs) and the caller's arrays stay valid; with it they are consumed, so no
    second copy of the model exists while training.
    """

    def init(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
        return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))

    return jax.jit(init, out_shardings=shardings, donate_argnums=(0,) if donate else ())(params)


def abstract_state(state_sharding: TrainState, tx: optax.GradientTransformation, params_abstract: dict) -> TrainState:
    """ShapeDtypeStructs with shardings, the restore target for a checkpoint."""
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params_abstract)
    shapes = TrainState(f32, jax.eval_shape(tx.init, f32), jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sharding)


# ---------------------------------------------------------------- steps


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
    """Rows of every batch array shard over (data, fsdp); the leading micro-batch axis stays whole."""
    # The shared prompt prefix [A, S] (one row per micro-batch) is replicated.
    return {k: named_sharding(mesh, (None,) * v.ndim if k.startswith("shared_") else
                              (None, "batch") + (None,) * (v.ndim - 2), v.shape) for k, v in batch.items()}


def packing_shards(mesh: Mesh, rows: int) -> int:
    """The shards a micro-batch of ``rows`` prompt rows packs its real tokens in (``make_batch(shards=...)``):
    the mesh's batch shards, or 1 where the rows do not divide over them (they are then replicated)."""
    ways = batch_ways(mesh)
    return ways if rows % ways == 0 else 1


def check_packing(mesh: Mesh, batch: dict) -> None:
    """A batch's real tokens must be packed per batch shard of the mesh (``packing_shards``): packed for
    fewer shards, every device would compute every shard's tokens."""
    if "slots" not in batch:
        return
    rows = batch["prefix_mask"].shape[1]
    want = packing_shards(mesh, rows)
    if batch["slots"].shape[1] != want:
        raise ValueError(f"the batch's real tokens are packed for {batch['slots'].shape[1]} shards, but the mesh "
                         f"splits its {rows} rows {want} ways: make_batch(..., shards={want})")


def place_batch(mesh: Mesh, batch: dict) -> dict:
    """Host batch arrays onto the mesh; in a multi-process job each process places only its rows."""
    return {k: v if isinstance(v, jax.Array) else put(v, s) for (k, v), s in
            zip(batch.items(), batch_shardings(mesh, batch).values())}


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _accumulate(micro_fn: Callable, params: dict, batch: dict, denom: jax.Array):
    """Sum of gradients (and aux sums) over the micro-batch axis; one micro-batch needs no scan."""
    grad_fn = jax.value_and_grad(micro_fn, has_aux=True)
    accum = batch["weights"].shape[0]
    if accum == 1:
        (_, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), denom)
        return grads, aux

    def body(carry, mb):
        grads, aux = carry
        (_, a), g = grad_fn(params, mb, denom)
        return (_tree_add(grads, g), _tree_add(aux, a)), None

    # Start from zeros (shapes only) so the forward and backward are traced once, in the scan.
    (_, aux_shape), grads_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], batch), denom)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, aux_shape))
    (grads, aux), _ = jax.lax.scan(body, zeros, batch)
    return grads, aux


def _apply_update(state: TrainState, grads, tx, schedule):
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra = {"grad_norm": grad_norm, "learning_rate": schedule(state.step)}
    return TrainState(params, opt_state, state.step + 1), extra


def dpo_pair_terms(sums, counts, ref_sums, dpo: Any):
    """Per-pair losses and rewards from [b, 2] (chosen, rejected) summed log-probs."""
    if dpo.loss_type == "ipo":  # IPO compares per-token averages (as TRL and the IPO authors do)
        safe = jnp.maximum(counts, 1.0)
        pol, ref = sums / safe, ref_sums / safe
    else:
        pol, ref = sums, ref_sums
    losses = dpo_losses(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], dpo.beta, dpo.loss_type, dpo.label_smoothing)
    chosen_rewards = dpo.beta * (sums[:, 0] - ref_sums[:, 0])
    rejected_rewards = dpo.beta * (sums[:, 1] - ref_sums[:, 1])
    return losses, chosen_rewards, rejected_rewards


def dpo_objective(module: Any, dpo: Any, max_logits_mb: int) -> Callable:
    """(params, micro-batch, number of real pairs in the step) -> (loss share, metric sums)."""

    def micro(params, mb, denom):
        sums, counts = sequence_logps(module, params, mb, 2, dpo.share_prompt, max_logits_mb)
        losses, cr, rr = dpo_pair_terms(sums, counts, mb["ref_logps"], dpo)
        per_pair = dpo_pair_metrics(losses, cr, rr, sums[:, 0], sums[:, 1])
        aux = {name: jnp.sum(mb["weights"] * value) for name, value in per_pair.items()}
        return aux["loss"] / denom, aux

    return micro


def sft_objective(module: Any, max_logits_mb: int) -> Callable:
    """(params, micro-batch, number of real completion tokens in the step) -> (mean NLL share, sums)."""

    def micro(params, mb, denom):
        sums, counts = sequence_logps(module, params, mb, 1, False, max_logits_mb)
        w = mb["weights"][:, None]
        aux = {"loss": -jnp.sum(w * sums), "num_tokens": jnp.sum(w * counts)}
        return aux["loss"] / denom, aux

    return micro


def make_train_step(
    kind: str,
    module: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: TrainState,
    mesh: Mesh,
    dpo: Any = None,
    max_logits_mb: int = 1024,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

    Metrics are global-batch means (DPO: over real pairs; SFT: ``loss`` over real
    completion tokens) plus ``grad_norm`` (before clipping) and ``learning_rate``.
    """
    if kind == "dpo":
        micro = dpo_objective(module, dpo, max_logits_mb)
    elif kind == "sft":
        micro = sft_objective(module, max_logits_mb)
    else:
        raise ValueError(f"kind {kind!r} is not dpo or sft")

    def step(state: TrainState, batch: dict):
        if kind == "dpo":
            denom = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        else:
            denom = jnp.maximum(jnp.sum(batch["weights"][..., None] * batch["mask"].astype(jnp.float32)), 1.0)
        grads, sums = _accumulate(micro, state.params, batch, denom)
        new_state, extra = _apply_update(state, grads, tx, schedule)
        metrics = {k: v / denom for k, v in sums.items() if k != "num_tokens"}
        if kind == "sft":
            metrics["num_tokens"] = sums["num_tokens"]
        metrics.update(extra)
        return new_state, metrics

    cache: dict = {}

    def program(batch: dict):
        """The jitted step for this batch's shapes (arrays or ShapeDtypeStructs: ``mrjax.plan`` lowers it)."""
        # One executable per batch shape (lengths are bucketed, so a handful); shardings declared for all inputs.
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in cache:
            cache[key] = jax.jit(
                step,
                in_shardings=(shardings, batch_shardings(mesh, batch)),
                out_shardings=(shardings, replicated(mesh)),
                donate_argnums=0,
            )
        return cache[key]

    def run(state: TrainState, batch: dict):
        check_packing(mesh, batch)
        return program(batch)(state, place_batch(mesh, batch))

    run.program = program
    run.compiled_shapes = cache  # for tests that count recompiles
    return run


def make_logps_fn(
    module: Any, mesh: Mesh, param_shardings: dict, repeats: int, share_prompt: bool, max_logits_mb: int
) -> Callable:
    """Jitted ``(params, batch) -> (sums, counts)`` [A, b, repeats], no gradients (reference and eval)."""

    def logps(params, batch):
        return jax.lax.map(
            lambda mb: sequence_logps(module, params, mb, repeats, share_prompt, max_logits_mb), batch
        )

    cache: dict = {}

    def run(params, batch):
        check_packing(mesh, batch)
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in cache:
            cache[key] = jax.jit(
                logps, in_shardings=(param_shardings, batch_shardings(mesh, batch)), out_shardings=replicated(mesh)
            )
        return cache[key](params, place_batch(mesh, batch))

    return run


def numpy_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


__all__ = [
    "DPO_METRICS",
    "LOSS_TYPES",
    "TrainState",
    "abstract_state",
    "batch_shardings",
    "dpo_loss",
    "dpo_losses",
    "init_state",
    "logits_chunk",
    "lr_schedule",
    "make_logps_fn",
    "make_optimizer",
    "make_train_step",
    "packing_shards",
    "sequence_logps",
    "state_shardings",
    "token_logps",
]
