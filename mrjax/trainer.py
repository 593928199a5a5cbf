"""DPO and SFT trainers: files and loops around the jitted steps of ``mrjax.train_step``.

    from mrjax.trainer import Trainer, run_training
    result = run_training(config, model=model, tokenizer=tok, data="pairs.jsonl")   # kind from config.train.kind
    result.model                                                                   # the trained Model

A DPO run first computes the reference log-probs of every pair (and eval pair)
with the model it was given — the frozen reference — and stores them in
``run_dir/reference_logps.npz``; training then needs only the policy. The run
directory holds ``checkpoints/`` (orbax), ``metrics.jsonl``, ``tensorboard/`` and
``train_config.yaml``. With ``train.resume`` a run continues exactly from its
latest checkpoint: same parameters, optimizer state, step and data position.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrjax import train_step as ts
from mrjax.checkpoint import Checkpointer
from mrjax.config import Config, ConfigError, to_dict
from mrjax.data import (Batcher, Examples, batch_groups, load_examples, sequential_batches, steps_per_epoch,
                        write_text)
from mrjax.mesh import agreed, batch_ways, fetch, is_main_process
from mrjax.model.llama import REMAT_POLICIES, remat_policy
from mrjax.model.pretrained import training_dtype

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict, np.ndarray], None]  # (steps done, metrics, example indices of the step)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not belong to this run)."""


@dataclasses.dataclass
class TrainResult:
    model: Any  # mrjax Model with the trained (float32) parameters
    step: int
    metrics: dict[str, float]  # the last step's training metrics
    eval_metrics: dict[str, float]
    run_dir: Path
    eval_pair_metrics: dict[str, np.ndarray] | None = None  # DPO: the DPO_METRICS of each eval pair, after training


class Trainer:
    """Trains ``model`` with DPO or SFT as ``config`` says. The caller's parameters are never modified."""

    def __init__(
        self,
        config: Config,
        model: Any,
        tokenizer: Any,
        kind: str | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
        callbacks: Sequence[StepCallback] = (),
        donate_model: bool = False,
    ):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        # With donate_model the trainer consumes model.params once the reference log-probs are computed
        # (model.params is set to None): the frozen reference is not held in memory while training.
        self.donate_model = donate_model
        self.train_settings, self.dpo = config.train, config.dpo
        self.kind = kind or config.train.kind
        if self.kind not in ("dpo", "sft"):
            raise ConfigError(f"config key 'train.kind' must be 'dpo' or 'sft', got {self.kind!r}")
        if config.train.max_length > model.config.max_position_embeddings:
            raise ConfigError(
                f"config key 'train.max_length' ({config.train.max_length}) exceeds the model's context "
                f"({model.config.max_position_embeddings} positions)"
            )
        self.run_dir = Path(run_dir if run_dir is not None else config.run_dir)
        self.progress, self.callbacks = progress, list(callbacks)
        self.mesh = model.mesh
        # The module the steps and log-probs run (train.dtype may differ from the sampler's model.dtype).
        dtype = training_dtype(config.train.dtype, model.module.dtype)
        split = bool(config.train.split_weights) and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
        self.module = (model.module if dtype == model.module.dtype and split == model.module.split_weights
                       else model.module.clone(dtype=dtype, split_weights=split))
        if dtype != model.module.dtype:
            log.info("training steps compute in %s (train.dtype=%s); the model samples in %s", jnp.dtype(dtype).name,
                     config.train.dtype, jnp.dtype(model.module.dtype).name)
        if (self.module.remat and self.module.remat_policy == "dots"
                and remat_policy("dots", dtype) is REMAT_POLICIES["full"]):
            log.info("remat 'dots' in bfloat16 on XLA:CPU recomputes each layer (faster there: see remat_policy)")
        self.micro_batch = config.train.batch_size // config.train.grad_accum
        self.batch_shards = ts.packing_shards(self.mesh, self.micro_batch)  # real tokens pack shard by shard
        if self.batch_shards != batch_ways(self.mesh):
            log.warning("micro-batch of %d rows does not divide over data*fsdp=%d devices: batches are replicated",
                        self.micro_batch, batch_ways(self.mesh))
        self._logps = _memo(
            ("logps", self.module, self.mesh, self.kind, self.dpo.share_prompt, config.train.max_logits_mb),
            lambda: ts.make_logps_fn(self.module, self.mesh, model.param_shardings, 2 if self.kind == "dpo" else 1,
                                     self.dpo.share_prompt, config.train.max_logits_mb),
        )

    # ------------------------------------------------------------ data

    def load(self, path: str | Path) -> Examples:
        return load_examples(path, self.tokenizer, self.kind, self.train_settings.max_length)

    def _sequential(self, examples: Examples):
        return sequential_batches(examples, self.micro_batch, self.tokenizer.pad_id, self.train_settings.max_length,
                                  self.train_settings.pad_multiple, self.batch_shards)

    def sequence_logps(self, examples: Examples, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs and token counts [n, r] of every example (default: the model's params)."""
        params = self.model.params if params is None else params
        sums = np.zeros((len(examples), examples.repeats), np.float32)
        counts = np.zeros_like(sums)
        for batch, idx in self._sequential(examples):
            s, c = fetch(self._logps(params, batch))
            sums[idx], counts[idx] = s[0, : len(idx)], c[0, : len(idx)]
        return sums, counts

    def attach_reference(self, examples: Examples, name: str) -> Examples:
        """Reference log-probs of a DPO set, computed once with the model given to the trainer
        (or read from the pair file / this run's cache) and stored with the examples."""
        if examples.ref_logps is not None:
            return examples
        cache = self.run_dir / "reference_logps.npz"
        key = f"{name}:{examples.fingerprint}:{self.train_settings.max_length}:{_params_fingerprint(self.model.params)}"
        stored = dict(np.load(cache)) if agreed(cache.is_file()) else {}
        if f"{name}_key" in stored and str(stored[f"{name}_key"]) == key:
            examples.ref_logps = stored[f"{name}_logps"].astype(np.float32)
            return examples
        t0 = time.perf_counter()
        examples.ref_logps, _ = self.sequence_logps(examples)
        log.info("reference log-probs of %d %s pairs in %.1fs", len(examples), name, time.perf_counter() - t0)
        stored[f"{name}_key"], stored[f"{name}_logps"] = np.asarray(key), examples.ref_logps
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **stored)
            tmp.replace(cache)
        return examples

    # ------------------------------------------------------------ evaluation

    def evaluate(self, examples: Examples, params: dict | None = None) -> dict[str, float]:
        """Held-out metrics: DPO → the DPO metrics over all pairs; SFT → mean token NLL (``loss``)."""
        if self.kind == "dpo":
            return _means(self.pair_metrics(examples, params))
        sums, counts = self.sequence_logps(examples, params)
        nll = -float(sums.sum()) / max(float(counts.sum()), 1.0)
        return {"loss": nll, "num_tokens": float(counts.sum())}

    def pair_metrics(self, examples: Examples, params: dict | None = None) -> dict[str, np.ndarray]:
        """The ``DPO_METRICS`` of every pair [n] (default params: the model's), against the pairs'
        reference log-probs; per pair, so callers can resample them."""
        if examples.ref_logps is None:
            raise ValueError("pair_metrics: DPO examples need reference log-probs (Trainer.attach_reference)")
        sums, counts = self.sequence_logps(examples, params)
        losses, cr, rr = ts.dpo_pair_terms(jnp.asarray(sums), jnp.asarray(counts), jnp.asarray(examples.ref_logps),
                                           self.dpo)
        per_pair = ts.dpo_pair_metrics(losses, cr, rr, sums[:, 0], sums[:, 1])
        return {name: np.asarray(value) for name, value in per_pair.items()}

    # ------------------------------------------------------------ training

    def total_steps(self, examples: Examples) -> int:
        t = self.train_settings
        if t.max_steps > 0:
            return t.max_steps
        return t.epochs * steps_per_epoch(batch_groups(examples, t.batch_size, t.max_length, t.pad_multiple), t.batch_size)

    def train(
        self,
        data: str | Path | Examples | None = None,
        eval_data: str | Path | Examples | None = None,
        resume: bool | None = None,
    ) -> TrainResult:
        t = self.train_settings
        data = data if data is not None else t.pairs
        eval_data = eval_data if eval_data is not None else (t.eval_pairs or None)
        if not data:
            raise ConfigError("config key 'train.pairs' is empty: name the training file")
        resume = t.resume if resume is None else resume
        examples = data if isinstance(data, Examples) else self.load(data)
        eval_examples = eval_data if (eval_data is None or isinstance(eval_data, Examples)) else self.load(eval_data)
        if self.kind == "dpo":
            examples = self.attach_reference(examples, "train")
            if eval_examples is not None:
                eval_examples = self.attach_reference(eval_examples, "eval")

        total = self.total_steps(examples)
        params_abstract = jax.eval_shape(lambda p: p, self.model.params)

        def build():
            tx, schedule = ts.make_optimizer(t, total)
            shardings = ts.state_shardings(tx, self.model.param_shardings, params_abstract, self.mesh)
            step = ts.make_train_step(self.kind, self.module, tx, schedule, shardings, self.mesh, self.dpo,
                                      t.max_logits_mb)
            return tx, shardings, step

        # Trainers with the same model, mesh and settings share compiled steps (a resumed run, the next iteration).
        key = ("step", self.kind, self.module, self.mesh, t, self.dpo, total,
               tuple((jax.tree_util.keystr(path), x.shape, str(x.dtype))
                     for path, x in jax.tree_util.tree_flatten_with_path(params_abstract)[0]))
        tx, shardings, step_fn = _memo(key, build)
        self.step_fn = step_fn
        batcher = Batcher(examples, t.batch_size, t.grad_accum, self.config.seed, self.tokenizer.pad_id,
                          t.max_length, t.shuffle, t.pad_multiple, self.batch_shards)
        run_meta = {
            "kind": self.kind,
            "data_fingerprint": examples.fingerprint,
            "num_examples": len(examples),
            "total_steps": total,
            "batch_size": t.batch_size,
            "seed": self.config.seed,
        }

        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_config_snapshot(self.run_dir, self.config)
        checkpointer = Checkpointer(self.run_dir / "checkpoints", t.keep_checkpoints)
        writer = None
        try:
            latest = checkpointer.latest_step()
            if latest is not None and not resume:
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints (latest: step {latest}); set train.resume=true to "
                    "continue that run, or choose a new run_dir"
                )
            if latest is not None:
                meta = checkpointer.read_meta(latest)
                _check_resume(meta, run_meta, batcher, self.run_dir)
                if self.donate_model:
                    self._release_model()
                state, _ = checkpointer.restore(ts.abstract_state(shardings, tx, params_abstract), latest)
                start = latest
                log.info("resumed %s from step %d (epoch %d, batch %d)", self.run_dir, latest, meta["epoch"],
                         meta["batch"])
            else:
                state = ts.init_state(self.model.params, tx, shardings, donate=self.donate_model)
                if self.donate_model:
                    self.model.params = None
                start = 0
            # A finished run resumed (killed after its last checkpoint) evaluates again: its old final eval line goes.
            writer = _MetricsWriter(self.run_dir, start, drop_final_eval=start == total)
            state, last_metrics = self._loop(state, step_fn, batcher, start, total, checkpointer, writer, run_meta,
                                             eval_examples)
            eval_metrics, eval_pairs = {}, None
            if eval_examples is not None:
                if self.kind == "dpo":
                    eval_pairs = self.pair_metrics(eval_examples, state.params)
                    eval_metrics = _means(eval_pairs)
                else:
                    eval_metrics = self.evaluate(eval_examples, state.params)
                writer.write(total, {f"eval/{k}": v for k, v in eval_metrics.items()})
        finally:
            checkpointer.close()
            if writer is not None:
                writer.close()

        return TrainResult(self.model.with_params(state.params), total, last_metrics, eval_metrics, self.run_dir,
                           eval_pairs)

    def _release_model(self) -> None:
        for x in jax.tree.leaves(self.model.params):
            x.delete()
        self.model.params = None

    def _loop(self, state, step_fn, batcher: Batcher, start: int, total: int, checkpointer: Checkpointer,
              writer: "_MetricsWriter", run_meta: dict, eval_examples: Examples | None):
        from tqdm.auto import tqdm

        t = self.train_settings
        last_metrics: dict[str, float] = {}
        bar = tqdm(total=total, initial=start, desc=self.kind, disable=not (self.progress and is_main_process()),
                   dynamic_ncols=True)
        try:
            for step in range(start, total):
                batch, indices = batcher.batch(step)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = ts.numpy_metrics(metrics)  # fetching the scalars also waits for the step
                metrics["step_time_s"] = time.perf_counter() - t0
                done = step + 1
                bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
                if bad:
                    writer.write(done, metrics)
                    last_good = checkpointer.latest_step()
                    where = (f"the last good checkpoint (step {last_good}) in {checkpointer.directory} is intact"
                             if last_good is not None else "no checkpoint was written yet")
                    raise TrainingError(
                        f"step {done}: {bad[0]} is {metrics[bad[0]]} (non-finite); training stopped and this state "
                        f"was not saved; {where}. Lower train.learning_rate or check the data."
                    )
                last_metrics = metrics
                if done % t.log_every == 0 or done == total:
                    writer.write(done, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                if done % t.save_every == 0 or done == total:
                    position = batcher.position(done)
                    checkpointer.save(done, state, {**run_meta, "step": done, "epoch": position.epoch,
                                                    "batch": position.batch, "examples_seen": done * t.batch_size})
                if eval_examples is not None and t.eval_every and done % t.eval_every == 0 and done != total:
                    evaluated = self.evaluate(eval_examples, state.params)
                    writer.write(done, {f"eval/{k}": v for k, v in evaluated.items()})
                for callback in self.callbacks:
                    callback(done, metrics, indices)
        finally:
            bar.close()
        return state, last_metrics


def _means(per_pair: dict[str, np.ndarray]) -> dict[str, float]:
    return ts.numpy_metrics({name: jnp.mean(jnp.asarray(value)) for name, value in per_pair.items()})


@jax.jit
def _abs_sums(params: dict) -> dict:
    return jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), params)  # one program, not two per shape


def _params_fingerprint(params: dict) -> str:
    """A cheap identity of a model's weights (one reduction per tensor), so cached reference
    log-probs are never reused for a different reference model."""
    sums = jax.device_get(_abs_sums(params))
    return hashlib.sha256(np.asarray(jax.tree.leaves(sums), np.float64).tobytes()).hexdigest()[:16]


_MEMO: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_MEMO_SIZE = 8


def _memo(key: Any, build: Callable[[], Any]) -> Any:
    """A small LRU of built (and so compiled) step functions keyed by everything they depend on."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    _MEMO[key] = value = build()
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def _check_resume(meta: dict, run_meta: dict, batcher: Batcher, run_dir: Path) -> None:
    for key, value in run_meta.items():
        if key in meta and meta[key] != value:
            raise TrainingError(
                f"{run_dir}: the checkpoint was written with {key}={meta[key]!r} but this run has {value!r}; "
                "resume with the same data and settings, or choose a new run_dir"
            )
    position = batcher.position(meta["step"])
    if (position.epoch, position.batch) != (meta["epoch"], meta["batch"]):
        raise TrainingError(f"{run_dir}: checkpoint data position {meta['epoch']}/{meta['batch']} does not match "
                            f"step {meta['step']}")


def _write_config_snapshot(run_dir: Path, config: Config) -> None:
    import yaml

    write_text(run_dir / "train_config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))


class _MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, run_dir: Path, resume_step: int | None, drop_final_eval: bool = False):
        from tensorboardX import SummaryWriter

        self.enabled = is_main_process()  # the other processes of a multi-process job log nothing
        if not self.enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Drop what a killed run logged after the checkpoint it resumes from (and the final eval, redone).
            def kept(entry: dict) -> bool:
                step = entry.get("step", 0)
                if drop_final_eval and step == resume_step and all(k.startswith("eval/") for k in entry if k != "step"):
                    return False
                return step <= resume_step

            lines = [line for line in self.path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
            self.path.write_text("".join(line + "\n" for line in lines))
        if not resume_step:  # a fresh start: what an earlier attempt logged is gone from metrics.jsonl too
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        self.file = open(self.path, "a", encoding="utf-8")
        purge = resume_step + 1 if resume_step else None
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key if key.startswith("eval/") else f"train/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def build_trainer(
    config: Config,
    model: Any = None,
    tokenizer: Any = None,
    kind: str | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    callbacks: Sequence[StepCallback] = (),
    donate_model: bool = False,
) -> Trainer:
    """A Trainer for ``config``; loads ``config.model`` on ``config.mesh`` when no model is given
    (that model is then the trainer's own and its parameters are donated to training)."""
    if model is None:
        from mrjax.mesh import mesh_from_settings
        from mrjax.model.pretrained import load_pretrained

        try:
            mesh = mesh_from_settings(config.mesh)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        m = config.model
        model, loaded_tok = load_pretrained(m.name, mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                                            remat=m.remat, seed=config.seed, progress=progress,
                                            remat_policy=m.remat_policy)
        tokenizer = tokenizer or loaded_tok
        donate_model = True
    if tokenizer is None:
        raise ConfigError(f"model {config.model.name!r} has no tokenizer; training needs one")
    return Trainer(config, model, tokenizer, kind, run_dir, progress, callbacks, donate_model)


def run_training(
    config: Config,
    data: str | Path | Examples | None = None,
    model: Any = None,
    tokenizer: Any = None,
    kind: str | None = None,
    eval_data: str | Path | Examples | None = None,
    run_dir: str | Path | None = None,
    resume: bool | None = None,
    progress: bool = True,
    callbacks: Sequence[StepCallback] = (),
    donate_model: bool = False,
) -> TrainResult:
    """Build a DPO or SFT trainer from ``config`` and train on ``data`` (default ``config.train.pairs``).

    ``donate_model=True`` lets training consume ``model.params`` (set to None) instead of copying them.
    """
    trainer = build_trainer(config, model, tokenizer, kind, run_dir, progress, callbacks, donate_model)
    return trainer.train(data, eval_data, resume)


__all__ = ["TrainResult", "Trainer", "TrainingError", "build_trainer", "run_training"]
