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
                              "--workloads", "sft_judge"])
    out = train.run_cases(model, tok, args)
    assert out["matmul_flops_per_s"] > 0
    share, plain = out["sft_judge/share"], out["sft_judge/plain"]
    assert share["shared_tokens"] >= 250 and plain["shared_tokens"] == 0  # the judge rubric, run once
    assert share["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert 0 < share["flops"] < plain["flops"]
    for r in (share, plain):
        assert r["step_s"] > 0 and r["gflops_per_s"] > 0 and 0 < r["fraction_of_matmul"]
    assert out["sft_judge/speedup"] > 0
    # DPO on judge pairs, without the cost analysis.
    args = parser.parse_args(["--rows", "2", "--steps", "1", "--matmul-size", "128", "--workloads", "dpo_judge",
                              "--modes", "share", "--no-flops"])
    out = train.run_cases(model, tok, args)
    assert out["dpo_judge/share"]["shared_tokens"] >= 250 and out["dpo_judge/share"]["flops"] is None
