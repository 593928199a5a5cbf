"""DPO step time: mrjax vs TRL's DPOTrainer (or an equal PyTorch step) on the same model and pairs.

    python -m mrjax.bench dpo --json

Workload (defaults): the embedded SmolLM2-135M-Instruct in float32, 8 pairs per step,
each sequence 256 tokens = a 128-token chat prompt + a 128-token completion, sigmoid
loss, AdamW, reference log-probs precomputed on both sides (TRL:
``precompute_ref_log_probs=True``), so a step is one policy forward + backward +
optimizer update. Both sides see the same token ids and the same weights (mrjax exports
its parameters to an HF directory that transformers loads). One process, steps
interleaved: after each reference step (timed by a TrainerCallback) one mrjax step
runs, so both sides see the same background load. Each side's time is the median of
its steps after a warm-up; ``ratio`` = reference_step_s / step_s. CPU seconds per step
(``*_cpu_s``, all threads of the process) are reported too: on a shared machine they
move less with other people's load than wall time does.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mrjax.mesh import release_memory

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF dir or .gguf")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--completion-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (mrjax runs twice this)")
    p.add_argument("--reference", choices=("auto", "trl", "pytorch"), default="auto",
                   help="TRL's DPOTrainer, an equal hand-written PyTorch step, or TRL when it imports")
    p.add_argument("--no-share-prompt", action="store_true", help="mrjax: concatenated forward instead")
    p.add_argument("--max-logits-mb", type=int, default=1024)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="mrjax rematerialisation: none (the default config), full, or dots (keep matmul outputs)")


# ---------------------------------------------------------------- memory


class PeakRSS:
    """Peak resident memory of this process between start and stop (sampled every 5 ms)."""

    def start_sampling(self) -> "PeakRSS":
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop_sampling(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        return self.start_sampling()

    def __exit__(self, *exc):
        self.stop_sampling()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def delta_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- workload


def _text_stream(tokenizer: Any) -> list[int]:
    """Natural-text token ids (the bundled pair file's answers), long enough to cut windows from."""
    from mrjax.data import read_rows

    rows = read_rows("mrjax/data/dpo_pairs.jsonl", "dpo")
    text = " ".join(f"{r['prompt']} {r['chosen']} {r['rejected']}" for _, r in rows)
    ids = tokenizer.encode(text)
    return ids * 8


def _window_text(tokenizer: Any, stream: list[int], start: int, count: int) -> str:
    return tokenizer.decode(stream[start:start + count], skip_special_tokens=True)


def _fit(tokenizer, target, make_text, longest, prompt="", prompt_ids=(), suffix=""):
    """The longest window (≤ ``longest`` tokens) whose text encodes to exactly ``target`` tokens after
    ``prompt`` (TRL's joint tokenisation of prompt + completion; the prompt part must stay a prefix)."""
    prompt_ids = list(prompt_ids)
    for k in range(longest, 0, -1):
        text = make_text(k)
        full = tokenizer.encode(prompt + text + suffix)
        if full[: len(prompt_ids)] != prompt_ids:
            continue
        n = len(full) - len(prompt_ids)
        if n == target:
            return text, full[len(prompt_ids):]
        if n < target:
            break
    return None, None


def build_pairs(tokenizer: Any, n_pairs: int, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """Text pairs whose tokenisation (TRL's: prompt alone, prompt + completion jointly) has exactly the
    requested prompt and completion lengths; rows hold the texts and the ids."""
    from mrjax.data import end_of_turn_text

    eot = end_of_turn_text(tokenizer)
    stream = _text_stream(tokenizer)
    rows = []
    for i in range(n_pairs):
        # Decode/encode round trips can skip a length; then try the window one token later.
        for shift in range(64):
            start = 997 * i + shift
            prompt, prompt_ids = _fit(tokenizer, prompt_tokens,
                                      lambda k: tokenizer.chat(_window_text(tokenizer, stream, start, k)),
                                      prompt_tokens)
            if prompt is not None:
                break
        else:
            raise RuntimeError(f"could not build a prompt of exactly {prompt_tokens} tokens")
        completions = []
        for side in range(2):
            for shift in range(64):
                start = 997 * i + 5000 + 331 * side + shift
                text, ids = _fit(tokenizer, completion_tokens,
                                 lambda k: _window_text(tokenizer, stream, start, k).strip(),
                                 completion_tokens + 8, prompt, prompt_ids, eot)
                if text is not None:
                    completions.append((text, ids))
                    break
            else:
                raise RuntimeError(f"could not build a completion of exactly {completion_tokens} tokens")
        rows.append({
            "prompt": prompt, "chosen": completions[0][0], "rejected": completions[1][0],
            "prompt_ids": prompt_ids, "chosen_ids": completions[0][1], "rejected_ids": completions[1][1],
        })
    return rows


def _examples(rows: list[dict]):
    from mrjax.data import Examples

    return Examples(
        kind="dpo",
        prompts=[np.asarray(r["prompt_ids"], np.int32) for r in rows],
        completions=[(np.asarray(r["chosen_ids"], np.int32), np.asarray(r["rejected_ids"], np.int32)) for r in rows],
        source="<bench>", lines=list(range(1, len(rows) + 1)), fingerprint="bench",
    )


# ---------------------------------------------------------------- mrjax


class MrjaxDPO:
    def __init__(self, model: Any, tokenizer: Any, rows: list[dict], share_prompt: bool, max_logits_mb: int,
                 lr: float, max_length: int):
        import jax

        from mrjax import train_step as ts
        from mrjax.config import DPOSettings, TrainSettings

        self.model, self.tokenizer = model, tokenizer
        self.examples = _examples(rows)
        self.n = len(rows)
        self.max_length = max_length
        dpo = DPOSettings(beta=0.1, loss_type="sigmoid", share_prompt=share_prompt)
        train = TrainSettings(batch_size=self.n, learning_rate=lr, warmup_ratio=0.0, schedule="cosine",
                              max_grad_norm=1.0, max_length=max_length, max_logits_mb=max_logits_mb)
        # Reference log-probs once, before training (not part of the step).
        logps = ts.make_logps_fn(model.module, model.mesh, model.param_shardings, 2, share_prompt, max_logits_mb)
        sums, _ = jax.device_get(logps(model.params, self._batch()))
        self.examples.ref_logps = np.asarray(sums[0], np.float32)
        tx, schedule = ts.make_optimizer(train, total_steps=1000)
        abstract = jax.eval_shape(lambda p: p, model.params)
        shardings = ts.state_shardings(tx, model.param_shardings, abstract, model.mesh)
        self.state = ts.init_state(model.params, tx, shardings)
        self.step_fn = ts.make_train_step("dpo", model.module, tx, schedule, shardings, model.mesh, dpo, max_logits_mb)
        self.ts = ts
        self.metrics: dict = {}

    def _batch(self):
        from mrjax.data import make_batch
        from mrjax.train_step import packing_shards

        return make_batch(self.examples, list(range(self.n)), self.n, 1, self.tokenizer.pad_id, self.max_length,
                          shards=packing_shards(self.model.mesh, self.n))

    def step(self) -> tuple[float, float]:
        """One step; (wall seconds, process CPU seconds)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.step_fn(self.state, self._batch())
        self.metrics = self.ts.numpy_metrics(metrics)
        return time.perf_counter() - wall, time.process_time() - cpu

    def memory_analysis(self) -> dict:
        """XLA's own accounting of the compiled step (bytes of arguments, outputs, temporaries);
        lowering again hits the executable cache, nothing is recompiled."""
        batch = self._batch()
        compiled = next(iter(self.step_fn.compiled_shapes.values()))
        try:
            stats = compiled.lower(self.state, batch).compile().memory_analysis()
        except Exception:  # noqa: BLE001 - not every backend reports it
            return {}
        if stats is None:
            return {}
        return {
            "xla_argument_mb": round(stats.argument_size_in_bytes / 2**20, 1),
            "xla_output_mb": round(stats.output_size_in_bytes / 2**20, 1),
            "xla_temp_mb": round(stats.temp_size_in_bytes / 2**20, 1),
        }


# ---------------------------------------------------------------- references


def _hf_dir(model: Any, tokenizer: Any, directory: Path) -> Path:
    """A plain HF checkpoint with mrjax's exact weights (no GGUF quantization_config: TRL accepts it)."""
    return model.save_pretrained(directory, tokenizer)


def run_trl(hf_dir: Path, rows: list[dict], steps: int, lr: float, out_dir: Path, between_steps) -> dict:
    """TRL's DPOTrainer for steps + 1 steps; ``between_steps()`` runs after each (outside its timing)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    policy = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    times: list[tuple[float, float]] = []
    memory = PeakRSS()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                memory.start_sampling()  # the reference's own peak: its first step, before any mrjax step
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.wall, time.process_time() - self.cpu))
            memory.stop_sampling()
            between_steps()

    config = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
        max_steps=steps + 1, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=len(rows),
        max_length=None, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_checkpointing=False,
    )
    trainer = DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    first = trainer.train_dataset[0]
    assert list(first["prompt_ids"]) == rows[0]["prompt_ids"] and list(first["chosen_ids"]) == rows[0]["chosen_ids"], \
        "TRL tokenised the pairs differently from mrjax"
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        trainer.train()
    del trainer, policy
    return {"times": times, "peak_rss_mb": memory.peak_mb, "rss_delta_mb": memory.delta_mb,
            "threads": torch.get_num_threads(), "version": __import__("trl").__version__}


def run_pytorch(hf_dir: Path, rows: list[dict], steps: int, lr: float, between_steps) -> dict:
    """The same DPO step written directly in PyTorch: concatenated chosen+rejected forward, completion-masked
    log-softmax sums, sigmoid loss against precomputed reference log-probs, clipping, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    seqs = [r["prompt_ids"] + r[side] for side in ("chosen_ids", "rejected_ids") for r in rows]
    masks = [[0] * len(r["prompt_ids"]) + [1] * len(r[side]) for side in ("chosen_ids", "rejected_ids") for r in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)

    def logps(m):
        logits = m(input_ids=ids, attention_mask=attention).logits[:, :-1]
        token = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (token * completion[:, 1:]).sum(-1)

    with torch.no_grad():
        ref = logps(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n = len(rows)
    times = []
    memory = PeakRSS().start_sampling()
    for _ in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        pol = logps(model)
        delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        loss = -F.logsigmoid(0.1 * delta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        memory.stop_sampling()
        between_steps()
    return {"times": times, "peak_rss_mb": memory.peak_mb, "rss_delta_mb": memory.delta_mb,
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    import jax

    from mrjax import load_pretrained
    from mrjax.mesh import make_mesh

    logging.getLogger("absl").setLevel(logging.WARNING)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    remat = args.remat
    model, tokenizer = load_pretrained(args.model, mesh=mesh, progress=False, remat=remat != "none",
                                       remat_policy="full" if remat == "none" else remat)
    return compare(model, tokenizer, args)


def compare(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    """The side-by-side measurement on a loaded model (its params are copied, not consumed)."""
    import jax

    rows = build_pairs(tokenizer, args.pairs, args.prompt_tokens, args.completion_tokens)
    max_length = args.prompt_tokens + args.completion_tokens
    lr = 5e-6

    reference = args.reference
    why = ""
    if reference in ("auto", "trl"):
        try:
            import trl  # noqa: F401 (is it installed?)
            import datasets  # noqa: F401

            reference = "trl"
        except ImportError as err:
            if args.reference == "trl":
                raise
            reference, why = "pytorch", f"TRL not importable ({err}); an equal PyTorch step instead"

    ours = MrjaxDPO(model, tokenizer, rows, not args.no_share_prompt, args.max_logits_mb, lr, max_length)
    compile_s, _ = ours.step()  # compiles
    release_memory()
    with PeakRSS() as mem_ours:  # mrjax's own peak: one step on its own
        ours.step()
    release_memory()
    interleaved: list[tuple[float, float]] = []

    def mrjax_step():  # runs after each reference step, outside the reference's timing
        release_memory()
        interleaved.append(ours.step())

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = _hf_dir(model, tokenizer, Path(tmp) / "hf")
        if reference == "trl":
            try:
                ref = run_trl(hf_dir, rows, args.steps, lr, Path(tmp) / "trl", mrjax_step)
            except Exception as err:  # noqa: BLE001 - fall back, and say why
                if args.reference == "trl":
                    raise
                reference, why = "pytorch", f"TRL failed here ({type(err).__name__}: {err}); an equal PyTorch step instead"
                interleaved.clear()
                ref = run_pytorch(hf_dir, rows, args.steps, lr, mrjax_step)
        else:
            ref = run_pytorch(hf_dir, rows, args.steps, lr, mrjax_step)
    release_memory()

    # The first pair is a warm-up (the reference's first step allocates and builds its kernels).
    ours_t, ref_t = interleaved[1:], ref["times"][1:]
    step_s = statistics.median(t for t, _ in ours_t)
    reference_step_s = statistics.median(t for t, _ in ref_t)
    tokens = args.pairs * 2 * max_length
    result = {
        "benchmark": "dpo",
        "model": args.model,
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
        "pairs": args.pairs,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "share_prompt": not args.no_share_prompt,
        "remat": args.remat,
        "step_s": round(step_s, 3),
        "reference_step_s": round(reference_step_s, 3),
        "ratio": round(reference_step_s / step_s, 3),
        "reference": "trl-DPOTrainer" if reference == "trl" else "pytorch-equivalent",
        "reference_version": ref.get("version", ""),
        "step_cpu_s": round(statistics.median(c for _, c in ours_t), 3),
        "reference_step_cpu_s": round(statistics.median(c for _, c in ref_t), 3),
        "compile_s": round(compile_s, 2),
        "step_times_s": [round(t, 3) for t, _ in ours_t],
        "reference_step_times_s": [round(t, 3) for t, _ in ref_t],
        "tokens_per_s": round(tokens / step_s, 1),
        "reference_tokens_per_s": round(tokens / reference_step_s, 1),
        "peak_rss_mb": mem_ours.peak_mb,
        "step_rss_delta_mb": mem_ours.delta_mb,
        "reference_peak_rss_mb": ref["peak_rss_mb"],
        "reference_rss_delta_mb": ref["rss_delta_mb"],
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": ref["threads"],
        "loss": round(ours.metrics.get("loss", float("nan")), 5),
        "gpu_mfu": "skipped: no GPU lent to this task",
        **ours.memory_analysis(),
    }
    if why:
        result["reference_note"] = why
    return result
