"""Preference pairs for Meta-Rewarding as pure, jitted jnp functions (docs/method.md, steps 3-5).

Arrays in, arrays out. Every function is batched over prompts (leading axis P)
and handles ragged counts with boolean masks, so one compiled program serves a
whole iteration; the per-prompt rules are written for one prompt and vmapped.

Public API::

    scores, has_score = response_scores(judgment_scores, judgment_mask)            # [P,K,N] -> [P,K]
    chosen, rejected, valid = actor_pairs(scores, lengths, mask, rho=0.32)         # [P,K] -> [P]
    top, bottom = length_control_tiers(scores, mask, rho=0.32)                     # [P,K] -> [P,K]
    response_idx, selected, variance = select_judged_response(judgment_scores, judgment_mask)
    pairs = judge_pairs(judgment_scores, judgment_mask, judgment_lengths,
                        meta_results, meta_mask)                                   # -> JudgePairs
    omega1, omega2 = positional_weights(meta_results, meta_mask)
    battles = battle_matrix(meta_results, meta_mask, omega1, omega2)               # [P,N,N]
    elo = bradley_terry_elo(battles, mask)                                         # [P,N,N] -> [P,N]
    score = expected_score(logits, score_token_ids)                                # [...,V] -> [...]

Indices returned for a prompt whose ``valid`` is False are in range (safe to
gather with) but meaningless.

Meta-judge results use the method's encoding: ``meta_results[p, m, n]`` is the
meta-judge's verdict with judgment m in the first position ("Judgment A") and
judgment n in the second: +1 if the first wins, -1 if the second wins, 0 on a
tie or an unparseable answer. Both orders of every pair live in one [N, N]
matrix; the diagonal is ignored.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Scores are means of a few integer judgments (or expected scores); any two
# that differ by less than this are the same score. It also absorbs float32
# rounding at tier boundaries: 0.68 * 5 + 0.32 * 2 must put 4.04 in the top tier.
DEFAULT_SCORE_ATOL = 1e-5
# Judgment-score variances below this are zero (float32 rounding of equal scores).
DEFAULT_VARIANCE_ATOL = 1e-9
# Bradley-Terry: L2 strength, Newton steps, and the largest move of one step.
DEFAULT_L2 = 0.01
DEFAULT_NEWTON_STEPS = 20
DEFAULT_MAX_NEWTON_STEP = 4.0
# Chosen and rejected judgments closer than this in Elo are a tie: no pair.
DEFAULT_MIN_ELO_GAP = 1e-4


class ActorPairs(NamedTuple):
    chosen: jax.Array  # [P] int32 response index
    rejected: jax.Array  # [P] int32 response index
    valid: jax.Array  # [P] bool


class JudgePairs(NamedTuple):
    chosen: jax.Array  # [P] int32 judgment index (within the selected response)
    rejected: jax.Array  # [P] int32 judgment index
    valid: jax.Array  # [P] bool: a judge pair was built for this prompt
    response_idx: jax.Array  # [P] int32 response whose judgments were meta-judged
    response_selected: jax.Array  # [P] bool: that response had judgment-score variance > 0
    elo: jax.Array  # [P, N] Bradley-Terry scores (0 where masked)
    battles: jax.Array  # [P, N, N] battle matrix B
    omega1: jax.Array  # [] weight of a first-position win
    omega2: jax.Array  # [] weight of a second-position win


# ----------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _check_finite_where(values: jax.Array, mask: jax.Array, name: str) -> None:
    """A NaN score under the mask (e.g. a mean of no judgments) would silently lose pairs."""
    if _is_concrete(values) and _is_concrete(mask) and not bool(jnp.all(jnp.isfinite(values) | ~mask)):
        raise ValueError(f"{name} must be finite wherever the mask is True")


def _as_int(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        if _is_concrete(x) and not bool(jnp.all(x == jnp.round(x))):
            raise ValueError(f"{name} must hold whole numbers (character counts)")
    return x.astype(jnp.int32)


def _as_mask(mask, shape: tuple[int, ...], name: str) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {mask.shape}")
    if mask.dtype != jnp.bool_:
        if _is_concrete(mask) and not bool(jnp.all((mask == 0) | (mask == 1))):
            raise ValueError(f"{name} must be boolean (or 0/1)")
        mask = mask.astype(bool)
    return mask


def _check_ndim(x: jax.Array, ndim: int, name: str, dims: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {dims} ({ndim} axes), got shape {x.shape}")


def _check_same_shape(x: jax.Array, shape: tuple[int, ...], name: str, ref: str) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of {ref} {shape}, got {x.shape}")


def _check_fraction(value, name: str) -> jax.Array:
    if _is_concrete(value):
        v = np.asarray(value)
        if v.shape != () or not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return jnp.asarray(value, jnp.float32)


def _char_limit(limit, name: str) -> jax.Array:
    """None disables the filter; otherwise a positive character count."""
    if limit is None:
        return jnp.asarray(jnp.inf, jnp.float32)
    if _is_concrete(limit):
        v = np.asarray(limit)
        if v.shape != () or not float(v) > 0:
            raise ValueError(f"{name} must be None or a positive number of characters, got {limit!r}")
    return jnp.asarray(limit, jnp.float32)


def _check_positive(value, name: str) -> jax.Array:
    if _is_concrete(value):
        v = np.asarray(value)
        if v.shape != () or not float(v) > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    return jnp.asarray(value, jnp.float32)


def _check_nonnegative(value, name: str) -> jax.Array:
    if _is_concrete(value):
        v = np.asarray(value)
        if v.shape != () or not float(v) >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return jnp.asarray(value, jnp.float32)


# ------------------------------------------------------------ shared helpers


def _first_lexmin(candidates: jax.Array, key1: jax.Array, key2: jax.Array) -> jax.Array:
    """Index of the candidate with the smallest (key1, key2, index); 0 if none."""
    k1 = jnp.min(jnp.where(candidates, key1, jnp.inf))
    candidates = candidates & (key1 == k1)
    k2 = jnp.min(jnp.where(candidates, key2, jnp.inf))
    candidates = candidates & (key2 == k2)
    return jnp.argmax(candidates).astype(jnp.int32)


def _masked_mean_var(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, population variance and count over the last axis, masked."""
    count = jnp.sum(mask, axis=-1)
    safe = jnp.maximum(count, 1)
    mean = jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / safe
    dev = jnp.where(mask, values - mean[..., None], 0.0)
    var = jnp.sum(dev * dev, axis=-1) / safe
    return mean, var, count


# ------------------------------------------------------------------ step 3


@jax.jit
def _response_scores(judgment_scores, judgment_mask):
    mean, _, count = _masked_mean_var(judgment_scores, judgment_mask)
    has_score = count > 0
    return jnp.where(has_score, mean, 0.0), has_score


def response_scores(judgment_scores, judgment_mask=None) -> tuple[jax.Array, jax.Array]:
    """Mean of each response's valid judgment scores (method, step 3).

    judgment_scores [P, K, N] float, judgment_mask [P, K, N] bool (True = a
    judgment that parsed into [0, 5]). Returns (scores [P, K], has_score
    [P, K]); a response with no valid judgment has has_score False and score 0.
    Feed has_score as the mask of :func:`actor_pairs`.
    """
    judgment_scores = _as_float(judgment_scores)
    _check_ndim(judgment_scores, 3, "judgment_scores", "[P, K, N]")
    judgment_mask = _as_mask(judgment_mask, judgment_scores.shape, "judgment_mask")
    _check_finite_where(judgment_scores, judgment_mask, "judgment_scores")
    return _response_scores(judgment_scores, judgment_mask)


# ------------------------------------------------------------------ step 4


def _tiers_one(scores, mask, rho, score_atol):
    any_valid = jnp.any(mask)
    s_max = jnp.where(any_valid, jnp.max(jnp.where(mask, scores, -jnp.inf)), 0.0)
    s_min = jnp.where(any_valid, jnp.min(jnp.where(mask, scores, jnp.inf)), 0.0)
    top_threshold = (1.0 - rho) * s_max + rho * s_min
    bottom_threshold = (1.0 - rho) * s_min + rho * s_max
    top_tier = mask & (scores >= top_threshold - score_atol)
    bottom_tier = mask & (scores <= bottom_threshold + score_atol)
    return top_tier, bottom_tier, any_valid, s_max, s_min


@jax.jit
def _length_control_tiers(scores, mask, rho, score_atol):
    top, bottom, *_ = jax.vmap(_tiers_one, in_axes=(0, 0, None, None))(scores, mask, rho, score_atol)
    return top, bottom


def length_control_tiers(
    scores, mask=None, rho: float = 0.0, score_atol: float = DEFAULT_SCORE_ATOL
) -> tuple[jax.Array, jax.Array]:
    """The top and bottom tiers of actor_pairs, [P, K] bool each (for inspection and logging).

    top: S >= (1-rho)*S_max + rho*S_min; bottom: S <= (1-rho)*S_min + rho*S_max,
    both inclusive up to score_atol, over the masked responses of each prompt.
    """
    scores = _as_float(scores)
    _check_ndim(scores, 2, "scores", "[P, K]")
    mask = _as_mask(mask, scores.shape, "mask")
    return _length_control_tiers(
        scores, mask, _check_fraction(rho, "rho"), _check_nonnegative(score_atol, "score_atol")
    )


def _actor_pair_one(scores, lengths, mask, rho, max_chosen_chars, score_atol):
    top_tier, bottom_tier, any_valid, s_max, s_min = _tiers_one(scores, mask, rho, score_atol)
    lengths_f = lengths.astype(jnp.float32)
    # Chosen: shortest in the top tier; among equal lengths the higher score.
    chosen = _first_lexmin(top_tier, lengths_f, -scores)
    # Rejected: longest in the bottom tier; among equal lengths the lower score.
    rejected = _first_lexmin(bottom_tier, -lengths_f, scores)
    valid = (
        any_valid
        & (s_max - s_min > score_atol)
        & (chosen != rejected)
        & (scores[chosen] - scores[rejected] > score_atol)
        & (lengths_f[chosen] <= max_chosen_chars)
    )
    return ActorPairs(chosen, rejected, valid)


@jax.jit
def _actor_pairs(scores, lengths, mask, rho, max_chosen_chars, score_atol):
    per_prompt = jax.vmap(_actor_pair_one, in_axes=(0, 0, 0, None, None, None))
    return per_prompt(scores, lengths, mask, rho, max_chosen_chars, score_atol)


def actor_pairs(
    scores,
    lengths,
    mask=None,
    rho: float = 0.0,
    max_chosen_chars: float | None = None,
    score_atol: float = DEFAULT_SCORE_ATOL,
) -> ActorPairs:
    """Length-controlled actor pairs (method, step 4), one per prompt.

    scores [P, K] mean judge scores, lengths [P, K] characters, mask [P, K]
    (True = a real response with a score). With S_max, S_min over a prompt's
    responses: the top tier is S >= (1-rho)*S_max + rho*S_min and chosen is its
    shortest response; the bottom tier is S <= (1-rho)*S_min + rho*S_max and
    rejected is its longest. No pair when S_max == S_min, chosen == rejected,
    S_chosen <= S_rejected, or the chosen response is longer than
    max_chosen_chars (None = no limit). rho = 0 is the Self-Rewarding rule.
    Length ties go to the higher (chosen) / lower (rejected) score, then the
    lower index. Scores within score_atol are equal.

    Returns ActorPairs(chosen [P] int32, rejected [P] int32, valid [P] bool).
    """
    scores = _as_float(scores)
    _check_ndim(scores, 2, "scores", "[P, K]")
    lengths = _as_int(lengths, "lengths")
    _check_same_shape(lengths, scores.shape, "lengths", "scores")
    mask = _as_mask(mask, scores.shape, "mask")
    _check_finite_where(scores, mask, "scores")
    return _actor_pairs(
        scores,
        lengths,
        mask,
        _check_fraction(rho, "rho"),
        _char_limit(max_chosen_chars, "max_chosen_chars"),
        _check_nonnegative(score_atol, "score_atol"),
    )


def self_rewarding_pairs(scores, lengths, mask=None, score_atol: float = DEFAULT_SCORE_ATOL) -> ActorPairs:
    """The Self-Rewarding baseline rule: highest vs lowest score (rho = 0), ties discarded."""
    return actor_pairs(scores, lengths, mask, rho=0.0, max_chosen_chars=None, score_atol=score_atol)


# ------------------------------------------------------------------ step 5


def _select_one(scores, mask, min_judgments, variance_atol):
    _, var, count = _masked_mean_var(scores, mask)
    eligible = (count >= min_judgments) & (var > variance_atol)
    ranked = jnp.where(eligible, var, -jnp.inf)
    response_idx = jnp.argmax(ranked).astype(jnp.int32)  # first of equal variances
    return response_idx, jnp.any(eligible), jnp.where(count > 0, var, 0.0)


@jax.jit
def _select_judged_response(judgment_scores, judgment_mask, min_judgments, variance_atol):
    return jax.vmap(_select_one, in_axes=(0, 0, None, None))(
        judgment_scores, judgment_mask, min_judgments, variance_atol
    )


def select_judged_response(
    judgment_scores,
    judgment_mask=None,
    min_judgments: int = 2,
    variance_atol: float = DEFAULT_VARIANCE_ATOL,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The response per prompt whose judgments the meta-judge compares (method, step 5).

    judgment_scores, judgment_mask [P, K, N]. Picks the response with the
    largest population variance of its valid judgment scores (first on ties),
    among responses with at least min_judgments valid judgments; a prompt is
    skipped when that variance is 0 (<= variance_atol).
    Returns (response_idx [P] int32, selected [P] bool, variance [P, K]).
    """
    judgment_scores = _as_float(judgment_scores)
    _check_ndim(judgment_scores, 3, "judgment_scores", "[P, K, N]")
    judgment_mask = _as_mask(judgment_mask, judgment_scores.shape, "judgment_mask")
    _check_finite_where(judgment_scores, judgment_mask, "judgment_scores")
    if int(min_judgments) < 2:
        raise ValueError(f"min_judgments must be >= 2 (a pair needs two judgments), got {min_judgments}")
    return _select_judged_response(
        judgment_scores,
        judgment_mask,
        jnp.asarray(min_judgments, jnp.int32),
        _check_nonnegative(variance_atol, "variance_atol"),
    )


def _off_diagonal(shape):
    n = shape[-1]
    return ~jnp.eye(n, dtype=bool)


def _positional_weights(meta_results, call_mask):
    win_first = jnp.sum(call_mask & (meta_results == 1))
    win_second = jnp.sum(call_mask & (meta_results == -1))
    decided = win_first + win_second
    # No decided call at all carries no positional information: weigh both 1/2.
    omega1 = jnp.where(decided > 0, win_second / jnp.maximum(decided, 1), 0.5)
    omega2 = jnp.where(decided > 0, win_first / jnp.maximum(decided, 1), 0.5)
    return omega1.astype(jnp.float32), omega2.astype(jnp.float32)


def _battle_matrix(meta_results, call_mask, omega1, omega2):
    first_wins = (call_mask & (meta_results == 1)).astype(jnp.float32)  # m first, m wins
    second_loses = (call_mask & (meta_results == -1)).astype(jnp.float32)  # n first, m second wins
    return omega1 * first_wins + omega2 * jnp.swapaxes(second_loses, -1, -2)


def _check_meta_results(meta_results) -> jax.Array:
    meta_results = jnp.asarray(meta_results)
    _check_ndim(meta_results, 3, "meta_results", "[P, N, N]")
    if meta_results.shape[1] != meta_results.shape[2]:
        raise ValueError(f"meta_results must be square in its last two axes, got {meta_results.shape}")
    if _is_concrete(meta_results):
        values = np.asarray(meta_results)
        if not np.isin(values, (-1, 0, 1)).all():
            raise ValueError("meta_results must hold only +1 (first wins), -1 (second wins) or 0")
    return meta_results.astype(jnp.int8)


@jax.jit
def _positional_weights_jit(meta_results, meta_mask):
    return _positional_weights(meta_results, meta_mask & _off_diagonal(meta_results.shape))


def positional_weights(meta_results, meta_mask=None) -> tuple[jax.Array, jax.Array]:
    """(omega1, omega2) from every meta-judge call in the batch (method, step 5).

    omega1 = win2nd / (win1st + win2nd) weighs a first-position win, omega2 =
    win1st / (win1st + win2nd) a second-position win; ties and masked or
    diagonal entries do not count. With no decided call both are 1/2.
    To weigh over a whole iteration processed in chunks, compute this once on
    all chunks' results and pass it to judge_pairs(omega=...).
    """
    meta_results = _check_meta_results(meta_results)
    meta_mask = _as_mask(meta_mask, meta_results.shape, "meta_mask")
    return _positional_weights_jit(meta_results, meta_mask)


@jax.jit
def _battle_matrix_jit(meta_results, meta_mask, omega1, omega2):
    return _battle_matrix(meta_results, meta_mask & _off_diagonal(meta_results.shape), omega1, omega2)


def battle_matrix(meta_results, meta_mask, omega1, omega2) -> jax.Array:
    """B[p, m, n] = omega1 * 1[r_mn = +1] + omega2 * 1[r_nm = -1]: how much m beat n."""
    meta_results = _check_meta_results(meta_results)
    meta_mask = _as_mask(meta_mask, meta_results.shape, "meta_mask")
    return _battle_matrix_jit(
        meta_results,
        meta_mask,
        _check_nonnegative(omega1, "omega1"),
        _check_nonnegative(omega2, "omega2"),
    )


def _solve_diagonally_dominant(matrix, rhs):
    """Solve matrix @ x = rhs by Gauss-Jordan elimination without pivoting.

    Valid (and stable) here because the negative Hessian below is strictly
    diagonally dominant (a Laplacian plus l2 I), and several times faster on CPU
    than the batched LAPACK solve for thousands of small N x N systems.
    """
    index = jnp.arange(matrix.shape[-1])

    def eliminate(k, state):
        matrix, rhs = state
        pivot_row = matrix[k]
        factors = jnp.where(index == k, 0.0, matrix[:, k] / pivot_row[k])
        return matrix - factors[:, None] * pivot_row[None, :], rhs - factors * rhs[k]

    matrix, rhs = jax.lax.fori_loop(0, matrix.shape[-1], eliminate, (matrix, rhs))
    return rhs / jnp.diagonal(matrix)


def _elo_one(battles, mask, l2, newton_steps, max_step):
    """Newton ascent on sum B[m,n] log sigmoid(e_m - e_n) - l2/2 |e|^2 for one prompt."""
    pair_mask = mask[:, None] & mask[None, :] & _off_diagonal(battles.shape)
    battles = jnp.where(pair_mask, battles, 0.0)
    games = battles + battles.T  # symmetric weight of each pair
    eye = jnp.eye(battles.shape[-1], dtype=battles.dtype)

    def step(_, elo):
        diff = elo[:, None] - elo[None, :]  # e_m - e_n
        p_win = jax.nn.sigmoid(diff)  # P(m beats n)
        # d/de_m: wins of m not yet explained minus losses of m not yet explained.
        grad = jnp.sum(battles * (1.0 - p_win) - battles.T * p_win, axis=1) - l2 * elo
        weight = games * p_win * (1.0 - p_win)
        # Negative Hessian = weighted graph Laplacian + l2 I: symmetric positive definite.
        neg_hessian = jnp.diag(jnp.sum(weight, axis=1)) - weight + l2 * eye
        delta = _solve_diagonally_dominant(neg_hessian, grad)
        # Far from the optimum the logistic curvature vanishes and a full Newton
        # step can overshoot; cap the largest move, keep the direction.
        scale = jnp.minimum(1.0, max_step / jnp.maximum(jnp.max(jnp.abs(delta)), 1e-30))
        return elo + scale * delta

    elo = jax.lax.fori_loop(0, newton_steps, step, jnp.zeros(battles.shape[-1], battles.dtype))
    return jnp.where(mask, elo, 0.0)


@partial(jax.jit, static_argnames=("newton_steps",))
def _bradley_terry_elo(battles, mask, l2, newton_steps, max_step):
    return jax.vmap(_elo_one, in_axes=(0, 0, None, None, None))(battles, mask, l2, newton_steps, max_step)


def bradley_terry_elo(
    battles,
    mask=None,
    l2: float = DEFAULT_L2,
    newton_steps: int = DEFAULT_NEWTON_STEPS,
    max_step: float = DEFAULT_MAX_NEWTON_STEP,
) -> jax.Array:
    """Bradley-Terry maximum-likelihood Elo per prompt: [P, N, N] -> [P, N].

    Maximises sum_{m != n} B[m,n] log sigmoid(e_m - e_n) - l2/2 sum_m e_m^2
    over the players with mask [P, N] True, by newton_steps damped Newton steps
    from 0 (each step moves no score by more than max_step). The likelihood is
    shift-invariant, so at the optimum the L2 term pins the mean to exactly 0
    and keeps a player that wins everything finite. Masked players get 0.
    """
    battles = _as_float(battles)
    _check_ndim(battles, 3, "battles", "[P, N, N]")
    if battles.shape[1] != battles.shape[2]:
        raise ValueError(f"battles must be square in its last two axes, got {battles.shape}")
    if _is_concrete(battles) and bool(jnp.any(battles < 0)):
        raise ValueError("battles must be non-negative")
    mask = _as_mask(mask, battles.shape[:2], "mask")
    if int(newton_steps) < 1:
        raise ValueError(f"newton_steps must be >= 1, got {newton_steps}")
    return _bradley_terry_elo(
        battles, mask, _check_positive(l2, "l2"), int(newton_steps), _check_positive(max_step, "max_step")
    )


def _judge_pair_one(elo, mask, lengths, max_judgment_chars, min_elo_gap):
    index = jnp.arange(elo.shape[-1])
    chosen = _first_lexmin(mask, -elo, index)  # highest Elo
    rejected = _first_lexmin(mask, elo, index)  # lowest Elo
    valid = (
        (jnp.sum(mask) >= 2)
        & (elo[chosen] - elo[rejected] > min_elo_gap)
        & (lengths[chosen].astype(jnp.float32) <= max_judgment_chars)
    )
    return chosen, rejected, valid


@partial(jax.jit, static_argnames=("newton_steps",))
def _judge_pairs(
    judgment_scores,
    judgment_mask,
    judgment_lengths,
    meta_results,
    meta_mask,
    omega,
    use_given_omega,
    max_judgment_chars,
    min_judgments,
    variance_atol,
    l2,
    newton_steps,
    max_step,
    min_elo_gap,
):
    response_idx, selected, _ = jax.vmap(_select_one, in_axes=(0, 0, None, None))(
        judgment_scores, judgment_mask, min_judgments, variance_atol
    )
    take = lambda a: jnp.take_along_axis(a, response_idx[:, None, None], axis=1)[:, 0]
    player_mask = take(judgment_mask) & selected[:, None]  # [P, N] judgments in the tournament
    player_lengths = take(judgment_lengths)
    call_mask = (
        meta_mask & player_mask[:, :, None] & player_mask[:, None, :] & _off_diagonal(meta_results.shape)
    )
    batch_omega1, batch_omega2 = _positional_weights(meta_results, call_mask)
    omega1 = jnp.where(use_given_omega, omega[0], batch_omega1)
    omega2 = jnp.where(use_given_omega, omega[1], batch_omega2)
    battles = _battle_matrix(meta_results, call_mask, omega1, omega2)
    elo = jax.vmap(_elo_one, in_axes=(0, 0, None, None, None))(battles, player_mask, l2, newton_steps, max_step)
    chosen, rejected, valid = jax.vmap(_judge_pair_one, in_axes=(0, 0, 0, None, None))(
        elo, player_mask, player_lengths, max_judgment_chars, min_elo_gap
    )
    return JudgePairs(
        chosen=chosen,
        rejected=rejected,
        valid=valid & selected,
        response_idx=response_idx,
        response_selected=selected,
        elo=elo,
        battles=battles,
        omega1=omega1,
        omega2=omega2,
    )


def judge_pairs(
    judgment_scores,
    judgment_mask,
    judgment_lengths,
    meta_results,
    meta_mask=None,
    *,
    max_judgment_chars: float | None = None,
    omega: tuple[float, float] | None = None,
    min_judgments: int = 2,
    variance_atol: float = DEFAULT_VARIANCE_ATOL,
    l2: float = DEFAULT_L2,
    newton_steps: int = DEFAULT_NEWTON_STEPS,
    max_step: float = DEFAULT_MAX_NEWTON_STEP,
    min_elo_gap: float = DEFAULT_MIN_ELO_GAP,
) -> JudgePairs:
    """Judge pairs via the meta-judge (method, step 5), one per prompt at most.

    judgment_scores, judgment_mask, judgment_lengths [P, K, N]: every judgment's
    parsed score, whether it parsed into [0, 5], and its length in characters.
    The response that is meta-judged is select_judged_response(...) of these
    (call that first to know which judgments to send to the meta-judge).
    meta_results [P, N, N] in {+1, -1, 0}: verdicts on that response's
    judgments in both orders (row = first position); meta_mask [P, N, N] True
    where the call was made. Only valid judgments of selected responses enter.

    omega1, omega2 come from all calls in this batch unless omega=(omega1,
    omega2) is given (e.g. computed over a whole iteration). Elo is
    bradley_terry_elo of the battle matrix; chosen = highest Elo, rejected =
    lowest (first index on ties). No pair when the response was not selected,
    the Elo gap is <= min_elo_gap, or the chosen judgment is longer than
    max_judgment_chars (None = no limit).
    """
    judgment_scores = _as_float(judgment_scores)
    _check_ndim(judgment_scores, 3, "judgment_scores", "[P, K, N]")
    shape = judgment_scores.shape
    judgment_mask = _as_mask(judgment_mask, shape, "judgment_mask")
    _check_finite_where(judgment_scores, judgment_mask, "judgment_scores")
    judgment_lengths = _as_int(judgment_lengths, "judgment_lengths")
    _check_same_shape(judgment_lengths, shape, "judgment_lengths", "judgment_scores")
    meta_results = _check_meta_results(meta_results)
    expected = (shape[0], shape[2], shape[2])
    if meta_results.shape != expected:
        raise ValueError(f"meta_results must have shape [P, N, N] = {expected}, got {meta_results.shape}")
    meta_mask = _as_mask(meta_mask, expected, "meta_mask")
    if int(min_judgments) < 2:
        raise ValueError(f"min_judgments must be >= 2, got {min_judgments}")
    if int(newton_steps) < 1:
        raise ValueError(f"newton_steps must be >= 1, got {newton_steps}")
    if omega is None:
        omega_array, use_given = jnp.full((2,), 0.5, jnp.float32), jnp.asarray(False)
    else:
        if len(omega) != 2:
            raise ValueError(f"omega must be a pair (omega1, omega2), got {omega!r}")
        omega_array = jnp.stack([_check_nonnegative(omega[0], "omega1"), _check_nonnegative(omega[1], "omega2")])
        use_given = jnp.asarray(True)
    return _judge_pairs(
        judgment_scores,
        judgment_mask,
        judgment_lengths,
        meta_results,
        meta_mask,
        omega_array,
        use_given,
        _char_limit(max_judgment_chars, "max_judgment_chars"),
        jnp.asarray(min_judgments, jnp.int32),
        _check_nonnegative(variance_atol, "variance_atol"),
        _check_positive(l2, "l2"),
        int(newton_steps),
        _check_positive(max_step, "max_step"),
        _check_nonnegative(min_elo_gap, "min_elo_gap"),
    )


# ------------------------------------------------------ expected judge score


@jax.jit
def _expected_score(logits, score_token_ids):
    # Gather the six columns before casting: the full [..., V] stays in its dtype.
    score_logits = jnp.take(logits, score_token_ids, axis=-1).astype(jnp.float32)
    probs = jax.nn.softmax(score_logits, axis=-1)
    values = jnp.arange(score_token_ids.shape[0], dtype=jnp.float32)
    return jnp.sum(probs * values, axis=-1)


def expected_score(logits, score_token_ids) -> jax.Array:
    """Expected judge score from the logits after "Score: " (beyond the papers).

    logits [..., V] at the position following roles.expected_score_text(...);
    score_token_ids [6]: the token ids of "0", "1", ..., "5" in order. The
    distribution is restricted to those tokens and renormalised, so every
    judgment gets a score in [0, 5], finer than integers. Returns [...].
    """
    logits = jnp.asarray(logits)
    score_token_ids = jnp.asarray(score_token_ids)
    if logits.ndim < 1:
        raise ValueError("logits must have a vocabulary axis [..., V]")
    if score_token_ids.shape != (6,) or not jnp.issubdtype(score_token_ids.dtype, jnp.integer):
        raise ValueError(f"score_token_ids must be 6 integer token ids for '0'..'5', got {score_token_ids!r}")
    if _is_concrete(score_token_ids):
        ids = np.asarray(score_token_ids)
        if ids.min() < 0 or ids.max() >= logits.shape[-1]:
            raise ValueError(f"score_token_ids must lie in [0, {logits.shape[-1]}), got {ids.tolist()}")
        if len(set(ids.tolist())) != 6:
            raise ValueError(f"score_token_ids must be 6 distinct ids, got {ids.tolist()}")
    return _expected_score(logits, score_token_ids.astype(jnp.int32))


def score_token_mass(logits, score_token_ids) -> jax.Array:
    """Probability the model puts on the score tokens at all (a sanity check for expected_score)."""
    logits = jnp.asarray(logits, jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(jnp.take(log_probs, jnp.asarray(score_token_ids), axis=-1)), axis=-1)
