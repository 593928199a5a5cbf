"""Helpers shared by the loop and evaluation tests: the CLI in a fresh process, JSONL rows."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# XLA's persistent cache shared by the tests' runs, from every pytest-xdist worker (a resumed run, or
# another worker's run of the same config, reuses the compiled programs; mrjax.cli locks the folder).
XLA_CACHE = Path(tempfile.gettempdir()) / "mrjax-test-xla-cache"


def _accepted(flag: str) -> str:
    """``flag`` where this jaxlib's XLA knows it, else "": an unknown flag in XLA_FLAGS aborts the process.
    The answer is kept in the environment, so the pytest-xdist workers (started from it) do not ask again."""
    if "MRJAX_TEST_XLA_FLAGS" not in os.environ:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                               env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag))
        os.environ["MRJAX_TEST_XLA_FLAGS"] = flag if probe.returncode == 0 else ""
    return os.environ["MRJAX_TEST_XLA_FLAGS"]


# XLA:CPU's classic fusion emitters compile the tests' programs 1.5-4x faster than its newer MLIR
# ones (the default), and most test programs run once or a few times: the suite compiles with them,
# in its own process (conftest.py) and in the runs it starts. CI's tiny loop (.ci/run) and the
# benchmarks compile as users do (there the classic emitters' programs run slower).
TEST_XLA_FLAGS = _accepted("--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS of a test process with ``devices`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


def cli_env(cache_dir=XLA_CACHE) -> dict:
    """The environment of a command line run in a fresh process: one CPU device (the loop's sharded
    paths are the model's and sampler's, tested on 8 devices elsewhere), the repository on the path,
    XLA's cache in ``cache_dir``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), MRJAX_COMPILATION_CACHE=str(cache_dir),
               XLA_FLAGS=xla_flags(1))
    env.pop("MRJAX_FAULT", None)
    return env


def run_cli(*args, fault=None, timeout=900, module="mrjax.train"):
    """``python -m <module>`` in a fresh process (``cli_env``), optionally armed to SIGKILL itself."""
    env = cli_env()
    if fault:
        env["MRJAX_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
