"""Benchmarks side by side with the PyTorch / HF reference.

    python -m mrjax.bench {sample,workload,dpo,preferences,train,accelerator} [--json]

Each benchmark lives in ``mrjax/benchmarks/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> dict``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = ("sample", "workload", "dpo", "preferences", "train", "accelerator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrjax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"mrjax.benchmarks.{name}")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    result = importlib.import_module(f"mrjax.benchmarks.{args.name}").run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
