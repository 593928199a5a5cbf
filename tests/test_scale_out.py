"""Scale-out end to end on one tiny loop iteration (generation, judging, meta-judging, DPO):

- a real multi-process job, two OS processes joined by ``jax.distributed`` on localhost (4 CPU
  devices each, gloo collectives), on all three mesh axes of the 8 devices (data 2, fsdp 2,
  tensor 2), makes the files and parameters of one device, through an orbax save and restore;
- a killed process fails the other within a bounded time."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from loop_helpers import REPO, TINY, XLA_CACHE, rows, xla_flags

from mrjax.mesh import MESH_AXES

pytestmark = pytest.mark.slow

# One iteration with judge training; 8 DPO rows a step, split over the 8 devices. tiny-random's
# next-token distribution is nearly flat (logits' std 0.16 over 49k tokens), so at T = 1 a
# float32 rounding difference between layouts (1e-6) moves the inverse-CDF draw to a neighbour
# token; at T = 0.01 the draws are among a few well-separated tokens and still differ per sample.
# A nucleus (top-p 0.9, which configs/tiny.yaml leaves off) then holds those few tokens, so the loop
# samples through the sampler's top-p path here, on every layout, at little cost.
OVERRIDES = ["iteration.iterations=1", "eft.enabled=false", "train.batch_size=8", "--no-eval", "--quiet",
             *(f"iteration.{role}_{name}" for role in ("actor", "judge", "meta_judge")
               for name in ("temperature=0.01", "top_p=0.9"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, fault: str | None = None, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(devices), **extra)
    env.pop("MRJAX_FAULT", None)
    if fault:
        env["MRJAX_FAULT"] = fault
    return env


def _command(run_dir, mesh=(-1, 1, 1)) -> list[str]:
    return [sys.executable, "-m", "mrjax.train", "--config", str(TINY), f"run_dir={run_dir}", *OVERRIDES,
            *(f"mesh.{axis}={n}" for axis, n in zip(MESH_AXES, mesh))]


def _start_job(run_dir, faults=(None, None), heartbeat_s: int = 100, mesh=(-1, 1, 1)) -> list[subprocess.Popen]:
    """Process 0 and process 1 of a two-process job (each its own XLA cache, kept apart from the
    single-process runs' shared one)."""
    address = f"127.0.0.1:{_free_port()}"
    return [
        subprocess.Popen(_command(run_dir, mesh), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(4, faults[i], JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(i), MRJAX_HEARTBEAT_TIMEOUT=str(heartbeat_s),
                                  MRJAX_COMPILATION_CACHE=str(XLA_CACHE) + f"-process{i}"))
        for i in range(2)
    ]


def _finish(processes, timeout=900) -> list[tuple[int, str, str]]:
    out = []
    for p in processes:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        out.append((p.returncode, stdout, stderr))
    return out


def _params(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "iter_1" / "hf" / "model.safetensors"))


STAGE_FILES = ("prompts", "responses", "judgments", "actor_pairs", "meta_judgments", "judge_pairs")


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The reference: the same iteration on one device."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    done = subprocess.run(_command(run_dir), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=_env(1, MRJAX_COMPILATION_CACHE=str(XLA_CACHE)))
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir


def _assert_same_rows(ours: list[dict], reference: list[dict], name: str):
    """The same rows: texts, ids and choices equal; float figures (expected scores, Elo) to float32 rounding."""
    assert len(ours) == len(reference), name
    for a, b in zip(ours, reference):
        assert a.keys() == b.keys(), name
        for key in b:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (name, key, a, b)
            else:
                assert a[key] == b[key], (name, key, a, b)


def _assert_same_run(ours, reference):
    for name in STAGE_FILES:
        _assert_same_rows(rows(ours / "iter_1" / f"{name}.jsonl"), rows(reference / "iter_1" / f"{name}.jsonl"), name)
    assert rows(ours / "iter_1" / "actor_pairs.jsonl") and rows(ours / "iter_1" / "judge_pairs.jsonl")
    a, b = _params(ours), _params(reference)
    assert a.keys() == b.keys()
    # Sharded reductions add in another order: float32 rounding only. Adam divides each gradient by its
    # own root mean square, so an element whose gradient is near 0 turns that rounding into up to a
    # fraction of the learning rate (1e-4 here): hence atol 1e-5.
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


# All three axes at once: data across the two processes (devices in process order), fsdp and tensor
# within each (the loop's rows over data, parameters over fsdp and tensor). The model's
# logits and the training step are checked on data8, fsdp8 and fsdp2_tensor4 as well, and the
# sampler on fsdp2_tensor4 (test_model, test_train_step, test_sampling), in-process.
MESH = (2, 2, 2)


def test_two_processes_make_the_files_and_parameters_of_one(one_device_run, tmp_path):
    run_dir = tmp_path / "run"
    # First both processes are killed right after DPO's first step and its orbax checkpoint ...
    killed = _finish(_start_job(run_dir, faults=("dpo:step1", "dpo:step1"), mesh=MESH))
    # A process whose peer has already killed itself may be aborted by JAX's coordination service
    # (SIGABRT) just before it reaches its own kill point; either way the job is dead after step 1.
    errors = [[line for line in e.splitlines() if "rror" in line][:5] for _, _, e in killed]
    assert {code for code, _, _ in killed} <= {-signal.SIGKILL, -signal.SIGABRT}, errors
    assert (run_dir / "iter_1" / "train" / "checkpoints" / "1").is_dir(), errors
    # ... then the job is started again: it restores the checkpoint from both processes and finishes.
    (code0, out0, err0), (code1, out1, err1) = _finish(_start_job(run_dir, mesh=MESH))
    assert code0 == 0 and code1 == 0, (err0[-3000:], err1[-3000:])
    assert "from step 1" in err0  # the trainer's "resumed ... from step 1": DPO went on from the checkpoint
    assert json.loads(out0.strip().splitlines()[-1])["final_model"].endswith("iter_1/hf")
    assert not any(line.startswith("{") for line in out1.splitlines())  # only process 0 reports (gloo chats) ...
    assert "INFO" not in err1  # ... and logs
    _assert_same_run(run_dir, one_device_run)


def test_a_killed_process_fails_the_other_in_bounded_time(tmp_path):
    """Process 1 dies in the middle of the actor's generation; process 0 must not wait forever."""
    heartbeat = 10
    processes = _start_job(tmp_path / "run", faults=(None, "responses:shard0"), heartbeat_s=heartbeat)
    t0 = time.monotonic()
    (code0, _, err0), (code1, _, _) = _finish(processes, timeout=600)
    waited = time.monotonic() - t0
    assert code1 == -signal.SIGKILL
    assert code0 == 3, err0[-3000:]  # mrjax.cli.PEER_FAILURE_EXIT: no abort, no hang
    assert "error: process 0 of 2: a collective with the other processes failed" in err0
    assert "Another process of this job most likely died" in err0
    assert waited < 120, waited
