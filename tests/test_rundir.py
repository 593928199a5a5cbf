"""The run directory is honest: one run at a time (an OS lock), stage markers that verify what they
recorded (a damaged or removed file is noticed and its stages redone, to the same bytes), input files
pinned by content, and every bad input refused before anything is written (exit 2, one line)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loop_helpers import REPO, TINY, cli_env, rows, run_cli


def main_in_process(capsys, *args, module="mrjax.train"):
    import importlib

    status = importlib.import_module(module).main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- one run per directory


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "run"
    args = ("--config", str(TINY), f"run_dir={run_dir}", "--quiet", "--no-eval", "eft.enabled=false",
            "iteration.iterations=1")
    first = subprocess.Popen([sys.executable, "-m", "mrjax.train", *args], cwd=REPO, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "config.yaml").is_file():  # written after the lock is taken
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        t0 = time.monotonic()
        second = run_cli(*args)
        assert time.monotonic() - t0 < 60 and second.returncode == 2
        _one_error_line(second.stderr, str(run_dir), "in use by another mrjax process", f"pid {first.pid}")
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert [m["iteration"] for m in rows(run_dir / "metrics.jsonl")] == [1]
    steps = [m["step"] for m in rows(run_dir / "iter_1" / "train" / "metrics.jsonl") if "loss" in m]
    assert steps == sorted(set(steps))  # no step trained twice


def test_the_lock_is_held_by_one_process_and_released_when_it_ends(tmp_path, capsys):
    from mrjax.rundir import RunDirError, RunLock

    with RunLock(tmp_path, "test holder"):
        holder = (tmp_path / ".lock").read_text()
        assert f"pid {os.getpid()}" in holder and "test holder" in holder
        with pytest.raises(RunDirError, match="in use by another mrjax process"):
            RunLock(tmp_path).acquire()
        # The evaluation of a run directory takes the same lock.
        (tmp_path / "config.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
        status, _, err = main_in_process(capsys, "--run", str(tmp_path), module="mrjax.eval.__main__")
        assert status == 2, err[-2000:]
        _one_error_line(err, "in use by another mrjax process", "test holder")
    RunLock(tmp_path).acquire().release()  # free again
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it with the process.
    code = f"from mrjax.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); import os, signal; " \
           "print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert done.returncode == -9 and "locked" in done.stdout
    RunLock(tmp_path).acquire().release()


# ----------------------------------------------------------------------------- markers that verify


def _pairs_and_params(run_dir: Path) -> dict[str, bytes]:
    names = ["iter_1/actor_pairs.jsonl", "iter_1/judge_pairs.jsonl", "iter_2/actor_pairs.jsonl",
             "eft/hf/model.safetensors", "iter_1/hf/model.safetensors", "iter_2/hf/model.safetensors"]
    return {name: (run_dir / name).read_bytes() for name in names}


DAMAGE = [  # (what is done to a finished run, the line that says it was noticed and redone)
    ("truncate iter_1/judgments.jsonl", "iter_1/judgments: redoing the stage, an output: iter_1/judgments.jsonl"),
    ("delete iter_1/.done/actor_pairs.json", "iter_1/actor_pairs done"),
    ("delete iter_1/hf/model.safetensors", "iter_1/train: redoing the stage, an output: iter_1/hf/model.safetensors"),
    ("delete iter_2/.done/summary.json", "iter_2/summary done"),
]


@pytest.mark.slow
def test_a_damaged_finished_run_is_noticed_and_redone_to_the_same_bytes(tiny_run, tmp_path):
    """Each damage of DAMAGE (all at once, in one re-run: each stage verifies its own records) is noticed,
    the stages it touches are redone, and the run ends byte-identical to the uninterrupted one."""
    reference, _ = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for damage, _ in DAMAGE:
        how, name = damage.split(" ", 1)
        path = run_dir / name
        if how == "truncate":
            text = path.read_bytes()
            path.write_bytes(text[: len(text) - 40])  # the last line cut in half
        else:
            path.unlink()
    (run_dir / ".done" / "run.json").unlink()  # even without the run's own marker nothing is appended twice
    again = run_cli("--config", str(TINY), f"run_dir={run_dir}", "--quiet", "--no-eval")
    assert again.returncode == 0, again.stderr[-3000:]
    for damage, noticed in DAMAGE:
        assert noticed in again.stderr, (damage, again.stderr[-3000:])
    assert "already complete" not in again.stderr
    assert _pairs_and_params(run_dir) == _pairs_and_params(reference)
    for t in (1, 2):
        assert (run_dir / f"iter_{t}" / "judgments.jsonl").read_bytes() == \
            (reference / f"iter_{t}" / "judgments.jsonl").read_bytes()
    assert [m["iteration"] for m in rows(run_dir / "metrics.jsonl")] == [1, 2]
    once_more = run_cli("--config", str(TINY), f"run_dir={run_dir}", "--quiet", "--no-eval")
    assert once_more.returncode == 0 and "already complete (every stage verified)" in once_more.stderr


def test_marker_records_detect_changed_files(tmp_path):
    from mrjax.rundir import marker_problem, record

    (tmp_path / "a.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.bin").write_bytes(b"\0" * 100)
    marker = {"inputs": record(tmp_path, [tmp_path / "a.jsonl"]), "outputs": record(tmp_path, [tmp_path / "d"])}
    assert set(marker["inputs"]) == {"a.jsonl"} and set(marker["outputs"]) == {"d/w.bin"}
    assert marker_problem(tmp_path, marker) is None
    (tmp_path / "a.jsonl").write_text('{"x": 2}\n')  # same size, other bytes
    assert marker_problem(tmp_path, marker) == "an input: a.jsonl changed (other content)"
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "d" / "w.bin").unlink()
    assert marker_problem(tmp_path, marker) == "an output: d/w.bin is missing"


# ----------------------------------------------------------------------------- inputs pinned


def test_a_changed_prompt_file_is_refused_naming_it(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"Question {i}: explain how tides work."}) for i in range(20)]
    prompts.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    from mrjax.config import load_config
    from mrjax.loop import MetaRewardingRun

    args = [f"run_dir={run_dir}", "prompts.source=jsonl", f"prompts.path={prompts}"]
    run = MetaRewardingRun(load_config(TINY, args), progress=False)
    run.root.mkdir()
    run._check_or_write_config()
    prompts.write_text("\n".join(lines[:-1] + [json.dumps({"prompt": "Another question about the moon."})]) + "\n")
    status, _, err = main_in_process(capsys, "--config", str(TINY), *args)
    assert status == 2
    _one_error_line(err, f"prompts.path: the file {prompts}", "is not the one this run started with",
                    "--force-config")


# ----------------------------------------------------------------------------- refused before any work


def _hf_copy(tiny_run_dir: Path, tmp_path: Path, **config_changes) -> Path:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_run_dir / "eft" / "hf", hf)  # a real HF export of the tiny model
    config = json.loads((hf / "config.json").read_text())
    config.update(config_changes)
    (hf / "config.json").write_text(json.dumps(config))
    return hf


def _bad_inputs(tmp_path: Path, tiny_run_dir: Path):
    long_prompt = tmp_path / "long.jsonl"
    fine = [json.dumps({"prompt": f"Question {i}: why is the sky blue?"}) for i in range(20)]
    long_prompt.write_text("\n".join(fine[:3] + [json.dumps({"prompt": "word " * 2100})] + fine[3:]) + "\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(("\n".join(fine[:5]) + "\n" + '{"prompt": "caf\xe9 au lait"}\n').encode("latin-1"))
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("keep me\n")
    biased = _hf_copy(tiny_run_dir, tmp_path, attention_bias=True)
    return [
        (["prompts.source=jsonl", f"prompts.path={long_prompt}"], None,
         [f"{long_prompt}:4: the prompt is too long for the actor", "prompts.drop_too_long=true"]),
        (["prompts.source=jsonl", f"prompts.path={latin1}"], None, [f"{latin1}:6: not UTF-8 text"]),
        ([], a_file, [f"run_dir {a_file} is a file, not a directory"]),
        (["model.dtype=float16"], None, ["config key 'model.dtype' must be one of float32, bfloat16, got 'float16'"]),
        ([f"model.name={biased}", "eft.enabled=false"], None, ["attention_bias=true is not supported"]),
    ]


@pytest.mark.slow
def test_bad_inputs_are_refused_by_the_dry_run_and_the_run_with_nothing_written(tiny_run, tmp_path, capsys):
    for overrides, run_dir, needles in _bad_inputs(tmp_path, tiny_run[0]):
        run_dir = run_dir or tmp_path / "run"
        before = run_dir.read_bytes() if run_dir.is_file() else None
        for extra in (["--dry-run"], []):
            status, _, err = main_in_process(capsys, "--config", str(TINY), f"run_dir={run_dir}", *overrides, *extra)
            assert status == 2, (overrides, extra, err[-3000:])
            _one_error_line(err, *needles)
            assert (run_dir.read_bytes() == before) if before is not None else not run_dir.exists()


def test_too_long_prompts_can_be_dropped_and_counted(tmp_path, capsys):
    from mrjax.config import load_config
    from mrjax.loop import MetaRewardingRun, check_config

    path = tmp_path / "p.jsonl"
    fine = [json.dumps({"prompt": f"Question {i}: why is the sky blue?"}) for i in range(16)]
    # 1,800 words fit the actor's 2048 - 16 positions but not the judge's template around them.
    path.write_text("\n".join(fine + [json.dumps({"prompt": "word " * 1900}),
                                      json.dumps({"prompt": "word " * 3000})]) + "\n")
    args = [f"run_dir={tmp_path / 'run'}", "prompts.source=jsonl", f"prompts.path={path}"]
    with pytest.raises(Exception, match=r"p.jsonl:17: the prompt is too long for the judge"):
        check_config(load_config(TINY, args))
    config = load_config(TINY, args + ["prompts.drop_too_long=true"])
    assert check_config(config)["dropped_too_long"] == 2
    run = MetaRewardingRun(config, progress=False)
    run.root.mkdir()
    info = run.stage_prompt_pool()
    assert info["dropped_too_long"] == 2 and info["pool"] + info["held_out"] == 16


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_hf_options_mrjax_does_not_compute_are_refused(change, message):
    from mrjax.model.weights import WeightsError, config_from_hf

    raw = {"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    config_from_hf(raw)
    with pytest.raises(WeightsError, match=message):
        config_from_hf({**raw, **change})


@pytest.mark.slow
def test_a_checkpoint_tensor_left_unread_is_refused(tiny_run, tmp_path):
    from safetensors.numpy import load_file, save_file

    from mrjax.model.pretrained import inspect_model
    from mrjax.model.weights import WeightsError

    hf = _hf_copy(tiny_run[0], tmp_path)
    tensors = load_file(str(hf / "model.safetensors"))
    inspect_model(hf)  # as exported: every tensor is read
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.0.self_attn.q_proj.bias' would be left unread"):
        inspect_model(hf)
