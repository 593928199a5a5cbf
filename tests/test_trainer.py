"""Trainer, data files, checkpoints and the CLI: learning, exact resume, bad input, NaN stop."""
import json
import random

import jax
import numpy as np
import pytest

from mrjax.checkpoint import Checkpointer
from mrjax.config import load_config
from mrjax.data import (Batcher, DataError, epoch_order, padded_length, load_examples, make_batch,
                        read_rows, tokenize_rows, write_jsonl)
from mrjax.trainer import Trainer, TrainingError


@pytest.fixture(scope="module")
def tiny():
    from train_helpers import tiny_model

    return tiny_model()


# ---------------------------------------------------------------- files and batches


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "hi", "chosen": "a", "rejected": "b"', "not valid JSON"),
        ('["hi", "a", "b"]', "expected a JSON object"),
        ('{"prompt": "hi", "chosen": "a"}', "missing field 'rejected'"),
        ('{"prompt": "hi", "chosen": 3, "rejected": "b"}', "'chosen' must be a string"),
        ('{"prompt": "hi", "chosen": "a", "rejected": ""}', "'rejected' is empty or whitespace-only"),
        ('{"prompt": "hi", "chosen": " \\n\\t ", "rejected": "b"}', "'chosen' is empty or whitespace-only"),
        ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', "'prompt' is empty"),
        ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "prompt message 0"),
        ('{"prompt": "hi", "chosen": "a", "rejected": "b", "ref_chosen_logps": 1.0}', "ref_chosen_logps"),
    ],
)
def test_malformed_pair_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        read_rows(path, "dpo")
    assert f"{path}:4:" in str(err.value) and message in str(err.value)


def test_pair_file_formats_and_missing_or_empty_files(tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2},
    ]
    got = read_rows(write_jsonl(tmp_path / "p.jsonl", rows), "dpo")
    assert [n for n, _ in got] == [1, 2]
    assert got[1][1]["chosen"] == "a" and got[1][1]["ref_logps"] == (-1.5, -2.0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl", "dpo")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        read_rows(tmp_path / "empty.jsonl", "dpo")
    with pytest.raises(DataError, match=r"s.jsonl:1: missing field 'completion'"):
        read_rows(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "chosen": "a"}]), "sft")


def test_prompt_longer_than_context_and_truncated_completions(tiny, tmp_path):
    _, tok = tiny
    long_prompt = "word " * 200
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                              {"prompt": long_prompt, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: the prompt is \d+ tokens, longer than the context"):
        load_examples(path, tok, "dpo", max_length=64)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "chosen": "yes " * 100, "rejected": "no"}])
    ex = load_examples(path, tok, "dpo", max_length=64)
    assert ex.truncated == 1 and len(ex.prompts[0]) + len(ex.completions[0][0]) == 64


def test_tokenisation_uses_chat_template_and_end_of_turn(tiny):
    _, tok = tiny
    ex = tokenize_rows([(1, {"prompt": "Hi there", "chosen": "Hello!", "rejected": "Bye"})], tok, "dpo", 128)
    assert list(ex.prompts[0]) == tok.encode(tok.chat("Hi there"))
    assert list(ex.completions[0][0]) == tok.encode("Hello!") + [tok.eos_ids[0]]  # <|im_end|> ends the turn
    assert tok.decode(ex.completions[0][1], skip_special_tokens=False) == "Bye<|im_end|>"


def test_make_batch_layout_by_hand(tiny):
    _, tok = tiny
    ex = tokenize_rows([(1, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Bye"})], tok, "dpo", 128)
    ex.ref_logps = np.array([[-1.0, -2.0]], np.float32)
    p, (c, r) = ex.prompts[0], ex.completions[0]
    b = make_batch(ex, [0], 2, 1, tok.pad_id, 128, pad_multiple=16)
    P = -(-(len(p) - 1) // 16) * 16  # the prompt without its last token, padded up to a multiple of 16
    assert b["prefix_tokens"].shape == (1, 2, P) and b["tokens"].shape == (1, 4, 16)
    # prefix: the prompt minus its last token, left-padded, positions from 0
    np.testing.assert_array_equal(b["prefix_tokens"][0, 0, P - len(p) + 1:], p[:-1])
    assert not b["prefix_mask"][0, 0, : P - len(p) + 1].any() and b["prefix_mask"][0, 0, P - len(p) + 1:].all()
    np.testing.assert_array_equal(b["prefix_positions"][0, 0, P - len(p) + 1:], np.arange(len(p) - 1))
    # completion rows interleave chosen, rejected; input = last prompt token + completion[:-1]; target = completion
    for row, comp in ((0, c), (1, r)):
        np.testing.assert_array_equal(b["tokens"][0, row, : len(comp)], np.r_[p[-1], comp[:-1]])
        np.testing.assert_array_equal(b["targets"][0, row, : len(comp)], comp)
        assert b["mask"][0, row].sum() == len(comp)
        np.testing.assert_array_equal(b["positions"][0, row], len(p) - 1 + np.arange(16))
    assert list(b["weights"][0]) == [1.0, 0.0]  # the second pair is padding
    np.testing.assert_array_equal(b["ref_logps"][0, 0], [-1.0, -2.0])


def test_batcher_covers_every_pair_once_per_epoch_and_is_deterministic():
    assert padded_length(3, 1024) == 16 and padded_length(17, 1024) == 32 and padded_length(17, 1024, 8) == 24
    assert padded_length(300, 256) == 300 and padded_length(250, 256) == 256 and padded_length(0, 256) == 16

    class FakeExamples:
        kind, repeats = "sft", 1
        prompts = [np.arange(100) + 100 * i for i in range(10)]  # ten distinct templates
        completions = [(np.arange(5),)] * 10

        def __len__(self):
            return 10

    b = Batcher(FakeExamples(), batch_size=4, micro_batches=1, seed=3, pad_id=0, max_length=8)
    assert b.steps_per_epoch == 3
    for epoch in range(3):
        seen = np.concatenate([b.indices(epoch * 3 + k) for k in range(3)])
        assert sorted(seen) == list(range(10))
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))
    np.testing.assert_array_equal(b.indices(4), Batcher(FakeExamples(), 4, 1, 3, 0, 8).indices(4))
    assert (b.position(7).epoch, b.position(7).batch) == (2, 1)
    np.testing.assert_array_equal(b.indices(0), epoch_order(10, 3, 0)[:4])  # distinct templates: plain order


def test_batches_keep_a_template_together_with_one_shape():
    """Rows 1, 4, 6, 9 share a 64-token rubric (a group as large as a batch); the six others are distinct
    prompts (the rest). Batches never mix the two, every row comes once per epoch, a group's batches have
    its shape (the rubric as the shared part), and the order changes with the epoch."""
    from mrjax.data import Examples, batch_groups

    rubric = list(range(1000, 1064))
    judge = (1, 4, 6, 9)
    prompts = [np.asarray(rubric + list(range(5 * i, 5 * i + 3 + i)), np.int32) if i in judge
               else np.asarray(list(range(100 * i, 100 * i + 20 + i)), np.int32) for i in range(10)]
    completions = [(np.arange(3 + i, dtype=np.int32),) for i in range(10)]
    ex = Examples("sft", prompts, completions, "<test>", list(range(1, 11)), "fp")
    groups = batch_groups(ex, 4, 1024)
    assert [list(g.members) for g in groups] == [[0, 2, 3, 5, 7, 8], [1, 4, 6, 9]]
    assert groups[0].shape.shared_tokens == 0 and groups[1].shape.shared_tokens == 64
    b = Batcher(ex, batch_size=4, micro_batches=2, seed=3, pad_id=0, max_length=1024, pad_multiple=16)
    assert b.steps_per_epoch == 3
    orders = set()
    for epoch in range(4):
        idx = [b.indices(epoch * 3 + k) for k in range(3)]
        assert sorted(np.concatenate(idx)) == list(range(10))
        assert all(set(i) <= set(judge) or not set(i) & set(judge) for i in idx)  # never mixed
        orders.add(tuple(np.concatenate(idx)))
        for k in range(3):
            batch, rows = b.batch(epoch * 3 + k)
            group = groups[1] if rows[0] in judge else groups[0]
            assert batch["prefix_tokens"].shape[-1] == group.shape.prefix_len
            assert batch["tokens"].shape[-1] == group.shape.length
            if rows[0] in judge:  # the rubric, once per micro-batch
                np.testing.assert_array_equal(batch["shared_tokens"][:, -64:], np.asarray([rubric] * 2))
            else:
                assert "shared_tokens" not in batch
    assert len(orders) > 1
    one = Batcher(ex, batch_size=8, micro_batches=1, seed=3, pad_id=0, max_length=1024)  # no group of 8: one group
    np.testing.assert_array_equal(one.indices(0), epoch_order(10, 3, 0)[:8])


# ---------------------------------------------------------------- training runs

WORDS_GOOD = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown"]
WORDS_BAD = ["seven", "twelve", "forty", "ninety", "three", "eleven", "sixty", "eight"]
TOPICS = ["apples", "rivers", "trains", "music", "chess", "clouds", "bread", "stars", "ships", "paper", "tea",
          "birds", "glass", "maps", "snow", "bells"]


def rule_pairs(n, seed):
    """Synthetic preference: chosen answers are colour words, rejected answers are number words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"prompt": f"Tell me something about {topic}.",
                     "chosen": " ".join(rng.sample(WORDS_GOOD, 2)),
                     "rejected": " ".join(rng.sample(WORDS_BAD, 2))})
    return rows


def tiny_config(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", "model.name=tiny-random", "train.max_length=128",
                              "train.warmup_ratio=0", "train.learning_rate=1e-3", *overrides])


def test_dpo_learns_synthetic_preference_on_held_out_pairs(tiny, tmp_path):
    model, tok = tiny
    train = write_jsonl(tmp_path / "train.jsonl", rule_pairs(48, seed=0))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rule_pairs(16, seed=1))
    config = tiny_config(tmp_path / "run", "train.batch_size=8", "train.epochs=3", "train.learning_rate=2e-3")
    copy = type(model)(model.config, jax.tree.map(lambda x: x.copy(), model.params), model.mesh)
    trainer = Trainer(config, copy, tok, progress=False, donate_model=True)
    before = trainer.evaluate(trainer.attach_reference(trainer.load(held_out), "eval"))
    assert before["rewards/accuracies"] == 0.0  # policy == reference: no pair is won yet
    result = trainer.train(train, held_out)
    assert result.step == 18
    assert result.eval_metrics["rewards/accuracies"] >= 0.95
    assert result.eval_metrics["loss"] < 0.5 < before["loss"]
    assert copy.params is None  # donated: no second copy of the model while training
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 19))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
        assert key in lines[0]
    assert "eval/rewards/accuracies" in lines[-1]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # A handful of bucket shapes, each compiled once.
    assert 1 <= len(trainer.step_fn.compiled_shapes) <= 4


def test_every_dpo_step_learns_from_the_first_with_warmup(tiny, tmp_path):
    """5 steps at warmup_ratio 0.1 (one warmup step): the logged rates are all above 0, the first at
    half the peak (the warmup's zero step would have wasted one step in five). The eval pairs' figures
    come per pair too, and a finished run resumed logs its final eval once."""
    model, tok = tiny
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(20, seed=5))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rule_pairs(6, seed=7))
    config = tiny_config(tmp_path / "run", "train.batch_size=4", "train.warmup_ratio=0.1", "train.learning_rate=1e-3")
    result = Trainer(config, model, tok, progress=False).train(pairs, held_out)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {x["step"]: x["learning_rate"] for x in lines if "learning_rate" in x}
    assert sorted(rates) == [1, 2, 3, 4, 5] and all(rate > 0 for rate in rates.values())
    assert rates[1] == pytest.approx(0.5e-3) and rates[2] == pytest.approx(1e-3)
    per_pair = result.eval_pair_metrics
    assert all(len(v) == 6 for v in per_pair.values())
    for key, value in result.eval_metrics.items():
        assert value == pytest.approx(float(np.mean(per_pair[key])), rel=1e-6, abs=1e-9), key
    again = Trainer(config, model, tok, progress=False).train(pairs, held_out)  # resumes at step 5: no step
    assert again.eval_metrics == result.eval_metrics
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval/loss" in x] == [5]


def test_sft_lowers_held_out_nll(tiny, tmp_path):
    model, tok = tiny
    config = tiny_config(tmp_path / "run", "train.kind=sft", "train.max_length=512", "train.batch_size=4",
                         "train.max_steps=12", "train.learning_rate=3e-3")
    trainer = Trainer(config, model, tok, progress=False)
    held_out = trainer.load("mrjax/data/eft_eval_judgments.jsonl")
    before = trainer.evaluate(held_out)["loss"]
    result = trainer.train("mrjax/data/eft_judgments.jsonl", held_out)
    assert result.eval_metrics["loss"] < before - 1.0
    assert result.metrics["num_tokens"] > 0


def _params(result):
    return jax.tree.leaves(jax.device_get(result.model.params))


RESUME_OVERRIDES = ["train.batch_size=4", "train.grad_accum=2", "train.epochs=2", "train.save_every=2",
                    "train.keep_checkpoints=2", "train.schedule=cosine", "train.warmup_ratio=0.2"]


def test_exact_resume_after_kill(tiny, tmp_path):
    """6 steps straight == 3 steps, kill (last checkpoint at 2), resume: bitwise params, no pair skipped or repeated."""
    model, tok = tiny
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(10, seed=2))
    overrides = RESUME_OVERRIDES

    seen_straight = {}
    straight = Trainer(tiny_config(tmp_path / "a", *overrides), model, tok, progress=False,
                       callbacks=[lambda s, m, idx: seen_straight.__setitem__(s, list(idx))]).train(pairs)

    class Kill(Exception):
        pass

    def kill_after_3(step, metrics, idx):
        seen_killed[step] = list(idx)
        if step == 3:
            raise Kill()

    seen_killed, seen_resumed = {}, {}
    config_b = tiny_config(tmp_path / "b", *overrides)
    with pytest.raises(Kill):
        Trainer(config_b, model, tok, progress=False, callbacks=[kill_after_3]).train(pairs)
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [2]  # step 3 never saved
    resumed = Trainer(config_b, model, tok, progress=False,
                      callbacks=[lambda s, m, idx: seen_resumed.__setitem__(s, list(idx))]).train(pairs)

    assert sorted(seen_resumed) == [3, 4, 5, 6]  # continued from the checkpoint at 2
    assert {**seen_killed, **seen_resumed} == seen_straight
    for epoch in (0, 1):
        pairs_seen = sum((seen_straight[epoch * 3 + k] for k in (1, 2, 3)), [])
        assert sorted(pairs_seen) == list(range(10))  # every pair once per epoch
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert straight.metrics["loss"] == resumed.metrics["loss"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 was dropped and redone
    meta = Checkpointer(tmp_path / "b" / "checkpoints").read_meta()
    assert (meta["step"], meta["epoch"], meta["batch"], meta["examples_seen"]) == (6, 2, 0, 24)
    # Keep-last-2 policy, and a finished run resumes to a no-op with the same result.
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 6]
    # donate_model: the trainer consumes its copy of the initial model (released on resume).
    copy = type(model)(model.config, jax.tree.map(lambda x: x.copy(), model.params), model.mesh)
    again = Trainer(config_b, copy, tok, progress=False, donate_model=True).train(pairs)
    assert copy.params is None
    for a, b in zip(_params(straight), _params(again)):
        np.testing.assert_array_equal(a, b)
    # A checkpoint belongs to its data: other pairs, or a fresh start over it, are refused.
    other = write_jsonl(tmp_path / "other.jsonl", rule_pairs(10, seed=4))
    with pytest.raises(TrainingError, match="data_fingerprint"):
        Trainer(config_b, model, tok, progress=False).train(other)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(config_b, model, tok, progress=False).train(pairs, resume=False)


def test_non_finite_loss_stops_with_clear_message_and_keeps_last_checkpoint(tiny, tmp_path):
    """A pair whose (given) reference log-probs overflow Δ to −inf makes step 3's loss inf: training stops
    naming the step, that state is not saved, and the checkpoint of step 2 stays intact."""
    model, tok = tiny
    rows = rule_pairs(10, seed=2)
    config = tiny_config(tmp_path / "run", *RESUME_OVERRIDES)  # the resume test's settings: its compiled step
    bad = int(epoch_order(10, config.seed, 0)[8])  # lands in the third batch
    for i, row in enumerate(rows):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = (3e38, -3e38) if i == bad else (0.0, 0.0)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(TrainingError) as err:
        Trainer(config, model, tok, progress=False).train(pairs)
    message = str(err.value)
    assert message.startswith("step 3: loss is inf (non-finite)") or message.startswith("step 3: loss is nan")
    assert "this state was not saved" in message and "last good checkpoint (step 2)" in message
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [2] and ckpt.read_meta()["step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and not np.isfinite(lines[-1]["loss"])


# ---------------------------------------------------------------- the CLI


def _fake_loader(tiny):
    """load_pretrained stand-in: the cached tiny model placed on the requested mesh (no reload)."""
    from mrjax.model.pretrained import Model, param_shardings

    def load(name, mesh=None, dtype="float32", param_dtype="float32", remat=False, seed=0, progress=True,
             remat_policy="full"):
        model, tok = tiny
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), jax.device_get(model.params),
                              param_shardings(model.config, mesh))
        return Model(model.config, params, mesh, dtype, remat, remat_policy), tok

    return load


def test_cli_trains_and_exports_hf(tiny, tmp_path, monkeypatch, capsys):
    from mrjax import train as train_cli
    from mrjax.model import pretrained

    monkeypatch.setattr(pretrained, "load_pretrained", _fake_loader(tiny))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8, seed=6))
    config = tmp_path / "c.yaml"
    config.write_text(f"mode: dpo\nrun_dir: {tmp_path / 'run'}\nmodel: {{name: tiny-random}}\n"
                      f"train: {{kind: dpo, pairs: {pairs}, max_length: 128, batch_size: 8, max_steps: 2}}\n")
    assert train_cli.main(["--config", str(config), "--quiet", "dpo.beta=0.2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and (tmp_path / "run" / "hf" / "config.json").is_file()
    from mrjax.model.weights import hf_source

    hf_config, _ = hf_source(tmp_path / "run" / "hf")
    assert hf_config == tiny[0].config


@pytest.mark.parametrize(
    "case,expected",
    [
        ("bad_key", "error: unknown config key 'train.nope'"),
        ("missing_file", "error: pair file not found"),
        ("bad_line", ":2: not valid JSON"),
        ("empty_completion", ":1: 'chosen' is empty or whitespace-only"),
        ("nan", "error: step 2: loss is nan"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, case, expected):
    from mrjax import train as train_cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{oops\n' if case == "bad_line" else
                     '{"prompt": "hi", "chosen": " ", "rejected": "b"}\n' if case == "empty_completion" else
                     '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    args = ["mode=dpo", f"train.pairs={pairs}", f"run_dir={tmp_path / 'run'}"]
    if case == "bad_key":
        args.append("train.nope=1")
    if case == "missing_file":
        args[1] = f"train.pairs={tmp_path / 'absent.jsonl'}"
    if case == "nan":  # any TrainingError from the run is reported the same way
        def boom(*a, **k):
            raise TrainingError("step 2: loss is nan (non-finite); training stopped")

        monkeypatch.setattr(train_cli, "run", boom)
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert "Traceback" not in err[0]


# ---------------------------------------------------------------- the embedded model


def test_sequence_logps_of_embedded_model_match_its_plain_forward(smol, tmp_path):
    """The real model path (SmolLM2 GGUF, tied embeddings): the trainer's shared-prompt, chunked log-probs
    equal a float64 log-softmax of the model's plain full-sequence logits."""
    model, tok = smol
    rows = read_rows("mrjax/data/dpo_pairs.jsonl", "dpo")[:2]
    config = load_config(None, [f"run_dir={tmp_path}", "train.batch_size=2", "train.max_length=256",
                                "train.max_logits_mb=8"])
    trainer = Trainer(config, model, tok, progress=False)
    examples = tokenize_rows(rows, tok, "dpo", 256)
    sums, counts = trainer.sequence_logps(examples)
    sequences = [np.r_[examples.prompts[i], examples.completions[i][j]] for i in range(2) for j in range(2)]
    width = max(map(len, sequences))
    ids = np.zeros((4, width), np.int32)
    mask = np.zeros((4, width), np.int32)
    for k, seq in enumerate(sequences):
        ids[k, : len(seq)], mask[k, : len(seq)] = seq, 1
    logits = np.asarray(model(ids, mask), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for k, seq in enumerate(sequences):
        i, j = divmod(k, 2)
        n = len(examples.prompts[i])
        want = sum(logp[k, t - 1, seq[t]] for t in range(n, len(seq)))
        assert counts[i, j] == len(seq) - n
        assert sums[i, j] == pytest.approx(want, rel=1e-4, abs=1e-3)


# ---------------------------------------------------------------- the benchmark


def test_dpo_benchmark_reports_side_by_side(tiny):
    import argparse

    from mrjax.benchmarks import dpo as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-random", "--pairs", "2", "--prompt-tokens", "48",
                              "--completion-tokens", "32", "--steps", "1", "--reference", "pytorch"])
    model, tok = tiny
    rows = bench.build_pairs(tok, 2, 48, 32)
    assert all(len(r["prompt_ids"]) == 48 and len(r["chosen_ids"]) == len(r["rejected_ids"]) == 32 for r in rows)
    assert rows[0]["prompt_ids"] == tok.encode(rows[0]["prompt"])
    result = bench.compare(model, tok, args)
    for key in ("step_s", "reference_step_s", "ratio", "peak_rss_mb", "reference_peak_rss_mb", "compile_s"):
        assert result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["reference_step_s"] / result["step_s"], rel=1e-2)
    assert result["reference"] == "pytorch-equivalent" and len(result["step_times_s"]) == 1
    json.dumps(result)


@pytest.mark.parametrize("name", ["smollm2_dpo", "smollm2_eft"])
def test_bundled_configs_and_data_load_without_truncation(tiny, name):
    _, tok = tiny
    config = load_config(f"configs/{name}.yaml")
    assert config.model.name == "smollm2-135m-instruct"
    for path in (config.train.pairs, config.train.eval_pairs):
        examples = load_examples(path, tok, config.train.kind, config.train.max_length)
        assert examples.truncated == 0 and len(examples) >= 8
    if config.train.kind == "sft":  # judge-format targets end with a parseable score
        for _, row in read_rows(config.train.pairs, "sft"):
            assert row["prompt"].startswith("Review the user's question") and "<response>" in row["prompt"]
            assert row["completion"].rsplit("\n", 1)[-1].startswith("Score: ")


def test_eft_sft_files_are_the_rendered_eft_judge_rows():
    """configs/smollm2_eft.yaml's prompt/completion files are the loop's EFT judge rows rendered by
    judge_sft_row (all training rows; the first 16 held-out rows), so the two cannot drift apart."""
    from mrjax.data import judge_sft_row, read_judge_rows

    train = [row for _, row in read_rows("mrjax/data/eft_judgments.jsonl", "sft")]
    held_out = [row for _, row in read_rows("mrjax/data/eft_eval_judgments.jsonl", "sft")]
    assert train == [judge_sft_row(r) for r in read_judge_rows("mrjax/data/eft_judge_rows.jsonl")]
    assert held_out == [judge_sft_row(r) for r in read_judge_rows("mrjax/data/eft_judge_eval_rows.jsonl")][:16]
