"""Every setting of mrjax as frozen dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/smollm2.yaml", ["train.learning_rate=1e-6", "mesh.tensor=4"])

Unknown keys and values of the wrong type are errors that name the dotted key.
Defaults follow SPEC.md; values marked *(uncertain)* there are plain fields here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


REMAT_POLICIES = ("full", "dots")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    # Sizes of the mesh axes; -1 takes the devices that are left.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    batch_size: int = 32  # prompts*samples decoded together


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
    min_bucket: int = 16  # shortest padded segment; lengths pad to powers of two up to max_length
    max_logits_mb: int = 1024  # largest float32 logits block computed at once; larger batches chunk the sequence

    def __post_init__(self):
        _check(self.kind in ("dpo", "sft"), "train.kind", f"must be 'dpo' or 'sft', got {self.kind!r}")
        _check(self.schedule in ("cosine", "linear", "constant"), "train.schedule",
               f"must be cosine, linear or constant, got {self.schedule!r}")
        for name in ("max_length", "batch_size", "grad_accum", "epochs", "save_every", "keep_checkpoints",
                     "log_every", "min_bucket", "max_logits_mb"):
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
    """One Meta-Rewarding iteration (SPEC steps 1-5)."""

    iterations: int = 4
    prompts_per_iteration: int = 5000
    responses_per_prompt: int = 7  # K
    judgments_per_response: int = 11  # N
    actor_temperature: float = 0.8
    actor_top_p: float = 0.95
    judge_temperature: float = 0.8
    judge_top_p: float = 0.95
    rho: tuple[float, ...] = (0.0, 0.32, 0.32, 0.4)  # per iteration (uncertain)
    max_chosen_chars: tuple[int, ...] = (2500, 0, 0, 0)  # per iteration, 0 = off (uncertain)
    judge_training_iterations: tuple[int, ...] = (1, 2)
    max_judgment_chars: tuple[int, ...] = (1100, 1000)  # per judge-training iteration (uncertain)
    expected_score: bool = False  # probability-weighted judge score instead of parsing (beyond the paper)


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSettings = ModelSettings()
    mesh: MeshSettings = MeshSettings()
    sampling: SamplingSettings = SamplingSettings()
    train: TrainSettings = TrainSettings()
    dpo: DPOSettings = DPOSettings()
    iteration: IterationSettings = IterationSettings()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
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


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
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
    "IterationSettings",
    "MeshSettings",
    "ModelSettings",
    "SamplingSettings",
    "TrainSettings",
    "from_dict",
    "load_config",
    "to_dict",
]
