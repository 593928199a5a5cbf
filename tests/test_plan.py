"""``mrjax.plan``: its sizes are those the arrays really have and those XLA's compiled programs
report; it refuses a config that cannot fit and names the setting to change."""
import subprocess
import sys

import jax
import numpy as np
import pytest
from loop_helpers import REPO

from mrjax import train_step as ts
from mrjax.config import ConfigError, load_config
from mrjax.mesh import mesh_from_settings
from mrjax.model.pretrained import init_params, param_shardings
from mrjax.plan import GiB, _worst_batch, format_plan, model_config, plan


def _bytes_on(device, tree) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize("overrides", [["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"], ["mesh.data=1", "mesh.fsdp=8"]])
def test_sizes_are_those_of_the_real_arrays_and_of_xla(overrides):
    config = load_config(REPO / "configs" / "tiny.yaml", overrides)
    facts = plan(config)
    mesh = mesh_from_settings(config.mesh)
    c = model_config(config.model.name)
    params = init_params(c, mesh)
    tx, _ = ts.make_optimizer(config.train, 1000)
    state = ts.init_state(params, tx, ts.state_shardings(tx, param_shardings(c, mesh), params, mesh))
    for device in mesh.devices.flat:  # the plan's figures are the largest any device holds
        assert _bytes_on(device, params) <= facts["param_bytes"]
        assert _bytes_on(device, state.opt_state) <= facts["optimizer_bytes"]
    assert max(_bytes_on(d, params) for d in mesh.devices.flat) == facts["param_bytes"]
    assert max(_bytes_on(d, state.opt_state) for d in mesh.devices.flat) == facts["optimizer_bytes"]
    assert facts["param_bytes"] < sum(x.nbytes for x in jax.tree.leaves(params)) / 2  # sharded, not replicated

    # XLA's view of the same step: its inputs are the state and the batch.
    train = facts["train_no_remat"]
    abstract_batch = _worst_batch(config, "dpo")
    batch = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                for x, s in zip(abstract_batch.values(), ts.batch_shardings(mesh, abstract_batch).values()))
    expected = facts["param_bytes"] + facts["optimizer_bytes"] + batch
    assert abs(train["argument"] - expected) <= 0.1 * expected, (train, expected)
    # Remat keeps less of the forward pass for the backward pass.
    assert facts["train_remat_activation_bytes"] < facts["train_no_remat_activation_bytes"]
    assert facts["train_step_flops_per_device"] > 0 and facts["decode_step_flops_per_device"] > 0
    assert facts["kv_cache_bytes"] > 0 and facts["sampling_peak_bytes"] >= facts["kv_cache_bytes"]
    assert "per device" in format_plan(facts)


def test_training_flops_agree_with_the_six_n_d_rule():
    """XLA's count for one DPO step of the 135M model is 6 x parameters x tokens (forward and
    backward), where the unembedding only runs on the completion tokens; attention adds a little."""
    config = load_config(REPO / "configs" / "smollm2.yaml", ["mesh.data=1", "mesh.fsdp=8", "train.batch_size=16",
                                                            "train.grad_accum=2", "train.max_length=256",
                                                            "model.remat=false"])
    facts = plan(config)
    c = model_config(config.model.name)
    assert facts["parameters"] == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M, as the checkpoint has it
    unembedding = c.vocab_size * c.hidden_size
    prompt, completions = 16 * 128, 16 * 2 * 128  # pairs (2 micro-batches of 8, one row per device) x (the shared prompt half; chosen and rejected halves)
    rule = 6 * ((facts["parameters"] - unembedding) * (prompt + completions) + unembedding * completions)
    assert rule < facts["train_step_flops_per_device"] * facts["devices"] < 1.15 * rule


def test_refuses_8b_on_one_16_gib_device_and_names_the_fix():
    done = subprocess.run([sys.executable, "-m", "mrjax.plan", "--config", "configs/llama3_8b.yaml", "--devices", "1",
                           "--device-memory", "16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: llama3-8b does not fit on 1 device(s) of 16 GiB")
    assert "mesh.fsdp" in message and "devices" in message


def test_refusal_names_remat_when_activations_do_not_fit():
    config = load_config(REPO / "configs" / "tiny.yaml", ["model.remat=false", "train.batch_size=8",
                                                         "train.max_length=256"])
    facts = plan(config, compile=False)  # the sizes of the arrays alone: nothing compiled
    static = facts["param_bytes"] + facts["grad_bytes"] + facts["optimizer_bytes"]
    # Room for the parameters, gradients and optimizer state and 1% more: the step's activations do not fit.
    with pytest.raises(ConfigError, match="set model.remat: true"):
        plan(config, device_memory_gib=1.01 * static / GiB)
