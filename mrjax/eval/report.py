"""The run's report: ``<run_dir>/report.md``, ``report.html`` (self-contained) and ``report/*.png``.

Built from whatever the run directory holds: the loop's files give the cheap parts (response
lengths, parse rates, the judge's score distribution, the meta-judge's biases) and are written
after every iteration; ``eval/metrics.json`` (``python -m mrjax.eval``) adds win rates, judge
agreement and Spearman correlations, and example answers.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mrjax.data import jsonl_objects, mean_or_none, write_text
from mrjax.eval import metrics as mx
from mrjax.rundir import stage_markers

# The loop's generation stages (actor, judge, meta-judge) and their names in the tables.
GENERATION_STAGES = {"responses": "actor", "judgments": "judge", "meta_judgments": "meta-judge"}

# Thresholds of the plain warnings.
MIN_COMPARISONS = 30
MIN_PARSE_RATE = 0.8
MAX_TOP_SCORE_SHARE = 0.5
MAX_POSITIONAL_BIAS = 70.0
MIN_VERIFIABLE_PROMPTS = 100


def _rows(path: Path) -> list[dict]:
    """The file's rows, or none when the stage has not written it yet."""
    return jsonl_objects(path) if path.is_file() else []


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- figures


def iteration_figures(where: Path) -> dict:
    """The cheap figures of one iteration directory, from its files (any stage may be missing)."""
    done = stage_markers(where)
    responses = _rows(where / "responses.jsonl")
    judgments = _rows(where / "judgments.jsonl")
    scores = [j["score"] for j in judgments if j.get("score") is not None]
    out: dict[str, Any] = {
        "responses": len(responses),
        "mean_response_chars": mean_or_none([len(r["response"]) for r in responses]),
        "judgments": len(judgments),
        "judge_parse_rate": done.get("judgments", {}).get("judge_parse_rate"),
        "scores": scores,
        "top_score_share": float(np.mean([s >= 4.5 for s in scores])) if scores else None,
        "meta_judge_parse_rate": done.get("meta_judgments", {}).get("meta_judge_parse_rate"),
        "actor_pairs": len(_rows(where / "actor_pairs.jsonl")),
        "judge_pairs": len(_rows(where / "judge_pairs.jsonl")),
        "wall_s": {k: v.get("wall_s") for k, v in sorted(done.items()) if k != "summary"},
        # Generated tokens per second of wall time, per generation stage (expected-mode reads included).
        "tokens_per_s": {k: done[k]["tokens"] / done[k]["wall_s"] for k in GENERATION_STAGES
                         if done.get(k, {}).get("tokens") and done[k].get("wall_s")},
        "dpo_loss": done.get("train", {}).get("loss_mean"),
        "dpo_pairs": done.get("train", {}).get("pairs"),
        "dpo_held_out_pairs": done.get("train", {}).get("held_out_pairs"),
        "dpo_train_after": done.get("train", {}).get("train_after"),
        "dpo_held_out_before": done.get("train", {}).get("held_out_before"),
        "dpo_held_out_after": done.get("train", {}).get("held_out_after"),
        "complete": "summary" in done,
    }
    meta = _rows(where / "meta_judgments.jsonl")
    if meta:
        score_of = {(j["prompt_id"], j["k"], j["n"]): j.get("score") for j in judgments}
        out["meta_judge"] = mx.meta_judge_biases(
            [m["winner"] for m in meta],
            [score_of.get((m["prompt_id"], m["k"], m["m"])) for m in meta],
            [score_of.get((m["prompt_id"], m["k"], m["n"])) for m in meta])
    return out


def collect(root: Path) -> dict:
    """Everything the report shows, as plain data (also written to ``report/figures.json``)."""
    import yaml

    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    total = int(config.get("iteration", {}).get("iterations", 0))
    iterations = {}
    for t in range(1, total + 1):
        where = root / f"iter_{t}"
        if (where / "responses.jsonl").is_file():
            iterations[t] = iteration_figures(where)
    return {"config": config, "iterations_planned": total, "iterations": iterations,
            "eft": _json(root / "eft" / "summary.json"), "eval": _json(root / "eval" / "metrics.json")}


def warnings_for(data: dict) -> list[str]:
    """Plain warnings where the numbers are weak."""
    out = []
    for w in data["eval"].get("win_rates", []):
        name = f"M_{w['model']} vs M_{w['baseline']}"
        if w["comparisons"] < MIN_COMPARISONS:
            out.append(f"{name}: only {w['comparisons']} comparisons with a verdict (fewer than {MIN_COMPARISONS}); "
                       "the win rate is a rough estimate")
        if not (math.isnan(w["ci_low"]) or math.isnan(w["ci_high"])) and w["ci_low"] < 50 < w["ci_high"]:
            out.append(f"{name}: the 95% interval [{w['ci_low']:.1f}, {w['ci_high']:.1f}] contains 50%; "
                       "no difference is shown")
        if w.get("pairwise_parse_rate") is not None and w["pairwise_parse_rate"] < MIN_PARSE_RATE:
            out.append(f"{name}: the pairwise judge's verdict parsed in {100 * w['pairwise_parse_rate']:.0f}% of "
                       f"calls (under {100 * MIN_PARSE_RATE:.0f}%)"
                       + (" (verdicts were read by expectation, not from the text)"
                          if data["eval"].get("verdict") == "expected" else ""))
    it_cfg = data["config"].get("iteration", {})
    by_expectation = " (scores were read by expectation, not from the text)"
    for t, it in data["iterations"].items():
        if it["judge_parse_rate"] is not None and it["judge_parse_rate"] < MIN_PARSE_RATE:
            out.append(f"iteration {t}: judge parse rate {100 * it['judge_parse_rate']:.0f}% "
                       f"(under {100 * MIN_PARSE_RATE:.0f}%)"
                       + (by_expectation if it_cfg.get("judge_score") == "expected" else ""))
        if it["meta_judge_parse_rate"] is not None and it["meta_judge_parse_rate"] < MIN_PARSE_RATE:
            out.append(f"iteration {t}: meta-judge parse rate {100 * it['meta_judge_parse_rate']:.0f}% "
                       f"(under {100 * MIN_PARSE_RATE:.0f}%)"
                       + (by_expectation.replace("scores", "verdicts") if it_cfg.get("meta_judge_verdict") == "expected"
                          else ""))
        if it["top_score_share"] is not None and it["top_score_share"] > MAX_TOP_SCORE_SHARE:
            out.append(f"iteration {t}: the judge gave 5 to {100 * it['top_score_share']:.0f}% of the responses "
                       f"(more than half): its scores separate little")
        bias = it.get("meta_judge", {}).get("positional_bias")
        if bias is not None and not math.isnan(bias) and bias > MAX_POSITIONAL_BIAS:
            out.append(f"iteration {t}: the meta-judge picked the first position in {bias:.0f}% of its verdicts "
                       f"(above {MAX_POSITIONAL_BIAS:.0f}%)")
    for t, j in data["eval"].get("judges", {}).items():
        if j.get("parse_rate") is not None and j["parse_rate"] < MIN_PARSE_RATE:
            out.append(f"M_{t} as judge (evaluation): parse rate {100 * j['parse_rate']:.0f}% "
                       f"(under {100 * MIN_PARSE_RATE:.0f}%)")
    return out + verifiable_warnings(data["eval"].get("verifiable"))


def verifiable_warnings(v: dict | None) -> list[str]:
    """Plain warnings of the verifiable-instruction section."""
    if not v:
        return []
    out = []
    if v["prompts"] < MIN_VERIFIABLE_PROMPTS:
        out.append(f"verifiable instructions: only {v['prompts']} prompts (fewer than {MIN_VERIFIABLE_PROMPTS}); "
                   "the accuracies are rough estimates")
    c = v.get("comparison")
    if c:
        first, last = v["actor"]["0"], v["actor"][str(c["model"])]
        if first["prompt_strict_low"] <= last["prompt_strict_high"] and last["prompt_strict_low"] <= first[
                "prompt_strict_high"]:
            out.append(f"verifiable instructions: the 95% intervals of M_0 and M_{c['model']} (prompt level, strict) "
                       f"overlap ([{first['prompt_strict_low']:.1f}, {first['prompt_strict_high']:.1f}] and "
                       f"[{last['prompt_strict_low']:.1f}, {last['prompt_strict_high']:.1f}]); read the paired "
                       f"difference and McNemar's p-value (p = {c['strict']['mcnemar_p']:.3g}) before claiming a "
                       "change")
    if not v["judge_pairs"]["pairs"]:
        out.append("verifiable instructions: no judge pairs (no model answer satisfied every constraint of its "
                   "prompt), so the judges' accuracy on verifiable pairs is not measured")
    return out


# ----------------------------------------------------------------------------- pictures


def _figure(height: float = 4.0, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(rows, 1, figsize=(6.4, height), dpi=110)
    return plt, fig, ax


def _legend_below(ax) -> None:
    """The legend under the axes, where it cannot hide a point or an interval."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=2, frameon=False)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_score_distribution(data: dict, path: Path) -> Path | None:
    """Kernel density of the judge's scores, one curve per iteration (the papers' figure)."""
    series = {t: it["scores"] for t, it in data["iterations"].items() if it["scores"]}
    if not series:
        return None
    plt, fig, ax = _figure()
    grid = np.linspace(-0.5, 5.5, 241)
    for t, scores in series.items():
        ax.plot(grid, mx.gaussian_kde(scores, grid), label=f"iteration {t} (n={len(scores)})")
    ax.set_xlabel("judge score (0-5)")
    ax.set_ylabel("density")
    ax.set_title("Judge score distribution per iteration")
    ax.set_xlim(-0.5, 5.5)
    ax.legend()
    return _save(plt, fig, path)


def plot_lengths(data: dict, path: Path) -> Path | None:
    loop = {t: it["mean_response_chars"] for t, it in data["iterations"].items() if it["mean_response_chars"]}
    held_out = {int(t): a["mean_chars"] for t, a in data["eval"].get("actor", {}).items() if a["mean_chars"]}
    if not loop and not held_out:
        return None
    plt, fig, ax = _figure(4.4)
    if loop:
        ax.plot(list(loop), list(loop.values()), "o-", label="training prompts: M_(t-1)'s responses in iteration t")
    if held_out:
        ax.plot(list(held_out), list(held_out.values()), "s--", label="held-out prompts: M_t's answers")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("mean response length (characters)")
    ax.set_title("Response length per iteration")
    ticks = sorted(set(loop) | set(held_out))
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] - 0.3, ticks[-1] + 0.3)
    ax.set_ylim(0, 1.15 * max(list(loop.values()) + list(held_out.values())))
    _legend_below(ax)
    return _save(plt, fig, path)


def plot_win_rates(data: dict, path: Path) -> Path | None:
    rates = data["eval"].get("win_rates", [])
    if not rates:
        return None
    plt, fig, ax = _figure(4.6)
    for label, keep, marker in (("win rate vs M_0", lambda w: w["baseline"] == 0, "o-"),
                                ("win rate vs M_(t-1)", lambda w: w["baseline"] == w["model"] - 1 and w["baseline"] > 0,
                                 "s-")):
        rows = [w for w in rates if keep(w)]
        if rows:
            x = [w["model"] for w in rows]
            y = [w["win_rate"] for w in rows]
            err = [[max(w["win_rate"] - w["ci_low"], 0) for w in rows], [max(w["ci_high"] - w["win_rate"], 0)
                                                                          for w in rows]]
            ax.errorbar(x, y, yerr=err, fmt=marker, capsize=4, label=f"{label} (95% bootstrap interval)")
    lc = [w for w in rates if w["baseline"] == 0]
    ax.plot([w["model"] for w in lc], [w["lc_win_rate"] for w in lc], "d:", label="length-controlled win rate vs M_0")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("iteration t (model M_t)")
    ax.set_ylabel("win rate (%)")
    ax.set_ylim(-3, 103)  # room for intervals that reach 0 or 100
    ticks = sorted({w["model"] for w in rates})
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] - 0.4, ticks[-1] + 0.4)
    ax.set_title("Actor: head-to-head win rate")
    _legend_below(ax)
    return _save(plt, fig, path)


def plot_biases(data: dict, path: Path) -> Path | None:
    rows = {t: it["meta_judge"] for t, it in data["iterations"].items() if "meta_judge" in it}
    if not rows:
        return None
    plt, fig, ax = _figure(4.6)
    ts = list(rows)
    for key, label, marker in (("score_bias", "score bias: prefers the higher-scored judgment", "o-"),
                               ("positional_bias", "positional bias: picks the first position", "s-"),
                               ("positional_bias_equal_scores", "positional bias, equal scores", "^:"),
                               ("positional_bias_unequal_scores", "positional bias, unequal scores", "v:")):
        ax.plot(ts, [rows[t][key] for t in ts], marker, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("% of meta-judge verdicts")
    ax.set_ylim(-3, 103)
    ax.set_xticks(ts)
    ax.set_xlim(ts[0] - 0.6, ts[-1] + 0.6)
    ax.set_title("Meta-judge biases per iteration")
    _legend_below(ax)
    return _save(plt, fig, path)


def plot_verifiable(data: dict, path: Path) -> Path | None:
    """Instruction following per model M_t (prompt and constraint level, strict and loose) and each M_t's
    accuracy as judge of the verifiable pairs, with 95% bootstrap intervals."""
    v = data["eval"].get("verifiable")
    if not v:
        return None
    plt, fig, (top, bottom) = _figure(7.6, rows=2)
    ts = sorted(int(t) for t in v["actor"])
    series = (("prompt_strict", "prompt level, strict", "o-"), ("prompt_loose", "prompt level, loose", "o--"),
              ("constraint_strict", "constraint level, strict", "s-"),
              ("constraint_loose", "constraint level, loose", "s--"))
    for k, (key, label, marker) in enumerate(series):  # the series side by side, so their intervals do not hide
        _with_errorbars(top, [t + 0.06 * (k - 1.5) for t in ts], [v["actor"][str(t)] for t in ts], key, marker, label)
    top.set_ylabel("instructions followed (%)")
    top.set_title(f"Actor: verifiable instructions ({v['prompts']} prompts)")
    judges = sorted(int(t) for t in v["judges"])
    for k, (key, label, marker) in enumerate((("score_accuracy", "judge scores", "o-"),
                                              ("pairwise_accuracy", "pairwise, both orders", "s--"))):
        _with_errorbars(bottom, [t + 0.06 * (k - 0.5) for t in judges], [v["judges"][str(t)] for t in judges], key,
                        marker, label)
    bottom.axhline(50, color="grey", lw=0.8, ls="--")
    bottom.set_ylabel("satisfying answer preferred (%)")
    bottom.set_title(f"Judge: verifiable pairs ({v['judge_pairs']['pairs']} pairs)")
    if not judges:
        bottom.text(0.5, 0.5, "no pairs: no answer satisfied every constraint of its prompt", ha="center",
                    va="center", transform=bottom.transAxes)
    for ax in (top, bottom):
        ax.set_xlabel("iteration t (model M_t)")
        ax.set_ylim(-3, 103)
        ax.set_xticks(ts)
        ax.set_xlim(ts[0] - 0.4, ts[-1] + 0.4)
        if ax.get_legend_handles_labels()[0]:
            _legend_below(ax)
    return _save(plt, fig, path)


def _with_errorbars(ax, x: list[float], figures: list[dict], key: str, marker: str, label: str) -> None:
    """``figures[i][key]`` at x[i] with its interval (``key_low`` / ``key_high``); NaNs left out."""
    shown = [(at, f) for at, f in zip(x, figures) if not math.isnan(f[key])]
    if not shown:
        return
    below = [max(f[key] - f[f"{key}_low"], 0) for _, f in shown]
    above = [max(f[f"{key}_high"] - f[key], 0) for _, f in shown]
    ax.errorbar([at for at, _ in shown], [f[key] for _, f in shown], yerr=[below, above], fmt=marker, capsize=4,
                label=f"{label} (95% interval)")


# ----------------------------------------------------------------------------- text


def _f(v: Any, digits: int = 1, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.0f}%" if pct else f"{v:.{digits}f}"
    return str(v)


def _with_interval(figures: dict, name: str, digits: int = 2, pct: bool = False) -> str:
    """``value [low, high]`` when the figures carry an interval, else the value alone."""
    if figures.get(f"{name}_low") is None:
        return _f(figures.get(name), digits, pct)
    return (f"{_f(figures.get(name), digits, pct)} [{_f(figures[name + '_low'], digits, pct)}, "
            f"{_f(figures[name + '_high'], digits, pct)}]")


def _before_after(before: dict | None, after: dict | None, name: str) -> str:
    if not before or not after:
        return "-"
    return f"{_f(before[name], 3)} -> {_with_interval(after, name, 3)}"


def run_table(root: str | Path) -> str:
    """The run at a glance, for the terminal: one column for EFT and one per iteration (wall time, speed,
    parse rates, the judge's error, the meta-judge's accuracy, pairs, DPO on trained and held-out pairs)."""
    data = collect(Path(root))
    eft, its = data["eft"], data["iterations"]
    columns = (["EFT"] if eft else []) + [f"iteration {t}" for t in its]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, eft_cell: str, per_iteration) -> None:
        rows.append((label, ([eft_cell] if eft else []) + [per_iteration(it) for it in its.values()]))

    before, after, train = eft.get("before", {}), eft.get("after", {}), eft.get("train", {})
    ba = lambda key, **kw: f"{_f(before.get(key), **kw)} -> {_f(after.get(key), **kw)}"  # noqa: E731
    eft_wall = sum(v.get("wall_s") or 0 for v in (before, after, train))
    row("wall time (s)", _f(eft_wall, 0), lambda it: _f(float(sum(v or 0 for v in it["wall_s"].values())), 0))
    for stage, name in GENERATION_STAGES.items():
        row(f"  {name}: s, tokens/s", "", lambda it, s=stage: (
            f"{_f(it['wall_s'].get(s), 0)}, {_f(it['tokens_per_s'].get(s), 0)}" if s in it["wall_s"] else "-"))
    row("  training (s)", _f(train.get("wall_s"), 0), lambda it: _f(it["wall_s"].get("train"), 0))
    row("judge parse rate", ba("judge_parse_rate", pct=True), lambda it: _f(it["judge_parse_rate"], pct=True))
    row("judge mean abs. error", f"{_f(before.get('judge_mean_abs_error'), 2)} -> "
        f"{_with_interval(after, 'judge_mean_abs_error')}", lambda it: "")
    row("  a constant guess's error", _f(after.get("judge_constant_guess_error"), 2), lambda it: "")
    row("meta-judge parse rate", ba("meta_judge_parse_rate", pct=True),
        lambda it: _f(it["meta_judge_parse_rate"], pct=True))
    row("meta-judge accuracy", f"{_f(before.get('meta_judge_accuracy'), pct=True)} -> "
        f"{_with_interval(after, 'meta_judge_accuracy', pct=True)}", lambda it: "")
    row("mean response chars", "", lambda it: _f(it["mean_response_chars"], 0))
    row("pairs: actor / judge", "", lambda it: f"{it['actor_pairs']} / {it['judge_pairs']}")
    row("DPO pairs trained / held out", "", lambda it: f"{it['dpo_pairs'] or 0} / {it['dpo_held_out_pairs'] or 0}")
    row("DPO accuracy, trained", "", lambda it: _with_interval(it["dpo_train_after"], "accuracy", 3)
        if it.get("dpo_train_after") else "-")
    row("DPO accuracy, held out", "", lambda it: _before_after(it.get("dpo_held_out_before"),
                                                              it.get("dpo_held_out_after"), "accuracy"))
    width = [max(len(label) for label, _ in rows)] + [
        max([len(c)] + [len(cells[i]) for _, cells in rows]) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, width)).rstrip()  # noqa: E731
    return "\n".join([f"run {root}", line([""] + columns)] + [line([label] + cells) for label, cells in rows])


def build_blocks(root: Path, data: dict, pictures: dict[str, Path | None]) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("list", items), ("table", head, rows),
    ("img", path, caption), ("pairs", head, rows) for side-by-side answers."""
    cfg, its, ev = data["config"], data["iterations"], data["eval"]
    it_cfg, model = cfg.get("iteration", {}), cfg.get("model", {})
    b: list[tuple] = [("h", 1, f"mrjax report: {root.name}")]
    done = [t for t, it in its.items() if it["complete"]]
    b.append(("p", f"Run directory `{root}`. Mode {cfg.get('mode', '?')}, model {model.get('name', '?')} "
                   f"({model.get('dtype', '?')}); {len(done)} of {data['iterations_planned']} iterations complete. "
                   f"Per iteration {it_cfg.get('prompts_per_iteration')} prompts, K={it_cfg.get('responses_per_prompt')} "
                   f"responses each, N={it_cfg.get('judgments_per_response')} judgments per response; judge scores "
                   f"by {it_cfg.get('judge_score')}, meta-judge verdicts by {it_cfg.get('meta_judge_verdict')}."))
    warnings = warnings_for(data)
    missing = ev.get("missing", [])
    if warnings or missing:
        b.append(("h", 2, "Warnings"))
        b.append(("list", [f"missing: {m}" for m in missing] + warnings))
    eft = data["eft"]
    if eft:
        before, after = eft.get("before", {}), eft.get("after", {})
        b.append(("h", 2, "EFT"))
        b.append(("table", ["", "before EFT", "after EFT"], [
            ["judge parse rate (held-out rows)", _f(before.get("judge_parse_rate"), pct=True),
             _f(after.get("judge_parse_rate"), pct=True)],
            ["judge mean abs. error [95% interval]", _with_interval(before, "judge_mean_abs_error"),
             _with_interval(after, "judge_mean_abs_error")],
            ["a constant guess's mean abs. error (the rows' mean score)",
             _f(before.get("judge_constant_guess_error"), 2), _f(after.get("judge_constant_guess_error"), 2)],
            ["meta-judge parse rate", _f(before.get("meta_judge_parse_rate"), pct=True),
             _f(after.get("meta_judge_parse_rate"), pct=True)],
            ["meta-judge accuracy (parsed verdicts) [95% interval]", _with_interval(before, "meta_judge_accuracy", pct=True),
             _with_interval(after, "meta_judge_accuracy", pct=True)],
        ]))
    if its:
        b.append(("h", 2, "Iterations"))
        b.append(("table", ["iteration", "responses", "mean chars", "judge parse", "score mean", "5s given",
                            "meta parse", "actor pairs", "judge pairs", "DPO loss", "wall (s)"],
                  [[str(t), str(it["responses"]), _f(it["mean_response_chars"], 0), _f(it["judge_parse_rate"], pct=True),
                    _f(mean_or_none(it["scores"]), 2), _f(it["top_score_share"], pct=True),
                    _f(it["meta_judge_parse_rate"], pct=True), str(it["actor_pairs"]), str(it["judge_pairs"]),
                    _f(it["dpo_loss"], 3), _f(float(sum(v or 0 for v in it["wall_s"].values())), 0)]
                   for t, it in its.items()]))
        stages = sorted({s for it in its.values() for s in it["wall_s"]})
        b.append(("table", ["wall time (s)"] + stages,
                  [[f"iteration {t}"] + [_f(it["wall_s"].get(s), 0) for s in stages] for t, it in its.items()]))
        b.append(("table", ["generated tokens/s"] + list(GENERATION_STAGES.values()),
                  [[f"iteration {t}"] + [_f(it["tokens_per_s"].get(s), 0) for s in GENERATION_STAGES]
                   for t, it in its.items()]))
        dpo = [(t, it) for t, it in its.items() if it.get("dpo_train_after")]
        if dpo:
            b.append(("h", 2, "DPO: does it learn?"))
            b.append(("p", "Reward accuracy (chosen reward above rejected; ties 0.5) and loss with 95% bootstrap "
                           "intervals over pairs. Held-out pairs are never trained on; before DPO they are scored by "
                           "M_{t-1}, the reference itself (loss ln 2, every pair a tie)."))
            b.append(("table", ["iteration", "pairs trained / held out", "trained: accuracy after",
                                "held out: accuracy before -> after", "held out: loss before -> after"],
                      [[str(t), f"{it['dpo_pairs']} / {it['dpo_held_out_pairs'] or 0}",
                        _with_interval(it["dpo_train_after"], "accuracy", 3),
                        _before_after(it["dpo_held_out_before"], it["dpo_held_out_after"], "accuracy"),
                        _before_after(it["dpo_held_out_before"], it["dpo_held_out_after"], "loss")]
                       for t, it in dpo]))
    if ev.get("win_rates"):
        b.append(("h", 2, "Actor: win rates on held-out prompts"))
        b.append(("p", f"Judge: `{ev['judge']}` (pairwise, both orders; ties and order disagreements count 0.5; "
                       f"verdicts by {ev['verdict']}). {ev['prompts']} prompts. M_0 = `{ev['models']['0']}`."
                       + (" The judge is one of the run's own models, which may prefer its own answers; "
                          "pass `--judge` a stronger model for an independent verdict."
                          if ev["judge"] in ev["models"].values() else "")))
        b.append(("table", ["model", "baseline", "comparisons", "win rate", "95% interval", "LC win rate",
                            "orders agree", "verdict parse"],
                  [[f"M_{w['model']}", f"M_{w['baseline']}", str(w["comparisons"]), _f(w["win_rate"]) + "%",
                    f"[{_f(w['ci_low'])}, {_f(w['ci_high'])}]", _f(w["lc_win_rate"]) + "%", _f(w["order_agreement"], 0) + "%",
                    _f(w["pairwise_parse_rate"], pct=True)] for w in ev["win_rates"]]))
    if ev.get("actor"):
        b.append(("table", ["model", "mean answer length (chars)"],
                  [[f"M_{t}", _f(a["mean_chars"], 0)] for t, a in ev["actor"].items()]))
    if ev.get("judges"):
        b.append(("h", 2, "Judge quality"))
        b.append(("p", f"Each M_t as judge (N={ev['judge_samples']} samples averaged) on the {ev['prompts']} "
                       f"(M_T, M_0) answer pairs, against the pairwise judge's preferences, and on "
                       f"{ev['human_prompts']} human-ranked prompts (Spearman's rho with ties, mean over prompts)."))
        rows = []
        for t, j in ev["judges"].items():
            a = j.get("agreement", {})
            rows.append([f"M_{t}", _f(j["parse_rate"], pct=True), _f(a.get("with_ties")) + ("%" if a else ""),
                         _f(a.get("ties_dropped")) + ("%" if a.get("pairs_without_ties") else ""),
                         str(a.get("pairs_without_ties", "-")), _f(j["spearman"], 3), str(j["spearman_prompts"])])
        b.append(("table", ["judge", "parse rate", "agreement (ties 0.5)", "agreement (ties dropped)",
                            "pairs w/o ties", "Spearman", "prompts"], rows))
    if ev.get("verifiable"):
        b += verifiable_blocks(ev["verifiable"], ev, pictures.get("verifiable"))
    meta = {t: it["meta_judge"] for t, it in its.items() if "meta_judge" in it}
    if meta:
        b.append(("h", 2, "Meta-judge biases"))
        b.append(("table", ["iteration", "verdicts", "score bias", "positional bias", "positional (equal scores)",
                            "positional (unequal scores)", "equal / unequal calls"],
                  [[str(t), str(m["verdicts"]), _f(m["score_bias"]) + "%", _f(m["positional_bias"]) + "%",
                    _f(m["positional_bias_equal_scores"]) + "%", _f(m["positional_bias_unequal_scores"]) + "%",
                    f"{m['equal_score_calls']} / {m['unequal_score_calls']}"] for t, m in meta.items()]))
    captions = {"score_distribution": "Judge score distribution per iteration (kernel density).",
                "response_length": "Mean response length per iteration.",
                "win_rates": "Win rate and length-controlled win rate per iteration, with 95% bootstrap intervals.",
                "meta_judge_biases": "Meta-judge score and positional biases per iteration."}
    shown = [(name, path) for name, path in pictures.items() if path is not None and name in captions]
    if shown:
        b.append(("h", 2, "Pictures"))
        b += [("img", path, captions[name]) for name, path in shown]
    examples = example_pairs(root, ev)
    if examples:
        last = max(int(t) for t in ev["models"])
        b.append(("h", 2, f"Examples: M_0 and M_{last} side by side"))
        b.append(("pairs", ["prompt", "M_0", f"M_{last}"], examples))
    return b


def _by_t(per_model: dict[str, Any]) -> list[tuple[str, Any]]:
    """A JSON dict keyed by model t ("0", "1", ..., "10") in the order of t."""
    return sorted(per_model.items(), key=lambda item: int(item[0]))


def _pct(figures: dict, key: str) -> str:
    """``value% [low, high]`` of a percentage with its interval; "-" when there is no value."""
    value = figures.get(key)
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}% [{_f(figures[key + '_low'])}, {_f(figures[key + '_high'])}]"


VERIFIABLE_MEASURES = (("prompt_strict", "prompt level, strict"), ("prompt_loose", "prompt level, loose"),
                       ("constraint_strict", "constraint level, strict"),
                       ("constraint_loose", "constraint level, loose"))


def verifiable_blocks(v: dict, ev: dict, picture: Path | None) -> list[tuple]:
    """The "Verifiable instructions" section: each M_t's instruction following, M_T against M_0, the judges."""
    b: list[tuple] = [("h", 2, "Verifiable instructions")]
    b.append(("p", f"Each M_t answered {v['prompts']} prompts sampled (seed {v['seed']}) from `{v['source']}` "
                   f"({v['rows_available']} rows), {v['constraints']} constraints in all (word counts, bullets, case, "
                   f"keywords, JSON, ...), one answer each with the actor's sampling settings; a program checks each "
                   f"constraint (`mrjax/eval/verifiable.py`). Prompt level: every constraint of the prompt followed; "
                   f"constraint level: the share of all constraints followed. Strict checks the answer as written; "
                   f"loose also accepts it without its first line, its last line or both, each also without "
                   f"markdown asterisks. "
                   f"95% intervals: percentile bootstrap over prompts (at constraint level too: a prompt's "
                   f"constraints are resampled together)."))
    b.append(("table", ["model"] + [label for _, label in VERIFIABLE_MEASURES] + ["cut at max tokens", "mean chars"],
              [[f"M_{t}"] + [_pct(a, key) for key, _ in VERIFIABLE_MEASURES]
               + [f"{a['cut_at_max_tokens']} / {v['prompts']}", _f(a["mean_chars"], 0)] for t, a in _by_t(v["actor"])]))
    c = v.get("comparison")
    if c:
        last, strict = c["model"], c["strict"]
        b.append(("p", f"M_{last} against M_0 on the same {strict['prompts']} prompts: the difference in percentage "
                       f"points with a paired-bootstrap 95% interval (prompts resampled, both models' results on a "
                       f"prompt kept together). McNemar's exact test on the prompt-level strict outcomes: M_{last} "
                       f"alone followed {strict['model_only']} prompts, M_0 alone {strict['baseline_only']} (the "
                       f"prompts both or neither followed say nothing about the difference); two-sided "
                       f"p = {strict['mcnemar_p']:.3g}."))
        rows = []
        for key, label in VERIFIABLE_MEASURES:
            level, mode = key.split("_")
            d = c[mode]
            rows.append([label, _pct(v["actor"]["0"], key), _pct(v["actor"][str(last)], key),
                         f"{d[level]:+.1f} [{d[level + '_low']:+.1f}, {d[level + '_high']:+.1f}]"])
        b.append(("table", ["measure", "M_0", f"M_{last}", f"M_{last} - M_0 (points) [paired 95% interval]"], rows))
    pairs = v["judge_pairs"]
    if not pairs["pairs"]:
        b.append(("p", f"Judge: no verifiable pairs. No model's answer satisfied every constraint of its prompt "
                       f"({v['prompts']} prompts), so the judges' accuracy on verifiable instructions is not measured "
                       f"(a satisfying answer is never written for the models)."))
    else:
        kinds = ", ".join(f"{k} {n}" for k, n in pairs["violated_kinds"].items())
        b.append(("p", f"Judge: {pairs['pairs']} pairs of a satisfying answer (every constraint followed, strict) and "
                       f"a violating one: {pairs['from_models']} from the models' own answers, "
                       f"{pairs['minimal_edits']} where every answer satisfied, by a minimal edit of one that breaks a "
                       f"single constraint; prompts without a pair (no answer satisfied them): "
                       f"{pairs['without_pair']}. Constraints the violating answers break: {kinds}. Each M_t as "
                       f"judge scores both "
                       f"answers (N={ev['judge_samples']} samples averaged, the run's judge prompt and score mode): "
                       f"accuracy is the share of pairs where the satisfying answer scores higher, ties 0.5; and "
                       f"compares them with the pairwise template in both orders (verdicts by {ev['verdict']}; an "
                       f"order disagreement counts 0.5). 50% is chance."))
        b.append(("table", ["judge", "scores: accuracy [95% interval]", "pairs scored", "ties",
                            "pairwise: accuracy [95% interval]", "orders agree", "parse rate (scores / pairwise)"],
                  [[f"M_{t}", _pct(j, "score_accuracy"), str(j["score_pairs"]), str(j["score_ties"]),
                    _pct(j, "pairwise_accuracy"),
                    _f(j["order_agreement"], 0) + ("%" if j["order_agreement"] is not None else ""),
                    f"{_f(j['judge_parse_rate'], pct=True)} / {_f(j['pairwise_parse_rate'], pct=True)}"]
                   for t, j in _by_t(v["judges"])]))
    if picture is not None:
        b.append(("img", picture, "Verifiable instructions: instructions followed per model and each model's "
                                  "accuracy as judge of the verifiable pairs, with 95% bootstrap intervals."))
    return b


def example_pairs(root: Path, ev: dict, count: int = 3) -> list[list[str]]:
    if not ev.get("models"):
        return []
    last = max(int(t) for t in ev["models"])
    first, final = _rows(root / "eval" / "answers_m0.jsonl"), _rows(root / "eval" / f"answers_m{last}.jsonl")
    return [[a["prompt"], a["response"], z["response"]] for a, z in list(zip(first, final))[:count]] if last else []


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: list[tuple], root: Path) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind in ("table", "pairs"):
            head, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] +
                                 ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1].relative_to(root).as_posix()})\n\n*{block[2]}*")
    return "\n\n".join(out) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
table.pairs td { white-space: pre-wrap; width: 33%; }
ul.warnings li { color: #8a4b00; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _html_text(text: str) -> str:
    """Escaped text; `code` spans kept."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[tuple]) -> str:
    title = next((b[2] for b in blocks if b[0] == "h"), "mrjax report")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{HTML_STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{_html_text(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_text(block[1])}</p>")
        elif kind == "list":
            out.append("<ul class='warnings'>" + "".join(f"<li>{_html_text(i)}</li>" for i in block[1]) + "</ul>")
        elif kind in ("table", "pairs"):
            cls = " class='pairs'" if kind == "pairs" else ""
            out.append(f"<table{cls}><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1]) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
                       + "</table>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(root: str | Path) -> dict[str, Path]:
    """Write report.md, report.html, report/*.png and report/figures.json from the run directory."""
    root = Path(root)
    data = collect(root)
    pictures_dir = root / "report"
    pictures = {
        "score_distribution": plot_score_distribution(data, pictures_dir / "score_distribution.png"),
        "response_length": plot_lengths(data, pictures_dir / "response_length.png"),
        "win_rates": plot_win_rates(data, pictures_dir / "win_rates.png"),
        "meta_judge_biases": plot_biases(data, pictures_dir / "meta_judge_biases.png"),
        "verifiable": plot_verifiable(data, pictures_dir / "verifiable.png"),
    }
    blocks = build_blocks(root, data, pictures)
    figures = {**data, "iterations": {t: {k: v for k, v in it.items() if k != "scores"}
                                      for t, it in data["iterations"].items()}, "warnings": warnings_for(data)}
    write_text(pictures_dir / "figures.json", json.dumps(figures, indent=1, sort_keys=True, default=str) + "\n")
    md = write_text(root / "report.md", to_markdown(blocks, root))
    page = write_text(root / "report.html", to_html(blocks))
    return {"md": md, "html": page, **{k: v for k, v in pictures.items() if v is not None}}


__all__ = ["collect", "iteration_figures", "to_html", "to_markdown", "warnings_for", "write_report"]
