"""The evaluation's numbers, as float64 numpy functions of plain arrays (no model, no files).

Conventions: a *preference* is the share of a comparison won by the first side, in {0, 0.5, 1}
(1 = the evaluated model wins; 0.5 = a tie or the two orders disagree); NaN marks a comparison
with no usable verdict (counted by the caller, never scored).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from mrjax.eval.verifiable import constraint_level, prompt_level
from mrjax.stats import bootstrap_mean_interval

Z95 = 1.959963984540054


def preference_from_orders(forward: str | None, reverse: str | None) -> float:
    """Share won by the model from the two orders of one pairwise comparison.

    ``forward`` is the verdict with the model's answer in position A, ``reverse`` with it in
    position B; each is "A", "B" or None (unparseable). Valid verdicts are averaged, so two
    orders that disagree give 0.5; with neither valid the result is NaN.
    """
    won = []
    for verdict, model_position in ((forward, "A"), (reverse, "B")):
        if verdict is None:
            continue
        won.append(float(verdict == model_position))
    return float(np.mean(won)) if won else math.nan


def win_rate(preferences: Sequence[float]) -> float:
    """100 x the mean preference over comparisons with a verdict (NaN when there are none)."""
    p = np.asarray(preferences, np.float64)
    p = p[~np.isnan(p)]
    return float(100.0 * p.mean()) if p.size else math.nan


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of 100 x mean(values), resampling the comparisons (prompts)."""
    lo, hi = bootstrap_mean_interval(values, resamples, seed, level)
    return 100 * lo, 100 * hi


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-6, steps: int = 100) -> np.ndarray:
    """Weights w of P(y=1) = sigmoid(x @ w) by Newton's method on the (soft-label) log-likelihood,
    with a tiny ridge so that separable data still converges; x carries its own intercept column."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def length_controlled_win_rate(preferences: Sequence[float], model_chars: Sequence[float],
                               baseline_chars: Sequence[float]) -> float:
    """AlpacaEval 2's length-controlled win rate: fit P(model wins) = sigmoid(a + b * tanh(d / std(d)))
    with d = len(model) - len(baseline) in characters, and report 100 * sigmoid(a), the win rate
    the fit predicts at equal length. Preferences of 0.5 enter as soft labels."""
    p = np.asarray(preferences, np.float64)
    d = np.asarray(model_chars, np.float64) - np.asarray(baseline_chars, np.float64)
    keep = ~np.isnan(p)
    p, d = p[keep], d[keep]
    if p.size == 0:
        return math.nan
    scale = d.std()
    feature = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    x = np.stack([np.ones_like(d), feature], axis=1)
    a = logistic_fit(x, p)[0]
    return float(100.0 / (1.0 + math.exp(-a)))


def preference_from_scores(score_a: float, score_b: float) -> float:
    """A judge's preference for A from two (mean) scores: 1, 0.5 on a tie, 0; NaN if either is missing."""
    if score_a is None or score_b is None or math.isnan(score_a) or math.isnan(score_b):
        return math.nan
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def agreement(judge: Sequence[float], reference: Sequence[float]) -> dict:
    """Agreement of a judge's preferences with a reference's, both in {0, 0.5, 1} (NaN = missing).

    ``with_ties``: per pair 1 - |judge - reference| (same side 1, one side a tie 0.5, opposite 0);
    ``ties_dropped``: the share of same-side pairs among pairs where neither is a tie.
    Both in percent, with the pair counts."""
    j, r = np.asarray(judge, np.float64), np.asarray(reference, np.float64)
    keep = ~(np.isnan(j) | np.isnan(r))
    j, r = j[keep], r[keep]
    decided = (j != 0.5) & (r != 0.5)
    return {
        "with_ties": float(100 * (1 - np.abs(j - r)).mean()) if j.size else math.nan,
        "ties_dropped": float(100 * (j[decided] == r[decided]).mean()) if decided.any() else math.nan,
        "pairs": int(j.size),
        "pairs_without_ties": int(decided.sum()),
    }


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    v = np.asarray(values, np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    sorted_v = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with ties (Pearson correlation of average ranks); NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def meta_judge_biases(winners: Sequence[str | None], score_first: Sequence[float | None],
                      score_second: Sequence[float | None]) -> dict:
    """The meta-judge's biases over its calls (the paper's table).

    ``winners[i]`` is "A" (first position), "B" or None (no verdict: left out); the scores are the
    judge scores of the judgments in the first and second position. ``score_bias``: % of calls with
    unequal scores where the higher-scored judgment won; ``positional_bias``: % of calls where the
    first position won, overall and split by equal / unequal scores."""
    w = np.array([x if x in ("A", "B") else "" for x in winners])
    a = np.array([math.nan if s is None else s for s in score_first], np.float64)
    b = np.array([math.nan if s is None else s for s in score_second], np.float64)
    has = w != ""
    equal = has & (a == b)
    unequal = has & ~np.isnan(a) & ~np.isnan(b) & (a != b)
    first = w == "A"
    higher_won = np.where(a > b, first, ~first)

    def pct(hits, where):
        return float(100 * hits[where].mean()) if where.any() else math.nan

    return {
        "calls": int(len(w)), "verdicts": int(has.sum()),
        "score_bias": pct(higher_won, unequal),
        "positional_bias": pct(first, has),
        "positional_bias_equal_scores": pct(first, equal),
        "positional_bias_unequal_scores": pct(first, unequal),
        "equal_score_calls": int(equal.sum()), "unequal_score_calls": int(unequal.sum()),
    }


def ratio_bootstrap_interval(numerators: Sequence[float], denominators: Sequence[float], resamples: int = 2000,
                             seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the entries
    together (one entry per prompt: a prompt's constraints stay together, a cluster bootstrap)."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    if num.size == 0:
        return math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, num.size, size=(resamples, num.size))
    ratios = num[picks].sum(axis=1) / den[picks].sum(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_bootstrap_interval(model: Sequence[float], baseline: Sequence[float],
                              counts: Sequence[float] | None = None, resamples: int = 2000, seed: int = 0,
                              level: float = 0.95) -> tuple[float, float]:
    """Interval of (sum(model) - sum(baseline)) / sum(counts), the two models' results on the same
    prompts: each resample draws prompts and keeps both models' results on them, so what the prompts
    share (an easy prompt is easy for both) cancels. ``counts`` default to 1 (the difference of means)."""
    model, baseline = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    counts = np.ones_like(model) if counts is None else counts
    return ratio_bootstrap_interval(model - baseline, counts, resamples, seed, level)


def mcnemar_exact_p(model_only: int, baseline_only: int) -> float:
    """McNemar's exact test on paired pass/fail outcomes: the two-sided binomial test of the discordant
    pairs (passed by one model only) against 1/2, i.e. min(1, 2 P(X <= min(b, c))) for X ~ Bin(b + c, 1/2).
    Pairs where both pass or both fail say nothing about which model is better; with none discordant, 1."""
    n, k = model_only + baseline_only, min(model_only, baseline_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers: no underflow for large n
    return min(1.0, 2 * tail / 2 ** n)


def following_accuracy(strict: Sequence[Sequence[bool]], loose: Sequence[Sequence[bool]], seed: int = 0) -> dict:
    """Instruction-following accuracy in percent from per-prompt verdict lists (one verdict per constraint):
    prompt level (every constraint of the prompt passed) and constraint level (share of all constraints),
    strict and loose, each with a 95% bootstrap interval over prompts (``<name>_low`` / ``<name>_high``)."""
    out: dict[str, float] = {}
    for mode, results in (("strict", strict), ("loose", loose)):
        passed = [all(r) for r in results]
        out[f"prompt_{mode}"] = 100 * prompt_level(results)
        lo, hi = bootstrap_interval(passed, seed=seed)
        out[f"prompt_{mode}_low"], out[f"prompt_{mode}_high"] = lo, hi
        out[f"constraint_{mode}"] = 100 * constraint_level(results)
        lo, hi = ratio_bootstrap_interval([sum(r) for r in results], [len(r) for r in results], seed=seed)
        out[f"constraint_{mode}_low"], out[f"constraint_{mode}_high"] = 100 * lo, 100 * hi
    return out


def following_difference(model: Sequence[Sequence[bool]], baseline: Sequence[Sequence[bool]], seed: int = 0) -> dict:
    """Model minus baseline on the same prompts (verdict lists aligned prompt by prompt), in percentage
    points, prompt level and constraint level, each with its paired-bootstrap interval; with McNemar's
    exact p-value on the prompt-level outcomes (the discordant prompts counted)."""
    m_passed = [float(all(r)) for r in model]
    b_passed = [float(all(r)) for r in baseline]
    m_count, b_count = [sum(r) for r in model], [sum(r) for r in baseline]
    counts = [len(r) for r in model]
    if counts != [len(r) for r in baseline]:
        raise ValueError("the two models' verdicts must be on the same prompts")
    out: dict[str, Any] = {"prompts": len(model)}
    for level, m, b, n in (("prompt", m_passed, b_passed, None), ("constraint", m_count, b_count, counts)):
        den = sum(n) if n is not None else len(m)
        out[level] = 100 * (sum(m) - sum(b)) / den
        lo, hi = paired_bootstrap_interval(m, b, n, seed=seed)
        out[f"{level}_low"], out[f"{level}_high"] = 100 * lo, 100 * hi
    model_only = sum(1 for a, b in zip(m_passed, b_passed) if a and not b)
    baseline_only = sum(1 for a, b in zip(m_passed, b_passed) if b and not a)
    out.update(model_only=model_only, baseline_only=baseline_only, mcnemar_p=mcnemar_exact_p(model_only, baseline_only))
    return out


def gaussian_kde(samples: Sequence[float], grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``samples`` on ``grid`` (Scott's rule; a floor for constant samples)."""
    s = np.asarray(samples, np.float64)
    if s.size == 0:
        return np.zeros_like(grid, dtype=np.float64)
    h = bandwidth or max(s.std() * s.size ** (-1 / 5), 0.1)
    z = (np.asarray(grid, np.float64)[:, None] - s[None, :]) / h
    return np.exp(-0.5 * z * z).sum(axis=1) / (s.size * h * math.sqrt(2 * math.pi))


__all__ = ["agreement", "average_ranks", "bootstrap_interval", "following_accuracy", "following_difference",
           "gaussian_kde", "length_controlled_win_rate", "logistic_fit", "mcnemar_exact_p", "meta_judge_biases",
           "paired_bootstrap_interval", "preference_from_orders", "preference_from_scores", "ratio_bootstrap_interval",
           "spearman", "win_rate"]
