"""The evaluation's numbers, as float64 numpy functions of plain arrays (no model, no files).

Conventions: a *preference* is the share of a comparison won by the first side, in {0, 0.5, 1}
(1 = the evaluated model wins; 0.5 = a tie or the two orders disagree); NaN marks a comparison
with no usable verdict (counted by the caller, never scored).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

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


def gaussian_kde(samples: Sequence[float], grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``samples`` on ``grid`` (Scott's rule; a floor for constant samples)."""
    s = np.asarray(samples, np.float64)
    if s.size == 0:
        return np.zeros_like(grid, dtype=np.float64)
    h = bandwidth or max(s.std() * s.size ** (-1 / 5), 0.1)
    z = (np.asarray(grid, np.float64)[:, None] - s[None, :]) / h
    return np.exp(-0.5 * z * z).sum(axis=1) / (s.size * h * math.sqrt(2 * math.pi))


__all__ = ["agreement", "average_ranks", "bootstrap_interval", "gaussian_kde", "length_controlled_win_rate",
           "logistic_fit", "meta_judge_biases", "preference_from_orders", "preference_from_scores", "spearman",
           "win_rate"]
