"""The accelerator check (``python -m mrjax.bench accelerator``) on its tiny shape on the CPU: every section
runs, and its figures are real ones: positive finite rates, XLA's FLOP counts next to a hand count of the
model's matmuls, bytes a decode step reads, greedy parity shares with a float32 control of exactly 1."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
from loop_helpers import REPO

from mrjax.benchmarks import accelerator

GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The CLI's figures (stdout) and its human table (stderr); the --out file must hold the same JSON."""
    out = tmp_path_factory.mktemp("accelerator") / "figures.json"
    # The 8 simulated CPU devices of conftest stay visible: the check must use one of them.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mrjax.bench", "accelerator", "--json", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == figures
    return figures, proc.stderr


def matmul_sizes(m: dict) -> tuple[int, int]:
    """FLOPs of one token through one layer's projections (q, k, v, o, gate, up, down: 2 per multiply-add),
    and the attention products' FLOPs per (query, key) pair in one layer (q.k and p.v over every head)."""
    e, d = m["hidden_size"], m["head_dim"]
    linear = 2 * (e * d * (2 * m["num_heads"] + 2 * m["num_kv_heads"]) + 3 * e * m["intermediate_size"])
    return linear, 4 * m["num_heads"] * d


def test_every_section_ran_within_the_budget(tiny):
    figures, stderr = tiny
    assert figures["benchmark"] == "accelerator" and figures["shape"] == "tiny"
    assert figures["errors"] == {} and figures["skipped"] == []
    assert set(figures["sections"]) == {"device", "dpo", "prefill", "decode_4", "decode_8", "parity"}
    assert set(figures["section_seconds"]) == set(figures["sections"])
    assert 0 < figures["total_s"] < figures["budget_s"]
    for line in ("dpo step", "prefill 2x64", "decode pool 4", "decode pool 8", "parity (tiny shapes"):
        assert line in stderr


def test_device_on_a_cpu_has_no_table_peak_but_measured_references(tiny):
    device = tiny[0]["sections"]["device"]
    assert device["platform"] == "cpu" and device["known_as"] is None
    assert device["peak_flops"] is None and device["hbm_bandwidth"] is None
    assert device["measured_matmul_flops"] > 1e8 and device["measured_read_bandwidth"] > 1e8


def test_dpo_step_flops_match_a_hand_count(tiny):
    figures = tiny[0]
    dpo, m = figures["sections"]["dpo"], figures["model"]
    assert dpo["layers"] == m["num_layers"] == 2 and "layers_reduced_from" not in dpo
    # The batch layout: the prompt without its last token pads to 32 slots, and that token plus the
    # 31 completion tokens fed back fill the 32-slot completion segment.
    pairs, prompt, completion = dpo["pairs"], dpo["prompt_slots"], dpo["completion_slots"]
    assert (pairs, prompt, completion) == (2, 32, 32)
    linear, attention = matmul_sizes(m)
    # Each prompt runs once; both completions continue from its KV cache (keys: prompt + completion slots);
    # only completion positions are unembedded. The backward pass costs twice the forward.
    keys = pairs * prompt * prompt + 2 * pairs * completion * (prompt + completion)  # (query, key) pairs
    forward = m["num_layers"] * (linear * (pairs * prompt + 2 * pairs * completion) + attention * keys)
    forward += 2 * m["hidden_size"] * m["vocab_size"] * 2 * pairs * completion
    # XLA also counts the element-wise work (norms, softmax, RoPE, AdamW): a few percent more at this size.
    assert 1.0 <= dpo["flops_per_step"] / (3 * forward) <= 1.1
    assert dpo["tokens_per_step"] == pairs * 2 * (32 + 32)
    assert math.isfinite(dpo["tokens_per_s"]) and dpo["tokens_per_s"] > 0
    assert dpo["tokens_per_s"] == pytest.approx(dpo["tokens_per_step"] / dpo["step_s"], rel=1e-3)
    assert dpo["achieved_flops"] == pytest.approx(dpo["flops_per_step"] / dpo["step_s"], rel=1e-3)
    assert dpo["mfu"] is None  # no table peak for a CPU ...
    assert 0 < dpo["fraction_of_measured_matmul"] < 1.5  # ... only the matmul measured in the same run
    assert abs(dpo["loss"] - math.log(2)) < 0.5  # random weights, zero reference log-probs: about ln 2
    assert dpo["xla_peak_bytes"] > 0


def test_prefill_flops_match_a_hand_count(tiny):
    figures = tiny[0]
    prefill, m = figures["sections"]["prefill"], figures["model"]
    b, t = prefill["batch"], prefill["prompt_tokens"]
    linear, attention = matmul_sizes(m)
    forward = m["num_layers"] * (linear * b * t + attention * b * t * t) + 2 * m["hidden_size"] * m["vocab_size"] * b
    assert 1.0 <= prefill["flops"] / forward <= 1.1
    assert math.isfinite(prefill["tokens_per_s"]) and prefill["tokens_per_s"] > 0
    assert prefill["tokens_per_s"] == pytest.approx(b * t / prefill["seconds"], rel=1e-3)


@pytest.mark.parametrize("pool", [4, 8])
def test_decode_steps_and_bytes_read(tiny, pool):
    figures = tiny[0]
    decode, m = figures["sections"][f"decode_{pool}"], figures["model"]
    assert decode["rows"] == pool and decode["new_tokens"] == 256 and decode["subtracted_run_tokens"] == 1
    assert decode["wall_s"] > decode["subtracted_wall_s"] > 0
    assert decode["step_s"] == pytest.approx((decode["wall_s"] - decode["subtracted_wall_s"]) / 255, rel=1e-2)
    assert decode["end_to_end_tokens_per_s"] == pytest.approx(pool * 256 / decode["wall_s"], rel=1e-2)
    assert math.isfinite(decode["tokens_per_s"]) and decode["tokens_per_s"] > 0
    assert decode["tokens_per_s"] == pytest.approx(pool / decode["step_s"], rel=1e-2)
    # bfloat16: 2 bytes for every parameter but the (untied) input embedding, and keys and values of
    # every layer for the mean context of the subtracted steps: 16 prompt tokens + (256 + 1) / 2.
    params = 2 * m["vocab_size"] * m["hidden_size"] + m["num_layers"] * (
        m["hidden_size"] * m["head_dim"] * (2 * m["num_heads"] + 2 * m["num_kv_heads"])
        + 3 * m["hidden_size"] * m["intermediate_size"] + 2 * m["hidden_size"]) + m["hidden_size"]
    assert decode["parameters"] == params
    assert decode["bytes_per_step"]["weights"] == 2 * (params - m["vocab_size"] * m["hidden_size"])
    kv_per_position = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 2
    assert decode["bytes_per_step"]["kv_cache"] == int(pool * (16 + (256 + 1) / 2) * kv_per_position)
    assert decode["hbm_roofline_fraction"] is None and decode["fraction_of_measured_read_bandwidth"] > 0


def test_greedy_parity_shares(tiny):
    parity = tiny[0]["sections"]["parity"]
    assert parity["prompts"] == 8 and parity["tokens_per_prompt"] == 16
    bf16, control = parity["bfloat16_vs_float32"], parity["float32_vs_float32"]
    assert 0.0 <= bf16["identical_share"] <= 1.0 and len(bf16["first_divergence"]) == 8
    for where in bf16["first_divergence"]:
        assert where is None or 0 <= where < 16
    assert (bf16["identical_share"] == 1.0) == all(w is None for w in bf16["first_divergence"])
    assert control == {"identical_share": 1.0, "first_divergence": [None] * 8}


def test_a_spent_budget_skips_every_section(capsys, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)  # run() sets it for GPUs: undone after
    parser = argparse.ArgumentParser()
    accelerator.add_arguments(parser)
    figures = accelerator.run(parser.parse_args(["--tiny", "--budget-s", "0"]))
    assert figures["sections"] == {} and figures["errors"] == {}
    assert figures["skipped"] == ["device", "dpo", "prefill", "decode_4", "decode_8", "parity"]
    assert "skipped (budget spent): device, dpo" in capsys.readouterr().err


def test_device_peaks_by_kind():
    assert accelerator.device_peaks("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989e12, 3.35e12)
    assert accelerator.device_peaks("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert accelerator.device_peaks("NVIDIA H200") == ("H200", 989e12, 4.8e12)
    assert accelerator.device_peaks("NVIDIA A100-SXM4-80GB") == ("A100 80GB", 312e12, 2.0e12)
    assert accelerator.device_peaks("TPU v4") == ("TPU v4", 275e12, 1.2e12)
    assert accelerator.device_peaks("TPU v5 lite") == ("TPU v5e", 197e12, 0.82e12)
    assert accelerator.device_peaks("TPU v5") == ("TPU v5p", 459e12, 2.76e12)
    assert accelerator.device_peaks("TPU v6 lite") == ("TPU v6e", 918e12, 1.64e12)
    assert accelerator.device_peaks("cpu") == (None, None, None)


def test_fit_layers_keeps_what_memory_holds():
    estimate = lambda layers: (10 + 3 * layers) * GiB  # noqa: E731
    assert accelerator.fit_layers(32, estimate, None) == (32, "")
    assert accelerator.fit_layers(32, estimate, 200 * GiB) == (32, "")
    layers, why = accelerator.fit_layers(32, estimate, 50 * GiB)  # 90% of 50 GiB holds 11 layers
    assert layers == 11 and "32 layers need about 106.0 GiB of 45.0; 11 fit" in why
    with pytest.raises(MemoryError, match="even one layer needs about 13.0 GiB"):
        accelerator.fit_layers(32, estimate, 10 * GiB)
