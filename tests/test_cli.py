"""The command line's XLA compilation cache: bounded, locked, shared by processes that run at once."""
import subprocess
import sys

from loop_helpers import cli_env

# Compiles eight small programs through the command line's cache setup; prints how many it read back.
COMPILE_EIGHT = """
import jax, jax.numpy as jnp
from mrjax.cli import COMPILATION_CACHE_MAX_BYTES, enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
enable_compilation_cache()
assert jax.config.jax_compilation_cache_max_size == COMPILATION_CACHE_MAX_BYTES
for n in range(1, 9):
    jax.block_until_ready(jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * n))(jnp.ones(7 * n)))
print(len(hits))
"""


def _start(cache_dir):
    # JAX's own threshold variable, which the command line leaves in force: these fast compiles are kept too.
    env = dict(cli_env(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, "-c", COMPILE_EIGHT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "compilation cache" not in stderr.lower(), stderr[-3000:]  # JAX warns when an entry fails
    return int(stdout.split()[-1])


def test_processes_at_once_share_one_bounded_locked_cache(tmp_path):
    together = [_start(tmp_path), _start(tmp_path)]
    [_finish(p) for p in together]
    entries = sorted(tmp_path.glob("*-cache"))
    assert len(list(tmp_path.glob("jit__lambda-*-cache"))) == 8  # and the programs that make the inputs
    # The size bound turns on JAX's least-recently-used bookkeeping (an access time per entry) and
    # its lock around every read and write.
    assert all(e.with_name(e.name[:-len("-cache")] + "-atime").is_file() for e in entries)
    assert (tmp_path / ".lockfile").exists()
    assert _finish(_start(tmp_path)) == len(entries)  # a later run reads every program back
