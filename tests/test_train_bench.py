"""``python -m mrjax.bench train`` on a tiny shape: the tiny-random model, 2 judge-format rows."""
import argparse

import pytest


def test_train_bench_runs_on_tiny_shapes_and_sharing_saves_flops():
    from train_helpers import tiny_model

    from mrjax.benchmarks import train

    model, tok = tiny_model()
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-random", "--rows", "2", "--steps", "1", "--matmul-size", "128",
                              "--workloads", "sft_judge", "--reference", "trl"])
    out = train.run_cases(model, tok, args)
    assert out["matmul_flops_per_s"] > 0
    share, plain = out["sft_judge/share"], out["sft_judge/plain"]
    assert share["shared_tokens"] >= 250 and plain["shared_tokens"] == 0  # the judge rubric, run once
    assert share["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert 0 < share["flops"] < plain["flops"]
    for r in (share, plain):
        assert r["step_s"] > 0 and r["gflops_per_s"] > 0 and 0 < r["fraction_of_matmul"]
    assert out["sft_judge/speedup"] > 0
    # TRL's SFTTrainer on the same rows: about the same tokens (its own chat-template tokenisation).
    trl = out["sft_judge/trl"]
    assert trl["step_s"] > 0 and out["sft_judge/trl_ratio"] == pytest.approx(trl["step_s"] / share["step_s"])
    ours = sum(len(p) + len(c[0]) for p, c in zip(case_examples(tok, "sft_judge", 2).prompts,
                                                   case_examples(tok, "sft_judge", 2).completions))
    assert abs(trl["tokens_per_step"] - ours) <= 4
    # DPO on judge pairs, without the cost analysis.
    args = parser.parse_args(["--rows", "2", "--steps", "1", "--matmul-size", "128", "--workloads", "dpo_judge",
                              "--modes", "share", "--no-flops", "--reference", "trl"])
    out = train.run_cases(model, tok, args)
    assert out["dpo_judge/share"]["shared_tokens"] >= 250 and out["dpo_judge/share"]["flops"] is None
    assert out["dpo_judge/trl"]["step_s"] > 0 and out["dpo_judge/trl_ratio"] > 0


def case_examples(tok, kind, n):
    from mrjax.benchmarks import train

    return train.Case(None, tok, kind, train._rows(kind, n), 1024).examples
