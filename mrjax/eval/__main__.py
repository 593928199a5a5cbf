"""python -m mrjax.eval --run <run_dir>: win rates, judge quality, meta-judge biases, report."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from mrjax.eval.run import HUMAN_RANKINGS, EvalSettings

    p = argparse.ArgumentParser(prog="python -m mrjax.eval", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the run directory (run_dir of the loop's config)")
    p.add_argument("--judge", default="", help="pairwise judge: a local HF directory or GGUF file "
                                              "(default: the run's last model)")
    p.add_argument("--prompts", default="",
                   help="JSONL of prompts (default: <run>/prompts/held_out.jsonl); a file of verifiable rows "
                        '{"prompt", "constraints": [...]} replaces the shipped verifiable set instead')
    p.add_argument("--human", default=str(HUMAN_RANKINGS),
                   help='JSONL of {"prompt", "responses": [...], "ranking": [...]} (default: the shipped set)')
    p.add_argument("--max-prompts", type=int, default=0, help="evaluate on the first N prompts only (0 = all)")
    p.add_argument("--judge-samples", type=int, default=0,
                   help="judgments averaged per response for judge quality (default: the run's N)")
    p.add_argument("--verdict", choices=("parse", "expected"), default="",
                   help="how pairwise verdicts are read (default: the run's iteration.meta_judge_verdict)")
    p.add_argument("--verifiable", type=int, default=EvalSettings.verifiable, metavar="N",
                   help="verifiable-instruction prompts sampled (seeded) for instruction following (0 = none; "
                        f"default {EvalSettings.verifiable})")
    p.add_argument("--no-verifiable", dest="verifiable", action="store_const", const=0,
                   help="no verifiable-instruction evaluation (= --verifiable 0)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from what is on disk; no model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.report_only:
        from mrjax.eval.report import write_report

        return {k: str(v) for k, v in write_report(args.run).items()}
    from mrjax.eval.run import EvalSettings, evaluate

    settings = EvalSettings(prompts=args.prompts, human=args.human, judge=args.judge, max_prompts=args.max_prompts,
                            judge_samples=args.judge_samples, verdict=args.verdict, verifiable=args.verifiable)
    return evaluate(args.run, settings, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    from mrjax.cli import cli_main

    return cli_main(run, argv)


if __name__ == "__main__":
    from mrjax.cli import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())
