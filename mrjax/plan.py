"""Check a config without loading weights: ``python -m mrjax.train --config X.yaml --dry-run``.

Validates every setting and data file the run would read, builds the mesh and the abstract
model (``jax.eval_shape``: shapes and shardings, no parameter memory), and reports the
parameter count and the bytes of parameters and optimizer state per device.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mrjax.config import Config, ConfigError

log = logging.getLogger(__name__)


def model_config(name: str):
    """The LlamaConfig of a named model, an HF directory (config.json) or a GGUF (its header), no weights read."""
    from mrjax.model import registry, weights

    if name in registry.RANDOM_CONFIGS:
        return registry.RANDOM_CONFIGS[name]
    path = registry.embedded_gguf_path() if name == "smollm2-135m-instruct" else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return weights.gguf_source(path)[0]
    if path.is_dir():
        import json

        config_file = path / "config.json"
        if not config_file.is_file():
            raise weights.WeightsError(f"{path}: no config.json (not an HF checkpoint directory)")
        return weights.config_from_hf(json.loads(config_file.read_text()), str(config_file))
    raise FileNotFoundError(f"model {name!r}: no such file or directory, and not a named model "
                            f"({', '.join(registry.NAMED_MODELS)})")


def dry_run(config: Config) -> dict[str, Any]:
    from mrjax.mesh import mesh_from_settings
    from mrjax.model.pretrained import resolve_dtype

    facts: dict[str, Any] = {"mode": config.mode, "run_dir": config.run_dir}
    if config.mode in ("meta_rewarding", "self_rewarding"):
        from mrjax.loop import check_config

        facts.update(check_config(config, dry_run=True))
        facts.pop("pinned_inputs", None)
    else:
        from mrjax.data import read_rows

        from mrjax.model.pretrained import inspect_model
        from mrjax.rundir import check_run_dir

        if not config.train.pairs:
            raise ConfigError("config key 'train.pairs' is empty: name the training file")
        check_run_dir(config.run_dir)
        facts["train_rows"] = len(read_rows(config.train.pairs, config.mode))
        inspect_model(config.model.name)  # the loop's check_config did this for the loop modes
    c = model_config(config.model.name)
    longest = max(config.train.max_length, config.eft.max_length if config.eft.enabled else 0)
    if longest > c.max_position_embeddings:
        raise ConfigError(f"train/eft max_length {longest} exceeds the model's {c.max_position_embeddings} positions")
    try:
        mesh = mesh_from_settings(config.mesh)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    params = _abstract_params(c, resolve_dtype(config.model.param_dtype), mesh)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    per_device = _bytes_per_device(params)
    per_device_f32 = _bytes_per_device(jax.tree.map(lambda x: x.update(dtype=np.float32), params))
    facts.update({
        "model": config.model.name, "parameters": count, "layers": c.num_layers, "hidden": c.hidden_size,
        "mesh": dict(mesh.shape), "devices": mesh.size,
        "param_bytes_per_device": per_device,
        "adam_state_bytes_per_device": 2 * per_device_f32,
        "dtype": config.model.dtype, "remat": config.model.remat,
    })
    from mrjax.model import registry

    if config.model.name in registry.RANDOM_CONFIGS and c.vocab_size != 49152:
        facts["warning"] = (f"{config.model.name!r} is a random-weight shape without a tokenizer: a real run needs "
                            "model.name set to an HF checkpoint directory (config.json, safetensors, tokenizer)")
        log.warning("dry run: %s", facts["warning"])
    for key, value in facts.items():
        log.info("dry run: %s = %s", key, value)
    log.info("dry run: the config is valid; nothing was loaded or trained")
    return facts


# ----------------------------------------------------------------------------- python -m mrjax.plan

GiB = 1024**3


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs (with shardings) or arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program, per device (None where the backend has none)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _worst_batch(config: Config, kind: str) -> dict:
    """The largest training batch the config allows (every row max_length tokens), as ShapeDtypeStructs."""
    from mrjax.data import Examples, make_batch

    t = config.train
    prompt = np.arange(t.max_length // 2, dtype=np.int32)
    completion = np.arange(t.max_length - len(prompt), dtype=np.int32)
    examples = Examples(kind, [prompt], [(completion,) * (2 if kind == "dpo" else 1)], "plan", [0], "plan")
    # Whole rows: no padding for the step to drop (``make_batch``'s packing), as a batch of the longest rows has none.
    batch = make_batch(examples, [0], t.batch_size, t.grad_accum, 0, t.max_length, t.pad_multiple, pack=False)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def _sampling_shapes(config: Config) -> tuple[int, int, int]:
    """(decode slots, prompt slots, new-token slots) of the config's largest generation."""
    from mrjax.sampling import NEW_TOKENS_ROUNDING, cache_bucket, prompt_bucket, round_up

    it = config.iteration
    new = config.sampling.max_new_tokens
    if config.mode in ("meta_rewarding", "self_rewarding"):
        new = max(it.actor_max_new_tokens, it.judge_max_new_tokens, it.meta_judge_max_new_tokens)
    new = round_up(new, NEW_TOKENS_ROUNDING)
    prompt = cache_bucket(prompt_bucket(config.train.max_length))  # every prompt the loop trains on fits this
    return config.sampling.batch_size, prompt, new


def _fix_for(facts: dict, config: Config, limit: int) -> str:
    """Which setting to change for the largest part of what does not fit."""
    static = facts["param_bytes"] + facts["grad_bytes"] + facts["optimizer_bytes"]
    devices = facts["devices"]
    if static > limit:
        need = math.ceil(static * facts["sharded_over"] / limit)
        if need > devices:
            where = f"even sharded over all {devices} devices" if devices > 1 else "on one device"
            return (f"parameters, gradients and optimizer state alone need {static / GiB:.1f} GiB per device; {where} "
                    f"they do not fit in {limit / GiB:.1f} GiB: use at least {need} devices (mesh.fsdp over all of "
                    "them), or model.param_dtype: bfloat16")
        return (f"parameters, gradients and optimizer state need {static / GiB:.1f} GiB per device: shard them "
                f"over at least {need} devices (mesh.fsdp={need}, now {config.mesh.fsdp}; mesh.tensor within a host)")
    train = facts.get("train_peak_bytes") or 0
    if train > limit:
        if not config.model.remat:
            return "the training step's activations do not fit: set model.remat: true"
        b = config.train.batch_size // config.train.grad_accum
        return (f"the training step needs {train / GiB:.1f} GiB per device even with remat: raise train.grad_accum "
                f"(micro-batches of {b} rows now) or lower train.max_length")
    return (f"sampling needs {facts.get('sampling_peak_bytes', 0) / GiB:.1f} GiB per device: lower sampling.batch_size "
            f"({config.sampling.batch_size} now) or shard the batch over more devices (mesh.data)")


def _abstract_params(c, param_dtype, mesh=None) -> dict:
    """ShapeDtypeStructs of the parameters (with their shardings on ``mesh``, if given); nothing allocated."""
    import flax.linen as nn

    from mrjax.model.llama import Llama
    from mrjax.model.pretrained import param_shardings

    tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
    params = nn.unbox(jax.eval_shape(lambda rng: Llama(c, param_dtype=param_dtype).init(rng, tokens),
                                     jax.random.key(0))["params"])
    if mesh is None:
        return params
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                        param_shardings(c, mesh))


def _abstract_training(config: Config, c, param_dtype, mesh):
    """(params, optimizer, schedule, state shardings, abstract state) of a training run of model ``c``."""
    from mrjax import train_step as ts
    from mrjax.model.pretrained import param_shardings

    params = _abstract_params(c, param_dtype, mesh)
    tx, schedule = ts.make_optimizer(config.train, 1000)
    state_sh = ts.state_shardings(tx, param_shardings(c, mesh), params, mesh)
    return params, tx, schedule, state_sh, ts.abstract_state(state_sh, tx, params)


def plan(config: Config, device_memory_gib: float | None = None, compile: bool = True) -> dict[str, Any]:
    """Per-device memory and FLOPs of the config's training step and decode step, and whether they fit.

    Sizes of parameters, gradients and optimizer state come from the abstract model and state
    (``jax.eval_shape``, with the config's shardings); activations, the KV cache and FLOPs from
    XLA's memory and cost analysis of the compiled programs (lowered on abstract inputs: no
    parameter memory). Raises ``ConfigError`` naming the setting to change if it does not fit.
    """
    from mrjax import train_step as ts
    from mrjax.mesh import mesh_from_settings
    from mrjax.model.llama import Llama
    from mrjax.model.pretrained import resolve_dtype

    c = model_config(config.model.name)
    try:
        mesh = mesh_from_settings(config.mesh)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    kind = "dpo" if config.mode in ("meta_rewarding", "self_rewarding") else config.mode
    dtype, param_dtype = resolve_dtype(config.model.dtype), resolve_dtype(config.model.param_dtype)
    params, _, _, _, state = _abstract_training(config, c, param_dtype, mesh)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    param_bytes = _bytes_per_device(params)
    facts: dict[str, Any] = {
        "model": config.model.name, "parameters": count, "mesh": dict(mesh.shape), "devices": mesh.size,
        "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "remat": config.model.remat,
        "param_bytes": param_bytes, "grad_bytes": param_bytes, "optimizer_bytes": _bytes_per_device(state.opt_state),
        "sharded_over": max(1, round(count * np.dtype(param_dtype).itemsize / max(param_bytes, 1))),
    }
    if device_memory_gib is None:
        stats = jax.devices()[0].memory_stats() or {}
        device_memory_gib = stats["bytes_limit"] / GiB if "bytes_limit" in stats else None
    facts["device_memory_bytes"] = int(device_memory_gib * GiB) if device_memory_gib else None
    limit = facts["device_memory_bytes"]

    def refuse():
        raise ConfigError(f"{config.model.name} does not fit on {mesh.size} device(s) of {device_memory_gib:g} GiB: "
                          + _fix_for(facts, config, limit))

    static = facts["param_bytes"] + facts["grad_bytes"] + facts["optimizer_bytes"]
    if limit is not None and static > limit:
        refuse()
    if not compile:
        return facts

    batch = _worst_batch(config, kind)
    facts["train_batch"] = {"rows": config.train.batch_size, "micro_batches": config.train.grad_accum,
                            "max_length": config.train.max_length}
    def compiled_step(c, remat: bool, unroll: bool = False, batch=batch):
        module = Llama(c, dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh,
                       remat_policy=config.model.remat_policy, unroll_layers=unroll)
        _, tx, schedule, state_sh, state = _abstract_training(config, c, param_dtype, mesh)
        step = ts.make_train_step(kind, module, tx, schedule, state_sh, mesh, config.dpo, config.train.max_logits_mb)
        return step.program(batch).lower(state, batch).compile()

    for remat in (False, True):
        memory = _memory(compiled_step(c, remat))
        tag = "remat" if remat else "no_remat"
        facts[f"train_{tag}"] = memory
        if memory is not None:  # what the step needs beyond its inputs: activations, gradients, temporaries
            facts[f"train_{tag}_activation_bytes"] = memory["temp"]
        if remat == config.model.remat:
            facts["train_peak_bytes"] = memory["peak"] if memory else None
    if limit is not None and (facts["train_peak_bytes"] or 0) > limit:  # refused before compiling any more
        refuse()
    # XLA's cost analysis counts a loop's body once, and the layers are one scanned loop: the step's
    # FLOPs are those of unrolled 1- and 2-layer copies of the model, extrapolated (every layer is the same).
    # (XLA:CPU's count leaves remat's recomputation out: about 2 x layer parameters x tokens more.)
    # The micro-batches are a loop too: one micro-batch's step, times their number (the optimizer's
    # update, counted that many times, is a few FLOPs per parameter: nothing next to the matmuls).
    micro = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    one, two = (_flops(compiled_step(dataclasses.replace(c, num_layers=n), config.model.remat, unroll=True,
                                     batch=micro)) for n in (1, 2))
    facts["train_step_flops_per_device"] = (None if one is None or two is None else
                                            config.train.grad_accum * (one + (c.num_layers - 1) * (two - one)))

    facts.update(_decode_plan(config, c, mesh, dtype, param_dtype, params))
    facts["fits"] = None if limit is None else all(
        (facts.get(k) or 0) <= limit for k in ("train_peak_bytes", "sampling_peak_bytes"))
    if facts["fits"] is False:
        refuse()
    return facts


def _decode_plan(config: Config, c, mesh, dtype, param_dtype, params) -> dict[str, Any]:
    """The sampler's decoder on the config's largest pool: its memory (weights + KV cache) and the FLOPs of a step."""
    import jax.numpy as jnp

    from mrjax.mesh import batch_ways, named_sharding
    from mrjax.model.llama import Llama
    from mrjax.model.llama import KV_CACHE_AXES, KVCache
    from mrjax.sampling import engine, prompt_bucket, round_up
    from mrjax.sampling.sample import SampleParams

    module = Llama(c, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    slots, prompt, new = _sampling_shapes(config)
    ways = batch_ways(mesh)
    slots = round_up(slots, ways)
    def placed(program, *args, **static):  # a program's outputs as ShapeDtypeStructs with the shardings it gives them
        compiled = program.lower(module, *args, **static).compile()
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(functools.partial(program, module, **static), *args),
                            compiled.output_shardings)

    weights = placed(engine.prepare, params)
    pool = placed(engine.empty_pool, rows=slots, prompt_slots=prompt, cache_slots=prompt + new, new_capacity=new)
    cb = prompt_bucket(1)
    prefix_shape = (c.num_layers, ways, cb, c.num_kv_heads, c.head_dim)
    prefix_sharding = named_sharding(mesh, KV_CACHE_AXES, prefix_shape)
    prefix = KVCache(*(jax.ShapeDtypeStruct(prefix_shape, dtype, sharding=prefix_sharding) for _ in range(2)))
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    sample_params = SampleParams(seed=scalar(jnp.uint32), max_new=scalar(jnp.int32), min_new=scalar(jnp.int32),
                                 temperature=scalar(jnp.float32), top_p=scalar(jnp.float32), top_k=scalar(jnp.int32),
                                 stop_ids=jax.ShapeDtypeStruct((1,), jnp.int32))
    compiled = engine.decode.lower(module, weights, prefix, jax.ShapeDtypeStruct((cb,), bool), pool, sample_params,
                                   scalar(jnp.int32), greedy=False, candidates=0).compile()
    memory = _memory(compiled)
    cache = pool.caches
    return {
        "sampling_pool": {"slots": slots, "prompt_slots": prompt, "new_tokens": new},
        "kv_cache_bytes": _bytes_per_device(cache),  # eval_shape of the jitted pool keeps its shardings
        "sampling_decode": memory,
        "sampling_peak_bytes": memory["peak"] if memory else None,
        # The decoder is a while loop; XLA's cost analysis counts its body (one decode step) once.
        "decode_step_flops_per_device": _flops(compiled),
    }


def format_plan(facts: dict) -> str:
    """The plan as a short table, GiB per device."""
    g = lambda b: "-" if b is None else f"{b / GiB:.2f} GiB" if b >= GiB / 4 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    f = lambda x: "-" if x is None else f"{x / 1e12:,.3f} TFLOP" if x < 1e14 else f"{x / 1e12:,.0f} TFLOP"  # noqa: E731
    lines = [
        f"model {facts['model']}: {facts['parameters'] / 1e6:,.1f}M parameters ({facts['param_dtype']}, compute "
        f"{facts['dtype']}), mesh {facts['mesh']} = {facts['devices']} devices",
        "per device:",
        f"  parameters            {g(facts['param_bytes'])}",
        f"  gradients             {g(facts['grad_bytes'])}",
        f"  optimizer state       {g(facts['optimizer_bytes'])}",
    ]
    if "train_peak_bytes" in facts:
        tb = facts["train_batch"]
        lines += [
            f"  train step activations (batch {tb['rows']} x {tb['max_length']} tokens in {tb['micro_batches']} "
            f"micro-batches): {g(facts.get('train_no_remat_activation_bytes'))} without remat, "
            f"{g(facts.get('train_remat_activation_bytes'))} with remat",
            f"  train step peak ({'remat' if facts['remat'] else 'no remat'}): {g(facts['train_peak_bytes'])}",
            f"  KV cache of sampling ({facts['sampling_pool']['slots']} slots x "
            f"{facts['sampling_pool']['prompt_slots'] + facts['sampling_pool']['new_tokens']} positions): "
            f"{g(facts['kv_cache_bytes'])}",
            f"  sampling peak (weights + cache + step): {g(facts['sampling_peak_bytes'])}",
            f"  FLOPs of one training step {f(facts['train_step_flops_per_device'])}, of one decode step "
            f"{f(facts['decode_step_flops_per_device'])}",
        ]
    if facts.get("device_memory_bytes"):
        lines.append(f"device memory {g(facts['device_memory_bytes'])}: "
                     + ("fits" if facts.get("fits", True) else "does NOT fit"))
    return "\n".join(lines)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m mrjax.plan", description=(
        "Per-device memory and FLOPs of a config's training step and sampler, from the abstract model and "
        "XLA's analysis of the compiled programs; refuses a config that will not fit."))
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for mrjax.train")
    p.add_argument("--devices", type=int, default=None,
                   help="plan for N devices (simulated with N CPU devices; default: the devices this machine has)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GiB",
                   help="memory of one device (default: what the accelerator reports; none on CPU)")
    p.add_argument("--no-compile", action="store_true", help="sizes from the abstract model only (fast)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def run(argv: list[str] | None = None) -> dict:
    import json
    import os

    args = _parser().parse_intermixed_args(argv)
    from mrjax.config import load_config

    config = load_config(args.config, args.overrides)
    if args.devices is not None:
        if args.devices < 1:
            raise ConfigError(f"--devices must be at least 1, got {args.devices}")
        # Before the backend starts: N simulated CPU devices stand in for the accelerators.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        jax.config.update("jax_platforms", "cpu")
    facts = plan(config, args.device_memory, compile=not args.no_compile)
    print(json.dumps(facts, default=str) if args.json else format_plan(facts))
    return facts


def main(argv: list[str] | None = None) -> int:
    from mrjax.cli import cli_main

    return cli_main(run, argv, print_summary=False)


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = ["dry_run", "format_plan", "model_config", "plan"]
