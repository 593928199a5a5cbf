"""Training step time and FLOP rate on the loop's shapes, with and without shared-prefix training.

    python -m mrjax.bench train --json

Workloads (defaults: the embedded SmolLM2-135M-Instruct, float32, remat ``dots`` as
``configs/smollm2.yaml``, 8 rows a step, max_length 1024, one micro-batch):

- ``sft_judge``: the EFT stage's SFT step on judge-format rows of ``mrjax/data/eft_judge_rows.jsonl``
  (the judge rubric, a question and response, then a justification ending in ``Score: X``);
- ``dpo_actor``: DPO on actor pairs (a question, two responses);
- ``dpo_judge``: DPO on judge pairs (the judge prompt, two judgments).

Each runs as the loop's trainer runs it (``share``, the defaults of ``mrjax.data.make_batch``: the
shared prompt prefix computed once per micro-batch, the per-token work on the real tokens only) and
as the textbook padded step (``plain``: every row whole, padding included): seconds per step (median of ``--steps`` after a
warm-up step), FLOPs of the step by XLA's cost analysis (the step compiled with 1 and 2 layers
unrolled, extrapolated to the model's layers: XLA counts a scanned loop's body once), the achieved
FLOP/s and its fraction of a square float32 matmul's rate measured in the same run (``jnp.dot`` of
two ``--matmul-size`` square matrices, jitted, median of 5).

With ``--reference trl`` (the default when TRL imports), TRL's ``SFTTrainer`` / ``DPOTrainer`` train
on the same rows in the same process (the same weights, exported to an HF directory; float32, no
gradient checkpointing, reference log-probs precomputed for DPO, a batch of ``--rows``): its seconds
per step (median after a warm-up step) and ``trl_ratio`` = TRL's step time / mrjax's shared-prefix
step time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


from mrjax.benchmarks.common import xla_flops

WORKLOADS = ("sft_judge", "dpo_actor", "dpo_judge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF dir or .gguf")
    p.add_argument("--rows", type=int, default=8, help="rows (SFT) or pairs (DPO) per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per workload and mode, after one warm-up")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--modes", default="share,plain", help="share (shared prompt prefix), plain, or both")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="dots")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16: bfloat16 matmul inputs, float32 accumulation and master weights; "
                        "TRL then runs with bf16 autocast)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--no-flops", action="store_true", help="skip the cost analysis (two extra compiles a case)")
    p.add_argument("--reference", choices=("auto", "trl", "none"), default="auto",
                   help="TRL's SFTTrainer/DPOTrainer on the same rows (auto: when TRL imports)")


def _rows(kind: str, n: int) -> list[dict]:
    """``n`` rows of a workload, built from the shipped EFT judge rows as the loop builds its rows."""
    from mrjax import roles
    from mrjax.data import judge_sft_row, read_judge_rows

    judge = read_judge_rows("mrjax/data/eft_judge_rows.jsonl")
    picks = [judge[i % len(judge)] for i in range(n)]
    other = [judge[(i + 1) % len(judge)] for i in range(n)]  # another row's text: the rejected side
    if kind == "sft_judge":
        return [judge_sft_row(r) for r in picks]
    if kind == "dpo_actor":
        return [{"prompt": r["question"], "chosen": r["response"], "rejected": o["response"]}
                for r, o in zip(picks, other)]
    if kind == "dpo_judge":
        return [{"prompt": roles.fill_judge_prompt(r["question"], r["response"]),
                 "chosen": judge_sft_row(r)["completion"], "rejected": judge_sft_row(o)["completion"]}
                for r, o in zip(picks, other)]
    raise ValueError(f"workload {kind!r} is not one of {', '.join(WORKLOADS)}")


def matmul_rate(size: int, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted [size, size] @ [size, size] in ``dtype`` (bfloat16: float32 accumulation), the
    median of ``repeats`` after a warm-up."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times)


class Case:
    """One workload's jitted step (``mrjax.train_step.make_train_step``) on a model."""

    def __init__(self, model: Any, tokenizer: Any, kind: str, rows: list[dict], max_length: int):
        from mrjax.data import tokenize_rows

        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.kind = "sft" if kind.startswith("sft") else "dpo"
        self.examples = tokenize_rows(list(enumerate(rows, 1)), tokenizer, self.kind, max_length)

    def batch(self, share: bool) -> dict:
        """All rows as one batch; shared and packed, to their ``batch_groups`` shape as the loop's trainer
        makes them; else padded, nothing shared."""
        from mrjax.data import batch_groups, make_batch

        n = len(self.examples)
        shape = batch_groups(self.examples, n, self.max_length)[0].shape if share else None
        return make_batch(self.examples, list(range(n)), n, 1, self.tokenizer.pad_id, self.max_length,
                          share_prefix=share, shape=shape, pack=share)

    def make_step(self, module: Any, config: Any, params_abstract: dict):
        from mrjax import train_step as ts
        from mrjax.config import DPOSettings, TrainSettings
        from mrjax.model.pretrained import param_shardings

        train = TrainSettings(kind=self.kind, batch_size=len(self.examples), max_length=self.max_length,
                              learning_rate=1e-5)
        tx, schedule = ts.make_optimizer(train, total_steps=1000)
        shardings = ts.state_shardings(tx, param_shardings(config, self.model.mesh), params_abstract, self.model.mesh)
        step = ts.make_train_step(self.kind, module, tx, schedule, shardings, self.model.mesh, DPOSettings(),
                                  train.max_logits_mb)
        abstract = ts.abstract_state(shardings, tx, params_abstract)
        init = lambda params: ts.init_state(params, tx, shardings)  # noqa: E731
        return step, abstract, init

    def flops(self, share: bool) -> float | None:
        """FLOPs of the step by XLA's cost analysis: 1- and 2-layer unrolled copies, extrapolated."""
        import dataclasses

        import jax

        from mrjax.model.llama import Llama

        batch = self.batch(share)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        full = self.model.module
        counts = []
        for n in (1, 2):
            config = dataclasses.replace(self.model.config, num_layers=n)
            module = Llama(config, dtype=full.dtype, param_dtype=full.param_dtype, remat=full.remat, mesh=full.mesh,
                           remat_policy=full.remat_policy, unroll_layers=True)
            params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.model.params)
            params["layers"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype),
                                            params["layers"])
            step, abstract, _ = self.make_step(module, config, params)
            counts.append(xla_flops(step.program(abstract_batch).lower(abstract, abstract_batch).compile()))
        one, two = counts
        return None if one is None or two is None else one + (self.model.config.num_layers - 1) * (two - one)


def time_step(case: Case, share: bool, steps: int) -> dict:
    """Seconds per step (median after one warm-up step that compiles) and the last step's loss."""
    import jax

    from mrjax import train_step as ts

    step, _, init = case.make_step(case.model.module, case.model.config,
                                   jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), case.model.params))
    state = init(case.model.params)  # a copy: the model's parameters stay valid
    batch = case.batch(share)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    del state
    return {"step_s": statistics.median(times), "first_step_s": compile_s,
            "loss": ts.numpy_metrics(metrics)["loss"],
            "shared_tokens": int(batch["shared_mask"].sum(axis=1).max()) if "shared_mask" in batch else 0,
            "slots": {k: int(batch[k].shape[-1]) for k in ("shared_tokens", "prefix_tokens", "tokens") if k in batch},
            "real_tokens": {"prefix": int(batch["prefix_mask"].sum()), "completions": int(batch["mask"].sum())},
            "packed": {k: int(batch[k].shape[-1]) for k in ("prefix_slots", "slots") if k in batch}}


def trl_step_seconds(hf_dir: Any, kind: str, rows: list[dict], steps: int, max_length: int, out_dir: Any,
                     bf16: bool = False) -> dict:
    """TRL's trainer for ``kind`` on ``rows`` (one batch of all of them a step), ``steps`` + 1 steps:
    the median step time after the first, and the tokens TRL fed its first step. ``bf16``: float32
    weights under bf16 autocast (HF Trainer's ``bf16=True``)."""
    import contextlib
    import sys

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    common = dict(output_dir=str(out_dir), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
                  max_steps=steps + 1, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0,
                  max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                  bf16=bf16, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                  max_length=max_length)  # no gradient checkpointing: the default
    if kind.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": user(r["prompt"]), "completion": assistant(r["completion"])}
                                  for r in rows] * (steps + 1))
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True, packing=False),
                             train_dataset=data, processing_class=tok, callbacks=[Timer()])
        tokens = [len(x["input_ids"]) for x in trainer.train_dataset.select(range(len(rows)))]
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                                   "rejected": assistant(r["rejected"])} for r in rows] * (steps + 1))
        config = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                           precompute_ref_batch_size=len(rows))
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()])
        tokens = [len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["prompt_ids"]) + len(x["rejected_ids"])
                  for x in trainer.train_dataset.select(range(len(rows)))]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        trainer.train()
    del trainer, model
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "tokens_per_step": sum(tokens),
            "version": __import__("trl").__version__, "threads": torch.get_num_threads(), "bf16": bf16}


def _trl_available(choice: str) -> bool:
    if choice == "none":
        return False
    try:
        import trl  # noqa: F401 (is it installed? a bench/dev extra, never the runtime's)
    except ImportError:
        if choice == "trl":
            raise
        return False
    return True


def run_cases(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    dtype = getattr(args, "dtype", "float32")
    peak = matmul_rate(args.matmul_size, dtype=dtype)
    out: dict[str, Any] = {"matmul_flops_per_s": peak, "matmul": f"{args.matmul_size}x{args.matmul_size} {dtype}",
                           "dtype": dtype, "rows": args.rows, "remat": args.remat}
    for kind in [w for w in args.workloads.split(",") if w]:
        case = Case(model, tokenizer, kind, _rows(kind, args.rows), args.max_length)
        for mode in [m for m in args.modes.split(",") if m]:
            if mode not in ("share", "plain"):
                raise ValueError(f"mode {mode!r} is not share or plain")
            r = time_step(case, mode == "share", args.steps)
            flops = None if args.no_flops else case.flops(mode == "share")
            r["flops"] = flops
            r["gflops_per_s"] = None if flops is None else flops / r["step_s"] / 1e9
            r["fraction_of_matmul"] = None if flops is None else flops / r["step_s"] / peak
            out[f"{kind}/{mode}"] = r
        if "share" in args.modes and "plain" in args.modes:
            out[f"{kind}/speedup"] = out[f"{kind}/plain"]["step_s"] / out[f"{kind}/share"]["step_s"]
        if _trl_available(getattr(args, "reference", "none")):
            import tempfile
            from pathlib import Path

            from mrjax.mesh import release_memory

            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = model.save_pretrained(Path(tmp) / "hf", tokenizer)
                ref = trl_step_seconds(hf_dir, kind, _rows(kind, args.rows), args.steps, args.max_length,
                                       Path(tmp) / "trl", bf16=dtype == "bfloat16")
            release_memory()
            out[f"{kind}/trl"] = ref
            ours = out.get(f"{kind}/share", out.get(f"{kind}/plain"))
            if ours:
                out[f"{kind}/trl_ratio"] = ref["step_s"] / ours["step_s"]
    return out


def run(args: argparse.Namespace) -> dict:
    import jax

    from mrjax import load_pretrained
    from mrjax.mesh import make_mesh

    remat = args.remat != "none"
    model, tokenizer = load_pretrained(args.model, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                       dtype=getattr(args, "dtype", "float32"), remat=remat, remat_policy=args.remat if remat else "full", progress=False)
    return run_cases(model, tokenizer, args)
