"""Verifiable instructions in the evaluation: McNemar's exact test against scipy, the paired bootstrap by
hand and its coverage in a seeded simulation, prompt- and constraint-level accuracy by hand, the judge
pairs built from hand-made answers, bad input, and ``python -m mrjax.eval`` on the tiny run (the shipped
set, then a user's verifiable file)."""
import json
import shutil

import numpy as np
import pytest
import scipy.stats

from loop_helpers import rows, run_cli
from mrjax.eval import metrics as mx
from mrjax.eval import verifiable as vf
from mrjax.data import DataError
from mrjax.eval.run import holds_constraints, read_verifiable_rows, sample_rows, verifiable_judge_pairs

# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("model_only, baseline_only", [
    (0, 0),     # all concordant: nothing to test
    (5, 5), (12, 13),
    (0, 7), (9, 0),  # one-sided: only one model ever wins alone
    (1, 0), (3, 10), (1, 20), (40, 60), (300, 380),
])
def test_mcnemar_exact_p_matches_scipy(model_only, baseline_only):
    got = mx.mcnemar_exact_p(model_only, baseline_only)
    n = model_only + baseline_only
    want = scipy.stats.binomtest(model_only, n, 0.5).pvalue if n else 1.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert mx.mcnemar_exact_p(baseline_only, model_only) == got  # two-sided: symmetric


def test_mcnemar_by_hand():
    assert mx.mcnemar_exact_p(0, 7) == pytest.approx(2 / 2 ** 7)  # 2 P(X = 0), X ~ Bin(7, 1/2)
    assert mx.mcnemar_exact_p(1, 4) == pytest.approx(2 * (1 + 5) / 2 ** 5)
    assert mx.mcnemar_exact_p(3, 3) == 1.0


# ----------------------------------------------------------------------------- paired bootstrap


def test_paired_difference_by_hand():
    # prompt level: model passes prompts 0, 1, 3; baseline 1 only -> difference (3 - 1) / 4 = +50 points,
    # discordant: model alone 2 (prompts 0, 3), baseline alone 0
    model = [[True], [True, True], [False, True], [True]]
    baseline = [[False], [True, True], [False, False], [False]]
    d = mx.following_difference(model, baseline)
    assert d["prompt"] == pytest.approx(50.0)
    # constraint level: (1 + 2 + 1 + 1) - (0 + 2 + 0 + 0) = 3 of 6 constraints
    assert d["constraint"] == pytest.approx(50.0)
    assert (d["model_only"], d["baseline_only"], d["prompts"]) == (2, 0, 4)
    assert d["mcnemar_p"] == pytest.approx(0.5)  # 2 * (1/2)^2
    assert d["prompt_low"] <= d["prompt"] <= d["prompt_high"]
    # Two prompts with differences 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2,
    # 1/4, so the 2.5% and 97.5% quantiles are 0 and 1.
    assert mx.paired_bootstrap_interval([1, 1], [1, 0]) == (0.0, 1.0)
    # The same difference on every prompt: no spread at all.
    assert mx.paired_bootstrap_interval([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)
    # Per-prompt weights (constraint counts): (2 - 1) / 3 on one prompt, the ratio of sums in general.
    assert mx.paired_bootstrap_interval([2], [1], [3]) == pytest.approx((1 / 3, 1 / 3))
    # Resampling prompts with both models together is the bootstrap of the per-prompt differences.
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
    assert mx.paired_bootstrap_interval(a, b, seed=4) == pytest.approx(
        mx.bootstrap_mean_interval(a - b, seed=4))


def test_paired_bootstrap_covers_the_true_difference():
    # Each prompt: both pass 0.30, model alone 0.20, baseline alone 0.10, neither 0.40 -> true difference 0.10;
    # the outcomes of a prompt are correlated (an easy prompt is easy for both).
    cells = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    probs = [0.30, 0.20, 0.10, 0.40]
    rng = np.random.default_rng(5)
    trials, hits = 200, 0
    for trial in range(trials):
        sample = cells[rng.choice(4, size=100, p=probs)]
        lo, hi = mx.paired_bootstrap_interval(sample[:, 0], sample[:, 1], resamples=1000, seed=trial)
        hits += lo <= 0.10 <= hi
    assert 0.90 <= hits / trials <= 0.99, hits / trials


# ----------------------------------------------------------------------------- accuracy by hand

ROWS = [
    {"id": "a", "prompt": "A", "constraints": [{"kind": "no_commas"}, {"kind": "lowercase"}]},
    {"id": "b", "prompt": "B", "constraints": [{"kind": "first_word", "word": "yes"}]},
    {"id": "c", "prompt": "C", "constraints": [{"kind": "end_phrase", "phrase": "Hope this helps!"},
                                              {"kind": "keywords", "words": ["tea"]}]},
]
ANSWERS = ["hello there, friend",                          # a comma (both ways); lowercase
           "Sure, here it is:\nYes, the answer is short.",  # "yes" first only once the preamble is dropped
           "I like tea. Hope this helps!"]                  # both followed


def test_prompt_and_constraint_level_by_hand():
    strict = [vf.follows(a, r["constraints"]) for a, r in zip(ANSWERS, ROWS)]
    loose = [vf.follows(a, r["constraints"], loose=True) for a, r in zip(ANSWERS, ROWS)]
    assert strict == [[False, True], [False], [True, True]]
    assert loose == [[False, True], [True], [True, True]]
    got = mx.following_accuracy(strict, loose)
    assert got["prompt_strict"] == pytest.approx(100 / 3)        # prompt c
    assert got["constraint_strict"] == pytest.approx(100 * 3 / 5)
    assert got["prompt_loose"] == pytest.approx(200 / 3)         # prompts b, c
    assert got["constraint_loose"] == pytest.approx(100 * 4 / 5)
    for key in ("prompt_strict", "constraint_strict", "prompt_loose", "constraint_loose"):
        assert 0 <= got[f"{key}_low"] <= got[key] <= got[f"{key}_high"] <= 100
    # Constraint level resamples prompts (a prompt's constraints together): with one prompt there is no spread.
    one = mx.following_accuracy([[True, False, True]], [[True, True, True]])
    assert (one["constraint_strict_low"], one["constraint_strict"], one["constraint_strict_high"]) == \
        pytest.approx((200 / 3, 200 / 3, 200 / 3))


# ----------------------------------------------------------------------------- judge pairs

TEA = [{"kind": "no_commas"}, {"kind": "keywords", "words": ["tea"]}, {"kind": "end_phrase", "phrase": "Enjoy!"}]
GOOD_TEA = "Brew the tea for three minutes and serve it hot. Enjoy!"
PAIR_ROWS = [
    {"id": "p0", "prompt": "Describe tea. Do not use any commas.", "constraints": [{"kind": "no_commas"}]},
    {"id": "p1", "prompt": "Tea, with three constraints.", "constraints": TEA},
    {"id": "p2", "prompt": "Lowercase please.", "constraints": [{"kind": "lowercase"}]},
]
PAIR_ANSWERS = {0: ["Tea, then more.", GOOD_TEA, "Hello."],
                1: ["Plain tea is good.", GOOD_TEA, "World."],
                2: ["Also plain.", GOOD_TEA, "NO."]}


def test_judge_pairs_from_models_or_minimal_edits_and_none_without_a_satisfying_answer():
    pairs = verifiable_judge_pairs(PAIR_ROWS, PAIR_ANSWERS)
    assert [p["i"] for p in pairs] == [0, 1]  # prompt 2: no answer is all lowercase, so no pair
    from_models, edited = pairs
    # prompt 0: M_1 and M_2 satisfy, M_0 does not: both answers are the models' own (the first of each kind)
    assert from_models["source"] == "models"
    assert (from_models["satisfying_model"], from_models["satisfying"]) == (1, "Plain tea is good.")
    assert (from_models["violating_model"], from_models["violating"]) == (0, "Tea, then more.")
    assert from_models["violated"] == ["no_commas"]
    # prompt 1: every model satisfies: the violating answer is a minimal edit of M_0's
    assert edited["source"] == "minimal_edit" and edited["satisfying"] == GOOD_TEA
    assert edited["violating_model"] is None and edited["violating"] != GOOD_TEA
    (target,) = edited["violated"]
    assert target == "no_commas"  # adding a comma keeps the word count: of the least-changing edits, the first
    verdicts = vf.follows(edited["violating"], TEA)
    assert verdicts == [c["kind"] != target for c in TEA]  # fails its target, keeps the others
    assert all(vf.follows(p["satisfying"], PAIR_ROWS[p["i"]]["constraints"]) for p in pairs)
    # No satisfying answer anywhere: no pairs at all (we never write one).
    assert verifiable_judge_pairs(PAIR_ROWS[2:], {0: ["Hello."], 1: ["World."]}) == []


def test_judge_pairs_prefer_the_edit_that_keeps_the_length():
    # Breaking "at most 20 words" adds words; breaking "no commas" adds a comma: the comma is chosen, so a
    # judge that prefers longer (or shorter) answers gains nothing from the pair.
    row = {"id": "w", "prompt": "Q", "constraints": [{"kind": "word_count", "relation": "at most", "n": 20},
                                                     {"kind": "no_commas"}]}
    assert vf.minimal_violation(GOOD_TEA, row["constraints"], 0) is not None
    (pair,) = verifiable_judge_pairs([row], {0: [GOOD_TEA]})
    assert pair["violated"] == ["no_commas"] and len(vf.words(pair["violating"])) == len(vf.words(GOOD_TEA))


def test_judge_pairs_skip_a_prompt_whose_satisfying_answers_cannot_be_edited():
    # "123 456" has no letters: it is both lowercase and uppercase, and no edit breaks one and keeps the other.
    row = {"id": "x", "prompt": "Q", "constraints": [{"kind": "lowercase"}, {"kind": "uppercase"}]}
    assert all(vf.follows("123 456", row["constraints"]))
    assert verifiable_judge_pairs([row], {0: ["123 456"], 1: ["123 456"]}) == []


# ----------------------------------------------------------------------------- files and sampling


def test_a_users_verifiable_file_without_ids_and_the_sample(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "Hi"}\n')
    user = tmp_path / "user.jsonl"
    constraint = {"kind": "no_commas"}
    user.write_text(json.dumps({"prompt": "Describe rain. " + vf.describe(constraint), "constraints": [constraint]})
                    + "\n\n" + json.dumps({"id": "own", "prompt": "Say hi. " + vf.describe(constraint),
                                           "constraints": [constraint]}) + "\n")
    assert not holds_constraints(plain) and holds_constraints(user)
    assert [r["id"] for r in read_verifiable_rows(user)] == ["line1", "own"]
    user.write_text(json.dumps({"prompt": "Describe rain.", "constraints": [constraint]}) + "\n")
    with pytest.raises(DataError, match=r"user\.jsonl:1: the prompt lacks the instruction"):
        read_verifiable_rows(user)
    shipped = vf.load_rows()
    sample = sample_rows(shipped, 48, seed=0)
    assert len(sample) == 48 and len({r["id"] for r in sample}) == 48
    assert sample == sample_rows(shipped, 48, seed=0) != sample_rows(shipped, 48, seed=1)
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample)  # the file's order
    assert sample_rows(shipped[:5], 48, seed=0) == shipped[:5]


def _eval_main(capsys, *args):
    from mrjax.eval.__main__ import main

    status = main(list(args))
    return status, capsys.readouterr().err


def test_bad_verifiable_input_fails_before_any_work(tiny_run, tmp_path, capsys):
    run_dir = tiny_run[0]
    constraint = {"kind": "no_commas"}
    good = {"prompt": "Describe rain. " + vf.describe(constraint), "constraints": [constraint]}
    path = tmp_path / "user.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "constraints": [{"kind": "rhymes"}]}) + "\n")
    status, err = _eval_main(capsys, "--run", str(run_dir), "--prompts", str(path), "--quiet")
    assert status == 2 and "user.jsonl:2: unknown constraint kind" in err, err
    path.write_text(json.dumps(good) + "\n")
    status, err = _eval_main(capsys, "--run", str(run_dir), "--prompts", str(path), "--no-verifiable", "--quiet")
    assert status == 2 and "holds verifiable rows, but --verifiable is 0" in err, err
    status, err = _eval_main(capsys, "--run", str(run_dir), "--verifiable", "-1", "--quiet")
    assert status == 2 and "--verifiable must be" in err, err
    assert not (run_dir / "eval").exists()


# ----------------------------------------------------------------------------- the tiny run


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("train", "shards", "tensorboard"))
    return dest


def _recomputed_accuracy(answers):
    strict = [vf.follows(a["response"], a["constraints"]) for a in answers]
    loose = [vf.follows(a["response"], a["constraints"], loose=True) for a in answers]
    return mx.following_accuracy(strict, loose)


def _check_actor_figures(ev, v, ts=("0", "1", "2")):
    for t in ts:
        answers = rows(ev / f"verifiable_answers_m{t}.jsonl")
        assert len(answers) == v["prompts"]
        want = _recomputed_accuracy(answers)
        for key in ("prompt_strict", "prompt_loose", "constraint_strict", "constraint_loose"):
            assert v["actor"][t][key] == pytest.approx(want[key])
            assert v["actor"][t][f"{key}_low"] <= v["actor"][t][key] <= v["actor"][t][f"{key}_high"]
    passed = {t: [all(vf.follows(a["response"], a["constraints"])) for a in rows(ev / f"verifiable_answers_m{t}.jsonl")]
              for t in ("0", "2")}
    strict = v["comparison"]["strict"]
    assert strict["model_only"] == sum(a and not b for a, b in zip(passed["2"], passed["0"]))
    assert strict["baseline_only"] == sum(b and not a for a, b in zip(passed["2"], passed["0"]))
    assert strict["mcnemar_p"] == pytest.approx(mx.mcnemar_exact_p(strict["model_only"], strict["baseline_only"]))
    assert strict["prompt"] == pytest.approx(v["actor"]["2"]["prompt_strict"] - v["actor"]["0"]["prompt_strict"])


def _check_report(run_dir):
    md, html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert "## Verifiable instructions" in md and "<h2>Verifiable instructions</h2>" in html
    assert "report/verifiable.png" in md and (run_dir / "report" / "verifiable.png").stat().st_size > 1000
    assert html.count("data:image/png;base64,") == 5  # the four pictures and this section's
    return md


@pytest.mark.slow
def test_eval_cli_adds_the_verifiable_section(tiny_run, tmp_path):
    # The shipped set, 6 prompts. An evaluation directory written before these settings existed is accepted.
    run_dir = _copy_run(tiny_run[0], tmp_path / "shipped")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "settings.json").write_text(json.dumps({
        "human": "", "judge": "", "judge_samples": "1", "max_prompts": "1", "prompts": "", "seed": "0", "verdict": ""}))
    done = run_cli("--run", str(run_dir), "--max-prompts", "1", "--judge-samples", "1", "--human", "",
                   "--verifiable", "6", "--quiet", module="mrjax.eval")
    assert done.returncode == 0, done.stderr[-4000:]
    ev = run_dir / "eval"
    assert json.loads((ev / "settings.json").read_text())["verifiable"] == "6"
    v = json.loads((ev / "metrics.json").read_text())["verifiable"]
    assert (v["prompts"], v["rows_available"], v["source"]) == (6, len(vf.load_rows()), str(vf.SHIPPED))
    assert [a["id"] for a in rows(ev / "verifiable_answers_m0.jsonl")] == [
        r["id"] for r in sample_rows(vf.load_rows(), 6, seed=0)]
    _check_actor_figures(ev, v)
    md = _check_report(run_dir)
    assert "only 6 prompts (fewer than 100)" in md
    if not v["judge_pairs"]["pairs"]:  # the random model satisfies no prompt of the shipped sample
        assert v["judges"] == {} and "no judge pairs" in md and "Judge: no verifiable pairs" in md

    # A user's file (no ids, easy constraints that random answers of 16 tokens satisfy) through --prompts:
    # the win rates keep the held-out prompts; every model satisfies the word limits, so there are pairs.
    specs = [[{"kind": "word_count", "relation": "at most", "n": 300}],
             [{"kind": "no_commas"}],
             [{"kind": "word_count", "relation": "at most", "n": 200}, {"kind": "forbidden_words", "words": ["tea"]}],
             [{"kind": "json"}],
             [{"kind": "word_count", "relation": "at most", "n": 250}]]
    user = tmp_path / "user.jsonl"
    user.write_text("".join(json.dumps({"prompt": f"Task {i}. " + " ".join(vf.describe(c) for c in cs),
                                        "constraints": cs}) + "\n" for i, cs in enumerate(specs)))
    run_dir = _copy_run(tiny_run[0], tmp_path / "user")
    done = run_cli("--run", str(run_dir), "--max-prompts", "1", "--judge-samples", "1", "--human", "",
                   "--prompts", str(user), "--verifiable", "4", "--quiet", module="mrjax.eval")
    assert done.returncode == 0, done.stderr[-4000:]
    ev = run_dir / "eval"
    held_out = rows(run_dir / "prompts" / "held_out.jsonl")
    assert [a["prompt"] for a in rows(ev / "answers_m0.jsonl")] == [held_out[0]["prompt"]]
    v = json.loads((ev / "metrics.json").read_text())["verifiable"]
    assert (v["prompts"], v["rows_available"], v["source"]) == (4, 5, str(user))
    _check_actor_figures(ev, v)
    sampled = sample_rows(read_verifiable_rows(user), 4, seed=0)
    answers = {t: [a["response"] for a in rows(ev / f"verifiable_answers_m{t}.jsonl")] for t in (0, 1, 2)}
    pairs = verifiable_judge_pairs(sampled, answers)
    assert rows(ev / "verifiable_pairs_m0_m1_m2.jsonl") == json.loads(json.dumps(pairs))
    counts = v["judge_pairs"]
    assert counts["pairs"] == len(pairs) > 0
    assert counts["from_models"] + counts["minimal_edits"] == len(pairs)
    assert counts["from_models"] == sum(p["source"] == "models" for p in pairs)
    for t in ("0", "1", "2"):
        scores = [r["score"] for r in rows(ev / f"verifiable_judge_m{t}_on_verifiable_pairs_m0_m1_m2.jsonl")]
        assert len(scores) == 2 * len(pairs)
        # the satisfying answer's score against the violating one's (scores read by expectation: never missing)
        right = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[:len(pairs)], scores[len(pairs):])]
        assert v["judges"][t]["score_accuracy"] == pytest.approx(100 * np.mean(right))
        verdicts = rows(ev / f"verifiable_pairwise_m{t}_on_verifiable_pairs_m0_m1_m2.jsonl")
        assert len(verdicts) == len(pairs)
        # the satisfying answer is A in the forward order and B in the reverse one
        per_pair = []
        for r in verdicts:
            won = [verdict == side for verdict, side in ((r["forward"], "A"), (r["reverse"], "B"))
                   if verdict is not None]
            if won:
                per_pair.append(np.mean(won))
        if per_pair:
            assert v["judges"][t]["pairwise_accuracy"] == pytest.approx(100 * np.mean(per_pair))
    md = _check_report(run_dir)
    assert f"{counts['from_models']} from the models' own answers" in md
    assert f"{counts['minimal_edits']} where every answer satisfied" in md
