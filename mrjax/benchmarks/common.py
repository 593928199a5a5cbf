"""Helpers the benchmarks share: CPU threads, other processes' load, compile time, the HF reference model."""
from __future__ import annotations

import os
from typing import Any


def cpu_threads() -> int:
    """CPU threads this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class OtherLoad:
    """Fraction of the machine's CPU time used by processes other than this one (Linux)."""

    def __init__(self):
        self.samples: list[float] = []

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                mine = f.read().rsplit(")", 1)[1].split()
            return sum(vals) - vals[3] - vals[4], sum(vals), int(mine[11]) + int(mine[12])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self._start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self._start is not None and end is not None and end[1] > self._start[1]:
            busy, total, mine = (e - s for e, s in zip(end, self._start))
            self.samples.append(max(0.0, (busy - mine) / total))


def compile_listener():
    """Seconds JAX spends tracing and compiling from now on (``listener()["total"]``)."""
    import jax

    seconds = {"total": 0.0}

    def listener(event: str, duration: float, **_: Any) -> None:
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            seconds["total"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return seconds


def load_reference(name: str, threads: int):
    """transformers' PyTorch model of the embedded default (from its GGUF) and mrjax's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from mrjax.model.registry import embedded_gguf_path
    from mrjax.tokenizer import load_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    path = embedded_gguf_path() if name == "smollm2-135m-instruct" else None
    if path is None:
        raise SystemExit("the reference side of this benchmark supports the embedded default model only")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), load_tokenizer(path)


def xla_flops(program) -> float | None:
    """FLOPs of a lowered or compiled program by XLA's cost analysis (None where the backend gives none)."""
    try:
        cost = program.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
