"""Check a config without loading weights: ``python -m mrjax.train --config X.yaml --dry-run``.

Validates every setting and data file the run would read, builds the mesh and the abstract
model (``jax.eval_shape``: shapes and shardings, no parameter memory), and reports the
parameter count and the bytes of parameters and optimizer state per device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mrjax.config import Config, ConfigError

log = logging.getLogger(__name__)


def model_config(name: str):
    """The LlamaConfig of a named model, an HF directory (config.json) or a GGUF (its header), no weights read."""
    from mrjax.model import registry, weights

    if name in registry.RANDOM_CONFIGS:
        return registry.RANDOM_CONFIGS[name]
    path = registry.embedded_gguf_path() if name == "smollm2-135m-instruct" else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return weights.gguf_source(path)[0]
    if path.is_dir():
        import json

        config_file = path / "config.json"
        if not config_file.is_file():
            raise weights.WeightsError(f"{path}: no config.json (not an HF checkpoint directory)")
        return weights.config_from_hf(json.loads(config_file.read_text()), str(config_file))
    raise FileNotFoundError(f"model {name!r}: no such file or directory, and not a named model "
                            f"({', '.join(registry.NAMED_MODELS)})")


def dry_run(config: Config) -> dict[str, Any]:
    from mrjax.mesh import mesh_from_settings
    from mrjax.model.pretrained import _dtype, param_shardings
    from mrjax.model.llama import Llama

    facts: dict[str, Any] = {"mode": config.mode, "run_dir": config.run_dir}
    if config.mode in ("meta_rewarding", "self_rewarding"):
        from mrjax.loop import check_config

        facts.update(check_config(config))
    else:
        from mrjax.data import read_rows

        if not config.train.pairs:
            raise ConfigError("config key 'train.pairs' is empty: name the training file")
        facts["train_rows"] = len(read_rows(config.train.pairs, config.mode))
    c = model_config(config.model.name)
    longest = max(config.train.max_length, config.eft.max_length if config.eft.enabled else 0)
    if longest > c.max_position_embeddings:
        raise ConfigError(f"train/eft max_length {longest} exceeds the model's {c.max_position_embeddings} positions")
    try:
        mesh = mesh_from_settings(config.mesh)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module = Llama(c, dtype=_dtype(config.model.dtype), param_dtype=_dtype(config.model.param_dtype))
    tokens = jax.ShapeDtypeStruct((1, 1), np.int32)
    abstract = jax.eval_shape(lambda rng: module.init(rng, tokens), jax.random.key(0))["params"]
    leaves = jax.tree.leaves(jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, abstract,
                                          is_leaf=lambda x: hasattr(x, "names")))
    shardings = jax.tree.leaves(param_shardings(c, mesh))
    count = sum(int(np.prod(x.shape)) for x in leaves)
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, shardings))
    per_device_f32 = sum(int(np.prod(s.shard_shape(x.shape))) * 4 for x, s in zip(leaves, shardings))
    facts.update({
        "model": config.model.name, "parameters": count, "layers": c.num_layers, "hidden": c.hidden_size,
        "mesh": dict(mesh.shape), "devices": mesh.size,
        "param_bytes_per_device": per_device,
        "adam_state_bytes_per_device": 2 * per_device_f32,
        "dtype": config.model.dtype, "remat": config.model.remat,
    })
    from mrjax.model import registry

    if config.model.name in registry.RANDOM_CONFIGS and c.vocab_size != 49152:
        facts["warning"] = (f"{config.model.name!r} is a random-weight shape without a tokenizer: a real run needs "
                            "model.name set to an HF checkpoint directory (config.json, safetensors, tokenizer)")
        log.warning("dry run: %s", facts["warning"])
    for key, value in facts.items():
        log.info("dry run: %s = %s", key, value)
    log.info("dry run: the config is valid; nothing was loaded or trained")
    return facts


__all__ = ["dry_run", "model_config"]
