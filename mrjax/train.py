"""The main job: ``python -m mrjax.train --config configs/X.yaml [key=value ...]``.

``mode: meta_rewarding`` (the default) runs the whole method of SPEC.md in ``run_dir``:
EFT, then the iterations (actor -> judge -> meta-judge -> pairs -> DPO), resuming at the
first incomplete stage when re-run (``mrjax.loop``). ``mode: self_rewarding`` is the
baseline (no meta-judge). ``mode: dpo`` / ``mode: sft`` train once on ``train.pairs``
with checkpoints under ``run_dir`` and export ``run_dir/hf``. ``--dry-run`` checks every
setting and builds the abstract model without loading weights. Errors a user can cause
print one ``error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

USER_ERRORS_EXIT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrjax.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config file (defaults apply to anything it leaves out)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-6 mesh.fsdp=2")
    p.add_argument("--no-export", action="store_true", help="skip writing run_dir/hf at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-eval", action="store_true",
                   help="loop modes: do not write report.md / report.html after each iteration")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data files and model shapes without loading weights or training")
    p.add_argument("--force-config", action="store_true",
                   help="continue a run directory even though its config.yaml differs from this config")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from mrjax.config import ConfigError
    from mrjax.data import DataError
    from mrjax.model.weights import WeightsError
    from mrjax.rundir import RunDirError
    from mrjax.tokenizer import TokenizerError
    from mrjax.trainer import TrainingError

    return (ConfigError, WeightsError, TokenizerError, FileNotFoundError, DataError, TrainingError, RunDirError,
            PermissionError, IsADirectoryError, NotADirectoryError)


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, train, export; returns a summary dict (also printed as JSON)."""
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    from mrjax.config import ConfigError, load_config
    from mrjax.data import read_rows
    from mrjax.mesh import initialize_distributed
    from mrjax.trainer import build_trainer

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        from mrjax.plan import dry_run

        return dry_run(config)
    if config.mode in ("meta_rewarding", "self_rewarding"):
        from mrjax.loop import check_config, run_loop

        check_config(config)  # before jax.distributed and any model: bad input fails fast
        initialize_distributed()
        result = run_loop(config, progress=not args.quiet, force_config=args.force_config,
                          report=not args.no_eval)
        return {"run_dir": str(result.run_dir), "mode": config.mode, "final_model": str(result.final_model),
                "already_complete": result.already_complete, "iterations": result.summaries}
    if not config.train.pairs:
        raise ConfigError("config key 'train.pairs' is empty: name the training file")
    # Check the data files before loading a model (seconds for big ones): a bad line fails fast.
    for path in filter(None, (config.train.pairs, config.train.eval_pairs)):
        read_rows(path, config.mode)
    initialize_distributed()
    trainer = build_trainer(config, kind=config.mode, progress=not args.quiet)
    result = trainer.train()
    summary = {"run_dir": str(result.run_dir), "kind": trainer.kind, "steps": result.step,
               "metrics": result.metrics, "eval_metrics": result.eval_metrics}
    if not args.no_export:
        hf_dir = Path(config.run_dir) / "hf"
        result.model.save_pretrained(hf_dir, trainer.tokenizer)
        summary["hf_dir"] = str(hf_dir)
    return summary


COMPILATION_CACHE_ENV = "MRJAX_COMPILATION_CACHE"


def _enable_compilation_cache() -> None:
    """XLA's persistent compilation cache (default ~/.cache/mrjax/xla; MRJAX_COMPILATION_CACHE=off
    disables it): a resumed or repeated run does not compile its programs again."""
    import os

    where = os.environ.get(COMPILATION_CACHE_ENV, str(Path.home() / ".cache" / "mrjax" / "xla"))
    if where.lower() in ("", "0", "off", "false", "none"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    errors = _user_errors()
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


PEER_FAILURE_EXIT = 3


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


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    _enable_compilation_cache()  # the command line only; library users and tests choose their own
    sys.exit(main())
