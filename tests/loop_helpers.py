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


def cli_env(cache_dir=XLA_CACHE) -> dict:
    """The environment of a command line run in a fresh process: one CPU device (the loop's sharded
    paths are the model's and sampler's, tested on 8 devices elsewhere), the repository on the path,
    XLA's cache in ``cache_dir``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), MRJAX_COMPILATION_CACHE=str(cache_dir))
    env.pop("XLA_FLAGS", None)
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
