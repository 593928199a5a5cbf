"""The Meta-Rewarding loop (docs/method.md, "The iteration M_t -> M_{t+1}") as resumable stages.

    python -m mrjax.train --config configs/smollm2.yaml        # make run
    from mrjax.loop import run_loop; result = run_loop(load_config("configs/tiny.yaml"))

One run:  prompt pool -> EFT (optional) -> for t = 1..T:

    prompts -> responses -> judgments -> actor_pairs -> [meta_judgments -> judge_pairs] -> train -> summary

Every stage is a method below that reads the files of earlier stages and writes its own
into ``run_dir`` atomically; a marker ``.done/<stage>.json`` (with the stage's figures and
wall time) is written last, once its outputs are durable. A re-run skips every marked
stage; generation stages write shards of ``iteration.shard_size`` as they go and a re-run
reuses the shards that exist, so a kill loses at most one shard. Sampling seeds are a
function of (seed, iteration, role, shard) only, and DPO resumes from its orbax
checkpoints exactly, so a killed and resumed run ends with the same files and parameters
as one that never stopped. M_t is always read back from ``iter_t/hf`` (float32
safetensors, bit-exact), whichever way the run got there, so a training stage's
checkpoints are deleted once its export is marked complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from mrjax import faults, roles
from mrjax import preferences as pf
from mrjax.config import Config, ConfigError, to_dict
from mrjax.mesh import agreed, barrier, is_main_process, release_memory
from mrjax.data import (
    SEED_PROMPTS,
    DataError,
    dedupe_prompts,
    file_fingerprint,
    jsonl_objects,
    judge_sft_row,
    mean_or_none,
    meta_judge_sft_row,
    prompt_question,
    read_jsonl,
    read_judge_rows,
    read_meta_judge_rows,
    read_prompt_rows,
    read_prompts,
    resolve_path,
    tfds_prompts,
    tokenize_rows,
    write_jsonl,
    write_text,
)
from mrjax.rundir import RunLock, check_run_dir, marker_problem, model_source, read_marker, record, stage_markers

log = logging.getLogger(__name__)

LOOP_MODES = ("meta_rewarding", "self_rewarding")
# The suffixes after which the expected judge score and meta-judge verdict are read.
SCORE_SUFFIX = "Score: "
WINNER_SUFFIX = "Winner: Judgement"
# Tokens an expected mode appends after a generated text's cut (its suffix, e.g. "\nWinner: Judgement").
EXPECTED_MAX_APPENDED = 32
# config.yaml's record of the input files' content (path and sha256), beside the resolved config.
PINNED_KEY = "pinned_inputs"
# iter_t/train/: the iteration's DPO pairs kept out of training (scored before and after it).
HELD_OUT_PAIRS = "held_out_pairs.jsonl"
# Fewer pairs than this and nothing is held out (a handful of pairs measures nothing and trains little).
MIN_PAIRS_TO_HOLD_OUT = 5
# The stages that load a model and generate or train (the self-instruct prompt pool generates): the
# only ones before which the process hands freed memory back (the others read and write small files).
ALLOCATING_STAGES = frozenset({"prompt_pool", "parse_before", "train", "parse_after", "responses", "judgments",
                               "meta_judgments"})


# ----------------------------------------------------------------------------- checks


def check_config(config: Config, dry_run: bool = False) -> dict:
    """Every check of what a user gives, before anything is written: the run directory, the model
    (source, options, tensors, tokenizer), every file (exists, UTF-8, parses), every prompt against
    the context of each role that sees it, the pool's size. Raises ConfigError / DataError /
    WeightsError / TokenizerError / RunDirError / FileNotFoundError; returns what it read (counts,
    and ``pinned_inputs``: the content hashes of the input files)."""
    from mrjax.model.pretrained import inspect_model

    if config.mode not in LOOP_MODES:
        raise ConfigError(f"config key 'mode' must be one of {', '.join(LOOP_MODES)} for the loop, got {config.mode!r}")
    check_run_dir(config.run_dir)
    it, pr = config.iteration, config.prompts
    facts: dict[str, Any] = {}
    pinned: dict[str, dict] = {}
    model_config, tokenizer = inspect_model(config.model.name)
    if tokenizer is None and not dry_run:  # a random-weight shape: the dry run says so and checks the rest
        raise ConfigError(f"model {config.model.name!r} has no tokenizer; the loop needs one (an HF directory or GGUF)")
    needed = pr.held_out + it.iterations * it.prompts_per_iteration
    if pr.source in ("seed", "jsonl"):
        source = prompt_source_file(pr)
        rows = read_prompt_rows(source)
        fitting, too_long = split_too_long(rows, tokenizer, model_config.max_position_embeddings, config) \
            if tokenizer is not None else (rows, [])
        if too_long and not pr.drop_too_long:
            where, message = too_long[0]
            more = f" ({len(too_long) - 1} more prompts too)" if len(too_long) > 1 else ""
            raise DataError(f"{where}: {message}{more}; shorten it, raise the model's context, lower the role's "
                            "max_new_tokens, or set prompts.drop_too_long=true")
        pool = dedupe_prompts([p for _, p in fitting])
        facts["pool"] = len(pool)
        if too_long:
            facts["dropped_too_long"] = len(too_long)
        if len(pool) < needed:
            raise DataError(
                f"the prompt pool ({source}) has {len(pool)} distinct prompts"
                f"{' that fit the context' if too_long else ''}, fewer than "
                f"prompts.held_out + iteration.iterations x iteration.prompts_per_iteration = {pr.held_out} + "
                f"{it.iterations} x {it.prompts_per_iteration} = {needed}"
            )
        pinned["prompts.path"] = _pin(source)
    elif pr.source == "self_instruct":
        source = prompt_source_file(pr)
        examples = read_prompts(source)
        if len(examples) < roles.SELF_INSTRUCT_NUM_EXAMPLES:
            raise DataError(f"self-instruct needs at least {roles.SELF_INSTRUCT_NUM_EXAMPLES} example prompts, "
                            f"got {len(examples)}")
        facts["self_instruct_examples"] = len(examples)
        pinned["prompts.path"] = _pin(source)
    elif pr.source == "tfds":
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError(f"prompts.source=tfds ({pr.tfds_name!r}) needs tensorflow-datasets: "
                            "pip install 'mrjax[tfds]'") from None
        try:
            version = str(tfds.builder(pr.tfds_name).info.version)
        except Exception as err:  # noqa: BLE001 - tfds raises many kinds (not found, not prepared)
            raise DataError(f"tfds dataset {pr.tfds_name!r} cannot be opened: {err}") from None
        pinned["prompts.tfds"] = {"file": f"tfds:{pr.tfds_name}/{pr.tfds_split}",
                                  "sha256": f"version {version}, field {pr.tfds_field}"}
    if config.eft.enabled:
        e = config.eft
        files = [("judge_rows", read_judge_rows), ("meta_judge_rows", read_meta_judge_rows)]
        if e.eval_rows:
            files += [("eval_judge_rows", read_judge_rows), ("eval_meta_judge_rows", read_meta_judge_rows)]
        for key, read in files:
            if getattr(e, key):
                facts[f"eft_{key}"] = len(read(getattr(e, key)))
                pinned[f"eft.{key}"] = _pin(resolve_path(getattr(e, key)))
    facts["pinned_inputs"] = pinned
    return facts


def prompt_source_file(prompts) -> Path | None:
    """The file the prompt pool is read from (seed / jsonl), or self-instruct takes its examples from;
    None for a TFDS dataset."""
    if prompts.source == "tfds":
        return None
    return resolve_path(prompts.path) if prompts.path and prompts.source != "seed" else SEED_PROMPTS


def _pin(path: Path) -> dict:
    return {"file": str(Path(path).resolve()), "sha256": file_fingerprint(Path(path))}


def role_budgets(config: Config, context: int) -> list[tuple[str, Callable[[Any], str], int]]:
    """(role, the text that role's prompt becomes, tokens left for it) for every role that sees a prompt:
    the actor its chat; the judge its template around the prompt and a response of up to
    actor_max_new_tokens; the meta-judge (judge-training iterations) that and two judgments."""
    it = config.iteration
    out = [("actor", lambda p: p, context - it.actor_max_new_tokens),
           ("judge", lambda p: roles.fill_judge_prompt(prompt_question(p), ""),
            context - it.actor_max_new_tokens - it.judge_max_new_tokens)]
    if config.mode == "meta_rewarding" and it.judge_training_iterations:
        out.append(("meta-judge", lambda p: roles.fill_meta_judge_prompt(prompt_question(p), "", "", ""),
                    context - it.actor_max_new_tokens - 2 * it.judge_max_new_tokens - it.meta_judge_max_new_tokens))
    return out


def split_too_long(rows: Sequence[tuple[str, Any]], tokenizer, context: int, config: Config):
    """``(rows that fit, [(where, why) of those that do not])`` for ``("file:line", prompt)`` rows."""
    budgets = role_budgets(config, context)
    fitting, too_long = [], []
    for where, prompt in rows:
        for role, text, room in budgets:
            n = len(tokenizer.encode(tokenizer.chat(text(prompt))))
            if n > room:
                too_long.append((where, f"the prompt is too long for the {role}: its prompt has {n} tokens, "
                                        f"but the model's {context} positions leave {room} after the new tokens "
                                        "of the roles that see it"))
                break
        else:
            fitting.append((where, prompt))
    return fitting, too_long


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (run_dir excluded)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted == "run_dir":
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, dotted + ".")
        elif a != b:
            changed.append(f"{dotted} (was {a!r}, now {b!r})")
    return changed


def _seed(*parts: Any) -> int:
    """A sampling seed from (run seed, iteration, role, shard): stable across runs and restarts."""
    words = [zlib.crc32(str(p).encode()) if not isinstance(p, int) else p for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class ExpectedRead(NamedTuple):
    """How an expected mode reads a value after each generated row: the probe (a
    ``mrjax.sampling.NextTokenProbe``) and the values [M] from its log-probs [M, K]."""

    probe: Any
    values: Callable[[np.ndarray], np.ndarray]


def _probe(tokenizer, text_to_read: Callable[[str], str], candidate_ids: list[int]):
    """A NextTokenProbe that reads after ``text_to_read(generated text)``: the generated ids whose text
    starts it stay (from the row's cache), the rest of it is tokenised and appended."""
    from mrjax.sampling import NextTokenProbe

    def continuation(ids: list[int]) -> tuple[int, list[int]]:
        text = text_to_read(tokenizer.decode(ids))
        lo, hi = 0, len(ids)  # the most generated ids whose text starts ``text``
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if text.startswith(tokenizer.decode(ids[:mid])) else (lo, mid - 1)
        return lo, tokenizer.encode(text[len(tokenizer.decode(ids[:lo])):])

    return NextTokenProbe(continuation, tuple(candidate_ids), max_appended=EXPECTED_MAX_APPENDED)


def _continuation_token(tokenizer, prefix: str, candidate: str) -> tuple[str, int]:
    """(text to append, the one token id that follows it) so that text + candidate tokenises as
    text's tokens + that id: tries ``prefix + candidate`` ("Score: " + "4": SmolLM2 writes the space
    alone), then with the space moved onto the candidate ("Score:" + " 4": Llama-3's " 4")."""
    for head, tail in ((prefix, candidate), (prefix.rstrip(), " " + candidate.lstrip())):
        base, full = tokenizer.encode(head), tokenizer.encode(head + tail)
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            return head, full[-1]
    raise ConfigError(f"the tokenizer does not write {prefix + candidate!r} with {candidate!r} as one token; "
                      "the expected judge score / verdict cannot be read with it (use 'parse')")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class LoopResult:
    run_dir: Path
    final_model: Path  # HF directory of M_T
    summaries: list[dict]
    already_complete: bool = False


class MetaRewardingRun:
    """One run directory; ``run()`` does (or finishes) the whole loop."""

    def __init__(self, config: Config, progress: bool = True, force_config: bool = False,
                 report: Callable[[Path], dict] | None = None):
        self.config, self.progress, self.force_config = config, progress, force_config
        # Called with the run directory after every iteration that did work (the CLI passes
        # mrjax.eval.report.write_report, which writes report.md / report.html and returns their paths).
        self.report = report
        self.root = Path(config.run_dir)
        self.it = config.iteration
        self.meta_judging = config.mode == "meta_rewarding"
        self._model = None  # (source path, Model), loaded on first use
        self._tokenizer = None
        self._mesh = None
        self.skipped: list[str] = []  # stages found complete (what a resumed run did not redo)
        self.ran: list[str] = []  # stages run (or redone) by this call
        # Called with (hf_dir, the trainer's TrainResult) after each training run, before its export (tests).
        self.on_trained: Callable[[Path, Any], None] | None = None

    # ------------------------------------------------------------------ plumbing

    def stage(self, where: Path, name: str, fn: Callable[[], dict | None], inputs: Callable[[], list] | list = (),
               outputs: Callable[[], list] | list = (), scratch: Sequence[Path] = ()) -> dict:
        """Run ``fn`` unless ``where/.done/name.json`` says it is complete and every file it recorded
        (``inputs`` it read, ``outputs`` it wrote: paths or folders) still has the same bytes; returns
        its figures. A stage redone because an input changed first removes its ``scratch`` (shards,
        checkpoints made from the old inputs); one redone for a changed output keeps them."""
        marker = where / ".done" / f"{name}.json"
        label = f"{where.relative_to(self.root)}/{name}" if where != self.root else name
        info = read_marker(marker) if is_main_process() else None
        problem = marker_problem(self.root, info) if info is not None else None
        if agreed(info is not None and problem is None):  # process 0's view of the run directory decides
            self.skipped.append(label)
            return info if info is not None else json.loads(marker.read_text())
        if problem is not None:
            log.warning("%s: redoing the stage, %s", label, problem)
            if is_main_process():
                marker.unlink(missing_ok=True)
                if problem.startswith("an input"):
                    for path in scratch:
                        shutil.rmtree(path, ignore_errors=True)
        barrier(f"redo {label}")
        self.ran.append(label)
        if name in ALLOCATING_STAGES:  # what the last stages freed goes back to the OS before this one allocates
            release_memory()  # (a full garbage collection: ~0.5 s, not worth it before a stage that only reads files)
        t0 = time.perf_counter()
        info = fn() or {}
        info["wall_s"] = round(agreed(time.perf_counter() - t0), 3)
        if is_main_process():
            info["inputs"] = record(self.root, inputs() if callable(inputs) else inputs)
            info["outputs"] = record(self.root, outputs() if callable(outputs) else outputs)
        write_text(marker, json.dumps(info, indent=1, sort_keys=True) + "\n")
        barrier(f"stage {label}")  # the stage's files are written before any process reads them
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items() if not isinstance(v, (dict, list)))
        log.info("%s done: %s", label, figures)
        return info

    def _model_files(self, source: str | Path) -> list[Path]:
        """The files a model source is read from (none for a random-weight registry model)."""
        from mrjax.model import registry

        if str(source) in registry.RANDOM_CONFIGS:
            return []
        if str(source) == "smollm2-135m-instruct":
            return [registry.embedded_gguf_path()]
        return [Path(source).expanduser()]

    def _mesh_now(self):
        if self._mesh is None:
            from mrjax.mesh import mesh_from_settings

            try:
                self._mesh = mesh_from_settings(self.config.mesh)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        return self._mesh

    def model(self, source: str | Path):
        """The model at ``source`` (a model name or an HF directory of this run), loaded once."""
        source = str(source)
        if self._model is None or self._model[0] != source:
            from mrjax.model.pretrained import load_pretrained

            self._model = None
            m = self.config.model
            model, tokenizer = load_pretrained(source, mesh=self._mesh_now(), dtype=m.dtype, param_dtype=m.param_dtype,
                                               remat=m.remat, seed=self.config.seed, progress=self.progress,
                                               remat_policy=m.remat_policy)
            if tokenizer is None:
                raise ConfigError(f"model {source!r} has no tokenizer; the loop needs one (use an HF directory or GGUF)")
            self._model, self._tokenizer = (source, model), tokenizer
        return self._model[1]

    def tokenizer(self, source: str | Path):
        self.model(source)
        return self._tokenizer

    def _drop_model(self) -> None:
        self._model = None

    def _bar(self, total: int, desc: str, unit: str = "row"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not (self.progress and is_main_process()),
                    dynamic_ncols=True)

    def generate_sharded(
        self,
        shard_dir: Path,
        role: str,
        source: str | Path,
        prompts: Sequence[Any],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed_parts: tuple,
        read: Callable[[Any], ExpectedRead] | None = None,
        shard_prompts: int | None = None,
    ) -> list[list[dict]]:
        """``n`` samples for each prompt, ``shard_prompts`` (default ``shard_size``) prompts per shard
        file; existing shards are reused. Returns per prompt a list of {"text", "tokens",
        "finish_reason"[, "value", "ids"]}. ``read(tokenizer)`` (expected modes: ``expected_scores``,
        ``expected_verdicts``) adds a per-sample "value", read after each row's text as it is generated,
        and the generated "ids" it was read after."""
        from mrjax.sampling import generate

        size = shard_prompts or self.it.shard_size
        shards = math.ceil(len(prompts) / size)
        out: list[list[dict]] = []
        bar = self._bar(len(prompts) * n, role)
        tokens_made, t0 = 0, time.perf_counter()
        try:
            for j in range(shards):
                path = shard_dir / f"{j:05d}.jsonl"
                chunk = prompts[j * size:(j + 1) * size]
                expected = [(j * size + i, s) for i in range(len(chunk)) for s in range(n)]
                rows = jsonl_objects(path) if agreed(path.is_file()) else None
                if rows is not None and sorted((r["i"], r["s"]) for r in rows) != expected:
                    # Written with another shard size (e.g. by an older mrjax): it does not cover this chunk.
                    log.warning("%s holds other rows than shard %d of %s: generating it again", path, j, role)
                    rows = None
                if rows is not None:
                    bar.update(len(chunk) * n)  # a shard already on disk
                else:
                    model, tokenizer = self.model(source), self._tokenizer
                    sampling = dataclasses.replace(
                        self.config.sampling, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        n=n, seed=_seed(self.config.seed, *seed_parts, j),
                    )
                    made = [0, 0]  # rows, tokens so far in this shard (the bar moves inside generate)

                    def rows_done(finished: int, tokens: int) -> None:
                        made[0] += finished
                        made[1] += tokens
                        bar.update(finished)
                        elapsed = time.perf_counter() - t0
                        so_far = tokens_made + made[1]
                        bar.set_postfix(tokens=so_far, tok_s=f"{so_far / max(elapsed, 1e-9):.0f}", refresh=False)

                    expected = read(tokenizer) if read is not None else None
                    result = generate(model, tokenizer, list(chunk), sampling, progress=False, rows_done=rows_done,
                                      probe=expected.probe if expected else None)
                    bar.update(len(chunk) * n - made[0])
                    texts = [[t.strip() for t in per] for per in result.texts]
                    values = None
                    if expected is not None:
                        flat = expected.values(np.asarray([lp for per in result.probe_logprobs for lp in per],
                                                      np.float32)).tolist()
                        values = [flat[i * n:(i + 1) * n] for i in range(len(chunk))]
                    rows = []
                    for i in range(len(chunk)):
                        for s in range(n):
                            row = {"i": j * size + i, "s": s, "text": texts[i][s], "tokens": result.lengths[i][s],
                                   "finish_reason": result.finish_reasons[i][s]}
                            if values is not None:  # with the ids it was read after, so it can be checked
                                row["value"] = values[i][s]
                                row["ids"] = result.token_ids[i][s]
                            rows.append(row)
                            tokens_made += result.lengths[i][s]
                    write_jsonl(path, rows)
                    faults.point(f"{role}:shard{j}")
                per_prompt: list[list[dict]] = [[None] * n for _ in chunk]  # type: ignore[list-item]
                for row in rows:
                    per_prompt[row["i"] - j * size][row["s"]] = row
                out.extend(per_prompt)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tokens=tokens_made, tok_s=f"{tokens_made / max(elapsed, 1e-9):.0f}", refresh=False)
        finally:
            bar.close()
        return out

    # ------------------------------------------------------------------ expected modes

    def expected_scores(self, tokenizer) -> ExpectedRead:
        """Probability-weighted judge score ("0".."5" after 'Score: ') after each judgment cut before its
        own 'Score:' label (roles.expected_score_text), read as the judgment is generated."""
        head, ids = None, []
        for digit in "012345":
            head, token = _continuation_token(tokenizer, SCORE_SUFFIX, digit)
            ids.append(token)
        return ExpectedRead(_probe(tokenizer, lambda text: roles.expected_score_text(text, head), ids),
                            lambda logprobs: np.asarray(pf.expected_score(logprobs, np.arange(6))))

    def expected_verdicts(self, tokenizer, suffix: str = WINNER_SUFFIX) -> ExpectedRead:
        """log p(A) - log p(B) of the token after the explanation + ``suffix`` ('Winner: Judgement'),
        read as the meta-judgment is generated."""
        head, a = _continuation_token(tokenizer, suffix, " A")
        _, b = _continuation_token(tokenizer, suffix, " B")
        return ExpectedRead(_probe(tokenizer, lambda text: roles.expected_verdict_text(text, head), [a, b]),
                            lambda logprobs: logprobs[:, 0] - logprobs[:, 1])

    def _judge_value(self, row: dict) -> tuple[str, float | None]:
        if self.it.judge_score == "expected":
            return "expected", float(row["value"])
        return roles.classify_judgment(row["text"])

    def _verdict(self, row: dict, threshold: float) -> tuple[str, str | None]:
        if self.it.meta_judge_verdict == "expected":
            margin = float(row["value"])
            return "expected", ("A" if margin > threshold else "B" if margin < threshold else None)
        return roles.classify_meta_judgment(row["text"])

    # ------------------------------------------------------------------ run

    def run(self, checked: dict | None = None) -> LoopResult:
        """``checked``: what ``check_config`` returned for this config, if the caller already ran it."""
        facts = dict(checked) if checked is not None else check_config(self.config)  # before anything is written
        self.root.mkdir(parents=True, exist_ok=True)
        with RunLock(self.root, "python -m mrjax.train"):
            self._check_or_write_config(facts.pop("pinned_inputs"))
            return self._run(facts)

    def _run(self, facts: dict) -> LoopResult:
        T = self.it.iterations
        final = model_source(self.config, T)
        log.info("run %s: %s, %d iterations (%s)", self.root, self.config.mode, T,
                 ", ".join(f"{k}={v}" for k, v in facts.items() if not isinstance(v, (dict, list))))
        pool_files = [self.root / "prompts" / "pool.jsonl", self.root / "prompts" / "held_out.jsonl"]
        self.stage(self.root, "prompt_pool", self.stage_prompt_pool, inputs=[f for f in [prompt_source_file(self.config.prompts)] if f],
                    outputs=pool_files, scratch=[self.root / "prompts" / "self_instruct_shards"])
        if self.config.eft.enabled:
            self.run_eft(self.config.model.name)
        summaries = [self.run_iteration(t, model_source(self.config, t - 1)) for t in range(1, T + 1)]
        self.stage(self.root, "run", lambda: {"final_model": str(final), "iterations": T},
                    inputs=[self.root / f"iter_{t}" / "summary.json" for t in range(1, T + 1)])
        if not self.ran:
            log.info("%s: the run is already complete (every stage verified); nothing to do", self.root)
            return LoopResult(self.root, final, summaries, already_complete=True)
        log.info("final model (M_%d): %s", T, final)
        log.info("pair files: %s", ", ".join(str(p) for t in range(1, T + 1)
                                             for p in sorted((self.root / f"iter_{t}").glob("*_pairs.jsonl"))))
        log.info("summaries: %s and %s", ", ".join(str(self.root / f"iter_{t}" / "summary.json") for t in range(1, T + 1)),
                 self.root / "metrics.jsonl")
        return LoopResult(self.root, final, summaries)

    def _check_or_write_config(self, pinned: dict | None = None) -> None:
        """config.yaml records the resolved config and the content of its input files (``pinned_inputs``);
        a re-run with another config or changed input files is refused, naming them."""
        import yaml

        pinned = check_config(self.config)["pinned_inputs"] if pinned is None else pinned
        path = self.root / "config.yaml"
        new = {**to_dict(self.config), PINNED_KEY: pinned}
        if agreed(path.is_file()):
            old = yaml.safe_load(path.read_text()) or {}
            old_pins = old.pop(PINNED_KEY, None)
            changed = config_changes(old, to_dict(self.config))
            for key, now in pinned.items():
                was = (old_pins or {}).get(key)
                if old_pins is not None and (was or {}).get("sha256") != now.get("sha256"):
                    changed.append(f"{key}: the file {now.get('file')} is not the one this run started with "
                                   f"(sha256 {str((was or {}).get('sha256'))[:12]}, now {str(now.get('sha256'))[:12]})")
            if changed and not self.force_config:
                raise ConfigError(
                    f"{self.root} was started with another config; changed keys: {'; '.join(changed)}. "
                    "Re-run with the original settings and files, use a new run_dir, or pass --force-config"
                )
            if not changed:
                return
            log.warning("%s: continuing with a changed config (--force-config): %s", self.root, "; ".join(changed))
        write_text(path, yaml.safe_dump(new, sort_keys=False))
        barrier("config.yaml")

    def _summaries(self) -> list[dict]:
        out = []
        for t in range(1, self.it.iterations + 1):
            path = self.root / f"iter_{t}" / "summary.json"
            if path.is_file():
                out.append(json.loads(path.read_text()))
        return out

    # ------------------------------------------------------------------ step 1: prompts

    def stage_prompt_pool(self) -> dict:
        """prompts/pool.jsonl (for the iterations) and prompts/held_out.jsonl (never trained on)."""
        from mrjax.model.pretrained import inspect_model

        pr, it = self.config.prompts, self.it
        if pr.source in ("seed", "jsonl"):
            rows = read_prompt_rows(prompt_source_file(pr))
        elif pr.source == "tfds":
            rows = [(f"tfds {pr.tfds_name} example {i}", p)
                    for i, p in enumerate(tfds_prompts(pr.tfds_name, pr.tfds_split, pr.tfds_field))]
        else:
            rows = [(f"self-instruct prompt {i}", p) for i, p in enumerate(self._self_instruct())]
        model_config, tokenizer = inspect_model(self.config.model.name)
        rows, too_long = split_too_long(rows, tokenizer, model_config.max_position_embeddings, self.config)
        if too_long and not (pr.drop_too_long or pr.source == "self_instruct"):  # generated prompts are just dropped
            raise DataError(f"{too_long[0][0]}: {too_long[0][1]}; set prompts.drop_too_long=true to drop such prompts")
        if too_long:
            log.warning("prompt pool: %d prompts too long for the context are dropped (first: %s)", len(too_long),
                        too_long[0][0])
        prompts = dedupe_prompts([p for _, p in rows])
        needed = pr.held_out + it.iterations * it.prompts_per_iteration
        if len(prompts) < needed:
            raise DataError(f"the prompt pool has {len(prompts)} distinct prompts, fewer than the {needed} this run "
                            f"needs (prompts.held_out={pr.held_out} + {it.iterations} x {it.prompts_per_iteration})")
        order = np.random.default_rng([self.config.seed, 1]).permutation(len(prompts)) if pr.shuffle \
            else np.arange(len(prompts))
        rows = [{"id": int(i), "prompt": prompts[i]} for i in order]
        write_jsonl(self.root / "prompts" / "held_out.jsonl", rows[: pr.held_out])
        write_jsonl(self.root / "prompts" / "pool.jsonl", rows[pr.held_out:])
        return {"source": pr.source, "pool": len(rows) - pr.held_out, "held_out": pr.held_out,
                "dropped_too_long": len(too_long)}

    def _self_instruct(self) -> list[str]:
        """New prompts written by M_0 from 8 examples of the seed pool, filtered and deduplicated."""
        pr, it = self.config.prompts, self.it
        examples = read_prompts(prompt_source_file(pr))
        examples = [prompt_question(p) for p in examples]
        needed = pr.held_out + it.iterations * it.prompts_per_iteration
        attempts = int(math.ceil(needed * pr.self_instruct_attempts))
        rng = np.random.default_rng([self.config.seed, 2])
        requests = [roles.fill_self_instruct_prompt(list(rng.choice(examples, roles.SELF_INSTRUCT_NUM_EXAMPLES,
                                                                    replace=False)))
                    for _ in range(attempts)]
        # The request is one user turn (the model is a chat model); its answer is read up to </task>.
        out = self.generate_sharded(self.root / "prompts" / "self_instruct_shards", "self_instruct",
                                    self.config.model.name, [[{"role": "user", "content": r}] for r in requests], 1,
                                    pr.self_instruct_temperature, pr.self_instruct_top_p,
                                    pr.self_instruct_max_new_tokens, ("self_instruct",))
        candidates = [roles.parse_self_instruct(per[0]["text"]) for per in out]
        kept = [c for c in candidates if c is not None and prompt_is_sane(c, pr)]
        prompts = dedupe_prompts(kept, against=examples)
        log.info("self-instruct: %d requests, %d parsed, %d sane, %d new after deduplication",
                 attempts, sum(c is not None for c in candidates), len(kept), len(prompts))
        if len(prompts) < needed:
            raise DataError(f"self-instruct wrote {len(prompts)} usable new prompts from {attempts} requests, fewer than "
                            f"the {needed} needed; raise prompts.self_instruct_attempts or use another prompt source")
        return prompts[:needed]

    def stage_prompts(self, t: int, where: Path) -> dict:
        pool = jsonl_objects(self.root / "prompts" / "pool.jsonl")
        P = self.it.prompts_per_iteration
        rows = pool[(t - 1) * P: t * P]  # disjoint slices: no prompt is used in two iterations
        write_jsonl(where / "prompts.jsonl", rows)
        return {"prompts": len(rows)}

    # ------------------------------------------------------------------ EFT

    def run_eft(self, base: str) -> None:
        """SFT of M_0 on judge-format (and meta-judge-format) rows; parse rates before and after."""
        e, where = self.config.eft, self.root / "eft"
        eval_files = [resolve_path(f) for f in (e.eval_judge_rows, e.eval_meta_judge_rows) if f and e.eval_rows]
        train_files = [resolve_path(f) for f in (e.judge_rows, e.meta_judge_rows) if f]
        self.stage(where, "parse_before", lambda: self.parse_rates(base, where / "parse_before", "before"),
                    inputs=lambda: eval_files + self._model_files(base), scratch=[where / "parse_before"])
        self.stage(where, "train", lambda: self.stage_eft_train(base, where),
                    inputs=lambda: train_files + self._model_files(base),
                    outputs=[where / "sft_rows.jsonl", where / "hf"], scratch=[where / "train"])
        self._drop_checkpoints(where / "train")
        self.stage(where, "parse_after", lambda: self.parse_rates(where / "hf", where / "parse_after", "after"),
                    inputs=lambda: eval_files + [where / "hf"], scratch=[where / "parse_after"])
        markers = [where / ".done" / f"{name}.json" for name in ("parse_before", "train", "parse_after")]
        self.stage(where, "summary", lambda: self.eft_summary(where), inputs=markers,
                    outputs=[where / "summary.json"])

    def eft_summary(self, where: Path) -> dict:
        e = self.config.eft
        done = stage_markers(where)
        before, after, train = (_figures(done[name]) for name in ("parse_before", "parse_after", "train"))
        write_text(where / "summary.json", json.dumps({"before": before, "after": after, "train": train}, indent=1,
                                                      sort_keys=True) + "\n")
        if e.eval_rows:
            log.info("EFT judge parse rate %.2f -> %.2f, meta-judge parse rate %s -> %s",
                     before.get("judge_parse_rate", 0), after.get("judge_parse_rate", 0),
                     _fmt(before.get("meta_judge_parse_rate")), _fmt(after.get("meta_judge_parse_rate")))
        return {}

    def parse_rates(self, source: str | Path, where: Path, tag: str) -> dict:
        """Judge and meta-judge parse rates of ``source`` on held-out EFT rows (one sample each)."""
        e, it = self.config.eft, self.it
        if not e.eval_rows:
            return {}
        info: dict[str, Any] = {}
        judge_rows = read_judge_rows(e.eval_judge_rows)[: e.eval_rows]
        out = self.generate_sharded(where / "judge", f"eft_{tag}_judge", source,
                                    [roles.fill_judge_prompt(r["question"], r["response"]) for r in judge_rows], 1,
                                    it.judge_temperature, it.judge_top_p, it.judge_max_new_tokens, ("eft_judge",))
        stats, errors = roles.ParseStats(), []
        for row, per in zip(judge_rows, out):
            value = roles.parse_judge_score(per[0]["text"], stats)
            if value is not None:
                errors.append(abs(value - row["score"]))
        info.update(stats.as_dict("judge_"))
        info["judge_mean_abs_error"] = mean_or_none(errors)
        info["judge_mean_abs_error_low"], info["judge_mean_abs_error_high"] = _mean_interval(errors)
        # The same error for a constant guess of the rows' mean score: the baseline a judge must beat.
        truth = np.asarray([r["score"] for r in judge_rows], np.float64)
        info["judge_constant_guess_error"] = float(np.abs(truth - truth.mean()).mean()) if len(truth) else None
        if e.eval_meta_judge_rows:
            meta_rows = read_meta_judge_rows(e.eval_meta_judge_rows)[: e.eval_rows]
            prompts = [roles.fill_meta_judge_prompt(r["question"], r["response"], r["judgment_a"], r["judgment_b"])
                       for r in meta_rows]
            out = self.generate_sharded(where / "meta_judge", f"eft_{tag}_meta_judge", source, prompts, 1,
                                        it.meta_judge_temperature, it.meta_judge_top_p, it.meta_judge_max_new_tokens,
                                        ("eft_meta_judge",))
            stats, right = roles.ParseStats(), []
            for row, per in zip(meta_rows, out):
                winner = roles.parse_meta_judge(per[0]["text"], stats)
                if winner is not None:
                    right.append(float(winner == row["winner"]))
            info.update(stats.as_dict("meta_judge_"))
            info["meta_judge_accuracy"] = mean_or_none(right)
            info["meta_judge_accuracy_low"], info["meta_judge_accuracy_high"] = _mean_interval(right)
        return info

    def stage_eft_train(self, base: str, where: Path) -> dict:
        e = self.config.eft
        judge = read_judge_rows(e.judge_rows)
        judge = judge[: e.max_judge_rows] if e.max_judge_rows else judge
        rows = [judge_sft_row(r) for r in judge]
        if e.meta_judge_rows:
            meta = read_meta_judge_rows(e.meta_judge_rows)
            meta = meta[: e.max_meta_judge_rows] if e.max_meta_judge_rows else meta
            rows += [meta_judge_sft_row(r) for r in meta]
        path = write_jsonl(where / "sft_rows.jsonl", rows)
        train = dataclasses.replace(
            self.config.train, kind="sft", learning_rate=e.learning_rate, batch_size=e.batch_size,
            grad_accum=1, epochs=e.epochs, max_steps=e.max_steps, max_length=e.max_length,
            warmup_ratio=e.warmup_ratio, schedule=e.schedule, pairs=str(path), eval_pairs="",
        )
        info = self._train(dataclasses.replace(self.config, train=train), "sft", base, path, where / "train",
                           where / "hf")
        info["rows"] = len(rows)
        return info

    # ------------------------------------------------------------------ one iteration

    def run_iteration(self, t: int, source: str | Path) -> dict:
        where = self.root / f"iter_{t}"
        log.debug("iteration %d/%d (M_%d from %s)", t, self.it.iterations, t - 1, source)
        model = lambda: self._model_files(source)  # noqa: E731
        files = {name: where / f"{name}.jsonl" for name in ("prompts", "responses", "judgments", "actor_pairs",
                                                            "meta_judgments", "judge_pairs")}
        read = lambda *names: [files[n] for n in names]  # noqa: E731

        def stage(name, fn, inputs=(), outputs=(), scratch=()):
            return self.stage(where, name, fn, inputs, outputs, scratch)

        stage("prompts", lambda: self.stage_prompts(t, where), [self.root / "prompts" / "pool.jsonl"],
              read("prompts"))
        stage("responses", lambda: self.stage_responses(t, where, source), lambda: read("prompts") + model(),
              read("responses"), [where / "shards" / "responses"])
        stage("judgments", lambda: self.stage_judgments(t, where, source),
              lambda: read("prompts", "responses") + model(), read("judgments"), [where / "shards" / "judgments"])
        stage("actor_pairs", lambda: self.stage_actor_pairs(t, where), read("prompts", "responses", "judgments"),
              read("actor_pairs"))
        judge_training = self.meta_judging and t in self.it.judge_training_iterations
        stages = ["prompts", "responses", "judgments", "actor_pairs"]
        if judge_training:
            stage("meta_judgments", lambda: self.stage_meta_judgments(t, where, source),
                  lambda: read("prompts", "responses", "judgments") + model(), read("meta_judgments"),
                  [where / "shards" / "meta_judgments"])
            stage("judge_pairs", lambda: self.stage_judge_pairs(t, where),
                  read("prompts", "responses", "judgments", "meta_judgments"), read("judge_pairs"))
            stages += ["meta_judgments", "judge_pairs"]
        stage("train", lambda: self.stage_train(t, where, source), lambda: read("actor_pairs", "judge_pairs") + model(),
              [where / "train" / "pairs.jsonl", where / "train" / HELD_OUT_PAIRS, where / "hf"], [where / "train"])
        self._drop_checkpoints(where / "train")
        stages.append("train")
        ran_before = len(self.ran)
        summary = self._stage_summary(t, where, judge_training, [files[n] for n in stages if n in files] +
                                      [where / ".done" / f"{n}.json" for n in stages])
        if self.report is not None and is_main_process() and len(self.ran) > ran_before:
            paths = self.report(self.root)
            log.info("report: %s (%s)", paths["md"], paths["html"])
        return summary

    # ------------------------------------------------------------------ step 2: actor

    def stage_responses(self, t: int, where: Path, source) -> dict:
        it = self.it
        prompts = jsonl_objects(where / "prompts.jsonl")
        out = self.generate_sharded(where / "shards" / "responses", "responses", source, [p["prompt"] for p in prompts],
                                    it.responses_per_prompt, it.actor_temperature, it.actor_top_p,
                                    it.actor_max_new_tokens, ("actor", t))
        rows, duplicates, empty = [], 0, 0
        for p, per in zip(prompts, out):
            seen = set()
            for k, sample in enumerate(per):
                text = sample["text"]
                if not text and it.drop_empty_responses:
                    empty += 1
                    continue
                if text in seen:
                    duplicates += 1
                    continue
                seen.add(text)
                rows.append({"prompt_id": p["id"], "k": k, "response": text, "tokens": sample["tokens"],
                             "finish_reason": sample["finish_reason"]})
        write_jsonl(where / "responses.jsonl", rows)
        return {"generated": len(prompts) * it.responses_per_prompt, "responses": len(rows),
                "duplicates_dropped": duplicates, "empty_dropped": empty,
                "tokens": sum(s["tokens"] for per in out for s in per)}

    # ------------------------------------------------------------------ step 3: judge

    def stage_judgments(self, t: int, where: Path, source) -> dict:
        it = self.it
        questions = {p["id"]: prompt_question(p["prompt"]) for p in jsonl_objects(where / "prompts.jsonl")}
        responses = jsonl_objects(where / "responses.jsonl")
        judge_prompts = [roles.fill_judge_prompt(questions[r["prompt_id"]], r["response"]) for r in responses]
        read = self.expected_scores if it.judge_score == "expected" else None
        out = self.generate_sharded(where / "shards" / "judgments", "judgments", source, judge_prompts,
                                    it.judgments_per_response, it.judge_temperature, it.judge_top_p,
                                    it.judge_max_new_tokens, ("judge", t), read)
        rows, stats = [], roles.ParseStats()  # the parse rate of the text, whichever way scores are read
        for r, per in zip(responses, out):
            for n, sample in enumerate(per):
                parsed, _ = roles.classify_judgment(sample["text"])
                stats.record(parsed)
                status, value = self._judge_value(sample)
                rows.append({"prompt_id": r["prompt_id"], "k": r["k"], "n": n, "judgment": sample["text"],
                             "score": value, "status": status, **({"parse_status": parsed} if status == "expected"
                                                                  else {})})
        write_jsonl(where / "judgments.jsonl", rows)
        valid = [r["score"] for r in rows if r["score"] is not None]
        info = {"judgments": len(rows), "valid": len(valid), "tokens": sum(s["tokens"] for per in out for s in per),
                "score_mean": mean_or_none(valid), "score_std": float(np.std(valid)) if valid else None}
        info.update(stats.as_dict("judge_"))
        return info

    def _judgment_arrays(self, where: Path):
        """[P, K, N] scores / masks / lengths of the iteration's judgments, plus the lookups."""
        it = self.it
        prompts = jsonl_objects(where / "prompts.jsonl")
        responses = jsonl_objects(where / "responses.jsonl")
        judgments = jsonl_objects(where / "judgments.jsonl")
        index = {p["id"]: i for i, p in enumerate(prompts)}
        P, K, N = len(prompts), it.responses_per_prompt, it.judgments_per_response
        scores = np.zeros((P, K, N), np.float32)
        mask = np.zeros((P, K, N), bool)
        lengths = np.zeros((P, K, N), np.int32)
        texts: dict[tuple[int, int, int], str] = {}
        for j in judgments:
            p = index[j["prompt_id"]]
            texts[(p, j["k"], j["n"])] = j["judgment"]
            lengths[p, j["k"], j["n"]] = len(j["judgment"])
            if j["score"] is not None:
                scores[p, j["k"], j["n"]], mask[p, j["k"], j["n"]] = j["score"], True
        response_text = {(index[r["prompt_id"]], r["k"]): r["response"] for r in responses}
        return prompts, response_text, texts, scores, mask, lengths

    # ------------------------------------------------------------------ step 4: actor pairs

    def stage_actor_pairs(self, t: int, where: Path) -> dict:
        it = self.it
        prompts, response_text, _, judgment_scores, judgment_mask, _ = self._judgment_arrays(where)
        P, K = len(prompts), it.responses_per_prompt
        scores, has_score = (np.asarray(a) for a in pf.response_scores(judgment_scores, judgment_mask))
        lengths = np.zeros((P, K), np.int32)
        present = np.zeros((P, K), bool)
        for (p, k), text in response_text.items():
            lengths[p, k], present[p, k] = len(text), True
        mask = has_score & present
        rho = it.per_iteration("rho", t)
        if self.meta_judging:
            limit = it.per_iteration("max_chosen_chars", t)
            pairs = pf.actor_pairs(scores, lengths, mask, rho=rho, max_chosen_chars=limit or None)
        else:  # Self-Rewarding: rho = 0, ties discarded
            rho = 0.0
            pairs = pf.self_rewarding_pairs(scores, lengths, mask)
        chosen, rejected, valid = (np.asarray(a) for a in pairs)
        rows = []
        for p in np.flatnonzero(valid):
            c, r = int(chosen[p]), int(rejected[p])
            rows.append({"prompt": prompts[p]["prompt"], "chosen": response_text[(p, c)],
                         "rejected": response_text[(p, r)], "prompt_id": prompts[p]["id"], "chosen_k": c,
                         "rejected_k": r, "chosen_score": float(scores[p, c]), "rejected_score": float(scores[p, r]),
                         "chosen_chars": int(lengths[p, c]), "rejected_chars": int(lengths[p, r])})
        write_jsonl(where / "actor_pairs.jsonl", rows)
        return {"actor_pairs": len(rows), "rho": rho, "prompts_with_scores": int(mask.any(axis=1).sum())}

    # ------------------------------------------------------------------ step 5: meta-judge and judge pairs

    def _meta_calls(self, where: Path):
        """The meta-judge calls: for each selected response, every ordered pair (m, n) of its valid judgments."""
        prompts, response_text, texts, scores, mask, _ = self._judgment_arrays(where)
        response_idx, selected, _ = (np.asarray(a) for a in pf.select_judged_response(scores, mask))
        calls = []
        for p in np.flatnonzero(selected):
            k = int(response_idx[p])
            valid_n = [n for n in range(self.it.judgments_per_response) if mask[p, k, n]]
            for m in valid_n:
                for n in valid_n:
                    if m != n:
                        calls.append((int(p), k, m, n))
        return prompts, response_text, texts, calls

    def stage_meta_judgments(self, t: int, where: Path, source) -> dict:
        it = self.it
        prompts, response_text, texts, calls = self._meta_calls(where)
        meta_prompts = [roles.fill_meta_judge_prompt(prompt_question(prompts[p]["prompt"]), response_text[(p, k)],
                                                     texts[(p, k, m)], texts[(p, k, n)]) for p, k, m, n in calls]
        read = self.expected_verdicts if it.meta_judge_verdict == "expected" else None
        # A shard holds the calls of shard_size selected responses (N(N-1) each), so one generate call
        # has enough rows to fill and refill its decode slots.
        per_response = it.judgments_per_response * (it.judgments_per_response - 1)
        out = self.generate_sharded(where / "shards" / "meta_judgments", "meta_judgments", source, meta_prompts, 1,
                                    it.meta_judge_temperature, it.meta_judge_top_p, it.meta_judge_max_new_tokens,
                                    ("meta_judge", t), read, shard_prompts=it.shard_size * per_response) if calls else []
        # Expected verdicts are calibrated (as in "Calibrate before use", Zhao et al. 2021): the margin
        # log p(A) - log p(B) is compared with its median over the calls of the same response, so neither
        # a constant position preference nor one question's offset (which moves all of its calls alike)
        # decides the verdicts; what is left is how each judgment fares against the others.
        threshold: dict[tuple[int, int], float] = {}
        if read is not None:
            margins: dict[tuple[int, int], list[float]] = {}
            for (p, k, _, _), per in zip(calls, out):
                margins.setdefault((p, k), []).append(per[0]["value"])
            threshold = {key: float(np.median(v)) for key, v in margins.items()}
        rows, stats = [], roles.ParseStats()  # the parse rate of the text, whichever way verdicts are read
        for (p, k, m, n), per in zip(calls, out):
            parsed, _ = roles.classify_meta_judgment(per[0]["text"])
            stats.record(parsed)
            status, winner = self._verdict(per[0], threshold.get((p, k), 0.0))
            rows.append({"prompt_id": prompts[p]["id"], "k": k, "m": m, "n": n,
                         "order": "forward" if m < n else "reverse", "text": per[0]["text"], "winner": winner,
                         "status": status,
                         **({"margin": per[0]["value"], "parse_status": parsed} if read is not None else {})})
        write_jsonl(where / "meta_judgments.jsonl", rows)
        info = {"meta_judgments": len(rows), "verdict_threshold": mean_or_none(list(threshold.values())),
                "selected_responses": len({(p, k) for p, k, _, _ in calls}),
                "tokens": sum(s["tokens"] for per in out for s in per), "winners": sum(r["winner"] is not None for r in rows)}
        info.update(stats.as_dict("meta_judge_") if stats.total else {"meta_judge_parse_rate": None})
        return info

    def stage_judge_pairs(self, t: int, where: Path) -> dict:
        it = self.it
        prompts, response_text, texts, scores, mask, lengths = self._judgment_arrays(where)
        index = {p["id"]: i for i, p in enumerate(prompts)}
        P, N = len(prompts), it.judgments_per_response
        results = np.zeros((P, N, N), np.int32)
        called = np.zeros((P, N, N), bool)
        for row in jsonl_objects(where / "meta_judgments.jsonl"):
            p = index[row["prompt_id"]]
            results[p, row["m"], row["n"]] = roles.winner_to_result(row["winner"])
            called[p, row["m"], row["n"]] = True
        limit = it.judgment_chars_limit(t)
        pairs = pf.judge_pairs(scores, mask, lengths, results, called, max_judgment_chars=limit or None)
        chosen, rejected, valid, response_idx, elo = (np.asarray(a) for a in
                                                      (pairs.chosen, pairs.rejected, pairs.valid, pairs.response_idx,
                                                       pairs.elo))
        rows = []
        for p in np.flatnonzero(valid):
            k, c, r = int(response_idx[p]), int(chosen[p]), int(rejected[p])
            rows.append({"prompt": roles.fill_judge_prompt(prompt_question(prompts[p]["prompt"]), response_text[(p, k)]),
                         "chosen": texts[(p, k, c)], "rejected": texts[(p, k, r)], "prompt_id": prompts[p]["id"],
                         "k": k, "chosen_n": c, "rejected_n": r, "chosen_elo": float(elo[p, c]),
                         "rejected_elo": float(elo[p, r]), "chosen_score": float(scores[p, k, c]),
                         "rejected_score": float(scores[p, k, r])})
        write_jsonl(where / "judge_pairs.jsonl", rows)
        return {"judge_pairs": len(rows), "omega1": float(pairs.omega1), "omega2": float(pairs.omega2),
                "max_judgment_chars": limit}

    # ------------------------------------------------------------------ step 6: DPO

    def stage_train(self, t: int, where: Path, source) -> dict:
        rows = [r for name in ("actor_pairs", "judge_pairs") if (where / f"{name}.jsonl").is_file()
                for r in jsonl_objects(where / f"{name}.jsonl")]
        train_dir = where / "train"
        if not rows:
            log.warning("iteration %d built no pairs: M_%d = M_%d", t, t, t - 1)
            self._export(self.model(source), where / "hf")
            return {"pairs": 0, "steps": 0}
        trained, held = held_out_split(rows, self.it.dpo_held_out, self.config.seed, t)
        pair = lambda r: {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}  # noqa: E731
        # Both files before training, so the split is part of the stage's recorded outputs (and of a resumed run's).
        write_jsonl(train_dir / HELD_OUT_PAIRS, [pair(rows[i]) for i in held])
        path = write_jsonl(train_dir / "pairs.jsonl", [pair(rows[i]) for i in trained])
        return self._train(self.config, "dpo", source, path, train_dir, where / "hf",
                           held_out=train_dir / HELD_OUT_PAIRS if held else None)

    def _examples(self, path: Path, kind: str, max_length: int, required: bool = True):
        """(tokenised rows of ``path``, how many were left out for a prompt too long for ``max_length``);
        with none left: an error, or (None, dropped) when the rows are not ``required``."""
        tokenizer = self._tokenizer
        rows = read_jsonl(path)
        room = max_length - 8
        kept = [(n, r) for n, r in rows if len(tokenizer.encode(tokenizer.chat(r["prompt"]))) <= room]
        dropped = len(rows) - len(kept)
        if dropped:
            log.warning("%s: %d rows have prompts longer than train.max_length - 8 = %d tokens and are left out",
                        path, dropped, room)
        if not kept and not required:
            return None, dropped
        if not kept:
            raise DataError(f"{path}: every row's prompt is longer than train.max_length={max_length}")
        fields = ("chosen", "rejected") if kind == "dpo" else ("completion",)
        examples = tokenize_rows([(n, {"prompt": r["prompt"], **{f: r[f] for f in fields}}) for n, r in kept],
                                 tokenizer, kind, max_length, str(path), file_fingerprint(path))
        return examples, dropped

    def _train(self, config: Config, kind: str, source, path: Path, train_dir: Path, hf_dir: Path,
               held_out: Path | None = None) -> dict:
        """Train the model at ``source`` on ``path`` (kind dpo|sft; resumes from train_dir's checkpoints),
        export it to ``hf_dir``; the reference of DPO is the model at ``source``. DPO pairs ``held_out``
        (never trained on) are scored before and after training, the trained pairs after it."""
        from mrjax.trainer import Trainer

        model = self.model(source)
        self._drop_model()  # the trainer consumes its parameters
        barrier(f"rows {path}")  # written by process 0 just before
        examples, dropped = self._examples(path, kind, config.train.max_length)
        held = None
        if held_out is not None:
            held, held_dropped = self._examples(held_out, kind, config.train.max_length, required=False)
            dropped += held_dropped
        callbacks = [lambda done, metrics, idx: faults.point(f"{kind}:step{done}")]
        trainer = Trainer(config, model, self._tokenizer, kind=kind, run_dir=train_dir, progress=self.progress,
                          callbacks=callbacks, donate_model=True)
        figures: dict[str, Any] = {}
        seed = self.config.seed
        if held is not None:
            held = trainer.attach_reference(held, "eval")
            # Before training the policy is the reference itself: by definition every margin is 0 and the
            # DPO (sigmoid) loss ln 2 (not recomputed: a forward pass over the pairs would only say so).
            ties = np.zeros(len(held))
            figures["held_out_before"] = dpo_figures({"loss": ties + math.log(2), "rewards/margins": ties}, seed)
        result = trainer.train(examples, held)
        if self.on_trained is not None:
            self.on_trained(hf_dir, result)
        if held is not None:
            figures["held_out_after"] = dpo_figures(result.eval_pair_metrics, seed)
        if kind == "dpo":  # one forward pass over the trained pairs (as long as their reference log-probs took)
            figures["train_after"] = dpo_figures(trainer.pair_metrics(examples, result.model.params), seed)
        self._export(result.model, hf_dir)
        metrics = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        metrics = [m for m in metrics if "loss" in m]
        info: dict[str, Any] = {"pairs" if kind == "dpo" else "rows": len(examples), "dropped_too_long": dropped,
                                "steps": result.step}
        if kind == "dpo":
            info["held_out_pairs"] = len(held) if held is not None else 0
        for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"):
            values = [m[key] for m in metrics if key in m]
            if values:
                info[f"{key}_mean"] = float(np.mean(values))
                info[f"{key}_last"] = float(values[-1])
        info.update(figures)
        return info

    def _drop_checkpoints(self, train_dir: Path) -> None:
        """Delete a finished training run's orbax checkpoints (parameters and optimizer state: 1.6 GB for
        SmolLM2) once its stage marker is durable. Nothing reads them after that: a later stage or a
        resumed run reads the trained model from the stage's hf/ export, and a stage redone for a damaged
        output trains again from its kept inputs (deterministic, so to the same bytes). Kept in
        ``train_dir``: pairs.jsonl, held_out_pairs.jsonl, reference_logps.npz, metrics.jsonl, tensorboard/.
        The folder is renamed first, so a kill mid-delete never leaves a partial checkpoint to resume from."""
        if is_main_process():
            checkpoints, doomed = train_dir / "checkpoints", train_dir / "checkpoints.deleting"
            if checkpoints.is_dir():
                shutil.rmtree(doomed, ignore_errors=True)
                checkpoints.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _export(self, model, hf_dir: Path) -> None:
        """Write M_t as an HF directory atomically (a temporary folder renamed when complete)."""
        tmp = hf_dir.with_name(hf_dir.name + ".tmp")
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, self._tokenizer)  # every process gathers the parameters; process 0 writes
        if is_main_process():
            shutil.rmtree(hf_dir, ignore_errors=True)
            tmp.rename(hf_dir)
        barrier(f"export {hf_dir}")
        self._drop_model()

    # ------------------------------------------------------------------ summary

    def _stage_summary(self, t: int, where: Path, judge_training: bool, inputs: list[Path]) -> dict:
        def summarize():
            summary = iteration_summary(t, where, judge_training)
            write_text(where / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
            self._rewrite_metrics()
            if is_main_process():
                print_table(summary)
            return {"iteration": t}

        self.stage(where, "summary", summarize, inputs=inputs, outputs=[where / "summary.json"])
        return json.loads((where / "summary.json").read_text())

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl and the TensorBoard scalars, rewritten from the iteration summaries (never
        appended: a redone iteration has one entry)."""
        summaries = self._summaries()
        write_text(self.root / "metrics.jsonl", "".join(json.dumps({"iteration": s["iteration"], **_flat(s)}) + "\n"
                                                        for s in summaries))
        if is_main_process():
            shutil.rmtree(self.root / "tensorboard", ignore_errors=True)
            _tensorboard(self.root, summaries)


def prompt_is_sane(text: str, settings) -> bool:
    """Self-instruct filter: a length in [min_chars, max_chars] and mostly ASCII letters and spaces."""
    if not settings.min_chars <= len(text) <= settings.max_chars:
        return False
    letters = sum(ch.isascii() and (ch.isalpha() or ch.isspace()) for ch in text)
    return letters / len(text) >= settings.min_letter_fraction and "<task" not in text.lower()


def held_out_split(rows: Sequence[dict], fraction: float, seed: int, iteration: int) -> tuple[list[int], list[int]]:
    """(indices trained on, indices held out) of an iteration's DPO pairs (actor and judge pairs together).

    Pairs are held out by prompt: all pairs of a held-out prompt (its actor pair and its judge pair) go
    together, so no held-out pair shares a question with a trained one. round(fraction x prompts) prompts
    are drawn by a seeded permutation over the prompts in order of first appearance; at least one once
    the iteration has MIN_PAIRS_TO_HOLD_OUT pairs, never all of them, none below that. The split is a
    function of (seed, iteration, the rows' prompt ids and their order) only."""
    groups = list(dict.fromkeys(r["prompt_id"] for r in rows))
    if fraction <= 0 or len(rows) < MIN_PAIRS_TO_HOLD_OUT or len(groups) < 2:
        return list(range(len(rows))), []
    count = min(max(1, math.floor(fraction * len(groups) + 0.5)), len(groups) - 1)
    drawn = np.random.default_rng(_seed(seed, "dpo_held_out", iteration)).permutation(len(groups))[:count]
    held_ids = {groups[int(i)] for i in drawn}
    held = [i for i, r in enumerate(rows) if r["prompt_id"] in held_ids]
    return [i for i in range(len(rows)) if rows[i]["prompt_id"] not in held_ids], held


def dpo_figures(per_pair: dict[str, np.ndarray], seed: int) -> dict:
    """Mean DPO loss, reward accuracy (chosen reward above the rejected one; a tie counts 0.5) and reward
    margin of a set of pairs, each with its 95% percentile-bootstrap interval over the pairs."""
    from mrjax.stats import bootstrap_mean_interval

    margins = np.asarray(per_pair["rewards/margins"], np.float64)
    values = {"loss": np.asarray(per_pair["loss"], np.float64), "accuracy": (margins > 0) + 0.5 * (margins == 0),
              "margin": margins}
    out: dict[str, Any] = {"pairs": int(margins.size)}
    for name, v in values.items():
        low, high = bootstrap_mean_interval(v, seed=seed)
        out[name], out[f"{name}_low"], out[f"{name}_high"] = float(np.mean(v)), low, high
    return out


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


def iteration_summary(t: int, where: Path, judge_training: bool) -> dict:
    """The iteration's figures, counted from its files and read from its stage markers."""
    done = stage_markers(where)
    responses = jsonl_objects(where / "responses.jsonl")
    summary: dict[str, Any] = {
        "iteration": t,
        "prompts": _count_lines(where / "prompts.jsonl"),
        "responses": len(responses),
        "duplicates_dropped": done["responses"]["duplicates_dropped"],
        "empty_dropped": done["responses"]["empty_dropped"],
        "judgments": _count_lines(where / "judgments.jsonl"),
        "valid_judgments": done["judgments"]["valid"],
        "judge_parse_rate": done["judgments"]["judge_parse_rate"],
        "score_mean": done["judgments"]["score_mean"],
        "score_std": done["judgments"]["score_std"],
        "actor_pairs": _count_lines(where / "actor_pairs.jsonl"),
        "rho": done["actor_pairs"]["rho"],
        "judge_pairs": _count_lines(where / "judge_pairs.jsonl") if judge_training else 0,
        "meta_judgments": _count_lines(where / "meta_judgments.jsonl") if judge_training else 0,
        "meta_judge_parse_rate": done["meta_judgments"]["meta_judge_parse_rate"] if judge_training else None,
        "omega1": done["judge_pairs"]["omega1"] if judge_training else None,
        "omega2": done["judge_pairs"]["omega2"] if judge_training else None,
        "mean_response_chars": mean_or_none([len(r["response"]) for r in responses]),
        "dpo_pairs": done["train"].get("pairs", 0),
        "dpo_steps": done["train"].get("steps", 0),
        "dpo_loss": done["train"].get("loss_mean"),
        "dpo_accuracy": done["train"].get("rewards/accuracies_mean"),
        "dpo_margin": done["train"].get("rewards/margins_mean"),
        # Pairs never trained on, scored by M_{t-1} and M_t; the trained pairs scored by M_t (dpo_figures).
        "dpo_held_out_pairs": done["train"].get("held_out_pairs", 0),
        "dpo_held_out_before": done["train"].get("held_out_before"),
        "dpo_held_out_after": done["train"].get("held_out_after"),
        "dpo_train_after": done["train"].get("train_after"),
        "generated_tokens": sum(done[s].get("tokens", 0) for s in ("responses", "judgments", "meta_judgments")
                                if s in done),
        "wall_s": {name: info["wall_s"] for name, info in sorted(done.items()) if name != "summary"},
    }
    return summary


def _flat(summary: dict) -> dict:
    """One level: a nested dict's figures as "name/figure" (wall_s/judgments, dpo_held_out_after/accuracy)."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _tensorboard(root: Path, summaries: list[dict]) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(root / "tensorboard")) as writer:
        for summary in summaries:
            for key, value in _flat(summary).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                    writer.add_scalar(f"iteration/{key}", value, summary["iteration"])


def _mean_interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The 95% bootstrap interval of mean(values), or (None, None) with no values."""
    from mrjax.stats import bootstrap_mean_interval

    return bootstrap_mean_interval(values) if len(values) else (None, None)


def _figures(marker: dict) -> dict:
    """A stage marker's figures, without its file records."""
    return {k: v for k, v in marker.items() if k not in ("inputs", "outputs")}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


TABLE_ROWS = (
    ("prompts", "prompts"), ("responses", "responses"), ("duplicates dropped", "duplicates_dropped"),
    ("judgments", "judgments"), ("judge parse rate", "judge_parse_rate"), ("score mean", "score_mean"),
    ("score std", "score_std"), ("actor pairs", "actor_pairs"), ("meta-judgments", "meta_judgments"),
    ("meta-judge parse rate", "meta_judge_parse_rate"), ("omega1 / omega2", None), ("judge pairs", "judge_pairs"),
    ("mean response chars", "mean_response_chars"), ("DPO loss", "dpo_loss"), ("DPO accuracy", "dpo_accuracy"),
    ("DPO margin", "dpo_margin"),
)


def _interval(figures: dict, name: str) -> str:
    return f"{_fmt(figures[name])} [{_fmt(figures[name + '_low'])}, {_fmt(figures[name + '_high'])}]"


def format_table(summary: dict) -> str:
    lines = [f"iteration {summary['iteration']}"]
    for label, key in TABLE_ROWS:
        value = (f"{_fmt(summary['omega1'])} / {_fmt(summary['omega2'])}" if key is None else _fmt(summary[key]))
        lines.append(f"  {label:<24}{value}")
    before, after = summary.get("dpo_held_out_before"), summary.get("dpo_held_out_after")
    if before and after:
        lines.append(f"  {'held-out DPO pairs':<24}{summary['dpo_held_out_pairs']} (before -> after [95% interval])")
        for name in ("loss", "accuracy", "margin"):
            lines.append(f"  {'held-out ' + name:<24}{_fmt(before[name])} -> {_interval(after, name)}")
    trained = summary.get("dpo_train_after")
    if trained:
        lines.append(f"  {'trained pairs, after':<24}" + ", ".join(f"{name} {_interval(trained, name)}"
                                                                  for name in ("loss", "accuracy", "margin")))
    lines.append("  wall time (s)           " + ", ".join(f"{k} {v:.1f}" for k, v in summary["wall_s"].items()))
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    import sys

    print(format_table(summary), file=sys.stderr, flush=True)


def run_loop(config: Config, progress: bool = True, force_config: bool = False,
             report: Callable[[Path], dict] | None = None, checked: dict | None = None) -> LoopResult:
    """Run (or resume) the Meta-Rewarding / Self-Rewarding loop of ``config`` in ``config.run_dir``;
    ``report`` (e.g. ``mrjax.eval.write_report``) is called with the run directory after each iteration;
    ``checked`` is ``check_config(config)``'s result when the caller has it (it is not computed twice)."""
    return MetaRewardingRun(config, progress=progress, force_config=force_config, report=report).run(checked)


__all__ = ["LoopResult", "MetaRewardingRun", "check_config", "config_changes", "format_table", "iteration_summary",
           "prompt_is_sane", "run_loop"]
