"""Evaluate a run directory: actor win rates, judge quality, meta-judge biases (docs/method.md, last section).

    python -m mrjax.eval --run runs/smollm2 [--judge <hf dir | gguf>] [--prompts <jsonl>] [--human <jsonl>]
                         [--verifiable N | --no-verifiable]

Stages, each cached in ``<run_dir>/eval/`` like the loop's (``.done/<stage>.json`` markers,
generation shards reused on a re-run; the names say what a result depends on, so evaluating
again after more iterations reuses what is still valid):

  answers_m<t>                each M_t answers the held-out prompts (one sample, the actor's settings)
  pairwise_m<t>_m<b>_by_<J>   judge J compares M_t's answer with M_b's, in both orders
  judge_m<t>_on_m<T>_m0       M_t as judge scores (N samples averaged) both answers of every
                              (M_T, M_0) comparison: agreement with J's preferences
  human_m<t>                  M_t as judge scores every response of the human-ranking set
  verifiable_answers_m<t>     each M_t answers a seeded sample of the verifiable-instruction prompts
  verifiable_pairs_m<a>_..    per verifiable prompt an answer that follows every constraint and one that
                              violates one, from the models' answers (or a minimal edit of a satisfying one)
  verifiable_judge_m<t>_on_<pairs>     M_t as judge scores both answers of every verifiable pair
  verifiable_pairwise_m<t>_on_<pairs>  M_t compares them with the pairwise template, in both orders
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
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mrjax import roles
from mrjax.config import ConfigError, load_config
from mrjax.data import (DataError, jsonl_objects, mean_or_none, prompt_question, read_jsonl, read_prompts, resolve_path,
                        write_jsonl, write_text)
from mrjax.eval import metrics as mx
from mrjax.eval import verifiable as vf
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
    verifiable: int = 48  # verifiable prompts sampled for instruction following (0 = none); small for a CPU
    verifiable_prompts: str = ""  # JSONL of {"prompt", "constraints"} rows; default: the shipped set


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


def holds_constraints(path: str | Path) -> bool:
    """Whether a prompt file holds verifiable rows (any row with ``constraints``) rather than plain prompts."""
    return any("constraints" in raw for _, raw in read_jsonl(resolve_path(path), "prompt"))


def read_verifiable_rows(path: str | Path) -> list[dict]:
    """The verifiable rows of a file (``mrjax.eval.verifiable.load_rows``), problems as a DataError."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verifiable prompt file not found: {path}")
    try:
        rows = vf.load_rows(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of ``size`` rows (all of them when there are fewer), in the file's order."""
    if size >= len(rows):
        return list(rows)
    picked = np.random.default_rng([seed, 2]).choice(len(rows), size=size, replace=False)
    return [rows[i] for i in sorted(picked)]


def verifiable_judge_pairs(rows: list[dict], answers: dict[int, list[str]]) -> list[dict]:
    """Per verifiable prompt at most one pair: a *satisfying* answer (every constraint followed, strict)
    and a *violating* one (at least one broken). ``answers[t][i]`` is M_t's answer to ``rows[i]``.

    Both come from the models' answers when both kinds exist (the first of each in model order:
    ``"source": "models"``); else, when every answer satisfies, the violating one is a minimal edit of a
    satisfying answer (``verifiable.minimal_violation``: one constraint broken, the others kept; of the
    possible edits the one that changes the word count least;
    ``"source": "minimal_edit"``); else (no answer satisfies) the prompt has no pair: a satisfying answer
    is never written by us. ``violated`` lists the kinds the violating answer fails."""
    pairs = []
    for i, row in enumerate(rows):
        constraints = row["constraints"]
        satisfies = {t: all(vf.follows(got[i], constraints)) for t, got in answers.items()}
        satisfying = [(t, answers[t][i]) for t, ok in satisfies.items() if ok]
        violating = [(t, answers[t][i]) for t, ok in satisfies.items() if not ok]
        pair = None
        if satisfying and violating:
            pair = {"source": "models", "satisfying_model": satisfying[0][0], "satisfying": satisfying[0][1],
                    "violating_model": violating[0][0], "violating": violating[0][1]}
        elif satisfying:  # every answer satisfies: the edit that changes the length least (a judge that
            # likes longer answers must not pass as one that checks constraints), the first on a tie
            edits = [(t, text, edited) for t, text in satisfying for k in range(len(constraints))
                     if (edited := vf.minimal_violation(text, constraints, k)) is not None]
            t, text, edited = min(edits, key=lambda e: abs(len(vf.words(e[2])) - len(vf.words(e[1]))),
                                  default=(None, None, None))
            if edited is not None:
                pair = {"source": "minimal_edit", "satisfying_model": t, "satisfying": text,
                        "violating_model": None, "violating": edited}
        if pair:
            violated = [c["kind"] for c, ok in zip(constraints, vf.follows(pair["violating"], constraints)) if not ok]
            pairs.append({"i": i, "id": row["id"], "prompt": row["prompt"], **pair, "violated": violated})
    return pairs


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
        # --prompts names plain prompts (the win rates' held-out prompts) or verifiable rows (instead of the
        # shipped set); the two uses are told apart by the rows' "constraints".
        prompts, verifiable_prompts = settings.prompts, settings.verifiable_prompts
        if prompts and holds_constraints(prompts):
            prompts, verifiable_prompts = "", prompts
            if settings.verifiable <= 0:
                raise ConfigError(f"--prompts {settings.prompts} holds verifiable rows, but --verifiable is 0")
        self.settings = dataclasses.replace(
            settings,
            prompts=prompts or str(self.root / "prompts" / "held_out.jsonl"),
            verifiable_prompts=verifiable_prompts or str(vf.SHIPPED),
            judge=settings.judge or self.models[-1][1],
            judge_samples=settings.judge_samples or it.judgments_per_response,
            verdict=settings.verdict or it.meta_judge_verdict,
        )
        if self.settings.verifiable < 0:
            raise ConfigError(f"--verifiable must be 0 (none) or a number of prompts, got {self.settings.verifiable}")
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
        self.verifiable_available = read_verifiable_rows(s.verifiable_prompts) if s.verifiable > 0 else []
        self.verifiable_rows = sample_rows(self.verifiable_available, s.verifiable, s.seed)
        try:
            model_config(s.judge)
        except Exception as err:  # noqa: BLE001 - any failure to read it is the same user error
            raise ConfigError(f"--judge {s.judge!r} cannot be loaded: {err}") from None
        for t, source in self.models:
            if not str(source).startswith(str(self.root)):
                model_config(source)
        path = self.where / "settings.json"
        current = {k: str(v) for k, v in dataclasses.asdict(self.given).items()}
        saved = json.loads(path.read_text()) if path.is_file() else {}
        # A setting added to mrjax since the file was written is new, not changed: the stages before it ran without it.
        changed = config_changes(saved, {k: v for k, v in current.items() if k in saved})
        if changed:
            raise ConfigError(f"{self.where} was computed with other settings ({'; '.join(changed)}); "
                              f"delete {self.where} or use the same settings")
        if saved != current:
            write_text(path, json.dumps(current, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ stages

    def stage(self, name: str, fn, **files) -> dict:
        """A cached stage (``MetaRewardingRun.stage``; ``files``: its inputs, outputs, scratch)."""
        return self.loop.stage(self.where, name, fn, **files)

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

    def compare_in_both_orders(self, name: str, label: str, judge: str, items: list[tuple[str, str, str]],
                               seed_parts: tuple) -> tuple[list[dict], dict]:
        """``judge`` compares ``first`` with ``second`` for each (question, first, second) with the pairwise
        template, ``first`` in position A then in position B; per item the verdicts and the share won by
        ``first`` (``preference``), and the parse figures."""
        it, prompts = self.it, []
        for question, first, second in items:
            prompts.append(roles.fill_pairwise_prompt(question, first, second))  # first is A
            prompts.append(roles.fill_pairwise_prompt(question, second, first))  # first is B
        expected = self.settings.verdict == "expected"
        read = functools.partial(self.loop.expected_verdicts, suffix=PAIRWISE_SUFFIX) if expected else None
        out = self.loop.generate_sharded(self.where / "shards" / name, label, judge, prompts, 1,
                                         it.meta_judge_temperature, it.meta_judge_top_p, it.meta_judge_max_new_tokens,
                                         seed_parts, read)
        # Expected verdicts are calibrated as the loop's meta-judge ones: the margin
        # log p(A) - log p(B) against its median over this comparison's calls.
        threshold = float(np.median([per[0]["value"] for per in out])) if expected else 0.0
        rows, stats = [], roles.ParseStats()
        for i in range(len(items)):
            verdicts = []
            for per in out[2 * i: 2 * i + 2]:
                parsed, winner = roles.classify_pairwise(per[0]["text"])
                stats.record(parsed)
                if expected:
                    margin = per[0]["value"]
                    winner = "A" if margin > threshold else "B" if margin < threshold else None
                verdicts.append(winner)
            rows.append({"forward_text": out[2 * i][0]["text"], "reverse_text": out[2 * i + 1][0]["text"],
                         "forward": verdicts[0], "reverse": verdicts[1],
                         "preference": mx.preference_from_orders(verdicts[0], verdicts[1])})
        return rows, stats.as_dict("pairwise_")

    def pairwise(self, t: int, b: int, answers: dict[int, list[dict]]) -> list[dict]:
        """M_t against M_b on every prompt, both orders; rows carry the per-prompt preference."""
        name = f"pairwise_m{t}_m{b}_by_{self.judge_id()}"
        path = self.where / f"{name}.jsonl"

        def make():
            model_rows, base_rows = answers[t], answers[b]
            verdicts, stats = self.compare_in_both_orders(
                name, f"eval pairwise M_{t} vs M_{b}", self.settings.judge,
                [(m["prompt"], m["response"], r["response"]) for m, r in zip(model_rows, base_rows)],
                ("eval_pairwise", t, b, self.settings.seed))
            rows = [{"i": i, **v, "model_chars": len(m["response"]), "baseline_chars": len(r["response"])}
                    for i, (v, m, r) in enumerate(zip(verdicts, model_rows, base_rows))]
            write_jsonl(path, rows)
            return {"comparisons": len(rows), **stats}

        self.stage(name, make)
        return jsonl_objects(path)

    def judge_scores(self, name: str, t: int, source: str, items: list[tuple[str, str]], **files) -> list[dict]:
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

        self.stage(name, make, **files)
        return jsonl_objects(path)

    # ------------------------------------------------------------------ verifiable instructions

    def verifiable_answers(self, t: int, source: str) -> list[dict]:
        """M_t answers the sampled verifiable prompts (one sample, the actor's settings); a changed
        verifiable file redoes it (the file is the stage's input)."""
        name = f"verifiable_answers_m{t}"
        path = self.where / f"{name}.jsonl"

        def make():
            it, rows = self.it, self.verifiable_rows
            out = self.loop.generate_sharded(self.where / "shards" / name, f"eval verifiable answers M_{t}", source,
                                             [r["prompt"] for r in rows], 1, it.actor_temperature, it.actor_top_p,
                                             it.actor_max_new_tokens, ("eval_verifiable_actor", self.settings.seed))
            write_jsonl(path, [{"i": i, "id": r["id"], "prompt": r["prompt"], "constraints": r["constraints"],
                                "response": per[0]["text"], "tokens": per[0]["tokens"],
                                "finish_reason": per[0]["finish_reason"]} for i, (r, per) in enumerate(zip(rows, out))])
            return {"answers": len(rows)}

        self.stage(name, make, inputs=[resolve_path(self.settings.verifiable_prompts)],
                   scratch=[self.where / "shards" / name])
        return jsonl_objects(path)

    def verifiable_pairs(self, answers: dict[int, list[dict]]) -> tuple[str, list[dict]]:
        """The judge pairs of the verifiable prompts (``verifiable_judge_pairs``), from every model's answers."""
        name = "verifiable_pairs_" + "_".join(f"m{t}" for t in answers)
        path = self.where / f"{name}.jsonl"

        def make():
            pairs = verifiable_judge_pairs(self.verifiable_rows, {t: [a["response"] for a in rows]
                                                                 for t, rows in answers.items()})
            write_jsonl(path, pairs)
            return {"pairs": len(pairs), "from_models": sum(p["source"] == "models" for p in pairs),
                    "minimal_edits": sum(p["source"] == "minimal_edit" for p in pairs)}

        self.stage(name, make, inputs=[self.where / f"verifiable_answers_m{t}.jsonl" for t in answers])
        return name, jsonl_objects(path)

    def verifiable_pairwise(self, t: int, source: str, pairs_name: str, pairs: list[dict]) -> list[dict]:
        """M_t with the pairwise template on every verifiable pair, the satisfying answer first then second."""
        name = f"verifiable_pairwise_m{t}_on_{pairs_name}"
        path = self.where / f"{name}.jsonl"

        def make():
            rows, stats = self.compare_in_both_orders(
                name, f"eval verifiable pairwise by M_{t}", source,
                [(p["prompt"], p["satisfying"], p["violating"]) for p in pairs],
                ("eval_verifiable_pairwise", t, self.settings.seed))
            write_jsonl(path, [{"i": p["i"], **row} for p, row in zip(pairs, rows)])
            return {"comparisons": len(rows), **stats}

        self.stage(name, make, inputs=[self.where / f"{pairs_name}.jsonl"], scratch=[self.where / "shards" / name])
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
        answers, verifiable = {}, {}
        for t, source in self.models:  # one model loaded at a time: all of M_t's answers together
            answers[t] = self.answers(t, source)
            if self.verifiable_rows:
                verifiable[t] = self.verifiable_answers(t, source)
        ts = [t for t, _ in self.models]
        last = ts[-1]
        comparisons = sorted({(t, 0) for t in ts if t > 0} | {(t, t - 1) for t in ts if t > 0 and t - 1 in ts})
        pairwise = {(t, b): self.pairwise(t, b, answers) for t, b in comparisons}
        # Judge quality: both answers of each (M_T, M_0) comparison, and the human-ranking set.
        pair_items = [(a["prompt"], a["response"]) for a in answers[last] + answers[0]] if last > 0 else []
        human_items = [(h["prompt"], r) for h in self.human for r in h["responses"]]
        pairs_name, pairs = self.verifiable_pairs(verifiable) if verifiable else ("", [])
        verifiable_items = ([(p["prompt"], p["satisfying"]) for p in pairs]
                            + [(p["prompt"], p["violating"]) for p in pairs])
        judged, humans, verifiable_judged, verifiable_pairwise = {}, {}, {}, {}
        for t, source in reversed(self.models):  # M_T first: it is the model loaded last
            if pair_items:
                judged[t] = self.judge_scores(f"judge_m{t}_on_m{last}_m0", t, source, pair_items)
            if human_items:
                humans[t] = self.judge_scores(f"human_m{t}", t, source, human_items)
            if pairs:
                pairs_file = [self.where / f"{pairs_name}.jsonl"]
                name = f"verifiable_judge_m{t}_on_{pairs_name}"
                verifiable_judged[t] = self.judge_scores(name, t, source, verifiable_items, inputs=pairs_file,
                                                         scratch=[self.where / "shards" / name])
                verifiable_pairwise[t] = self.verifiable_pairwise(t, source, pairs_name, pairs)
        # The numbers are cheap: recomputed every time.
        verifiable_figures = self.verifiable_metrics(verifiable, pairs_name, pairs, verifiable_judged,
                                                     verifiable_pairwise) if verifiable else None
        result = self.metrics(answers, pairwise, judged, humans, verifiable_figures)
        from mrjax.eval.report import write_report

        paths = write_report(self.root)
        return {"run_dir": str(self.root), "report": str(paths["md"]), "html": str(paths["html"]),
                "missing": self.missing, **result}

    def metrics(self, answers, pairwise, judged, humans, verifiable_figures: dict | None = None) -> dict:
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
        if verifiable_figures:
            out["verifiable"] = verifiable_figures
        write_text(self.where / "metrics.json", json.dumps(out, indent=1, sort_keys=True) + "\n")
        return {"win_rates": out["win_rates"], "judges": judges, "verifiable": verifiable_figures}

    def verifiable_metrics(self, answers: dict[int, list[dict]], pairs_name: str, pairs: list[dict],
                           judged: dict[int, list[dict]], pairwise: dict[int, list[dict]]) -> dict:
        """The verifiable-instruction figures (percentages), added to eval/metrics.json as "verifiable":
        each M_t's accuracy, M_T against M_0 on the same prompts, each M_t as judge of the pairs."""
        seed, done, ts = self.settings.seed, stage_markers(self.where), sorted(answers)
        verdicts = {t: {mode: [vf.follows(a["response"], a["constraints"], loose) for a in answers[t]]
                        for mode, loose in (("strict", False), ("loose", True))} for t in ts}
        out: dict[str, Any] = {
            "source": self.settings.verifiable_prompts, "rows_available": len(self.verifiable_available),
            "prompts": len(self.verifiable_rows), "seed": seed,
            "constraints": sum(len(r["constraints"]) for r in self.verifiable_rows),
            "actor": {str(t): {**mx.following_accuracy(verdicts[t]["strict"], verdicts[t]["loose"], seed),
                               "mean_chars": mean_or_none([len(a["response"]) for a in answers[t]]),
                               "cut_at_max_tokens": sum(a["finish_reason"] == "length" for a in answers[t])}
                      for t in ts}}
        last = ts[-1]
        if last > 0:  # the paired comparison: the same prompts, both models' outcomes kept together
            out["comparison"] = {"model": last, "baseline": 0, **{
                mode: mx.following_difference(verdicts[last][mode], verdicts[0][mode], seed)
                for mode in ("strict", "loose")}}
        out["judge_pairs"] = {"pairs": len(pairs), "without_pair": len(self.verifiable_rows) - len(pairs),
                              "from_models": sum(p["source"] == "models" for p in pairs),
                              "minimal_edits": sum(p["source"] == "minimal_edit" for p in pairs),
                              "violated_kinds": dict(sorted(Counter(k for p in pairs for k in p["violated"]).items()))}
        judges = {}
        for t in ts:
            if t not in judged:
                continue
            scores = [_nan(r["score"]) for r in judged[t]]  # the satisfying answers, then the violating ones
            by_score = [mx.preference_from_scores(a, b) for a, b in zip(scores[:len(pairs)], scores[len(pairs):])]
            by_pairwise = [r["preference"] for r in pairwise[t]]
            entry: dict[str, Any] = {}
            for key, prefs in (("score", by_score), ("pairwise", by_pairwise)):
                lo, hi = mx.bootstrap_interval(prefs, seed=seed)
                entry.update({f"{key}_accuracy": mx.win_rate(prefs), f"{key}_accuracy_low": lo,
                              f"{key}_accuracy_high": hi, f"{key}_pairs": sum(not math.isnan(x) for x in prefs),
                              f"{key}_ties": sum(x == 0.5 for x in prefs)})
            entry["judge_parse_rate"] = done.get(f"verifiable_judge_m{t}_on_{pairs_name}", {}).get("judge_parse_rate")
            entry["pairwise_parse_rate"] = done.get(f"verifiable_pairwise_m{t}_on_{pairs_name}", {}).get(
                "pairwise_parse_rate")
            entry["order_agreement"] = _order_agreement(pairwise[t])
            judges[str(t)] = entry
        out["judges"] = judges
        return out


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
