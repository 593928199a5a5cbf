"""Train with DPO or SFT from a config: ``python -m mrjax.train --config configs/X.yaml [key=value ...]``.

Loads the config, builds the mesh, loads the model, runs ``train.kind`` (dpo | sft)
on ``train.pairs`` with checkpoints under ``run_dir`` (resuming when it holds
some and ``train.resume`` is true), and exports the final model as an HF
directory ``run_dir/hf``. Errors a user can cause print one ``error: ...`` line
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

USER_ERRORS_EXIT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrjax.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config file (defaults apply to anything it leaves out)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-6 mesh.fsdp=2")
    p.add_argument("--no-export", action="store_true", help="skip writing run_dir/hf at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from mrjax.config import ConfigError
    from mrjax.data import DataError
    from mrjax.model.weights import WeightsError
    from mrjax.tokenizer import TokenizerError
    from mrjax.trainer import TrainingError

    return ConfigError, WeightsError, TokenizerError, FileNotFoundError, DataError, TrainingError


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, train, export; returns a summary dict (also printed as JSON)."""
    args = _parser().parse_args(argv)
    from mrjax.config import ConfigError, load_config
    from mrjax.data import read_rows
    from mrjax.mesh import initialize_distributed
    from mrjax.trainer import build_trainer

    config = load_config(args.config, args.overrides)
    if not config.train.pairs:
        raise ConfigError("config key 'train.pairs' is empty: name the training file")
    # Check the data files before loading a model (seconds for big ones): a bad line fails fast.
    for path in filter(None, (config.train.pairs, config.train.eval_pairs)):
        read_rows(path, config.train.kind)
    initialize_distributed()
    trainer = build_trainer(config, progress=not args.quiet)
    result = trainer.train()
    summary = {"run_dir": str(result.run_dir), "kind": trainer.kind, "steps": result.step,
               "metrics": result.metrics, "eval_metrics": result.eval_metrics}
    if not args.no_export:
        hf_dir = Path(config.run_dir) / "hf"
        result.model.save_pretrained(hf_dir, trainer.tokenizer)
        summary["hf_dir"] = str(hf_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrjax").setLevel(logging.INFO)
    try:  # orbax logs every save step at INFO through absl
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    errors = _user_errors()
    try:
        summary = run(argv)
    except errors as err:
        message = str(err) if not isinstance(err, FileNotFoundError) or not err.filename else f"{err.strerror}: {err.filename}"
        print(f"error: {message}", file=sys.stderr)
        return USER_ERRORS_EXIT
    except KeyboardInterrupt:
        print("error: interrupted (resume with the same command; the last checkpoint is kept)", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
