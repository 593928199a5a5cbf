"""Preference building: judge pairs (variance selection, battle matrix, Elo) and actor pairs.

    python -m mrjax.bench preferences --json

Times the public calls end to end from NumPy inputs (validation, transfer,
compute, block_until_ready) on synthetic data shaped like one Meta-Rewarding
iteration: P prompts x K responses x N judgments, and N*(N-1) meta-judge
verdicts per prompt (both orders of every pair) with a first-position bias.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from mrjax import preferences as pf

DEFAULTS = {"prompts": 5000, "responses": 7, "judgments": 11, "repeats": 7, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=DEFAULTS["prompts"], help="P, prompts per iteration")
    parser.add_argument("--responses", type=int, default=DEFAULTS["responses"], help="K, responses per prompt")
    parser.add_argument("--judgments", type=int, default=DEFAULTS["judgments"], help="N, judgments per response")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="timed calls after the first")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])


def _synthetic_iteration(rng: np.random.Generator, P: int, K: int, N: int) -> dict[str, np.ndarray]:
    quality = rng.uniform(1, 5, (P, K, 1))
    judgment_scores = np.clip(np.rint(quality + rng.normal(0, 0.8, (P, K, N))), 0, 5).astype(np.float32)
    judgment_mask = rng.uniform(size=(P, K, N)) < 0.95  # ~5% judgments did not parse
    judgment_lengths = rng.integers(150, 1400, (P, K, N))
    # First position wins more often than second: the bias omega corrects.
    meta_results = rng.choice(np.array([1, -1, 0], np.int8), size=(P, N, N), p=[0.5, 0.4, 0.1])
    scores = rng.uniform(0, 5, (P, K)).astype(np.float32)
    lengths = rng.integers(50, 3000, (P, K))
    return {
        "judgment_scores": judgment_scores,
        "judgment_mask": judgment_mask,
        "judgment_lengths": judgment_lengths,
        "meta_results": meta_results,
        "meta_mask": np.ones((P, N, N), bool),
        "scores": scores,
        "lengths": lengths,
        "mask": np.ones((P, K), bool),
    }


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, times, out


def run(args: argparse.Namespace) -> dict:
    opts = {key: getattr(args, key, default) for key, default in DEFAULTS.items()}
    P, K, N = opts["prompts"], opts["responses"], opts["judgments"]
    data = _synthetic_iteration(np.random.default_rng(opts["seed"]), P, K, N)

    def build_judge_pairs():
        return pf.judge_pairs(
            data["judgment_scores"],
            data["judgment_mask"],
            data["judgment_lengths"],
            data["meta_results"],
            data["meta_mask"],
            max_judgment_chars=1100,
        )

    def build_actor_pairs():
        return pf.actor_pairs(data["scores"], data["lengths"], data["mask"], rho=0.32, max_chosen_chars=2500)

    first, times, pairs = _timed(build_judge_pairs, opts["repeats"])
    build = statistics.median(times)
    actor_first, actor_times, actor = _timed(build_actor_pairs, opts["repeats"])
    actor_build = statistics.median(actor_times)
    return {
        "prompts": P,
        "responses": K,
        "judgments": N,
        "meta_judge_results_per_prompt": N * (N - 1),
        "build_s": round(build, 4),
        "build_min_s": round(min(times), 4),
        "compile_s": round(max(first - build, 0.0), 4),
        "first_call_s": round(first, 4),
        "judge_pairs_valid": int(np.asarray(pairs.valid).sum()),
        "omega1": round(float(pairs.omega1), 4),
        "omega2": round(float(pairs.omega2), 4),
        "newton_steps": pf.DEFAULT_NEWTON_STEPS,
        "actor_pairs_s": round(actor_build, 4),
        "actor_pairs_compile_s": round(max(actor_first - actor_build, 0.0), 4),
        "actor_pairs_valid": int(np.asarray(actor.valid).sum()),
        "repeats": opts["repeats"],
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }
