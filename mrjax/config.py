"""Every setting of mrjax as frozen dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/smollm2.yaml", ["train.learning_rate=1e-6", "mesh.tensor=4"])

Unknown keys and values of the wrong type are errors that name the dotted key.
Defaults follow the method (docs/method.md); values marked *(uncertain)* there are plain fields here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from mrjax.sampling import SamplingConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


REMAT_POLICIES = ("full", "dots")
DTYPES = ("float32", "bfloat16")  # float16 is not supported: its range overflows in Llama's activations
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
MODES = ("meta_rewarding", "self_rewarding", "dpo", "sft")
JUDGE_SCORES = ("parse", "expected")
PROMPT_SOURCES = ("seed", "jsonl", "self_instruct", "tfds")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    # A registry name (smollm2-135m-instruct, tiny-random, llama3-8b), an HF checkpoint dir or a .gguf path.
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # stored parameter dtype; optimizer state is always float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    # What remat keeps: "full" recomputes the whole layer (least memory); "dots" keeps the
    # matmul outputs and recomputes the cheap elementwise work (about no-remat speed, less memory).
    remat_policy: str = "full"

    def __post_init__(self):
        _check(self.remat_policy in REMAT_POLICIES, "model.remat_policy",
               f"must be one of {', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES, f"model.{name}",
                   f"must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    # Sizes of the mesh axes; -1 takes the devices that are left.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    kind: str = "dpo"  # dpo | sft
    pairs: str = ""  # JSONL of {"prompt","chosen","rejected"} (dpo) or {"prompt","completion"} (sft)
    eval_pairs: str = ""
    max_length: int = 1024  # prompt + completion tokens
    batch_size: int = 32  # global batch (pairs per optimizer step)
    grad_accum: int = 1  # micro-batches per step; batch_size must be a multiple of it
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide
    learning_rate: float = 5e-6
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW decay; never applied to norm scales
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 = off
    save_every: int = 100  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # kept-last-N
    log_every: int = 1
    eval_every: int = 0  # evaluate eval_pairs every N steps; 0 = only at the end
    resume: bool = True  # continue from the latest checkpoint in run_dir/checkpoints
    shuffle: bool = True  # seed-shuffled order, a new permutation every epoch
    # Training rows pad up to a multiple of this many tokens (one compiled program per group of rows whatever
    # its lengths, so coarser padding only adds work).
    pad_multiple: int = 16
    max_logits_mb: int = 1024  # largest float32 logits block computed at once; larger batches chunk the sequence
    # Compute dtype of the training steps and their log-probs ("": model.dtype; "auto": bfloat16 where the
    # backend multiplies bfloat16 fast (TPU, GPU, a CPU with AMX or AVX-512 BF16), else float32). bfloat16:
    # bfloat16 matmuls with float32 accumulation and float32 parameters and optimizer state.
    dtype: str = ""
    # In bfloat16, each float32 weight enters the matmuls as two bfloat16 parts (~16 bits), so updates
    # smaller than a bfloat16 step count; it doubles the forward's weight products.
    split_weights: bool = False

    def __post_init__(self):
        _check(self.kind in ("dpo", "sft"), "train.kind", f"must be 'dpo' or 'sft', got {self.kind!r}")
        _check(self.schedule in ("cosine", "linear", "constant"), "train.schedule",
               f"must be cosine, linear or constant, got {self.schedule!r}")
        _check(self.dtype in ("", "auto") + tuple(DTYPES), "train.dtype",
               f"must be empty (the model's), auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "grad_accum", "epochs", "save_every", "keep_checkpoints",
                     "log_every", "pad_multiple", "max_logits_mb"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "learning_rate", "weight_decay", "max_grad_norm", "adam_eps"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must not be negative, got {getattr(self, name)}")
        _check(0 <= self.warmup_ratio <= 1, "train.warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _check(self.batch_size % self.grad_accum == 0, "train.batch_size",
               f"({self.batch_size}) must be a multiple of train.grad_accum ({self.grad_accum})")
        _check(self.max_length >= 2, "train.max_length", "must leave room for a prompt and a completion token")


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: conservative DPO, in [0, 0.5)
    share_prompt: bool = True  # run each prompt once and both completions from its KV cache

    def __post_init__(self):
        _check(self.beta > 0, "dpo.beta", f"must be positive, got {self.beta}")
        _check(self.loss_type in LOSS_TYPES, "dpo.loss_type",
               f"must be sigmoid, ipo or hinge, got {self.loss_type!r}")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class IterationSettings:
    """The Meta-Rewarding iterations (docs/method.md, steps 1-7)."""

    iterations: int = 4
    prompts_per_iteration: int = 5000
    responses_per_prompt: int = 7  # K
    judgments_per_response: int = 11  # N
    actor_temperature: float = 0.8
    actor_top_p: float = 0.95
    actor_max_new_tokens: int = 512
    judge_temperature: float = 0.8
    judge_top_p: float = 0.95
    judge_max_new_tokens: int = 256
    meta_judge_temperature: float = 0.8
    meta_judge_top_p: float = 0.95
    meta_judge_max_new_tokens: int = 384
    # Per iteration; an iteration past the end of a list uses its last value.
    rho: tuple[float, ...] = (0.0, 0.32, 0.32, 0.4)  # length control (uncertain)
    max_chosen_chars: tuple[int, ...] = (2500, 0, 0, 0)  # 0 = off (uncertain)
    judge_training_iterations: tuple[int, ...] = (1, 2)
    max_judgment_chars: tuple[int, ...] = (1100, 1000)  # per judge-training iteration, 0 = off (uncertain)
    # How a judgment becomes a score: "parse" reads the last "Score: X" (the papers); "expected"
    # is the probability-weighted mean over "0".."5" after the judgment (never unparseable).
    judge_score: str = "parse"
    # How a meta-judgment becomes a verdict: "parse" reads "Winner: Judgement A|B"; "expected"
    # compares log p(A) - log p(B) after "Winner: Judgement" with its median over the calls of the
    # same response (calibrated, so a constant position preference does not decide every verdict).
    meta_judge_verdict: str = "parse"
    drop_empty_responses: bool = True  # whitespace-only responses are dropped (counted) like duplicates
    shard_size: int = 64  # prompts (actor), responses (judge), selected responses (meta-judge) per shard
    # Share of an iteration's prompts whose DPO pairs (actor and judge pairs together) are held out of
    # training and scored before and after it; 0 = train on every pair (mrjax.loop.held_out_split).
    dpo_held_out: float = 0.15

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "responses_per_prompt", "judgments_per_response",
                     "actor_max_new_tokens", "judge_max_new_tokens", "meta_judge_max_new_tokens", "shard_size"):
            _check(getattr(self, name) >= 1, f"iteration.{name}", f"must be at least 1, got {getattr(self, name)}")
        _check(0 <= self.dpo_held_out < 1, "iteration.dpo_held_out", f"must be in [0, 1), got {self.dpo_held_out}")
        _check(self.responses_per_prompt >= 2, "iteration.responses_per_prompt",
               f"must be at least 2 (a pair needs two responses), got {self.responses_per_prompt}")
        for name in ("actor_temperature", "judge_temperature", "meta_judge_temperature"):
            _check(getattr(self, name) >= 0, f"iteration.{name}", f"must not be negative, got {getattr(self, name)}")
        for name in ("actor_top_p", "judge_top_p", "meta_judge_top_p"):
            _check(0 < getattr(self, name) <= 1, f"iteration.{name}", f"must be in (0, 1], got {getattr(self, name)}")
        _check(self.judge_score in JUDGE_SCORES, "iteration.judge_score",
               f"must be one of {', '.join(JUDGE_SCORES)}, got {self.judge_score!r}")
        _check(self.meta_judge_verdict in JUDGE_SCORES, "iteration.meta_judge_verdict",
               f"must be one of {', '.join(JUDGE_SCORES)}, got {self.meta_judge_verdict!r}")
        for name in ("rho", "max_chosen_chars", "max_judgment_chars"):
            _check(len(getattr(self, name)) >= 1, f"iteration.{name}", "needs at least one value")
        for i, r in enumerate(self.rho):
            _check(0 <= r <= 1, f"iteration.rho[{i}]", f"must be in [0, 1], got {r}")
        for name in ("max_chosen_chars", "max_judgment_chars"):
            for i, v in enumerate(getattr(self, name)):
                _check(v >= 0, f"iteration.{name}[{i}]", f"must not be negative (0 = off), got {v}")
        bad = [t for t in self.judge_training_iterations if not 1 <= t <= self.iterations]
        _check(not bad, "iteration.judge_training_iterations",
               f"names iteration {bad[0] if bad else ''} but the run has iterations 1..{self.iterations}")
        _check(len(set(self.judge_training_iterations)) == len(self.judge_training_iterations),
               "iteration.judge_training_iterations", "lists an iteration twice")

    def per_iteration(self, name: str, t: int):
        """The value of a per-iteration list for iteration t (1-based); the last value repeats."""
        values = getattr(self, name)
        return values[min(t, len(values)) - 1]

    def judgment_chars_limit(self, t: int) -> int:
        """max_judgment_chars for judge-training iteration t (indexed by its place in the list)."""
        place = sorted(self.judge_training_iterations).index(t) + 1
        return self.per_iteration("max_judgment_chars", place)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """Where the iterations' prompts come from (docs/method.md, step 1)."""

    # seed: the built-in pool shipped in the package; jsonl: a file of {"prompt"} or {"messages"};
    # self_instruct: the model writes new prompts from 8 examples of the seed pool (or `path`);
    # tfds: a TensorFlow Datasets dataset by name (the tfds extra).
    source: str = "seed"
    path: str = ""  # the JSONL file (source jsonl; optional example pool for self_instruct)
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_field: str = "prompt"
    held_out: int = 16  # prompts kept out of training (written to prompts/held_out.jsonl) for evaluation
    # A prompt too long for a role's context budget (its tokens + the new tokens of every role that sees
    # it) is an error naming the file and line; true drops such prompts and counts them in the pool.
    drop_too_long: bool = False
    shuffle: bool = True  # seeded shuffle of the pool before it is split into held-out and iterations
    min_chars: int = 10  # self-instruct sanity filter: length in characters ...
    max_chars: int = 600
    min_letter_fraction: float = 0.6  # ... and the share of ASCII letters and spaces (language sanity)
    self_instruct_temperature: float = 0.6
    self_instruct_top_p: float = 0.9
    self_instruct_max_new_tokens: int = 96
    self_instruct_attempts: float = 3.0  # generation calls per prompt needed, at most, before giving up

    def __post_init__(self):
        _check(self.source in PROMPT_SOURCES, "prompts.source",
               f"must be one of {', '.join(PROMPT_SOURCES)}, got {self.source!r}")
        _check(self.source != "jsonl" or bool(self.path), "prompts.path", "must name a JSONL file when source is jsonl")
        _check(self.source != "tfds" or bool(self.tfds_name), "prompts.tfds_name",
               "must name a dataset when source is tfds")
        _check(self.held_out >= 0, "prompts.held_out", f"must not be negative, got {self.held_out}")
        _check(1 <= self.min_chars <= self.max_chars, "prompts.min_chars",
               f"must be between 1 and prompts.max_chars ({self.max_chars}), got {self.min_chars}")
        _check(0 <= self.min_letter_fraction <= 1, "prompts.min_letter_fraction", "must be in [0, 1]")
        _check(self.self_instruct_attempts >= 1, "prompts.self_instruct_attempts", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class EFTSettings:
    """Evaluation fine-tuning before iteration 1: SFT on judge-format (and meta-judge-format) rows."""

    enabled: bool = True
    judge_rows: str = "mrjax/data/eft_judge_rows.jsonl"  # {"question","response","justification","score"}
    meta_judge_rows: str = "mrjax/data/eft_meta_judge_rows.jsonl"  # {..., "judgment_a","judgment_b","explanation","winner"}; "" = none
    eval_judge_rows: str = "mrjax/data/eft_judge_eval_rows.jsonl"  # held out: parse rates before/after
    eval_meta_judge_rows: str = "mrjax/data/eft_meta_judge_eval_rows.jsonl"
    max_judge_rows: int = 0  # 0 = all rows of the file
    max_meta_judge_rows: int = 0
    eval_rows: int = 16  # held-out rows per role whose generated judgments are parsed before and after EFT
    learning_rate: float = 1e-4
    batch_size: int = 8
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide
    max_length: int = 1024
    warmup_ratio: float = 0.1
    schedule: str = "cosine"

    def __post_init__(self):
        _check(bool(self.judge_rows) or not self.enabled, "eft.judge_rows", "must name a file when EFT is enabled")
        for name in ("max_judge_rows", "max_meta_judge_rows", "eval_rows", "max_steps"):
            _check(getattr(self, name) >= 0, f"eft.{name}", f"must not be negative, got {getattr(self, name)}")
        for name in ("batch_size", "epochs", "max_length"):
            _check(getattr(self, name) >= 1, f"eft.{name}", f"must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Config:
    # meta_rewarding: EFT + the iterations (the main job); self_rewarding: the same loop without the
    # meta-judge (actor pairs at rho = 0, ties discarded); dpo / sft: train once on train.pairs.
    mode: str = "meta_rewarding"
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSettings = ModelSettings()
    mesh: MeshSettings = MeshSettings()
    # mrjax.sampling's own settings type: batch_size (decode slots) and the settings every role shares
    # (top_k, min_new_tokens, top_p_candidates); each role sets its own n, seed, temperature, top_p and
    # max_new_tokens (iteration.*), mode dpo/sft's plan reads max_new_tokens.
    sampling: SamplingConfig = SamplingConfig()
    train: TrainSettings = TrainSettings()
    dpo: DPOSettings = DPOSettings()
    iteration: IterationSettings = IterationSettings()
    prompts: PromptSettings = PromptSettings()
    eft: EFTSettings = EFTSettings()

    def __post_init__(self):
        _check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") \
                from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw.pop("pinned_inputs", None)  # a run directory's config.yaml records its input files' hashes there
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    return from_dict(Config, raw)


# Keys of earlier versions, with what replaced them (a clearer error than an unknown key).
REPLACED_KEYS = {
    "train.min_bucket": "train.pad_multiple (training rows pad up to a multiple of it; 16 by default)",
}


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown and f"{prefix}{unknown[0]}" in REPLACED_KEYS:
        raise ConfigError(f"config key '{prefix}{unknown[0]}' was replaced by {REPLACED_KEYS[prefix + unknown[0]]}")
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys in this section: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for writing back to YAML."""
    out = dataclasses.asdict(config)

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(out)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(items))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")


__all__ = [
    "Config",
    "ConfigError",
    "DPOSettings",
    "EFTSettings",
    "IterationSettings",
    "MeshSettings",
    "ModelSettings",
    "PromptSettings",
    "TrainSettings",
    "from_dict",
    "load_config",
    "to_dict",
]
