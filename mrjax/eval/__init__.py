"""Evaluation of a run: ``python -m mrjax.eval --run <run_dir>`` (see mrjax.eval.run), the metrics
(mrjax.eval.metrics) and the report (mrjax.eval.report)."""
from mrjax.eval.report import write_report
from mrjax.eval.run import EvalSettings, Evaluation, evaluate, read_human_rankings

__all__ = ["EvalSettings", "Evaluation", "evaluate", "read_human_rankings", "write_report"]
