"""The main job: ``python -m mrjax.train --config configs/X.yaml [key=value ...]``.

``mode: meta_rewarding`` (the default) runs the whole method (README, "The Meta-Rewarding loop") in ``run_dir``:
EFT, then the iterations (actor -> judge -> meta-judge -> pairs -> DPO), resuming at the
first incomplete stage when re-run (``mrjax.loop``). ``mode: self_rewarding`` is the
baseline (no meta-judge). ``mode: dpo`` / ``mode: sft`` train once on ``train.pairs``
with checkpoints under ``run_dir`` and export ``run_dir/hf``. ``--dry-run`` checks every
setting and builds the abstract model without loading weights. Errors a user can cause
print one ``error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrjax.cli import cli_main, enable_compilation_cache


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


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, train, export; returns a summary dict (also printed as JSON)."""
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    from mrjax.config import ConfigError, load_config
    from mrjax.data import read_rows
    from mrjax.mesh import initialize_distributed, is_main_process
    from mrjax.trainer import build_trainer

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        from mrjax.plan import dry_run

        return dry_run(config)
    if config.mode in ("meta_rewarding", "self_rewarding"):
        from mrjax.eval.report import run_table, write_report
        from mrjax.loop import check_config, run_loop

        checked = check_config(config)  # before jax.distributed and any model: bad input fails fast
        initialize_distributed()
        # The cheap part of the evaluation (lengths, parse rates, scores, biases) after every iteration,
        # so the report grows while the run goes; python -m mrjax.eval adds win rates and judge quality.
        result = run_loop(config, progress=not args.quiet, force_config=args.force_config,
                          report=None if args.no_eval else write_report, checked=checked)
        if is_main_process():  # the run at a glance; report.md has the same and more
            print(run_table(result.run_dir), file=sys.stderr, flush=True)
        return {"run_dir": str(result.run_dir), "mode": config.mode, "final_model": str(result.final_model),
                "already_complete": result.already_complete, "iterations": result.summaries}
    if not config.train.pairs:
        raise ConfigError("config key 'train.pairs' is empty: name the training file")
    from mrjax.model.pretrained import inspect_model
    from mrjax.rundir import RunLock, check_run_dir

    # Check the run directory, data files and model before loading anything: bad input fails fast.
    check_run_dir(config.run_dir)
    for path in filter(None, (config.train.pairs, config.train.eval_pairs)):
        read_rows(path, config.mode)
    inspect_model(config.model.name)
    initialize_distributed()
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    with RunLock(config.run_dir, f"python -m mrjax.train ({config.mode})"):
        trainer = build_trainer(config, kind=config.mode, progress=not args.quiet)
        result = trainer.train()
        summary = {"run_dir": str(result.run_dir), "kind": trainer.kind, "steps": result.step,
                   "metrics": result.metrics, "eval_metrics": result.eval_metrics}
        if not args.no_export:
            hf_dir = Path(config.run_dir) / "hf"
            result.model.save_pretrained(hf_dir, trainer.tokenizer)
            summary["hf_dir"] = str(hf_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    from mrjax.mesh import allocate_large_blocks_apart

    enable_compilation_cache()  # the command line only; library users and tests choose their own
    allocate_large_blocks_apart()  # the command line's peak memory: see the README's measured run
    sys.exit(main())
