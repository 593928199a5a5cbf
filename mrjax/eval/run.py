"""Evaluate a run directory: actor win rates, judge quality, meta-judge biases (docs/method.md, last section).

    python -m mrjax.eval --run runs/smollm2 [--judge <hf dir | gguf>] [--prompts <jsonl>] [--human <jsonl>]

Stages, each cached in ``<run_dir>/eval/`` like the loop's (``.done/<stage>.json`` markers,
generation shards reused on a re-run; the names say what a result depends on, so evaluating
again after more iterations reuses what is still valid):

  answers_m<t>                each M_t answers the held-out prompts (one sample, the actor's settings)
  pairwise_m<t>_m<b>_by_<J>   judge J compares M_t's answer with M_b's, in both orders
  judge_m<t>_on_m<T>_m0       M_t as judge scores (N samples averaged) both answers of every
                              (M_T, M_0) comparison: agreement with J's preferences
  human_m<t>                  M_t as judge scores every response of the human-ranking set
then the numbers (mrjax.eval.metrics, written to eval/metrics.json) and the report (mrjax.eval.report).

M_0 is the model iteration 1 started from (the EFT model when EFT ran, else config.model.name).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mrjax import roles
from mrjax.config import ConfigError, load_config
from mrjax.data import (DataError, jsonl_objects, mean_or_none, prompt_question, read_jsonl, read_prompts, resolve_path,
                        write_jsonl, write_text)
from mrjax.eval import metrics as mx
from mrjax.loop import MetaRewardingRun, config_changes
from mrjax.rundir import model_source, stage_markers

log = logging.getLogger(__name__)

HUMAN_RANKINGS = Path(__file__).resolve().parent.parent / "data" / "human_rankings.jsonl"
PAIRWISE_SUFFIX = "Winner: Response"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    prompts: str = ""  # JSONL of prompts; default: the run's held-out split
    human: str = str(HUMAN_RANKINGS)
    judge: str = ""  # pairwise (reference) judge; default: the run's last model
    max_prompts: int = 0  # 0 = all
    judge_samples: int = 0  # N for judge quality; 0 = the run's iteration.judgments_per_response
    verdict: str = ""  # parse | expected; default: the run's iteration.meta_judge_verdict
    seed: int = 0


def read_human_rankings(path: str | Path) -> list[dict]:
    """``{"prompt", "responses": [str, ...], "ranking": [rank, ...]}`` rows; rank 1 is best, equal
    ranks are ties. Every problem names the file and line."""
    path = resolve_path(path)
    rows = []
    for number, raw in read_jsonl(path, "human-ranking"):
        where = f"{path}:{number}"
        prompt, responses, ranking = raw.get("prompt"), raw.get("responses"), raw.get("ranking")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(responses, list) or len(responses) < 2 or not all(
                isinstance(r, str) and r.strip() for r in responses):
            raise DataError(f"{where}: 'responses' must be a list of at least two non-empty strings")
        if not isinstance(ranking, list) or len(ranking) != len(responses) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking):
            raise DataError(f"{where}: 'ranking' must be a list of numbers, one per response (1 = best)")
        rows.append({"prompt": prompt, "responses": responses, "ranking": [float(r) for r in ranking]})
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def run_models(root: Path, config) -> tuple[list[tuple[int, str]], list[str]]:
    """[(t, source)] of the models the run directory holds, M_0 first, and what is missing."""
    models, missing = [], []
    for t in range(config.iteration.iterations + 1):
        source = model_source(config, t)
        if isinstance(source, str) or (source / "config.json").is_file():  # a str is model.name
            models.append((t, str(source)))
        elif t == 0:
            missing.append("eft/hf (M_0 after EFT): using the base model instead")
            models.append((0, config.model.name))
        else:
            missing.append(f"iter_{t}/hf (M_{t})")
    return models, missing


class Evaluation:
    """The evaluation of one run directory; ``run()`` computes (or finishes) it and writes the report."""

    def __init__(self, run_dir: str | Path, settings: EvalSettings = EvalSettings(), progress: bool = True):
        self.given = settings
        self.root = Path(run_dir)
        if not (self.root / "config.yaml").is_file():
            raise FileNotFoundError(f"{self.root}: not a run directory (no config.yaml)")
        # run_dir is the directory given (the run may have been moved or copied since it was started)
        self.config = dataclasses.replace(load_config(self.root / "config.yaml"), run_dir=str(self.root))
        self.where = self.root / "eval"
        self.models, self.missing = run_models(self.root, self.config)  # after run_dir is the given one
        it = self.config.iteration
        self.settings = dataclasses.replace(
            settings,
            prompts=settings.prompts or str(self.root / "prompts" / "held_out.jsonl"),
            judge=settings.judge or self.models[-1][1],
            judge_samples=settings.judge_samples or it.judgments_per_response,
            verdict=settings.verdict or it.meta_judge_verdict,
        )
        if self.settings.verdict not in ("parse", "expected"):
            raise ConfigError(f"--verdict must be parse or expected, got {self.settings.verdict!r}")
        # The loop's machinery (model cache, sharded generation, stage markers), rooted at the run.
        self.loop = MetaRewardingRun(self.config, progress=progress)
        self.it = it

    # ------------------------------------------------------------------ inputs

    def check_inputs(self) -> None:
        """Every file and the judge, before any model is loaded: bad input fails fast."""
        from mrjax.plan import model_config

        s = self.settings
        self.prompts = read_prompts(s.prompts)
        if s.max_prompts:
            self.prompts = self.prompts[: s.max_prompts]
        self.human = read_human_rankings(s.human) if s.human else []
        try:
            model_config(s.judge)
        except Exception as err:  # noqa: BLE001 - any failure to read it is the same user error
            raise ConfigError(f"--judge {s.judge!r} cannot be loaded: {err}") from None
        for t, source in self.models:
            if not str(source).startswith(str(self.root)):
                model_config(source)
        path = self.where / "settings.json"
        current = {k: str(v) for k, v in dataclasses.asdict(self.given).items()}
        if path.is_file():
            changed = config_changes(json.loads(path.read_text()), current)
            if changed:
                raise ConfigError(f"{self.where} was computed with other settings ({'; '.join(changed)}); "
                                  f"delete {self.where} or use the same settings")
        else:
            write_text(path, json.dumps(current, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ stages

    def stage(self, name: str, fn) -> dict:
        return self.loop.stage(self.where, name, fn)

    def answers(self, t: int, source: str) -> list[dict]:
        path = self.where / f"answers_m{t}.jsonl"

        def make():
            it = self.it
            out = self.loop.generate_sharded(self.where / "shards" / f"answers_m{t}", f"eval answers M_{t}", source,
                                             self.prompts, 1, it.actor_temperature, it.actor_top_p,
                                             it.actor_max_new_tokens, ("eval_actor", self.settings.seed))
            rows = [{"i": i, "prompt": prompt_question(p), "response": per[0]["text"], "tokens": per[0]["tokens"]}
                    for i, (p, per) in enumerate(zip(self.prompts, out))]
            write_jsonl(path, rows)
            return {"answers": len(rows), "mean_chars": mean_or_none([len(r["response"]) for r in rows])}

        self.stage(f"answers_m{t}", make)
        return jsonl_objects(path)

    def judge_id(self) -> str:
        """``m<t>`` when the pairwise judge is one of the run's models, else a tag of its path."""
        for t, source in self.models:
            if str(source) == str(self.settings.judge):
                return f"m{t}"
        return f"ext{zlib.crc32(str(Path(self.settings.judge).expanduser().resolve()).encode()):08x}"

    def pairwise(self, t: int, b: int, answers: dict[int, list[dict]]) -> list[dict]:
        """M_t against M_b on every prompt, both orders; rows carry the per-prompt preference."""
        name = f"pairwise_m{t}_m{b}_by_{self.judge_id()}"
        path = self.where / f"{name}.jsonl"

        def make():
            it, model_rows, base_rows = self.it, answers[t], answers[b]
            prompts = []
            for m, r in zip(model_rows, base_rows):
                prompts.append(roles.fill_pairwise_prompt(m["prompt"], m["response"], r["response"]))  # model is A
                prompts.append(roles.fill_pairwise_prompt(m["prompt"], r["response"], m["response"]))  # model is B
            expected = self.settings.verdict == "expected"
            read = functools.partial(self.loop.expected_verdicts, suffix=PAIRWISE_SUFFIX) if expected else None
            out = self.loop.generate_sharded(self.where / "shards" / name,
                                             f"eval pairwise M_{t} vs M_{b}", self.settings.judge, prompts, 1,
                                             it.meta_judge_temperature, it.meta_judge_top_p,
                                             it.meta_judge_max_new_tokens, ("eval_pairwise", t, b, self.settings.seed),
                                             read)
            # Expected verdicts are calibrated as the loop's meta-judge ones: the margin
            # log p(A) - log p(B) against its median over this comparison's calls.
            threshold = float(np.median([per[0]["value"] for per in out])) if expected else 0.0
            rows, stats = [], roles.ParseStats()
            for i, (m, r) in enumerate(zip(model_rows, base_rows)):
                verdicts = []
                for per in out[2 * i: 2 * i + 2]:
                    parsed, winner = roles.classify_pairwise(per[0]["text"])
                    stats.record(parsed)
                    if expected:
                        margin = per[0]["value"]
                        winner = "A" if margin > threshold else "B" if margin < threshold else None
                    verdicts.append(winner)
                rows.append({"i": i, "forward_text": out[2 * i][0]["text"], "reverse_text": out[2 * i + 1][0]["text"],
                             "forward": verdicts[0], "reverse": verdicts[1],
                             "preference": mx.preference_from_orders(verdicts[0], verdicts[1]),
                             "model_chars": len(m["response"]), "baseline_chars": len(r["response"])})
            write_jsonl(path, rows)
            return {"comparisons": len(rows), **stats.as_dict("pairwise_")}

        self.stage(name, make)
        return jsonl_objects(path)

    def judge_scores(self, name: str, t: int, source: str, items: list[tuple[str, str]]) -> list[dict]:
        """M_t as judge: N sampled judgments of each (question, response); per item the mean valid score."""
        path = self.where / f"{name}.jsonl"

        def make():
            it, n = self.it, self.settings.judge_samples
            expected = it.judge_score == "expected"
            prompts = [roles.fill_judge_prompt(q, r) for q, r in items]
            out = self.loop.generate_sharded(self.where / "shards" / name, f"eval {name}", source,
                                             prompts, n, it.judge_temperature, it.judge_top_p, it.judge_max_new_tokens,
                                             ("eval_judge", name, self.settings.seed),
                                             self.loop.expected_scores if expected else None)
            rows, stats = [], roles.ParseStats()
            for per in out:
                scores = []
                for sample in per:
                    parsed, value = roles.classify_judgment(sample["text"])
                    stats.record(parsed)
                    value = float(sample["value"]) if expected else value
                    if value is not None:
                        scores.append(value)
                rows.append({"scores": scores, "score": mean_or_none(scores)})
            write_jsonl(path, rows)
            return {"items": len(rows), **stats.as_dict("judge_")}

        self.stage(name, make)
        return jsonl_objects(path)

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        from mrjax.rundir import RunLock

        with RunLock(self.root, "python -m mrjax.eval"):  # not while a run (or another evaluation) writes here
            return self._run()

    def _run(self) -> dict:
        for line in self.missing:
            log.warning("%s: missing %s; evaluating what is there", self.root, line)
        self.check_inputs()
        answers = {t: self.answers(t, source) for t, source in self.models}
        ts = [t for t, _ in self.models]
        last = ts[-1]
        comparisons = sorted({(t, 0) for t in ts if t > 0} | {(t, t - 1) for t in ts if t > 0 and t - 1 in ts})
        pairwise = {(t, b): self.pairwise(t, b, answers) for t, b in comparisons}
        # Judge quality: both answers of each (M_T, M_0) comparison, and the human-ranking set.
        pair_items = [(a["prompt"], a["response"]) for a in answers[last] + answers[0]] if last > 0 else []
        human_items = [(h["prompt"], r) for h in self.human for r in h["responses"]]
        judged, humans = {}, {}
        for t, source in reversed(self.models):  # M_T first: it is the model loaded last
            if pair_items:
                judged[t] = self.judge_scores(f"judge_m{t}_on_m{last}_m0", t, source, pair_items)
            if human_items:
                humans[t] = self.judge_scores(f"human_m{t}", t, source, human_items)
        result = self.metrics(answers, pairwise, judged, humans)  # cheap: recomputed every time
        from mrjax.eval.report import write_report

        paths = write_report(self.root)
        return {"run_dir": str(self.root), "report": str(paths["md"]), "html": str(paths["html"]),
                "missing": self.missing, **result}

    def metrics(self, answers, pairwise, judged, humans) -> dict:
        ts = [t for t, _ in self.models]
        last, n_prompts = ts[-1], len(self.prompts)
        done = stage_markers(self.where)
        out: dict[str, Any] = {"models": {str(t): src for t, src in self.models}, "missing": self.missing,
                               "judge": self.settings.judge, "prompts": n_prompts, "verdict": self.settings.verdict,
                               "judge_samples": self.settings.judge_samples, "human_prompts": len(self.human)}
        out["actor"] = {str(t): {"mean_chars": mean_or_none([len(a["response"]) for a in answers[t]])} for t in ts}
        out["win_rates"] = []
        for (t, b), rows in sorted(pairwise.items()):
            prefs = [r["preference"] for r in rows]
            lo, hi = mx.bootstrap_interval(prefs, seed=self.settings.seed)
            valid = [r for r in rows if not math.isnan(r["preference"])]
            out["win_rates"].append({
                "model": t, "baseline": b, "comparisons": len(valid), "no_verdict": len(rows) - len(valid),
                "win_rate": mx.win_rate(prefs), "ci_low": lo, "ci_high": hi,
                "lc_win_rate": mx.length_controlled_win_rate(prefs, [r["model_chars"] for r in rows],
                                                             [r["baseline_chars"] for r in rows]),
                "order_agreement": _order_agreement(rows),
                "pairwise_parse_rate": done[f"pairwise_m{t}_m{b}_by_{self.judge_id()}"].get("pairwise_parse_rate"),
            })
        reference = [r["preference"] for r in pairwise.get((last, 0), [])]
        judges = {}
        for t in ts:
            entry: dict[str, Any] = {}
            stats = [done[name] for name in (f"judge_m{t}_on_m{last}_m0", f"human_m{t}") if name in done]
            total = sum(s.get("judge_total", 0) for s in stats)
            entry["parse_rate"] = sum(s.get("judge_parsed", 0) for s in stats) / total if total else None
            if t in judged:
                scores = [r["score"] for r in judged[t]]
                k = len(scores) // 2  # the M_T answers, then the M_0 answers
                mine = [mx.preference_from_scores(_nan(a), _nan(b)) for a, b in zip(scores[:k], scores[k:])]
                entry["agreement"] = mx.agreement(mine, reference)
            rhos, start = [], 0
            for h in self.human if t in humans else []:
                got = [r["score"] for r in humans[t][start:start + len(h["responses"])]]
                start += len(h["responses"])
                if all(s is not None for s in got):
                    rhos.append(mx.spearman(got, [-r for r in h["ranking"]]))  # rank 1 is best
            rhos = [r for r in rhos if not math.isnan(r)]
            entry["spearman"], entry["spearman_prompts"] = mean_or_none(rhos), len(rhos)
            judges[str(t)] = entry
        out["judges"] = judges
        write_text(self.where / "metrics.json", json.dumps(out, indent=1, sort_keys=True) + "\n")
        return {"win_rates": out["win_rates"], "judges": judges}


def _order_agreement(rows: list[dict]) -> float | None:
    """% of comparisons with both verdicts where the two orders agree on the winner (position-consistency)."""
    both = [r for r in rows if r["forward"] is not None and r["reverse"] is not None]
    return 100 * float(np.mean([r["forward"] != r["reverse"] for r in both])) if both else None


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def evaluate(run_dir: str | Path, settings: EvalSettings = EvalSettings(), progress: bool = True) -> dict:
    """Evaluate (or finish evaluating) ``run_dir``; writes ``eval/`` and the report; returns the figures."""
    return Evaluation(run_dir, settings, progress).run()


__all__ = ["EvalSettings", "Evaluation", "evaluate", "read_human_rankings", "run_models"]
