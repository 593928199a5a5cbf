"""Evaluation: every metric against hand-worked values or an independent reference (scipy), the
bootstrap's coverage in a seeded simulation, the report of the tiny run (the loop's cheap part and
``python -m mrjax.eval``'s full one), missing iterations and bad input files."""
import json
import math
import shutil
import struct

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from loop_helpers import REPO, rows, run_cli
from mrjax import roles
from mrjax.eval import metrics as mx

# ----------------------------------------------------------------------------- metrics


def test_win_rate_with_both_orders_ties_and_missing_verdicts():
    # (forward: model in A, reverse: model in B)
    cases = [("A", "B", 1.0),    # model wins both orders
             ("A", "A", 0.5),    # the orders disagree (position decided): a tie
             ("B", "A", 0.0),    # baseline wins both
             (None, "B", 1.0),   # one order unparseable: the other decides
             ("B", None, 0.0),
             (None, None, None)]  # no verdict: counted, never scored
    prefs = [mx.preference_from_orders(f, r) for f, r, _ in cases]
    for (f, r, want), got in zip(cases, prefs):
        assert (math.isnan(got) if want is None else got == want), (f, r, got)
    assert mx.win_rate(prefs) == pytest.approx(100 * 2.5 / 5)  # (1 + .5 + 0 + 1 + 0) / 5 scored
    assert math.isnan(mx.win_rate([math.nan]))


def test_length_controlled_win_rate_removes_a_length_preference():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(200, 800, n).astype(float)
    model = base + rng.normal(250, 200, n)  # the model mostly writes longer answers
    d = model - base
    feature = np.tanh(d / d.std())
    # A judge that only likes length: at equal length it is a coin flip.
    prefs = (rng.random(n) < 1 / (1 + np.exp(-3 * feature))).astype(float)
    raw, lc = mx.win_rate(prefs), mx.length_controlled_win_rate(prefs, model, base)
    assert raw > 75
    assert abs(lc - 50) < 8, (raw, lc)
    # A model that is better at equal length (intercept 1) keeps its advantage: 100 * sigmoid(1) = 73.1.
    prefs = (rng.random(n) < 1 / (1 + np.exp(-(1 + 3 * feature)))).astype(float)
    assert mx.length_controlled_win_rate(prefs, model, base) == pytest.approx(73.1, abs=8)


def test_logistic_fit_matches_scipy_with_soft_labels():
    rng = np.random.default_rng(1)
    x = np.stack([np.ones(60), rng.normal(size=60)], axis=1)
    y = rng.choice([0.0, 0.5, 1.0], size=60)

    def nll(w):
        z = x @ w
        return np.sum(np.logaddexp(0, z) - y * z)

    want = scipy.optimize.minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(mx.logistic_fit(x, y, l2=0.0), want, atol=1e-5)


def test_bootstrap_interval_covers_the_true_rate_about_95_percent():
    rng = np.random.default_rng(2)
    values, probs = np.array([0.0, 0.5, 1.0]), np.array([0.45, 0.2, 0.35])
    truth = 100 * float(values @ probs)  # 45%
    trials, hits = 300, 0
    for trial in range(trials):
        sample = rng.choice(values, size=80, p=probs)
        lo, hi = mx.bootstrap_interval(sample, resamples=1000, seed=trial)
        hits += lo <= truth <= hi
    assert 0.90 <= hits / trials <= 0.985, hits / trials


def test_agreement_with_ties_counted_half_and_dropped():
    judge = [1.0, 0.5, 0.0, 1.0, 0.0, math.nan]
    reference = [1.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    got = mx.agreement(judge, reference)
    # per pair: 1, .5 (judge tie), 0, .5 (reference tie), 1; the NaN pair is left out
    assert got["with_ties"] == pytest.approx(100 * 3 / 5)
    # without ties: (1,1) agree, (0,1) disagree, (0,0) agree
    assert got["ties_dropped"] == pytest.approx(100 * 2 / 3)
    assert (got["pairs"], got["pairs_without_ties"]) == (5, 3)
    assert [mx.preference_from_scores(a, b) for a, b in ((4, 2), (3, 3), (1, 2.5))] == [1.0, 0.5, 0.0]
    assert math.isnan(mx.preference_from_scores(None, 3))


def test_spearman_with_ties_by_hand_and_against_scipy():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert mx.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    np.testing.assert_allclose(mx.average_ranks([3, 1, 3, 2, 3]), [4, 1, 4, 2, 4])
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 4, 7), rng.integers(0, 5, 7)
        want = scipy.stats.spearmanr(x, y).statistic
        got = mx.spearman(x, y)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert math.isnan(mx.spearman([2, 2, 2], [1, 2, 3]))  # a constant judge has no correlation


def test_meta_judge_biases_by_hand():
    winners = ["A", "A", "B", "A", None, "B", "B"]
    first = [3, 2, 4, 1, 5, 2, 1]
    second = [1, 4, 4, 1, 0, 2, 3]
    got = mx.meta_judge_biases(winners, first, second)
    # unequal-score calls 0, 1, 6: the higher-scored judgment won in 0 and 6
    assert got["score_bias"] == pytest.approx(100 * 2 / 3)
    # verdicts 0, 1, 2, 3, 5, 6: first position in 0, 1, 3
    assert got["positional_bias"] == pytest.approx(50.0)
    assert got["positional_bias_equal_scores"] == pytest.approx(100 / 3)  # calls 2, 3, 5: only 3
    assert got["positional_bias_unequal_scores"] == pytest.approx(100 * 2 / 3)  # 0, 1 of 0, 1, 6
    assert (got["verdicts"], got["equal_score_calls"], got["unequal_score_calls"]) == (6, 3, 3)


def test_gaussian_kde_matches_scipy_and_integrates_to_one():
    samples = np.array([1.0, 2.0, 2.0, 3.5, 4.0, 5.0])
    grid = np.linspace(-3, 9, 1201)
    h = samples.std() * samples.size ** (-1 / 5)
    want = scipy.stats.gaussian_kde(samples, bw_method=h / samples.std(ddof=1))(grid)
    np.testing.assert_allclose(mx.gaussian_kde(samples, grid), want, rtol=1e-9, atol=1e-12)
    assert np.trapezoid(mx.gaussian_kde(samples, grid), grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("text, want", [
    ("Response B is clearer.\nWinner: Response B", "B"),
    ("**Winner:** response A", "A"),
    ("Winner: A", "A"),
    ("Winner: [Response A | Response B]", None),  # the echoed format names both
    ("Response A is better.", None),
])
def test_pairwise_verdicts_parse_like_the_meta_judge(text, want):
    assert roles.classify_pairwise(text)[1] == want
    prompt = roles.fill_pairwise_prompt("Q?", "first answer", "second answer")
    assert prompt.index("Response A: first answer") < prompt.index("Response B: second answer")


# ----------------------------------------------------------------------------- the tiny run


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("train", "shards", "tensorboard"))
    return dest


@pytest.mark.slow
def test_loop_writes_the_cheap_report_after_each_iteration(tiny_run):
    run_dir, _ = tiny_run
    figures = json.loads((run_dir / "report" / "figures.json").read_text())
    assert sorted(figures["iterations"]) == ["1", "2"]
    # the meta-judge's biases, recomputed here from the loop's files
    judgments = {(j["prompt_id"], j["k"], j["n"]): j["score"] for j in rows(run_dir / "iter_1" / "judgments.jsonl")}
    meta = [m for m in rows(run_dir / "iter_1" / "meta_judgments.jsonl") if m["winner"]]
    first_won = [m["winner"] == "A" for m in meta]
    unequal = [(judgments[(m["prompt_id"], m["k"], m["m"])], judgments[(m["prompt_id"], m["k"], m["n"])], m["winner"])
               for m in meta if judgments[(m["prompt_id"], m["k"], m["m"])] != judgments[(m["prompt_id"], m["k"], m["n"])]]
    biases = figures["iterations"]["1"]["meta_judge"]
    assert biases["positional_bias"] == pytest.approx(100 * np.mean(first_won))
    assert biases["score_bias"] == pytest.approx(100 * np.mean([(a > b) == (w == "A") for a, b, w in unequal]))
    lengths = [len(r["response"]) for r in rows(run_dir / "iter_2" / "responses.jsonl")]
    assert figures["iterations"]["2"]["mean_response_chars"] == pytest.approx(np.mean(lengths))
    report = (run_dir / "report.md").read_text()
    assert "## Meta-judge biases" in report and "report/score_distribution.png" in report
    for name in ("score_distribution", "response_length", "meta_judge_biases"):
        width, height = _png_size(run_dir / "report" / f"{name}.png")
        assert width >= 600 and height >= 400


@pytest.mark.slow
def test_the_run_ends_with_a_table_recomputed_from_its_files(tiny_run):
    """The CLI's closing table (stderr) and the report's DPO and speed tables carry the run's figures:
    tokens/s = the stage's generated tokens (counted here from its rows) over its wall time; the
    DPO accuracies are the train marker's."""
    run_dir, done = tiny_run
    table = done.stderr[done.stderr.index(f"run {run_dir}"):]
    lines = {line.strip().split("  ")[0]: line for line in table.splitlines()[2:]}
    for stage, name in (("responses", "actor"), ("judgments", "judge"), ("meta_judgments", "meta-judge")):
        tokens = sum(r["tokens"] for shard in sorted((run_dir / "iter_1" / "shards" / stage).glob("*.jsonl"))
                     for r in rows(shard))
        marker = json.loads((run_dir / "iter_1" / ".done" / f"{stage}.json").read_text())
        assert marker["tokens"] == tokens > 0
        rate = f"{marker['wall_s']:.0f}, {marker['tokens'] / marker['wall_s']:.0f}"
        assert rate in lines[f"{name}: s, tokens/s"], (rate, lines)
    train = json.loads((run_dir / "iter_1" / ".done" / "train.json").read_text())
    assert f"{train['pairs']} / {train['held_out_pairs']}" in lines["DPO pairs trained / held out"]
    assert f"{train['train_after']['accuracy']:.3f} [" in lines["DPO accuracy, trained"]
    assert f"{train['held_out_before']['accuracy']:.3f} -> {train['held_out_after']['accuracy']:.3f}" in \
        lines["DPO accuracy, held out"]
    report = (run_dir / "report.md").read_text()
    assert "## DPO: does it learn?" in report and "| generated tokens/s | actor | judge | meta-judge |" in report
    # The judge's baseline: a constant guess of the held-out rows' mean score (tiny.yaml: the first 3 rows).
    truth = np.asarray([r["score"] for r in rows(REPO / "mrjax" / "data" / "eft_judge_eval_rows.jsonl")[:3]], float)
    guess = np.abs(truth - truth.mean()).mean()
    eft = json.loads((run_dir / "eft" / "summary.json").read_text())
    assert eft["after"]["judge_constant_guess_error"] == pytest.approx(guess)
    assert f"{guess:.2f}" in lines["a constant guess's error"]


@pytest.mark.slow
def test_eval_cli_on_the_tiny_run_writes_report_and_pictures(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run[0], tmp_path / "run")
    from mrjax.eval.run import HUMAN_RANKINGS

    human = tmp_path / "human.jsonl"
    human.write_text("".join(line + "\n" for line in HUMAN_RANKINGS.read_text().splitlines()[:3]))
    done = run_cli("--run", str(run_dir), "--max-prompts", "3", "--judge-samples", "2", "--human", str(human),
                   "--no-verifiable", "--quiet", module="mrjax.eval")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ev = run_dir / "eval"
    # win rates recomputed from the pairwise files: per prompt the mean over orders of "model won"
    for w in result["win_rates"]:
        pairs = rows(ev / f"pairwise_m{w['model']}_m{w['baseline']}_by_m2.jsonl")
        assert len(pairs) == 3
        per_prompt = []
        for p in pairs:
            won = [v == side for v, side in ((p["forward"], "A"), (p["reverse"], "B")) if v is not None]
            if won:
                per_prompt.append(np.mean(won))
        assert w["win_rate"] == pytest.approx(100 * np.mean(per_prompt))
        assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    assert {(w["model"], w["baseline"]) for w in result["win_rates"]} == {(1, 0), (2, 0), (2, 1)}
    # judge quality: each M_t scored 2 x 3 answers and 3 x 4 human-ranked responses, N = 2 each
    for t in ("0", "1", "2"):
        assert len(rows(ev / f"judge_m{t}_on_m2_m0.jsonl")) == 6 and len(rows(ev / f"human_m{t}.jsonl")) == 12
        assert all(len(r["scores"]) == 2 for r in rows(ev / f"human_m{t}.jsonl"))
        assert result["judges"][t]["agreement"]["pairs"] == 3
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src='report/" not in html
    assert "verifiable" not in json.loads((ev / "metrics.json").read_text())  # tests/test_verifiable_eval.py
    md = (run_dir / "report.md").read_text()
    for section in ("## Actor: win rates", "## Judge quality", "## Meta-judge biases", "## Examples: M_0 and M_2"):
        assert section in md
    for name in ("score_distribution", "response_length", "win_rates", "meta_judge_biases"):
        assert f"report/{name}.png" in md and _png_size(run_dir / "report" / f"{name}.png")[0] >= 600
    # the warnings of weak numbers: 3 comparisons, the random judge parses nothing
    assert "only 3 comparisons" in md and "parse rate 0%" in md

    # Missing iterations: M_2 gone, the evaluation runs on M_0 and M_1 and says what is missing;
    # answers already computed are reused (their markers are not rewritten).
    marker = ev / ".done" / "answers_m1.json"
    mtime = marker.stat().st_mtime_ns
    shutil.rmtree(run_dir / "iter_2" / "hf")
    done = run_cli("--run", str(run_dir), "--max-prompts", "3", "--judge-samples", "2", "--human", str(human),
                   "--no-verifiable", "--quiet", module="mrjax.eval")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missing"] == ["iter_2/hf (M_2)"] and "missing" in done.stderr
    assert {(w["model"], w["baseline"]) for w in result["win_rates"]} == {(1, 0)}
    assert marker.stat().st_mtime_ns == mtime
    assert "missing: iter_2/hf (M_2)" in (run_dir / "report.md").read_text()


# ----------------------------------------------------------------------------- bad input


def _eval_main(capsys, *args):
    from mrjax.eval.__main__ import main

    status = main(list(args))
    out = capsys.readouterr()
    return status, out.err


@pytest.mark.parametrize("which, text, message", [
    ("prompts", "", "no prompts (the file is empty)"),
    ("prompts", '{"prompt": "ok"}\n{"prompt": \n', "prompts.jsonl:2: not valid JSON"),
    ("human", "", "no rows (the file is empty)"),
    ("human", '{"prompt": "q", "responses": ["a", "b"], "ranking": [1, 2]}\n{"prompt": "q", "responses": ["a"], '
              '"ranking": [1]}\n', "human.jsonl:2: 'responses' must be a list of at least two"),
    ("human", '{"prompt": "q", "responses": ["a", "b"], "ranking": [1]}\n', "human.jsonl:1: 'ranking' must be"),
])
def test_bad_eval_files_name_file_and_line(tiny_run, tmp_path, capsys, which, text, message):
    run_dir = tiny_run[0]
    path = tmp_path / f"{which}.jsonl"
    path.write_text(text)
    status, err = _eval_main(capsys, "--run", str(run_dir), f"--{which}", str(path), "--quiet")
    assert status == 2 and message in err, err
    assert not (run_dir / "eval").exists()  # nothing was started


def test_unloadable_judge_and_non_run_directory_fail_before_any_work(tiny_run, tmp_path, capsys):
    run_dir = tiny_run[0]
    status, err = _eval_main(capsys, "--run", str(run_dir), "--judge", str(tmp_path / "nowhere"), "--quiet")
    assert status == 2 and "--judge" in err and "cannot be loaded" in err
    (tmp_path / "empty_hf").mkdir()
    status, err = _eval_main(capsys, "--run", str(run_dir), "--judge", str(tmp_path / "empty_hf"), "--quiet")
    assert status == 2 and "no config.json" in err
    status, err = _eval_main(capsys, "--run", str(tmp_path), "--quiet")
    assert status == 2 and "not a run directory" in err
    assert not (run_dir / "eval").exists()
