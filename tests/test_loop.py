"""The Meta-Rewarding loop end to end on the tiny-random model: files, rules, resume after SIGKILL,
the Self-Rewarding switch, config checks and errors (exit status 2)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import single_device_mesh
from loop_helpers import REPO, TINY, rows, run_cli

STAGE_FILES = ("prompts.jsonl", "responses.jsonl", "judgments.jsonl", "actor_pairs.jsonl")
JUDGE_FILES = ("meta_judgments.jsonl", "judge_pairs.jsonl")


def main_in_process(capsys, *args):
    """``mrjax.train.main`` here (the checks fail before any model is loaded): (status, stdout, stderr)."""
    from mrjax import train as train_cli

    status = train_cli.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.slow
def test_tiny_run_writes_every_file_with_its_fields(tiny_run):
    run_dir, done = tiny_run
    assert (run_dir / "config.yaml").is_file() and (run_dir / "prompts" / "held_out.jsonl").is_file()
    assert json.loads(done.stdout.strip().splitlines()[-1])["final_model"] == str(run_dir / "iter_2" / "hf")
    assert "final model (M_2)" in done.stderr and "pair files:" in done.stderr
    eft = json.loads((run_dir / "eft" / "summary.json").read_text())
    assert {"judge_parse_rate", "meta_judge_parse_rate"} <= set(eft["before"]) and eft["after"]["judge_total"] == 3
    assert (run_dir / "eft" / "hf" / "model.safetensors").is_file()
    fields = {
        "prompts.jsonl": {"id", "prompt"},
        "responses.jsonl": {"prompt_id", "k", "response", "tokens", "finish_reason"},
        "judgments.jsonl": {"prompt_id", "k", "n", "judgment", "score", "status"},
        "actor_pairs.jsonl": {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_chars",
                              "rejected_chars"},
        "meta_judgments.jsonl": {"prompt_id", "k", "m", "n", "order", "text", "winner"},
        "judge_pairs.jsonl": {"prompt", "chosen", "rejected", "chosen_elo", "rejected_elo"},
    }
    used = set()
    held_out = {r["id"] for r in rows(run_dir / "prompts" / "held_out.jsonl")}
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        files = STAGE_FILES + (JUDGE_FILES if t == 1 else ())
        for name in files:
            got = rows(it / name)
            assert got, f"iter_{t}/{name} is empty"
            assert all(fields[name] <= set(r) for r in got), name
        assert not any((it / name).exists() for name in JUDGE_FILES) or t == 1
        summary = json.loads((it / "summary.json").read_text())
        assert summary["prompts"] == len(rows(it / "prompts.jsonl"))
        assert summary["responses"] == len(rows(it / "responses.jsonl"))
        assert summary["judgments"] == len(rows(it / "judgments.jsonl"))
        assert summary["actor_pairs"] == len(rows(it / "actor_pairs.jsonl")) > 0
        assert summary["judge_pairs"] == (len(rows(it / "judge_pairs.jsonl")) if t == 1 else 0)
        assert summary["dpo_pairs"] + summary["dpo_held_out_pairs"] == summary["actor_pairs"] + summary["judge_pairs"]
        assert summary["dpo_steps"] > 0 and summary["dpo_held_out_pairs"] > 0
        assert (it / "hf" / "model.safetensors").is_file() and (it / "train" / "metrics.jsonl").is_file()
        ids = {r["id"] for r in rows(it / "prompts.jsonl")}
        assert not ids & used and not ids & held_out  # never reused, never the held-out split
        used |= ids
    metrics = rows(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def _pair(row):
    return row["prompt"], row["chosen"], row["rejected"]


def _within(figures, name):
    return figures[f"{name}_low"] - 1e-12 <= figures[name] <= figures[f"{name}_high"] + 1e-12


@pytest.mark.slow
def test_tiny_run_holds_out_pairs_and_scores_them(tiny_run):
    """Each iteration's DPO holds out the pairs of a seeded third of its prompts (tiny.yaml: dpo_held_out 0.33),
    never trains on them, and scores them by M_{t-1} (the reference: loss ln 2, every pair a tie) and M_t."""
    from mrjax.config import load_config
    from mrjax.loop import HELD_OUT_PAIRS, held_out_split

    run_dir, done = tiny_run
    config = load_config(TINY, [f"run_dir={run_dir}"])
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        pairs = rows(it / "actor_pairs.jsonl") + (rows(it / "judge_pairs.jsonl") if t == 1 else [])
        trained, held = rows(it / "train" / "pairs.jsonl"), rows(it / "train" / HELD_OUT_PAIRS)
        assert held and not {_pair(r) for r in held} & {_pair(r) for r in trained}  # never trained on
        assert sorted(map(_pair, trained + held)) == sorted(map(_pair, pairs))
        keep, out = held_out_split(pairs, config.iteration.dpo_held_out, config.seed, t)
        assert [_pair(pairs[i]) for i in keep] == list(map(_pair, trained))  # the split, recomputed
        assert [_pair(pairs[i]) for i in out] == list(map(_pair, held))
        held_prompts = {pairs[i]["prompt_id"] for i in out}
        assert len(held_prompts) == 2 and not held_prompts & {pairs[i]["prompt_id"] for i in keep}

        summary = json.loads((it / "summary.json").read_text())
        before, after, train = (summary[f"dpo_{k}"] for k in ("held_out_before", "held_out_after", "train_after"))
        assert before["pairs"] == after["pairs"] == summary["dpo_held_out_pairs"] == len(held)
        assert train["pairs"] == summary["dpo_pairs"] == len(trained)
        assert before["loss"] == pytest.approx(np.log(2), abs=1e-5)
        assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # policy == reference: every pair a tie
        for figures in (before, after, train):
            assert 0 <= figures["accuracy"] <= 1
            for name in ("loss", "accuracy", "margin"):
                assert _within(figures, name), (t, name, figures)
        assert train["accuracy"] > 0.5 and train["loss"] < np.log(2)  # the trained pairs moved
    metrics = rows(run_dir / "metrics.jsonl")
    assert all(m["dpo_held_out_before/loss"] == pytest.approx(np.log(2), abs=1e-5) for m in metrics)
    assert all({"dpo_held_out_after/accuracy_low", "dpo_train_after/accuracy"} <= set(m) for m in metrics)
    assert "held-out accuracy       0.5 -> " in done.stderr and "trained pairs, after" in done.stderr


def _read_after(hf_tok, model, prompt, ids, text_to_read):
    """Log-probs [V] (float64) of the token after ``text_to_read(generated text)`` answering ``prompt``,
    by transformers: the generated ``ids`` whose text starts it, then the rest of it tokenised."""
    import torch

    stop = set(hf_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    ids = ids[:-1] if ids and ids[-1] in stop else ids
    text_to_read = text_to_read(hf_tok.decode(ids, skip_special_tokens=True))  # as generated, not stripped
    k = max(k for k in range(len(ids) + 1) if text_to_read.startswith(hf_tok.decode(ids[:k], skip_special_tokens=True)))
    rest = text_to_read[len(hf_tok.decode(ids[:k], skip_special_tokens=True)):]
    chat = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = (hf_tok.encode(chat, add_special_tokens=False) + list(ids[:k])
            + hf_tok.encode(rest, add_special_tokens=False))
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


@pytest.mark.slow
def test_tiny_run_expected_scores_and_verdicts_recomputed_by_transformers(tiny_run):
    """Iteration 1's expected judge scores and calibrated meta-judge verdicts (read by M_0 during generation)
    recomputed by an independent path: transformers' Llama on the EFT export, fed the generated ids stored
    with each value. Scores agree to float32 tolerance and every verdict is the same, so a reversed A/B,
    a wrong digit order or a wrong calibration would fail."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mrjax import roles
    from mrjax.data import prompt_question

    run_dir, _ = tiny_run
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "eft" / "hf")
    model = LlamaForCausalLM.from_pretrained(run_dir / "eft" / "hf", torch_dtype=torch.float32).eval()
    digits = [hf_tok.encode(f"Score: {d}", add_special_tokens=False)[-1] for d in range(6)]
    a, b = (hf_tok.encode(f"Winner: Judgement {x}", add_special_tokens=False)[-1] for x in "AB")
    assert len(set(digits)) == 6 and a != b

    it = run_dir / "iter_1"
    prompts = {r["id"]: prompt_question(r["prompt"]) for r in rows(it / "prompts.jsonl")}
    responses = {(r["prompt_id"], r["k"]): r["response"] for r in rows(it / "responses.jsonl")}
    judgments = rows(it / "judgments.jsonl")
    shard_rows = [r for f in sorted((it / "shards" / "judgments").glob("*.jsonl")) for r in rows(f)]
    assert len(shard_rows) == len(judgments)
    checked = 0
    for judgment, shard in zip(judgments, sorted(shard_rows, key=lambda r: (r["i"], r["s"]))):
        assert shard["text"] == judgment["judgment"] and judgment["status"] == "expected"
        prompt = roles.fill_judge_prompt(prompts[judgment["prompt_id"]], responses[(judgment["prompt_id"], judgment["k"])])
        logp = _read_after(hf_tok, model, prompt, shard["ids"], roles.expected_score_text)
        p = np.exp(logp[digits] - logp[digits].max())
        assert judgment["score"] == pytest.approx(float((p / p.sum()) @ np.arange(6)), abs=1e-4)
        checked += 1

    judged = {(r["prompt_id"], r["k"], r["n"]): r["judgment"] for r in judgments}
    metas = rows(it / "meta_judgments.jsonl")
    shard_rows = [r for f in sorted((it / "shards" / "meta_judgments").glob("*.jsonl")) for r in rows(f)]
    assert metas and len(shard_rows) == len(metas)
    margins, theirs = {}, []
    for meta, shard in zip(metas, sorted(shard_rows, key=lambda r: (r["i"], r["s"]))):
        assert shard["text"] == meta["text"]
        key = (meta["prompt_id"], meta["k"])
        prompt = roles.fill_meta_judge_prompt(prompts[meta["prompt_id"]], responses[key],
                                              judged[key + (meta["m"],)], judged[key + (meta["n"],)])
        logp = _read_after(hf_tok, model, prompt, shard["ids"], roles.expected_verdict_text)
        margin = logp[a] - logp[b]  # log p(A) - log p(B): A is judgment m, shown first
        assert meta["margin"] == pytest.approx(margin, abs=1e-4)
        margins.setdefault(key, []).append(margin)
        theirs.append(margin)
    for meta, margin in zip(metas, theirs):
        threshold = float(np.median(margins[(meta["prompt_id"], meta["k"])]))  # calibrated by the response's calls
        if abs(margin - threshold) > 1e-2:  # the same verdict unless the margin sits on its median
            assert meta["winner"] == ("A" if margin > threshold else "B")
            checked += 1
    assert checked > 20


def _tiers(scores, rho):
    hi, lo = max(scores), min(scores)
    top = [s >= (1 - rho) * hi + rho * lo - 1e-5 for s in scores]
    bottom = [s <= (1 - rho) * lo + rho * hi + 1e-5 for s in scores]
    return top, bottom


@pytest.mark.slow
def test_tiny_run_pairs_obey_the_rules(tiny_run):
    run_dir, _ = tiny_run
    for t, rho in ((1, 0.0), (2, 0.32)):
        it = run_dir / f"iter_{t}"
        judged = {}
        for j in rows(it / "judgments.jsonl"):
            if j["score"] is not None:
                judged.setdefault((j["prompt_id"], j["k"]), []).append(j["score"])
        responses = {(r["prompt_id"], r["k"]): r["response"] for r in rows(it / "responses.jsonl")}
        for pair in rows(it / "actor_pairs.jsonl"):
            keys = [key for key in judged if key[0] == pair["prompt_id"]]
            score = {key[1]: float(np.mean(judged[key])) for key in keys}
            ks = sorted(score)
            assert pair["chosen_score"] > pair["rejected_score"]
            assert pair["chosen_score"] == pytest.approx(score[pair["chosen_k"]], abs=1e-5)
            top, bottom = _tiers([score[k] for k in ks], rho)
            top_ks = [k for k, ok in zip(ks, top) if ok]
            bottom_ks = [k for k, ok in zip(ks, bottom) if ok]
            assert len(pair["chosen"]) == min(len(responses[(pair["prompt_id"], k)]) for k in top_ks)
            assert len(pair["rejected"]) == max(len(responses[(pair["prompt_id"], k)]) for k in bottom_ks)
            assert pair["chosen"] == responses[(pair["prompt_id"], pair["chosen_k"])]

    # Judge pairs: chosen has the highest Bradley-Terry score of the battle matrix, fitted here in float64.
    it = run_dir / "iter_1"
    meta = rows(it / "meta_judgments.jsonl")
    r = {(m["prompt_id"], m["k"], m["m"], m["n"]): (1 if m["winner"] == "A" else -1 if m["winner"] == "B" else 0)
         for m in meta}
    win1 = sum(v == 1 for v in r.values())
    win2 = sum(v == -1 for v in r.values())
    omega1, omega2 = win2 / (win1 + win2), win1 / (win1 + win2)
    judgments = {(j["prompt_id"], j["k"], j["n"]): j["judgment"] for j in rows(it / "judgments.jsonl")}
    pairs = rows(it / "judge_pairs.jsonl")
    assert pairs
    for pair in pairs:
        p, k = pair["prompt_id"], pair["k"]
        ns = sorted({key[2] for key in r if key[:2] == (p, k)})
        B = np.zeros((len(ns), len(ns)))
        for a, m in enumerate(ns):
            for b, n in enumerate(ns):
                if m != n:
                    B[a, b] = omega1 * (r[(p, k, m, n)] == 1) + omega2 * (r[(p, k, n, m)] == -1)
        elo = np.zeros(len(ns))
        for _ in range(5000):  # gradient ascent on sum B log sigmoid(e_m - e_n) - 0.01/2 |e|^2
            s = 1 / (1 + np.exp(-(elo[:, None] - elo[None, :])))
            grad = (B * (1 - s)).sum(1) - (B.T * (1 - s.T)).sum(1) - 0.01 * elo
            elo += 0.1 * grad
        assert ns[int(np.argmax(elo))] == pair["chosen_n"] and ns[int(np.argmin(elo))] == pair["rejected_n"]
        assert pair["chosen"] == judgments[(p, k, pair["chosen_n"])]
        assert pair["prompt"].startswith("Review the user's question") and "<response>" in pair["prompt"]


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)  # the session's tiny run is shared: runs go on copies
    # Optimizer checkpoints go once a training stage's model is exported and marked: a finished run keeps none.
    assert not list(run_dir.rglob("checkpoints*"))
    assert (run_dir / "eft" / "train" / "metrics.jsonl").is_file() and (run_dir / "iter_1" / "train").is_dir()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_cli("--config", str(TINY), f"run_dir={run_dir}", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete (every stage verified); nothing to do" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["already_complete"] is True
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_result(tiny_run, tmp_path):
    """SIGKILL during generation, meta-judging and DPO's second checkpoint write; each re-run
    continues, keeps what was complete, and the end is byte-identical to the uninterrupted run.
    (The last kill's re-run resumes DPO from its first checkpoint; the two-process job in
    tests/test_scale_out.py is killed right after a DPO step.)"""
    reference, _ = tiny_run
    run_dir = tmp_path / "killed"
    args = ("--config", str(TINY), f"run_dir={run_dir}", "--quiet")
    completed: dict[Path, int] = {}
    # judgments and meta-judgments share generate_sharded with responses: one of them is killed
    for fault in ("responses:shard1", "meta_judgments:shard0", "checkpoint:2"):
        killed = run_cli(*args, fault=fault)
        assert killed.returncode == -9, f"{fault}: {killed.returncode}\n{killed.stderr[-3000:]}"
        for path, mtime in completed.items():  # nothing complete was redone
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten after the {fault} kill"
        markers = list(run_dir.rglob(".done/*.json"))
        completed = {p: p.stat().st_mtime_ns for p in markers}
        completed.update({p: p.stat().st_mtime_ns for p in run_dir.rglob("shards/*/*.jsonl")})
    leftovers = list(run_dir.rglob("checkpoints/*tmp*"))
    assert leftovers, "the checkpoint kill happened outside a write"
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(run_dir.rglob("checkpoints*"))
    for path, mtime in completed.items():
        assert path.stat().st_mtime_ns == mtime
    for t in (1, 2):
        ours, theirs = (json.loads((d / f"iter_{t}" / "summary.json").read_text()) for d in (run_dir, reference))
        for key in ("dpo_held_out_before", "dpo_held_out_after", "dpo_train_after"):
            assert ours[key] == theirs[key], (t, key)
        for name in ("actor_pairs.jsonl", "judge_pairs.jsonl", "responses.jsonl", "judgments.jsonl",
                     "meta_judgments.jsonl", "train/pairs.jsonl", "train/held_out_pairs.jsonl"):
            ours, theirs = run_dir / f"iter_{t}" / name, reference / f"iter_{t}" / name
            assert ours.exists() == theirs.exists()
            if theirs.exists():
                assert ours.read_bytes() == theirs.read_bytes(), f"iter_{t}/{name} differs"
    for rel in ("eft/hf/model.safetensors", "iter_1/hf/model.safetensors", "iter_2/hf/model.safetensors"):
        assert (run_dir / rel).read_bytes() == (reference / rel).read_bytes(), f"{rel} differs"


@pytest.mark.slow
def test_self_rewarding_switch_runs_without_meta_judge(tiny_run, tmp_path):
    done = run_cli("--config", str(TINY), f"run_dir={tmp_path}", "--quiet", "--no-eval", "mode=self_rewarding",
                   "iteration.iterations=1", "iteration.judge_training_iterations=[]", "eft.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    it = tmp_path / "iter_1"
    assert rows(it / "actor_pairs.jsonl") and not any((it / name).exists() for name in JUDGE_FILES)
    assert not (it / "shards" / "meta_judgments").exists() and "meta_judgments" not in done.stderr
    summary = json.loads((it / "summary.json").read_text())
    assert summary["judge_pairs"] == 0 and summary["rho"] == 0.0 and summary["meta_judgments"] == 0
    assert (it / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()  # --no-eval


def test_held_out_split_is_seeded_by_prompt_and_follows_its_rule():
    from mrjax.loop import held_out_split

    pairs = [{"prompt_id": p, "kind": kind} for kind in ("actor", "judge") for p in range(20)]
    keep, held = held_out_split(pairs, 0.15, 0, 1)
    assert (keep, held) == held_out_split(pairs, 0.15, 0, 1)  # deterministic
    assert sorted(keep + held) == list(range(40)) and not set(keep) & set(held)
    held_prompts = {pairs[i]["prompt_id"] for i in held}
    assert len(held_prompts) == 3 and len(held) == 6  # round(0.15 x 20) prompts, both kinds of pair each
    assert not held_prompts & {pairs[i]["prompt_id"] for i in keep}
    assert held_out_split(pairs, 0.15, 0, 2)[1] != held != held_out_split(pairs, 0.15, 1, 1)[1]  # drawn anew
    assert held_out_split(pairs, 0.0, 0, 1) == (list(range(40)), [])  # 0 disables
    few = [{"prompt_id": p} for p in range(4)]
    assert held_out_split(few, 0.5, 0, 1)[1] == []  # under 5 pairs nothing is held out
    five = [{"prompt_id": p} for p in range(5)]
    assert len(held_out_split(five, 0.01, 0, 1)[1]) == 1  # 5 pairs or more: at least one prompt
    assert len(held_out_split(five, 0.99, 0, 1)[0]) == 1  # never every prompt
    # Not a function of Python's hash randomization (string ids, two hash seeds, fresh processes).
    import os
    import subprocess
    import sys

    code = ("from mrjax.loop import held_out_split; "
            "print(held_out_split([{'prompt_id': f'p{i % 9}'} for i in range(30)], 0.3, 3, 1))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=h, JAX_PLATFORMS="cpu")).stdout for h in ("1", "2")}
    assert len(outs) == 1


def test_dpo_stage_exports_exactly_the_trainers_final_parameters(tmp_path, monkeypatch):
    """iter_t/hf, read back by the loader, holds the trainer's own final state bit for bit (float32
    safetensors); the held-out pairs stay out of pairs.jsonl and M_{t-1} scores them at ln 2."""
    import jax
    import mrjax.mesh as mesh_lib
    from mrjax import load_pretrained
    from mrjax.config import load_config
    from mrjax.data import write_jsonl
    from mrjax.loop import HELD_OUT_PAIRS, MetaRewardingRun

    monkeypatch.setattr(mesh_lib, "mesh_from_settings", lambda settings: single_device_mesh())
    config = load_config(TINY, [f"run_dir={tmp_path}", "eft.enabled=false", "train.warmup_ratio=0.1"])
    where = tmp_path / "iter_1"
    write_jsonl(where / "actor_pairs.jsonl", [{"prompt_id": i, "prompt": f"Name a colour, please ({i}).",
                                               "chosen": ["Red.", "Blue.", "Green."][i % 3],
                                               "rejected": f"{i * 7} is a number."} for i in range(8)])
    run = MetaRewardingRun(config, progress=False)
    final = {}
    run.on_trained = lambda hf_dir, result: final.update(hf_dir=hf_dir, params=jax.device_get(result.model.params),
                                                          step=result.step)
    info = run.stage_train(1, where, "tiny-random")
    assert final["hf_dir"] == where / "hf" and final["step"] == info["steps"] == 2  # 5 pairs, batch 4
    exported, _ = load_pretrained(where / "hf", mesh=single_device_mesh(), progress=False)
    got = jax.tree_util.tree_flatten_with_path(jax.device_get(exported.params))[0]
    want = jax.tree_util.tree_flatten_with_path(final["params"])[0]
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype == np.float32, path
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    held = rows(where / "train" / HELD_OUT_PAIRS)
    assert len(held) == info["held_out_pairs"] == 3 and info["pairs"] == 5  # round(0.33 x 8) prompts
    assert not {_pair(r) for r in held} & {_pair(r) for r in rows(where / "train" / "pairs.jsonl")}
    assert info["held_out_before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    # The warmup's first step learns too (tiny.yaml has no warmup; 0.1 of 2 steps rounds up to one).
    rates = [m["learning_rate"] for m in rows(where / "train" / "metrics.jsonl") if "learning_rate" in m]
    assert rates == [pytest.approx(config.train.learning_rate / 2), pytest.approx(config.train.learning_rate)]


def test_bundled_loop_configs_validate_without_loading_weights(tmp_path, capsys):
    for name in ("tiny", "smollm2", "self_rewarding_smollm2", "llama3_8b"):
        status, out, err = main_in_process(capsys, "--config", str(REPO / "configs" / f"{name}.yaml"),
                                           f"run_dir={tmp_path / name}", "--dry-run")
        assert status == 0, f"{name}: {err[-2000:]}"
        facts = json.loads(out.strip().splitlines()[-1])
        assert facts["parameters"] > 0 and ("pool" in facts or "self_instruct_examples" in facts)
        assert not (tmp_path / name).exists()  # a dry run writes nothing
    status, out, _ = main_in_process(capsys, "--config", str(REPO / "configs" / "llama3_8b.yaml"), "--dry-run")
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["parameters"] == 8_030_261_248 and facts["mode"] == "meta_rewarding"
    assert facts["adam_state_bytes_per_device"] == 2 * 4 * 8_030_261_248 // facts["devices"]


def _pool_file(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("overrides, message", [
    (["iteration.bogus=1"], "unknown config key 'iteration.bogus'"),
    (["prompts.source=jsonl", "prompts.path=/nonexistent/p.jsonl"], "prompt file not found: /nonexistent/p.jsonl"),
    (["iteration.judge_training_iterations=[3]"], "names iteration 3 but the run has iterations 1..2"),
    (["iteration.prompts_per_iteration=500"], "fewer than prompts.held_out + iteration.iterations x"),
    (["eft.judge_rows=/nonexistent/eft.jsonl"], "EFT judge file not found"),
    (["prompts.source=tfds", "prompts.tfds_name=some_dataset"], "needs tensorflow-datasets"),
    (["mode=bogus"], "config key 'mode' must be one of"),
])
def test_config_errors_exit_2_before_any_work(tmp_path, capsys, overrides, message):
    status, _, err = main_in_process(capsys, "--config", str(TINY), f"run_dir={tmp_path / 'run'}", *overrides)
    assert status == 2, err[-2000:]
    assert message in err and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a fine prompt"}', '{"prompt": "x"'], "prompts.jsonl:2: not valid JSON"),
    (['{"prompt": "   "}'], "prompts.jsonl:1: 'prompt' is empty"),
    (['{"text": "no prompt field"}'], "prompts.jsonl:1: a prompt row needs a 'prompt' string or a 'messages' list"),
    (['{"messages": [{"role": "system", "content": "only a system turn"}]}'], "has no non-empty user message"),
    (['', ''], "no prompts (the file is empty)"),
    (['{"prompt": "one"}', '{"prompt": "ONE "}'], "has 1 distinct prompts, fewer than"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, capsys, lines, message):
    path = _pool_file(tmp_path, lines)
    status, _, err = main_in_process(capsys, "--config", str(TINY), f"run_dir={tmp_path / 'run'}",
                                     "prompts.source=jsonl", f"prompts.path={path}")
    assert status == 2 and message in err, err[-2000:]


def test_prompt_file_with_messages_feeds_the_pool(tmp_path):
    from mrjax.config import load_config
    from mrjax.loop import MetaRewardingRun

    lines = [json.dumps({"prompt": f"Question number {i}: why is the sky blue?"}) for i in range(16)]
    lines.append(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name a prime number."}]}))
    lines.append(json.dumps({"prompt": "question NUMBER 0: why is the sky blue?"}))  # a repeat
    path = _pool_file(tmp_path, lines)
    config = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "prompts.source=jsonl", f"prompts.path={path}"])
    run = MetaRewardingRun(config, progress=False)
    run.root.mkdir(parents=True)
    info = run.stage_prompt_pool()
    assert info == {"source": "jsonl", "pool": 13, "held_out": 4, "dropped_too_long": 0}
    pool = rows(tmp_path / "run" / "prompts" / "pool.jsonl") + rows(tmp_path / "run" / "prompts" / "held_out.jsonl")
    assert len({r["id"] for r in pool}) == 17
    assert any(isinstance(r["prompt"], list) for r in pool)


def test_changed_config_is_refused_naming_the_keys(tmp_path):
    from mrjax.config import ConfigError, load_config
    from mrjax.loop import MetaRewardingRun, config_changes

    first = load_config(TINY, [f"run_dir={tmp_path}"])
    MetaRewardingRun(first)._check_or_write_config()
    changed = load_config(TINY, [f"run_dir={tmp_path}", "iteration.rho=[0.1, 0.2]", "train.learning_rate=3e-4"])
    with pytest.raises(ConfigError, match=r"changed keys: iteration.rho \(was \[0.0, 0.32\], now \[0.1, 0.2\]\); "
                                          r"train.learning_rate"):
        MetaRewardingRun(changed)._check_or_write_config()
    MetaRewardingRun(changed, force_config=True)._check_or_write_config()  # --force-config
    assert config_changes({"a": {"b": 1}, "run_dir": "x"}, {"a": {"b": 2}, "run_dir": "y"}) == ["a.b (was 1, now 2)"]


def test_changed_config_exits_2_from_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from mrjax.config import load_config, to_dict
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(TINY, [f"run_dir={run_dir}"]))))
    status, _, err = main_in_process(capsys, "--config", str(TINY), f"run_dir={run_dir}",
                                     "iteration.judgments_per_response=5")
    assert status == 2
    assert "changed keys: iteration.judgments_per_response (was 3, now 5)" in err and "--force-config" in err


def test_model_tokenizer_mismatch_exits_2(tiny_run, tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_run[0] / "eft" / "hf", hf)  # a real HF export of the tiny model
    config = json.loads((hf / "config.json").read_text())
    config["vocab_size"] = 1000
    (hf / "config.json").write_text(json.dumps(config))
    import mrjax.mesh as mesh_lib

    monkeypatch.setattr(mesh_lib, "mesh_from_settings", lambda settings: single_device_mesh())
    status, _, err = main_in_process(capsys, "--config", str(TINY), f"run_dir={tmp_path / 'run'}", f"model.name={hf}",
                                     "eft.enabled=false")
    assert status == 2, err[-2000:]
    assert "tokenizer has 49152 tokens but the model's embedding has only 1000 rows" in err


# ----------------------------------------------------------------------------- pieces


def test_next_token_logprobs_match_the_full_forward():
    import jax
    from mrjax import load_pretrained
    from mrjax.sampling import next_token_logprobs

    model, _ = load_pretrained("tiny-random", mesh=single_device_mesh(), progress=False)
    candidates = [3, 17, 4000, 49151]
    # No shared prefix; then a 40-token prefix shared by all and two groups sharing 70 more.
    head, group_a, group_b = list(range(1000, 1040)), list(range(2000, 2070)), list(range(3000, 3070))
    for texts in ([[5, 9, 300, 17], [44], list(range(100, 137))],
                  [head + group_a + [7], head + group_a + [8, 9, 10], head + group_b + [11], head + group_b + [12, 13],
                   head + group_a + list(range(50, 60)), head + [99]]):
        ours = next_token_logprobs(model, texts, candidates, batch_size=2)
        for row, ids in zip(ours, texts):
            logits = np.asarray(model(np.asarray([ids], np.int32)))[0, -1].astype(np.float64)
            reference = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            np.testing.assert_allclose(row, reference[candidates], atol=2e-5)
        assert jax.numpy.isfinite(ours).all()
    from mrjax.sampling import prefix_groups, shared_prefix_length

    C = shared_prefix_length(texts)
    group, length = prefix_groups([t[C:] for t in texts])
    assert C == 40 and len({group[i] for i in (0, 1, 4)}) == 1 and group[0] != group[2] and min(length[:5]) >= 64


def test_continuation_tokens_of_the_expected_modes():
    from mrjax.loop import SCORE_SUFFIX, WINNER_SUFFIX, _continuation_token
    from mrjax.model.registry import embedded_gguf_path
    from mrjax.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_gguf_path())
    head, four = _continuation_token(tok, SCORE_SUFFIX, "4")
    assert tok.encode(head + "4") == tok.encode(head) + [four] and tok.decode([four]).strip() == "4"
    head, a = _continuation_token(tok, WINNER_SUFFIX, " A")
    assert tok.decode(tok.encode(head) + [a]) == "Winner: Judgement A"


def test_expected_modes_read_after_the_cut_text_from_the_generated_ids(tmp_path):
    """The probes of the expected modes keep the generated ids whose text starts the text to read
    (the judgment cut before its own label, then the suffix) and append the rest: the kept and
    appended ids spell that text exactly, and the ids before the label are kept."""
    from mrjax import roles
    from mrjax.config import load_config
    from mrjax.loop import SCORE_SUFFIX, WINNER_SUFFIX, MetaRewardingRun, _continuation_token

    from mrjax.model.registry import embedded_gguf_path
    from mrjax.tokenizer import load_tokenizer

    run = MetaRewardingRun(load_config(TINY, [f"run_dir={tmp_path}"]), progress=False)
    tok = load_tokenizer(embedded_gguf_path())
    score_head, _ = _continuation_token(tok, SCORE_SUFFIX, "4")
    verdict_head, _ = _continuation_token(tok, WINNER_SUFFIX, " A")
    score, verdict = run.expected_scores(tok), run.expected_verdicts(tok)
    cases = [
        (score, lambda t: roles.expected_score_text(t, score_head), "The response is accurate and clear.\n**Score: 4**",
         "The response is accurate and clear."),
        (score, lambda t: roles.expected_score_text(t, score_head), "  No label at all, just words",
         "  No label at all, just words"),
        (verdict, lambda t: roles.expected_verdict_text(t, verdict_head), "A explains more.\nWinner: Judgement B",
         "A explains more."),
        (verdict, lambda t: roles.expected_verdict_text(t, verdict_head), "Both fine; émigré café — ünïcode.",
         "Both fine; émigré café — ünïcode."),
    ]
    for read, text_to_read, text, kept_text in cases:
        ids = tok.encode(text)
        k, appended = read.probe.continuation(ids)
        assert tok.decode(ids[:k] + list(appended)) == text_to_read(text)
        assert tok.decode(ids[:k]).startswith(kept_text) and len(appended) <= read.probe.max_appended


def test_self_instruct_sanity_filter_and_dedupe():
    from mrjax.config import PromptSettings
    from mrjax.data import dedupe_prompts
    from mrjax.loop import prompt_is_sane

    s = PromptSettings(min_chars=10, max_chars=80, min_letter_fraction=0.7)
    assert prompt_is_sane("Explain how a rainbow forms.", s)
    assert not prompt_is_sane("Too short", s)
    assert not prompt_is_sane("x" * 81, s)
    assert not prompt_is_sane("ДЛЯ ЧЕГО НУЖЕН ЭТОТ ВОПРОС И ЗАЧЕМ", s)  # not the pool's language
    assert not prompt_is_sane("1234 5678 9012 3456 7890 !!!!", s)
    assert not prompt_is_sane("Write a <task> about tasks please", s)
    assert dedupe_prompts(["A b", "a  B", "new one", "Seed"], against=["seed"]) == ["A b", "new one"]


def test_self_instruct_pool_from_the_model(tmp_path, monkeypatch):
    """Self-instruct runs the model on 8-example requests and keeps sane prompts new to the seed pool;
    too few usable prompts is a clear error naming the counts (never a silently short pool)."""
    import mrjax.mesh as mesh_lib
    from mrjax import roles
    from mrjax.config import load_config
    from mrjax.data import SEED_PROMPTS, DataError, normalized, read_prompts
    from mrjax.loop import MetaRewardingRun, prompt_is_sane

    monkeypatch.setattr(mesh_lib, "mesh_from_settings", lambda settings: single_device_mesh())
    overrides = [f"run_dir={tmp_path / 'a'}", "prompts.source=self_instruct", "prompts.held_out=1",
                 "iteration.iterations=1", "iteration.prompts_per_iteration=2",
                 "iteration.judge_training_iterations=[1]", "prompts.self_instruct_max_new_tokens=12"]
    config = load_config(TINY, overrides)
    run = MetaRewardingRun(config, progress=False)
    assert run.stage_prompt_pool() == {"source": "self_instruct", "pool": 2, "held_out": 1, "dropped_too_long": 0}
    shards = sorted((tmp_path / "a" / "prompts" / "self_instruct_shards").glob("*.jsonl"))
    written = [roles.parse_self_instruct(r["text"]) for shard in shards for r in rows(shard)]
    assert len(written) == 9  # ceil(3 prompts needed x 3 attempts) requests, one sample each
    seed = {normalized(p) for p in read_prompts(SEED_PROMPTS)}
    pool = [r["prompt"] for r in rows(tmp_path / "a" / "prompts" / "pool.jsonl")]
    pool += [r["prompt"] for r in rows(tmp_path / "a" / "prompts" / "held_out.jsonl")]
    assert len(set(pool)) == 3 and all(p in written and prompt_is_sane(p, config.prompts) for p in pool)
    assert not {normalized(p) for p in pool} & seed

    strict = load_config(TINY, overrides[1:] + [f"run_dir={tmp_path / 'b'}", "prompts.min_chars=400",
                                                "prompts.max_chars=600"])
    shutil.copytree(tmp_path / "a" / "prompts" / "self_instruct_shards",
                    tmp_path / "b" / "prompts" / "self_instruct_shards")  # the same requests: reused, not rerun
    with pytest.raises(DataError, match=r"self-instruct wrote 0 usable new prompts from 9 requests"):
        MetaRewardingRun(strict, progress=False).stage_prompt_pool()


@pytest.mark.slow
def test_tiny_loop_runs_in_bfloat16(tmp_path):
    """The path pods and GPU hosts run: bfloat16 compute (float32 parameters) through every stage."""
    done = run_cli("--config", str(TINY), f"run_dir={tmp_path}", "--quiet", "--no-eval", "model.dtype=bfloat16",
                   "eft.enabled=false", "iteration.iterations=1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "iter_1" / "summary.json").read_text())
    assert summary["actor_pairs"] > 0 and summary["judge_pairs"] > 0 and summary["dpo_steps"] > 0
    assert np.isfinite(summary["dpo_loss"]) and np.isfinite(summary["score_mean"])
    assert (tmp_path / "iter_1" / "hf" / "model.safetensors").is_file()
