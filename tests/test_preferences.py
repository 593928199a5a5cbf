"""Actor pairs, judge pairs, Bradley-Terry Elo and expected scores (mrjax.preferences).

References are independent of the implementation: hand-worked examples, plain
Python with exact fractions for the method's rules (docs/method.md), and float64 scipy for Elo.
"""
from __future__ import annotations

from fractions import Fraction

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from scipy.optimize import minimize

from mrjax import preferences as pf

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- references


def reference_actor_pair(scores, lengths, mask, rho, max_chosen_chars=None):
    """Method step 4 in exact arithmetic; scores and rho are Fractions. (chosen, rejected) or None."""
    items = [(scores[i], lengths[i], i) for i in range(len(scores)) if mask[i]]
    if not items:
        return None
    s_max = max(s for s, _, _ in items)
    s_min = min(s for s, _, _ in items)
    if s_max == s_min:
        return None
    top = [it for it in items if it[0] >= (1 - rho) * s_max + rho * s_min]
    bottom = [it for it in items if it[0] <= (1 - rho) * s_min + rho * s_max]
    chosen = min(top, key=lambda it: (it[1], -it[0], it[2]))  # shortest, then best, then first
    rejected = min(bottom, key=lambda it: (-it[1], it[0], it[2]))  # longest, then worst, then first
    if chosen[2] == rejected[2] or not chosen[0] > rejected[0]:
        return None
    if max_chosen_chars is not None and chosen[1] > max_chosen_chars:
        return None
    return chosen[2], rejected[2]


def reference_elo(battles, l2):
    """Float64 argmax of sum B log sigmoid(e_m - e_n) - l2/2 |e|^2 by scipy BFGS."""
    battles = np.asarray(battles, np.float64).copy()
    np.fill_diagonal(battles, 0.0)

    def negative_objective(elo):
        diff = elo[:, None] - elo[None, :]
        return np.sum(battles * np.logaddexp(0.0, -diff)) + 0.5 * l2 * elo @ elo

    def gradient(elo):
        diff = elo[:, None] - elo[None, :]
        p_win = 1.0 / (1.0 + np.exp(-diff))
        return -(np.sum(battles * (1 - p_win), axis=1) - np.sum(battles.T * p_win, axis=1)) + l2 * elo

    result = minimize(
        negative_objective,
        np.zeros(len(battles)),
        jac=gradient,
        method="BFGS",
        options={"gtol": 1e-11, "maxiter": 10_000},
    )
    assert np.abs(gradient(result.x)).max() < 1e-7
    return result.x


def reference_weights_and_battles(meta_results, call_mask):
    """The method's omega1, omega2 and B with plain Python loops."""
    P, N, _ = len(meta_results), len(meta_results[0]), None
    win_first = win_second = 0
    for p in range(P):
        for m in range(N):
            for n in range(N):
                if m != n and call_mask[p][m][n]:
                    win_first += meta_results[p][m][n] == 1
                    win_second += meta_results[p][m][n] == -1
    if win_first + win_second:
        omega1 = win_second / (win_first + win_second)
        omega2 = win_first / (win_first + win_second)
    else:
        omega1 = omega2 = 0.5
    battles = [[[0.0] * N for _ in range(N)] for _ in range(P)]
    for p in range(P):
        for m in range(N):
            for n in range(N):
                if m == n:
                    continue
                first = call_mask[p][m][n] and meta_results[p][m][n] == 1
                second = call_mask[p][n][m] and meta_results[p][n][m] == -1
                battles[p][m][n] = omega1 * first + omega2 * second
    return omega1, omega2, np.array(battles)


def reference_selection(judgment_scores, judgment_mask, min_judgments=2):
    """Per prompt: (index of largest-variance response or None, variances)."""
    picks = []
    for scores_p, mask_p in zip(judgment_scores, judgment_mask):
        best, best_var = None, 0.0
        for k, (scores_k, mask_k) in enumerate(zip(scores_p, mask_p)):
            values = np.asarray(scores_k, np.float64)[np.asarray(mask_k, bool)]
            if len(values) >= min_judgments and np.var(values) > best_var + 1e-9:
                best, best_var = k, np.var(values)
        picks.append(best)
    return picks


# ---------------------------------------------------------------- actor pairs


def test_length_control_hand_worked():
    # S_max = 5.0, S_min = 2.0, rho = 0.32: top tier S >= 0.68*5 + 0.32*2 = 4.04,
    # bottom tier S <= 0.68*2 + 0.32*5 = 2.96.
    scores = [[5.0, 4.2, 3.0, 2.0, 2.5]]
    lengths = [[1900, 1500, 300, 800, 2100]]
    chosen, rejected, valid = pf.actor_pairs(scores, lengths, rho=0.32)
    # The 4.2-score 1,500-char response beats the 5.0-score 1,900-char one;
    # rejected is the longest of {2.0, 2.5}.
    assert (int(chosen[0]), int(rejected[0]), bool(valid[0])) == (1, 4, True)
    # Without length control the best score wins and the worst loses.
    chosen, rejected, valid = pf.actor_pairs(scores, lengths, rho=0.0)
    assert (int(chosen[0]), int(rejected[0]), bool(valid[0])) == (0, 3, True)


def test_top_tier_is_4_04_to_5_for_smax_5_smin_2_rho_0_32():
    grid = np.round(np.arange(200, 501) / 100, 2)  # 2.00, 2.01, ..., 5.00
    top, bottom = (np.asarray(t)[0] for t in pf.length_control_tiers(grid[None], rho=0.32))
    np.testing.assert_array_equal(grid[top], grid[grid >= 4.04 - 1e-9])
    assert grid[top].min() == 4.04 and grid[top].max() == 5.0
    assert grid[bottom].min() == 2.0 and grid[bottom].max() == 2.96
    with pytest.raises(ValueError, match="rho"):
        pf.length_control_tiers(grid[None], rho=2.0)


def test_tier_boundaries_are_inclusive_despite_float_rounding():
    # 4.04 sits exactly on the top-tier threshold and 2.96 on the bottom one.
    scores = [[5.0, 4.04, 4.039, 2.0, 2.96, 2.961]]
    lengths = [[2000, 1000, 10, 100, 3000, 5000]]
    chosen, rejected, valid = pf.actor_pairs(scores, lengths, rho=0.32)
    assert (int(chosen[0]), int(rejected[0]), bool(valid[0])) == (1, 4, True)
    # The same in float64 input.
    chosen, rejected, _ = pf.actor_pairs(np.asarray(scores, np.float64), lengths, rho=0.32)
    assert (int(chosen[0]), int(rejected[0])) == (1, 4)


def test_max_chosen_chars_drops_the_pair_instead_of_picking_another():
    scores, lengths = [[5.0, 4.2, 2.0]], [[1900, 1500, 800]]
    assert bool(pf.actor_pairs(scores, lengths, rho=0.32, max_chosen_chars=1500).valid[0])
    assert not bool(pf.actor_pairs(scores, lengths, rho=0.32, max_chosen_chars=1499).valid[0])


def test_no_pair_cases():
    chosen, rejected, valid = pf.actor_pairs(
        [[3.0, 3.0, 3.0], [4.0, 0.0, 0.0], [1.0, 2.0, 0.0], [4.0, 4.0, 1.0]],
        [[10, 20, 30], [10, 20, 30], [10, 20, 30], [10, 10, 10]],
        [[True, True, True], [True, False, False], [False, False, False], [True, True, True]],
        rho=1.0,
    )
    # all equal; a single response; nothing valid; rho=1 puts everything in both
    # tiers, equal lengths pick the best as chosen and worst as rejected.
    assert valid.tolist() == [False, False, False, True]
    assert (int(chosen[3]), int(rejected[3])) == (0, 2)


def test_self_rewarding_rule_is_rho_zero_and_discards_ties():
    scores = [[4.0, 5.0, 5.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]]
    lengths = [[100, 900, 400, 50, 70], [1, 2, 3, 4, 5]]
    chosen, rejected, valid = pf.self_rewarding_pairs(scores, lengths)
    assert valid.tolist() == [True, False]
    assert (int(chosen[0]), int(rejected[0])) == (2, 4)  # shortest of the 5s, longest of the 1s


@st.composite
def actor_batches(draw):
    P, K = 3, 8  # fixed shapes: one compilation; ragged counts via the mask
    grid = st.integers(0, 30)  # scores k/6 in [0, 5]: means of a few integer judgments
    score_units = draw(st.lists(st.lists(grid, min_size=K, max_size=K), min_size=P, max_size=P))
    lengths = draw(st.lists(st.lists(st.integers(1, 12), min_size=K, max_size=K), min_size=P, max_size=P))
    counts = draw(st.lists(st.integers(0, K), min_size=P, max_size=P))
    mask = [[k < c for k in range(K)] for c in counts]
    rho = Fraction(draw(st.integers(0, 100)), 100)
    return score_units, [[10 * l for l in row] for row in lengths], mask, rho


def _as_arrays(score_units, lengths, mask):
    return np.asarray(score_units, np.float32) / 6, np.asarray(lengths), np.asarray(mask)


@SETTINGS
@given(actor_batches(), st.sampled_from([None, 60, 100]))
def test_actor_pairs_match_exact_reference(batch, max_chosen_chars):
    score_units, lengths, mask, rho = batch
    chosen, rejected, valid = pf.actor_pairs(
        *_as_arrays(score_units, lengths, mask), rho=float(rho), max_chosen_chars=max_chosen_chars
    )
    for p in range(len(score_units)):
        scores = [Fraction(u, 6) for u in score_units[p]]
        expected = reference_actor_pair(scores, lengths[p], mask[p], rho, max_chosen_chars)
        got = (int(chosen[p]), int(rejected[p])) if bool(valid[p]) else None
        assert got == expected


@SETTINGS
@given(actor_batches(), st.randoms(use_true_random=False))
def test_actor_pairs_properties(batch, rnd):
    score_units, lengths, mask, rho = batch
    scores, lengths, mask = _as_arrays(score_units, lengths, mask)
    chosen, rejected, valid = (np.asarray(a) for a in pf.actor_pairs(scores, lengths, mask, rho=float(rho)))
    rows = np.arange(len(scores))
    # A valid pair prefers the better score and never uses padding.
    assert np.all(scores[rows, chosen][valid] > scores[rows, rejected][valid])
    assert np.all(mask[rows, chosen][valid]) and np.all(mask[rows, rejected][valid])
    # Padded entries do not influence anything.
    garbage_scores = np.where(mask, scores, 5.0)
    garbage_lengths = np.where(mask, lengths, 1)
    again = pf.actor_pairs(garbage_scores, garbage_lengths, mask, rho=float(rho))
    assert np.array_equal(np.asarray(again.valid), valid)
    assert np.array_equal(np.asarray(again.chosen)[valid], chosen[valid])
    # Permuting responses permutes the answer (same response by content;
    # the same index when its (score, length) is unique).
    perm = np.array([rnd.sample(range(scores.shape[1]), scores.shape[1]) for _ in rows])
    take = lambda a: np.take_along_axis(a, perm, axis=1)
    pc, pr, pv = (np.asarray(a) for a in pf.actor_pairs(take(scores), take(lengths), take(mask), rho=float(rho)))
    assert np.array_equal(pv, valid)
    for p in rows[valid]:
        for ours, theirs in ((chosen[p], perm[p, pc[p]]), (rejected[p], perm[p, pr[p]])):
            assert (scores[p, ours], lengths[p, ours]) == (scores[p, theirs], lengths[p, theirs])
            key = (scores[p, ours], lengths[p, ours])
            if sum((scores[p, k], lengths[p, k]) == key for k in range(scores.shape[1]) if mask[p, k]) == 1:
                assert ours == theirs


@SETTINGS
@given(actor_batches())
def test_rho_zero_is_max_versus_min_with_length_tie_breaks(batch):
    score_units, lengths, mask, _ = batch
    scores, lengths, mask = _as_arrays(score_units, lengths, mask)
    chosen, rejected, valid = (np.asarray(a) for a in pf.actor_pairs(scores, lengths, mask, rho=0.0))
    for p in range(len(scores)):
        real = np.flatnonzero(mask[p])
        if len(real) == 0 or scores[p, real].max() == scores[p, real].min():
            assert not valid[p]  # all-equal scores give no pair
            continue
        assert valid[p]
        best = real[scores[p, real] == scores[p, real].max()]
        worst = real[scores[p, real] == scores[p, real].min()]
        assert chosen[p] in best and lengths[p, chosen[p]] == lengths[p, best].min()
        assert rejected[p] in worst and lengths[p, rejected[p]] == lengths[p, worst].max()


@SETTINGS
@given(
    st.integers(0, 30),
    st.lists(st.integers(1, 50), min_size=8, max_size=8),
    st.integers(1, 8),
    st.integers(0, 100),
)
def test_all_equal_scores_give_no_pair(score_units, lengths, count, rho_percent):
    scores = np.full((3, 8), score_units / 6, np.float32)
    mask = np.tile(np.arange(8) < count, (3, 1))
    scores[:, count:] = 0.0  # padding with a different score must not create a pair
    valid = pf.actor_pairs(scores, np.tile(lengths, (3, 1)), mask, rho=rho_percent / 100).valid
    assert not np.asarray(valid).any()


def test_actor_pairs_compile_once_across_hyperparameters():
    scores, lengths = np.random.default_rng(0).uniform(0, 5, (4, 5)), np.full((4, 5), 10)
    pf.actor_pairs(scores, lengths, rho=0.0)
    before = pf._actor_pairs._cache_size()
    for rho, limit in ((0.32, 2500), (0.4, None), (1.0, 10)):
        pf.actor_pairs(scores, lengths, rho=rho, max_chosen_chars=limit)
    assert pf._actor_pairs._cache_size() == before


def test_public_functions_work_inside_an_outer_jit():
    import jax

    scores = np.array([[5.0, 4.2, 2.0]], np.float32)
    lengths = np.array([[1900, 1500, 800]])

    @jax.jit
    def pairs(scores, lengths, rho):
        return pf.actor_pairs(scores, lengths, None, rho=rho)

    assert int(pairs(scores, lengths, 0.32).chosen[0]) == 1
    assert int(pairs(scores, lengths, 0.0).chosen[0]) == 0


def test_actor_pairs_reject_bad_input():
    ok_scores, ok_lengths = np.zeros((2, 3)), np.zeros((2, 3), int)
    with pytest.raises(ValueError, match="rho"):
        pf.actor_pairs(ok_scores, ok_lengths, rho=1.5)
    with pytest.raises(ValueError, match="rho"):
        pf.actor_pairs(ok_scores, ok_lengths, rho=-0.1)
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        pf.actor_pairs(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match="lengths"):
        pf.actor_pairs(ok_scores, np.zeros((2, 4), int))
    with pytest.raises(ValueError, match="mask"):
        pf.actor_pairs(ok_scores, ok_lengths, np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="max_chosen_chars"):
        pf.actor_pairs(ok_scores, ok_lengths, max_chosen_chars=0)
    with pytest.raises(ValueError, match="whole numbers"):
        pf.actor_pairs(ok_scores, np.full((2, 3), 1.5))
    nan_scores = ok_scores.copy()
    nan_scores[0, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        pf.actor_pairs(nan_scores, ok_lengths)
    # NaN under the mask is padding, not an error.
    assert not bool(pf.actor_pairs(nan_scores, ok_lengths, ~np.isnan(nan_scores)).valid[0])


def test_response_scores_mean_of_valid_judgments():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, (4, 3, 5)).astype(np.float32)
    mask = rng.uniform(size=(4, 3, 5)) < 0.6
    mask[0, 0] = False
    means, has_score = (np.asarray(a) for a in pf.response_scores(scores, mask))
    for p in range(4):
        for k in range(3):
            values = scores[p, k][mask[p, k]]
            assert has_score[p, k] == (len(values) > 0)
            assert means[p, k] == pytest.approx(values.mean() if len(values) else 0.0, abs=1e-6)


# ---------------------------------------------------------------------- Elo


def _random_battles(rng, n):
    kind = rng.integers(4)
    if kind == 0:  # dense, arbitrary weights
        battles = rng.uniform(0, 1, (n, n))
    elif kind == 1:  # sparse: many pairs never decided
        battles = (rng.uniform(size=(n, n)) < 0.3) * rng.uniform(0, 1, (n, n))
    elif kind == 2:  # weights as the meta-judge gives them: omega1, omega2 or their sum
        omega1 = rng.uniform(0.2, 0.8)
        battles = omega1 * (rng.uniform(size=(n, n)) < 0.5) + (1 - omega1) * (rng.uniform(size=(n, n)) < 0.5)
    else:  # near-transitive with one player beating everyone
        battles = np.triu(rng.uniform(0.5, 1, (n, n)), 1)
    np.fill_diagonal(battles, 0.0)
    return battles


# Elo tests share one padded shape too (one compilation).
ELO_SHAPE = (48, 11)


def padded_elo(battles, mask=None, **kwargs):
    P, N, _ = np.shape(battles)
    Pp, Np = ELO_SHAPE
    padded = np.full((Pp, Np, Np), 7.0, np.float32)  # garbage under the mask
    padded[:P, :N, :N] = battles
    padded_mask = np.zeros((Pp, Np), bool)
    padded_mask[:P, :N] = True if mask is None else mask
    elo = np.asarray(pf.bradley_terry_elo(padded, padded_mask, **kwargs))
    assert not elo[P:].any() and not elo[:, N:].any()
    return elo[:P, :N]


@pytest.mark.parametrize("l2", [pf.DEFAULT_L2, 0.1])
def test_elo_matches_float64_reference(l2):
    # float32 is enough: Newton converges quadratically, so after the fixed
    # steps the error is float32 rounding (~1e-6 on scores of size ~10), and
    # jax_enable_x64 is a process-wide switch that would leak into other tests.
    rng = np.random.default_rng(2)
    N = 11
    counts = rng.integers(2, N + 1, 48)
    battles = np.stack([_random_battles(rng, N) for _ in counts])
    mask = np.arange(N)[None, :] < counts[:, None]
    elo = padded_elo(battles.astype(np.float32), mask, l2=l2)
    for p, n in enumerate(counts):
        reference = reference_elo(battles[p, :n, :n], l2)
        ours = elo[p, :n]
        np.testing.assert_allclose(ours - ours.mean(), reference - reference.mean(), atol=1e-4, rtol=0)
        # The L2 term pins the mean: the likelihood's gradient sums to zero.
        assert abs(ours.mean()) < 1e-4 and abs(reference.mean()) < 1e-6
        assert np.all(elo[p, n:] == 0.0)


def test_elo_ranks_a_transitive_matrix_in_order():
    N = 11
    battles = np.triu(np.ones((N, N)), 1)  # m beats every n > m
    elo = padded_elo(battles[None])[0]
    assert np.all(np.diff(elo) < 0)


def test_elo_stays_finite_for_a_judgment_that_wins_everything():
    N = 11
    battles = np.zeros((3, N, N))
    battles[0, 4, :] = 1.0  # judgment 4 wins every battle, both orders
    battles[1, 0, 1:] = 1.0  # judgment 0 wins, nobody else plays
    battles[2] = 1e3 * np.triu(np.ones((N, N)), 1)  # overwhelming, transitive
    np.fill_diagonal(battles[0], 0.0)
    elo = padded_elo(battles)
    assert np.all(np.isfinite(elo))
    assert np.argmax(elo[0]) == 4 and np.argmax(elo[1]) == 0
    assert np.all(np.diff(elo[2]) < 0)
    for p in range(3):
        reference = reference_elo(battles[p], pf.DEFAULT_L2)
        np.testing.assert_allclose(elo[p], reference, atol=1e-4 * max(1.0, np.abs(reference).max()))


def test_elo_of_masked_players_equals_the_smaller_problem():
    rng = np.random.default_rng(3)
    battles = rng.uniform(0, 1, (1, 7, 7)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True, True])
    full = padded_elo(battles, keep[None])[0]
    small = np.asarray(pf.bradley_terry_elo(battles[:, keep][:, :, keep]))[0]
    np.testing.assert_allclose(full[keep], small, atol=1e-5)
    assert np.all(full[~keep] == 0.0)


def test_elo_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        pf.bradley_terry_elo(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\[P, N, N\]"):
        pf.bradley_terry_elo(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="l2"):
        pf.bradley_terry_elo(np.zeros((1, 3, 3)), l2=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        pf.bradley_terry_elo(-np.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="mask"):
        pf.bradley_terry_elo(np.zeros((1, 3, 3)), np.ones((1, 4), bool))


# ---------------------------------------------------- omega and battle matrix


def _random_meta(rng, P, N, p_first=0.55, p_second=0.35):
    results = rng.choice(np.array([1, -1, 0], np.int8), size=(P, N, N), p=[p_first, p_second, 1 - p_first - p_second])
    mask = rng.uniform(size=(P, N, N)) < 0.9
    return results, mask


def test_positional_weights_and_battles_match_python_reference():
    rng = np.random.default_rng(4)
    results, mask = _random_meta(rng, 6, 5)
    omega1, omega2 = (float(w) for w in pf.positional_weights(results, mask))
    ref_omega1, ref_omega2, ref_battles = reference_weights_and_battles(results.tolist(), mask.tolist())
    assert (omega1, omega2) == pytest.approx((ref_omega1, ref_omega2), abs=1e-6)
    assert omega1 < 0.5 < omega2  # first position wins more, so its wins count less
    battles = np.asarray(pf.battle_matrix(results, mask, omega1, omega2))
    np.testing.assert_allclose(battles, ref_battles, atol=1e-6)


@pytest.mark.parametrize("always", [1, -1])
def test_one_position_always_wins(always):
    rng = np.random.default_rng(5)
    results = np.full((4, 6, 6), always, np.int8)
    results[rng.uniform(size=results.shape) < 0.2] = 0  # some ties
    mask = np.ones(results.shape, bool)
    omega1, omega2 = (float(w) for w in pf.positional_weights(results, mask))
    ref_omega1, ref_omega2, ref_battles = reference_weights_and_battles(results.tolist(), mask.tolist())
    assert (omega1, omega2) == (ref_omega1, ref_omega2) == ((0.0, 1.0) if always == 1 else (1.0, 0.0))
    battles = np.asarray(pf.battle_matrix(results, mask, omega1, omega2))
    np.testing.assert_array_equal(battles, ref_battles)
    # Every verdict is explained by position: no judgment beats another.
    assert not battles.any()
    scores = np.tile(np.arange(6, dtype=np.float32) % 3, (4, 1, 1))
    pairs = padded_judge_pairs(scores, np.ones((4, 1, 6), bool), np.full((4, 1, 6), 100), results, mask)
    assert (float(pairs.omega1), float(pairs.omega2)) == (omega1, omega2)
    assert not np.asarray(pairs.valid).any()


def test_no_decided_call_gives_equal_weights():
    omega1, omega2 = pf.positional_weights(np.zeros((2, 3, 3), np.int8), np.ones((2, 3, 3), bool))
    assert (float(omega1), float(omega2)) == (0.5, 0.5)


def test_meta_results_must_be_plus_minus_one_or_zero():
    with pytest.raises(ValueError, match=r"\+1"):
        pf.positional_weights(np.full((1, 2, 2), 2), None)


# --------------------------------------------------------------- judge pairs

# Judge-pair tests share one padded shape so the program compiles once; the
# padding (masked prompts, responses and judgments) is itself under test.
JUDGE_SHAPE = (24, 4, 8)


def padded_judge_pairs(scores, mask, lengths, results, meta_mask=None, **kwargs):
    """judge_pairs on inputs padded to JUDGE_SHAPE, with outputs cut back to the inputs' shape."""
    P, K, N = np.shape(scores)
    Pp, Kp, Np = JUDGE_SHAPE
    assert P <= Pp and K <= Kp and N <= Np

    def pad(a, shape, fill):
        out = np.full(shape, fill, dtype=np.asarray(a).dtype)
        out[tuple(slice(0, d) for d in np.shape(a))] = a
        return out

    mask = np.ones((P, K, N), bool) if mask is None else mask
    meta_mask = np.ones((P, N, N), bool) if meta_mask is None else meta_mask
    pairs = pf.judge_pairs(
        pad(np.asarray(scores, np.float32), JUDGE_SHAPE, 5.0),  # garbage under the mask
        pad(mask, JUDGE_SHAPE, False),
        pad(lengths, JUDGE_SHAPE, 1),
        pad(results, (Pp, Np, Np), 1),
        pad(meta_mask, (Pp, Np, Np), False),
        **kwargs,
    )
    out = pairs._replace(
        chosen=pairs.chosen[:P],
        rejected=pairs.rejected[:P],
        valid=pairs.valid[:P],
        response_idx=pairs.response_idx[:P],
        response_selected=pairs.response_selected[:P],
        elo=pairs.elo[:P, :N],
        battles=pairs.battles[:P, :N, :N],
    )
    assert not np.asarray(pairs.valid[P:]).any() and not np.asarray(pairs.elo[:, N:]).any()
    return out



def test_variance_selection_matches_numpy():
    rng = np.random.default_rng(6)
    P, K, N = 40, 5, 7
    scores = rng.uniform(0, 5, (P, K, N)).astype(np.float32)
    mask = rng.uniform(size=(P, K, N)) < 0.7
    scores[0] = 3.0  # every response agrees with itself: skipped
    mask[1, :, 1:] = False  # one judgment each: no variance
    idx, selected, variance = (np.asarray(a) for a in pf.select_judged_response(scores, mask))
    for p, expected in enumerate(reference_selection(scores, mask)):
        assert selected[p] == (expected is not None)
        if expected is not None:
            assert idx[p] == expected
    assert not selected[0] and not selected[1]
    for p in range(P):
        for k in range(K):
            values = scores[p, k][mask[p, k]].astype(np.float64)
            assert variance[p, k] == pytest.approx(np.var(values) if len(values) else 0.0, abs=1e-5)


def test_variance_selection_breaks_exact_ties_by_first_index():
    scores = np.array([[[1, 1, 1], [0, 5, 0], [2, 2, 2], [0, 5, 0]]], np.float32)
    idx, selected, _ = pf.select_judged_response(scores, None)
    assert (int(idx[0]), bool(selected[0])) == (1, True)


def _judge_batch(rng, P=24, K=4, N=8):
    """Random judgments with continuous scores (distinct variances) and meta-judge results."""
    scores = rng.uniform(0, 5, (P, K, N)).astype(np.float32)
    mask = rng.uniform(size=(P, K, N)) < 0.85
    lengths = rng.integers(100, 1500, (P, K, N))
    results, meta_mask = _random_meta(rng, P, N)
    return scores, mask, lengths, results, meta_mask


def reference_judge_pairs(scores, mask, lengths, results, meta_mask, l2, max_chars, gap):
    picks = reference_selection(scores, mask)
    P, _, N = scores.shape
    players = np.zeros((P, N), bool)
    for p, k in enumerate(picks):
        if k is not None:
            players[p] = mask[p, k]
    call_mask = [
        [[bool(meta_mask[p, m, n] and players[p, m] and players[p, n]) for n in range(N)] for m in range(N)]
        for p in range(P)
    ]
    omega1, omega2, battles = reference_weights_and_battles(results.tolist(), call_mask)
    out = []
    for p, k in enumerate(picks):
        if k is None:
            out.append(None)
            continue
        real = np.flatnonzero(players[p])
        elo = np.full(N, np.nan)
        elo[real] = reference_elo(battles[p][np.ix_(real, real)], l2)
        best, worst = np.nanargmax(elo), np.nanargmin(elo)
        ok = elo[best] - elo[worst] > gap and lengths[p, k, best] <= max_chars
        out.append((k, elo, ok))
    return omega1, omega2, battles, out


@pytest.mark.parametrize("max_chars", [None, 900])
def test_judge_pairs_match_reference(max_chars):
    rng = np.random.default_rng(7)
    scores, mask, lengths, results, meta_mask = _judge_batch(rng)
    pairs = padded_judge_pairs(scores, mask, lengths, results, meta_mask, max_judgment_chars=max_chars)
    omega1, omega2, battles, reference = reference_judge_pairs(
        scores, mask, lengths, results, meta_mask, pf.DEFAULT_L2, max_chars or np.inf, pf.DEFAULT_MIN_ELO_GAP
    )
    assert (float(pairs.omega1), float(pairs.omega2)) == pytest.approx((omega1, omega2), abs=1e-6)
    np.testing.assert_allclose(np.asarray(pairs.battles), battles, atol=1e-6)
    chosen, rejected, valid = (np.asarray(a) for a in (pairs.chosen, pairs.rejected, pairs.valid))
    for p, ref in enumerate(reference):
        assert bool(pairs.response_selected[p]) == (ref is not None)
        if ref is None:
            assert not valid[p]
            continue
        k, elo, ok = ref
        assert int(pairs.response_idx[p]) == k
        real = ~np.isnan(elo)
        np.testing.assert_allclose(np.asarray(pairs.elo[p])[real], elo[real], atol=1e-4)
        assert valid[p] == ok
        # Highest and lowest Elo; exact index unless the reference is near-tied.
        assert elo[chosen[p]] >= np.nanmax(elo) - 1e-4 and elo[rejected[p]] <= np.nanmin(elo) + 1e-4
        assert real[chosen[p]] and real[rejected[p]]
    assert 0 < valid.sum() < len(valid) or max_chars is None


def test_judge_pairs_hand_worked():
    # One prompt, two responses: response 1 has the spread-out scores.
    scores = np.array([[[4, 4, 4, 4], [1, 5, 3, 2]]], np.float32)
    mask = np.array([[[True] * 4, [True, True, True, False]]])  # judgment 3 did not parse
    lengths = np.array([[[100] * 4, [400, 300, 200, 50]]])
    # Judgment 2 beats everyone in both orders; 0 loses to everyone;
    # judgment 3 would win everything but is not a valid judgment.
    results = np.zeros((1, 4, 4), np.int8)
    for m in range(4):
        for n in range(4):
            if m != n:
                better = max((m, n), key=lambda j: {3: 9, 2: 2, 1: 1, 0: 0}[j])
                results[0, m, n] = 1 if better == m else -1
    pairs = padded_judge_pairs(scores, mask, lengths, results)
    assert int(pairs.response_idx[0]) == 1 and bool(pairs.response_selected[0])
    assert (int(pairs.chosen[0]), int(pairs.rejected[0]), bool(pairs.valid[0])) == (2, 0, True)
    assert float(pairs.elo[0, 3]) == 0.0 and not np.asarray(pairs.battles)[0, 3].any()
    # Each valid pair was decided once in each order: win1st == win2nd.
    assert (float(pairs.omega1), float(pairs.omega2)) == (0.5, 0.5)
    # The chosen judgment is 200 characters long.
    assert bool(padded_judge_pairs(scores, mask, lengths, results, max_judgment_chars=200).valid[0])
    assert not bool(padded_judge_pairs(scores, mask, lengths, results, max_judgment_chars=199).valid[0])
    # A given omega overrides the batch's.
    given = padded_judge_pairs(scores, mask, lengths, results, omega=(0.25, 0.75))
    assert (float(given.omega1), float(given.omega2)) == (0.25, 0.75)


def test_judge_pairs_skip_prompts_without_variance_or_verdicts():
    scores = np.array([[[3, 3, 3]], [[1, 4, 2]]], np.float32)
    results = np.zeros((2, 3, 3), np.int8)  # all ties
    pairs = padded_judge_pairs(scores, None, np.full((2, 1, 3), 10), results)
    assert pairs.response_selected.tolist() == [False, True]
    assert pairs.valid.tolist() == [False, False]


def test_judge_pairs_permuting_judgments_permutes_the_answer():
    rng = np.random.default_rng(8)
    scores, mask, lengths, results, meta_mask = _judge_batch(rng)
    base = pf.judge_pairs(scores, mask, lengths, results, meta_mask)
    perm = rng.permutation(scores.shape[-1])
    permuted = pf.judge_pairs(
        scores[..., perm], mask[..., perm], lengths[..., perm],
        results[:, perm][:, :, perm], meta_mask[:, perm][:, :, perm],
    )
    np.testing.assert_array_equal(permuted.valid, base.valid)
    np.testing.assert_allclose(np.asarray(permuted.elo), np.asarray(base.elo)[:, perm], atol=2e-5)
    valid = np.asarray(base.valid)
    elo = np.asarray(base.elo)
    rows = np.flatnonzero(valid)
    np.testing.assert_allclose(elo[rows, perm[np.asarray(permuted.chosen)[rows]]], elo[rows, np.asarray(base.chosen)[rows]], atol=2e-5)


def test_judge_pairs_reject_bad_input():
    scores, lengths = np.zeros((2, 3, 4)), np.zeros((2, 3, 4), int)
    with pytest.raises(ValueError, match="meta_results"):
        pf.judge_pairs(scores, None, lengths, np.zeros((2, 3, 3), np.int8))
    with pytest.raises(ValueError, match="judgment_lengths"):
        pf.judge_pairs(scores, None, lengths[:, :2], np.zeros((2, 4, 4), np.int8))
    with pytest.raises(ValueError, match="omega"):
        pf.judge_pairs(scores, None, lengths, np.zeros((2, 4, 4), np.int8), omega=(0.5,))
    with pytest.raises(ValueError, match="finite"):
        pf.judge_pairs(np.full((2, 3, 4), np.nan), None, lengths, np.zeros((2, 4, 4), np.int8))
    with pytest.raises(ValueError, match="max_judgment_chars"):
        pf.judge_pairs(scores, None, lengths, np.zeros((2, 4, 4), np.int8), max_judgment_chars=-1)


# ------------------------------------------------------------ expected score


def test_expected_score_matches_numpy():
    rng = np.random.default_rng(9)
    vocab = 64
    logits = rng.normal(0, 4, (3, 5, vocab)).astype(np.float32)
    logits[0, 0] *= 30  # large logits must not overflow
    ids = rng.permutation(vocab)[:6]
    ours = np.asarray(pf.expected_score(logits, ids))
    chosen = logits.astype(np.float64)[..., ids]
    probs = np.exp(chosen - chosen.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(ours, probs @ np.arange(6.0), atol=1e-5)
    assert np.all((ours >= 0) & (ours <= 5))
    mass = np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(
        np.asarray(pf.score_token_mass(logits[1:], ids)), mass[1:][..., ids].sum(-1) / mass[1:].sum(-1), rtol=1e-4
    )


def test_expected_score_of_a_confident_model_is_its_digit():
    logits = np.zeros((6, 10), np.float32)
    ids = np.array([3, 4, 5, 6, 7, 8])
    logits[np.arange(6), ids] = 100.0
    np.testing.assert_allclose(np.asarray(pf.expected_score(logits, ids)), np.arange(6.0), atol=1e-5)
    assert float(pf.expected_score(np.zeros(10, np.float32), ids)) == pytest.approx(2.5)


def test_expected_score_rejects_bad_ids():
    with pytest.raises(ValueError, match="6"):
        pf.expected_score(np.zeros((2, 10)), np.arange(5))
    with pytest.raises(ValueError, match="lie in"):
        pf.expected_score(np.zeros((2, 10)), np.arange(6) + 5)
    with pytest.raises(ValueError, match="distinct"):
        pf.expected_score(np.zeros((2, 10)), np.array([1, 1, 2, 3, 4, 5]))
