"""``load_pretrained``: a model (config + sharded params + jitted forward) and its tokenizer."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from mrjax import mesh as mesh_lib
from mrjax.model import registry, weights
from mrjax.model.llama import REMAT_POLICIES, Llama, LlamaConfig
from mrjax.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: Any) -> Any:
    """A dtype from its config name (float32 | bfloat16); a dtype passes through."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


def fast_bfloat16() -> bool:
    """Whether the default backend multiplies bfloat16 faster than float32: TPUs and GPUs, and CPUs with
    AMX or AVX-512 BF16 (read from /proc/cpuinfo; elsewhere XLA:CPU emulates bfloat16 products)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def training_dtype(name: str, model_dtype: Any) -> Any:
    """``train.dtype``'s dtype: empty for the model's, ``auto`` for bfloat16 where ``fast_bfloat16``."""
    if not name:
        return model_dtype
    if name == "auto":
        return jnp.bfloat16 if fast_bfloat16() else jnp.float32
    return resolve_dtype(name)


class Model:
    """A Llama model on a mesh: ``model(input_ids) -> float32 logits [B, T, vocab]``.

    ``params`` is a plain dict of (sharded) arrays; ``module.apply({"params": params}, ...)``
    is the pure function that samplers and trainers jit themselves.
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: dict,
        mesh: Mesh,
        dtype: Any = jnp.float32,
        remat: bool = False,
        remat_policy: str = "full",
    ):
        self.config, self.params, self.mesh = config, params, mesh
        self.dtype = resolve_dtype(dtype)
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {remat_policy!r}")
        self.module = Llama(config, dtype=self.dtype, param_dtype=_leaf_dtype(params), remat=remat, mesh=mesh,
                            remat_policy=remat_policy)

    def with_params(self, params: dict) -> "Model":
        """This model (config, mesh, compute dtype, remat) with other parameters."""
        return type(self)(self.config, params, self.mesh, self.dtype, self.module.remat, self.module.remat_policy)

    @functools.cached_property
    def param_axes(self) -> dict:
        return param_logical_axes(self.config)

    @functools.cached_property
    def param_shardings(self) -> dict:
        return param_shardings(self.config, self.mesh)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        return mesh_lib.named_sharding(self.mesh, ("batch",) + (None,) * (ndim - 1))

    def apply(self, params: dict, *args, **kwargs):
        return self.module.apply({"params": params}, *args, **kwargs)

    @functools.cached_property
    def _forward(self):
        def forward(params, input_ids, attention_mask):
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
            logits, _ = self.apply(params, input_ids, positions, attention_mask.astype(bool))
            return logits

        return jax.jit(forward)

    def __call__(self, input_ids: Any, attention_mask: Any | None = None) -> jax.Array:
        """Logits for int32 ``input_ids`` [B, T]; ``attention_mask`` [B, T] marks real tokens (padding 0)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        too_big = int(jnp.max(input_ids)) if input_ids.size else 0
        if too_big >= self.config.vocab_size or (input_ids.size and int(jnp.min(input_ids)) < 0):
            raise ValueError(f"token id {too_big} is outside the model's vocabulary of {self.config.vocab_size}")
        sharding = self.batch_sharding() if input_ids.shape[0] % mesh_lib.batch_ways(self.mesh) == 0 else None
        if sharding is not None:
            input_ids = mesh_lib.put(input_ids, sharding)
            attention_mask = mesh_lib.put(attention_mask, sharding)
        return self._forward(self.params, input_ids, attention_mask)

    def save_pretrained(self, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
        """Export an HF directory (config.json, safetensors, tokenizer) that transformers loads."""
        return weights.save_hf(directory, self.config, self.params, tokenizer)


def _leaf_dtype(params: dict) -> Any:
    return jax.tree.leaves(params)[0].dtype


def _abstract_boxed(config: LlamaConfig) -> Any:
    module = Llama(config)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda rng: module.init(rng, tokens), jax.random.key(0))["params"]


def param_logical_axes(config: LlamaConfig) -> dict:
    """Tree of logical-axis tuples, one per parameter, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
    return jax.tree.map(lambda x: tuple(x.names), _abstract_boxed(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(config: LlamaConfig, mesh: Mesh) -> dict:
    abstract = _abstract_boxed(config)
    return jax.tree.map(
        lambda x: mesh_lib.named_sharding(mesh, x.names, x.value.shape),
        abstract,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def init_params(config: LlamaConfig, mesh: Mesh, seed: int = 0, param_dtype: Any = jnp.float32) -> dict:
    """Random parameters created already sharded (never whole on one device)."""
    module = Llama(config, param_dtype=resolve_dtype(param_dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda rng: nn.unbox(module.init(rng, tokens))["params"], out_shardings=param_shardings(config, mesh))
    return init(jax.random.key(seed))


def load_pretrained(
    name_or_path: str | Path = "smollm2-135m-instruct",
    mesh: Mesh | None = None,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    remat: bool = False,
    seed: int = 0,
    progress: bool = True,
    remat_policy: str = "full",
) -> tuple[Model, Tokenizer]:
    """A model and its tokenizer from a registry name, an HF checkpoint directory or a .gguf file.

    ``mesh`` defaults to all devices on the ``data`` axis (see ``mrjax.mesh.make_mesh``).
    """
    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    name = str(name_or_path)
    if name in registry.RANDOM_CONFIGS:
        config = registry.RANDOM_CONFIGS[name]
        tokenizer = load_tokenizer(registry.embedded_gguf_path()) if config.vocab_size == 49152 else None
        params = init_params(config, mesh, seed, param_dtype)
        return Model(config, params, mesh, dtype, remat, remat_policy), tokenizer

    path, config, source, tokenizer = _open_checkpoint(name)
    params = weights.load_params(config, source, param_shardings(config, mesh), resolve_dtype(param_dtype), progress)
    return Model(config, params, mesh, dtype, remat, remat_policy), tokenizer


def _open_checkpoint(name: str) -> tuple[Path, LlamaConfig, "weights.TensorSource", Tokenizer]:
    """A checkpoint's path, config, tensor source (nothing read yet) and tokenizer, every part checked."""
    path = registry.embedded_gguf_path() if name == "smollm2-135m-instruct" else Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r}: no such file or directory, and not a named model ({', '.join(registry.NAMED_MODELS)})"
        )
    if path.is_file() and path.suffix == ".gguf":
        config, source = weights.gguf_source(path)
    elif path.is_dir():
        config, source = weights.hf_source(path)
    else:
        raise weights.WeightsError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise weights.WeightsError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
            f"{config.vocab_size} rows (tokenizer and weights do not belong together)"
        )
    weights.check_tensors(config, source)
    return path, config, source, tokenizer


def inspect_model(name_or_path: str | Path) -> tuple[LlamaConfig, Tokenizer | None]:
    """What ``load_pretrained`` would load, checked without reading any weights: the source exists, its
    architecture and options are supported, its tensors are the model's (names and shapes from the
    headers), its tokenizer loads and fits the vocabulary. Raises the error loading would raise."""
    name = str(name_or_path)
    if name in registry.RANDOM_CONFIGS:
        config = registry.RANDOM_CONFIGS[name]
        return config, load_tokenizer(registry.embedded_gguf_path()) if config.vocab_size == 49152 else None
    _, config, _, tokenizer = _open_checkpoint(name)
    return config, tokenizer
