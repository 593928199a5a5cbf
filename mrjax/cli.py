"""The command lines' shared frame (``python -m mrjax.train``, ``mrjax.eval``, ``mrjax.plan``): logging,
one ``error:`` line and exit status 2 for what a user got wrong, 130 on Ctrl-C, 3 when a peer
process of a multi-process job died, the result printed as JSON; XLA's persistent compilation cache."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

USER_ERRORS_EXIT = 2
PEER_FAILURE_EXIT = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (a config, a file, a model, the run directory), not a bug."""
    from mrjax.config import ConfigError
    from mrjax.data import DataError
    from mrjax.model.weights import WeightsError
    from mrjax.rundir import RunDirError
    from mrjax.sampling import SamplingError
    from mrjax.tokenizer import TokenizerError
    from mrjax.trainer import TrainingError

    return (ConfigError, WeightsError, TokenizerError, FileNotFoundError, DataError, TrainingError, RunDirError,
            SamplingError, PermissionError, IsADirectoryError, NotADirectoryError)


COMPILATION_CACHE_ENV = "MRJAX_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 4 << 30  # the embedded default's programs take about 20 MB


def enable_compilation_cache() -> None:
    """XLA's persistent compilation cache (default ~/.cache/mrjax/xla, at most 4 GiB;
    MRJAX_COMPILATION_CACHE=off disables it): a resumed or repeated run does not compile its programs again."""
    where = os.environ.get(COMPILATION_CACHE_ENV, str(Path.home() / ".cache" / "mrjax" / "xla"))
    if where.lower() in ("", "0", "off", "false", "none"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting, if given
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # A size bound makes JAX evict the least recently used programs and lock the folder around each
    # read and write, so runs that share it at the same time (pytest workers, several jobs) are safe.
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


def cli_main(run_fn, argv: list[str] | None = None, print_summary: bool = True) -> int:
    """A command line around ``run_fn(argv) -> dict``: logging, one ``error:`` line and exit status 2
    for bad input, 130 on Ctrl-C, the result printed as JSON (``python -m mrjax.train`` / ``mrjax.eval``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrjax").setLevel(logging.INFO)
    try:  # orbax logs every save step at INFO through absl
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    errors = user_errors()
    try:
        summary = run_fn(argv)
    except errors as err:
        message = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}"
        print(f"error: {message}", file=sys.stderr)
        return USER_ERRORS_EXIT
    except KeyboardInterrupt:
        print("error: interrupted (resume with the same command; the last checkpoint is kept)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only a multi-process job's collectives are translated
        _peer_failure(err)
        raise
    import jax

    if print_summary and jax.process_index() == 0:
        print(json.dumps(summary, default=str))
    return 0


def _peer_failure(err: BaseException) -> None:
    """In a multi-process job, a failed collective almost always means another process died: say so
    in one line and exit now (JAX's shutdown barrier would otherwise wait for the dead peer, then abort)."""
    import jax

    if not (jax.distributed.is_initialized() and jax.process_count() > 1 and isinstance(err, jax.errors.JaxRuntimeError)):
        return
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"error: process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
          f"failed ({first}). Another process of this job most likely died or was killed: see its log. Start the "
          "whole job again with the same command; it resumes from the run directory.", file=sys.stderr, flush=True)
    os._exit(PEER_FAILURE_EXIT)
