"""Test setup: an 8-device simulated CPU mesh (set before jax is imported) and shared fixtures."""
import os

from loop_helpers import xla_flags  # stdlib only: jax is not imported yet

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A command line run inside a test process (``mrjax.train.main``) must not turn XLA's persistent cache on
# for the rest of that process's tests (nor write to ~/.cache): a worker that ran such a test crashed
# in a later compile that went through the cache's path. Runs in a subprocess get their own cache
# (loop_helpers.run_cli).
os.environ["MRJAX_COMPILATION_CACHE"] = "off"
# The subprocess runs' cache keeps every program, not only those that take 0.5 s to compile: the tiny
# model's programs compile fast, but there are many, and most runs repeat the same ones.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# The tests' programs are small and most run a few times, so compiling them costs more than running
# them: XLA compiles without LLVM's optimizations here (and in the runs the tests start, which inherit
# this environment), which cuts a tiny loop's compile time by 40-50%. Results are compared with
# independent references to tolerances, or with runs under the same setting; CI's tiny loop (.ci/run)
# and ``python -m mrjax.bench`` compile as users do. Tests whose programs do a lot of elementwise work
# ask for the full optimization (``full_optimization``).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def full_optimization():
    """XLA's full optimization for this test's compilations (the suite turns most of it off)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


CHAT_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea, then explain which image in it you like best and why.",
    "List three prime numbers greater than 100 and show how you checked that each of them is prime. "
    "Keep the explanation short, but do not skip any step of the check.",
]


def single_device_mesh():
    from mrjax.mesh import make_mesh

    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def smol():
    """The embedded default (SmolLM2-135M-Instruct GGUF) on one device: (model, tokenizer)."""
    from mrjax import load_pretrained

    return load_pretrained("smollm2-135m-instruct", mesh=single_device_mesh(), progress=False)


@pytest.fixture(scope="session")
def hf_smol():
    """transformers' PyTorch model from the same GGUF (float32, dequantised): the reference."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from mrjax.model.registry import embedded_gguf_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smol_hf_dir(hf_smol, smol, tmp_path_factory):
    """The embedded model as a plain HF directory written by transformers (quantization_config dropped)."""
    directory = tmp_path_factory.mktemp("smol_hf")
    if hasattr(hf_smol.config, "quantization_config"):
        del hf_smol.config.quantization_config
    hf_smol.hf_quantizer = None
    hf_smol.save_pretrained(str(directory))
    smol[1].hf.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """The tiny config's whole loop (EFT + 2 iterations) through the CLI: (run_dir, completed process).
    Made once per test session: the pytest-xdist workers share it (the first one to need it runs it,
    under a file lock). Tests read it; a test that runs the CLI on it works on a copy."""
    import json
    import subprocess

    from filelock import FileLock
    from loop_helpers import TINY, run_cli

    # xdist gives each worker its own base directory inside the session's one.
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    run_dir, record = root / "tiny_run" / "run", root / "tiny_run" / "process.json"
    with FileLock(str(root / "tiny_run.lock")):
        if not record.is_file():
            done = run_cli("--config", str(TINY), f"run_dir={run_dir}", "--quiet")
            assert done.returncode == 0, done.stderr[-4000:]
            record.write_text(json.dumps(dict(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)))
    done = json.loads(record.read_text())
    return run_dir, subprocess.CompletedProcess([], done["returncode"], done["stdout"], done["stderr"])
