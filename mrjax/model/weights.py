"""Checkpoint formats ⇄ mrjax parameters.

- HF Llama directory: ``config.json`` + ``model.safetensors`` (or shards with an index).
- GGUF (llama.cpp): tensors read with the ``gguf`` package, dequantised, and q/k
  un-permuted (llama.cpp's converter interleaves RoPE halves; HF does not).
- Export: an HF directory (config.json, safetensors, tokenizer files) that transformers loads.

Loading builds each stacked parameter on the host and places only each device's
shard on that device (``jax.make_array_from_callback``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mrjax.mesh import fetch, is_main_process
from mrjax.model.llama import PARAMETER_PATHS as P
from mrjax.model.llama import LlamaConfig, RopeScaling, param_at


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file or tensor and why."""


# mrjax parameter path -> (HF tensor name, HF [out, in] -> mrjax layout, mrjax -> HF layout).
# "{i}" is the layer index; "layers/..." leaves are stacked over layers.
def _layouts(c: LlamaConfig) -> dict[str, tuple[str, Callable, Callable]]:
    e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    same = (lambda w: w, lambda w: w)
    transpose = (lambda w: w.T, lambda w: w.T)
    table = {
        P["embedding"]: ("model.embed_tokens.weight", *same),
        P["final_norm"]: ("model.norm.weight", *same),
        P["attn_norm"]: ("model.layers.{i}.input_layernorm.weight", *same),
        P["mlp_norm"]: ("model.layers.{i}.post_attention_layernorm.weight", *same),
        P["q"]: (
            "model.layers.{i}.self_attn.q_proj.weight",
            lambda w: w.T.reshape(e, h, d),
            lambda w: w.reshape(e, h * d).T,
        ),
        P["k"]: (
            "model.layers.{i}.self_attn.k_proj.weight",
            lambda w: w.T.reshape(e, k, d),
            lambda w: w.reshape(e, k * d).T,
        ),
        P["v"]: (
            "model.layers.{i}.self_attn.v_proj.weight",
            lambda w: w.T.reshape(e, k, d),
            lambda w: w.reshape(e, k * d).T,
        ),
        P["o"]: (
            "model.layers.{i}.self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, d, e),
            lambda w: w.reshape(h * d, e).T,
        ),
        P["gate"]: ("model.layers.{i}.mlp.gate_proj.weight", *transpose),
        P["up"]: ("model.layers.{i}.mlp.up_proj.weight", *transpose),
        P["down"]: ("model.layers.{i}.mlp.down_proj.weight", *transpose),
    }
    if not c.tie_word_embeddings:
        table[P["lm_head"]] = ("lm_head.weight", *transpose)
    return table


def _hf_shape(c: LlamaConfig, path: str) -> tuple[int, ...]:
    e, h, k, d, m, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    return {
        P["embedding"]: (v, e),
        P["final_norm"]: (e,),
        P["attn_norm"]: (e,),
        P["mlp_norm"]: (e,),
        P["q"]: (h * d, e),
        P["k"]: (k * d, e),
        P["v"]: (k * d, e),
        P["o"]: (e, h * d),
        P["gate"]: (m, e),
        P["up"]: (m, e),
        P["down"]: (e, m),
        P["lm_head"]: (v, e),
    }[path]


# ---------------------------------------------------------------- config.json


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    arch = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "llama" and "LlamaForCausalLM" not in arch:
        raise WeightsError(
            f"{source}: model_type={model_type!r} architectures={arch}: mrjax runs Llama-architecture "
            "models only (Llama 2/3/3.1, SmolLM, TinyLlama, ...)"
        )
    # Options of the HF Llama that mrjax does not implement: loading them would give wrong logits.
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise WeightsError(f"{source}: {key}=true is not supported (mrjax's Llama has no bias terms)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise WeightsError(f"{source}: hidden_act={act!r} is not supported (mrjax's Llama MLP is SwiGLU: 'silu')")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise WeightsError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")
    rope = raw.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise WeightsError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    try:
        heads = int(raw["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        )
    except KeyError as err:
        raise WeightsError(f"{source}: missing key {err.args[0]!r}") from None


def config_to_hf(c: LlamaConfig, bos_token_id: int | None = None, eos_token_id: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return out


# ---------------------------------------------------------------- tensor sources


class TensorSource:
    """Named float32 numpy tensors in HF naming and HF [out, in] layout."""

    def __init__(self, names: set[str], read: Callable[[str], np.ndarray], origin: str,
                 shape: Callable[[str], tuple[int, ...]] | None = None):
        self.names, self._read, self.origin = names, read, origin
        self._shape = shape  # a tensor's shape from the file's header, without reading its data

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(int(n) for n in self._shape(name)) if self._shape is not None else None

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.names:
            raise WeightsError(f"{self.origin}: tensor {name!r} is missing")
        w = self._read(name)
        if tuple(w.shape) != tuple(expected_shape):
            raise WeightsError(
                f"{self.origin}: tensor {name!r} has shape {tuple(w.shape)} but the config implies "
                f"{tuple(expected_shape)} (config and weights do not match)"
            )
        return np.asarray(w, dtype=np.float32)


def hf_source(directory: Path) -> tuple[LlamaConfig, TensorSource]:
    """Config and tensors of an HF checkpoint directory (one safetensors file or an index of shards)."""
    from safetensors import safe_open

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{directory}: no config.json (not an HF checkpoint directory)")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(directory / "model.safetensors", "np") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    handles: dict[str, Any] = {}

    def handle(name: str) -> Any:
        file = weight_map[name]
        if file not in handles:
            path = directory / file
            if not path.is_file():
                raise WeightsError(f"{directory}: shard {file} listed in the index is missing")
            try:
                handles[file] = safe_open(path, "np")
            except Exception as err:  # safetensors raises its own error types on a damaged file
                raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
        return handles[file]

    return config, TensorSource(set(weight_map), lambda name: handle(name).get_tensor(name), str(directory),
                                shape=lambda name: handle(name).get_slice(name).get_shape())


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs -> HF half-split)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_source(path: Path) -> tuple[LlamaConfig, TensorSource]:
    """Config and dequantised tensors of a llama.cpp GGUF file."""
    import gguf

    from .gguf_file import read_gguf

    try:
        metadata, tensors = read_gguf(path)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable GGUF file ({err})") from None

    def field(key: str, default: Any = None) -> Any:
        return metadata.get(key, default)

    arch = field("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: GGUF architecture {arch!r}: mrjax runs Llama-architecture models only")
    if "rope_freqs.weight" in tensors:
        raise WeightsError(f"{path}: GGUF files with rope_freqs (Llama-3.1 scaling) are not supported; use the HF checkpoint")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    vocab = field("llama.vocab_size") or len(field("tokenizer.ggml.tokens", []))
    config = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=int(field("llama.attention.key_length", field("llama.rope.dimension_count", hidden // heads))),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(field("llama.context_length", 8192)),
    )
    names: dict[str, str] = {}
    unmapped: set[str] = set()  # GGUF tensors with no HF name (a bias, ...): reported as unread by load_params
    for name in tensors:
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest in _GGUF_NAMES:
                names[f"model.layers.{layer}.{_GGUF_NAMES[rest]}"] = name
                continue
        elif name in _GGUF_NAMES:
            names[_GGUF_NAMES[name]] = name
            continue
        unmapped.add(name)

    def read(hf_name: str) -> np.ndarray:
        t = tensors[names[hf_name]]
        w = gguf.quants.dequantize(t.data, t.type).astype(np.float32).reshape(t.shape)
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, config.num_kv_heads)
        return w

    return config, TensorSource(set(names) | unmapped, read, str(path),
                                shape=lambda hf_name: tensors[names[hf_name]].shape)


# ---------------------------------------------------------------- params


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str) -> Any:
    return param_at(tree, path)


def load_params(
    config: LlamaConfig,
    source: TensorSource,
    shardings: dict,
    param_dtype: Any = np.float32,
    progress: bool = True,
) -> dict:
    """Parameters from ``source``, each placed shard by shard with ``shardings`` (same tree); the caller
    checks the source first (``check_tensors``, as ``load_pretrained`` does)."""
    from tqdm.auto import tqdm

    table = _layouts(config)
    params: dict = {}
    for path, (name, to_mrjax, _) in tqdm(table.items(), desc=f"loading {Path(source.origin).name}", disable=not progress):
        shape = _hf_shape(config, path)
        if path.startswith("layers/"):
            host = np.stack([to_mrjax(source.get(name.format(i=i), shape)) for i in range(config.num_layers)])
        else:
            host = to_mrjax(source.get(name, shape))
        host = np.ascontiguousarray(host.astype(param_dtype))
        sharding = _get(shardings, path)
        _set(params, path, jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
    return params


def unread_tensors(config: LlamaConfig, source: TensorSource) -> list[str]:
    """Tensors of ``source`` that loading would not read (a bias, an extra head, ...): their
    presence means the checkpoint is not the model mrjax computes."""
    read = set()
    for path, (name, _, _) in _layouts(config).items():
        read |= {name.format(i=i) for i in range(config.num_layers)} if path.startswith("layers/") else {name}
    if config.tie_word_embeddings:
        read.add("lm_head.weight")  # a tied checkpoint may store the shared matrix twice; transformers ties it too
    ignorable = ("rotary_emb.inv_freq",)  # old exports keep RoPE's cached frequencies, which are recomputed
    return sorted(n for n in source.names - read if not n.endswith(ignorable))


def check_tensors(config: LlamaConfig, source: TensorSource) -> None:
    """Refuse a checkpoint whose tensors are not the model's (from the file headers, no data read):
    a missing tensor, a shape the config does not imply, or a tensor mrjax would leave unread."""
    for path, (name, _, _) in _layouts(config).items():
        expected = _hf_shape(config, path)
        for one in ([name.format(i=i) for i in range(config.num_layers)] if path.startswith("layers/") else [name]):
            if one not in source.names:
                raise WeightsError(f"{source.origin}: tensor {one!r} is missing")
            shape = source.shape(one)
            if shape is not None and shape != tuple(expected):
                raise WeightsError(f"{source.origin}: tensor {one!r} has shape {shape} but the config implies "
                                   f"{tuple(expected)} (config and weights do not match)")
    extra = unread_tensors(config, source)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise WeightsError(f"{source.origin}: tensor {extra[0]!r}{more} would be left unread: this checkpoint has "
                           "parts mrjax's Llama does not compute (biases, extra heads), so its logits would be wrong")


def params_to_hf_tensors(config: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
    """HF-named float32 tensors (gathered to the host) from mrjax parameters."""
    out = {}
    for path, (name, _, to_hf) in _layouts(config).items():
        value = np.asarray(fetch(_get(params, path)), dtype=np.float32)
        if path.startswith("layers/"):
            for i in range(config.num_layers):
                out[name.format(i=i)] = np.ascontiguousarray(to_hf(value[i]))
        else:
            out[name] = np.ascontiguousarray(to_hf(value))
    return out


def save_hf(
    directory: str | Path,
    config: LlamaConfig,
    params: dict,
    tokenizer: Any | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write an HF Llama checkpoint directory that ``transformers`` loads (every process gathers
    the parameters; process 0 writes)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    tensors = params_to_hf_tensors(config, params)
    if not is_main_process():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    hf_tok = getattr(tokenizer, "hf", tokenizer)
    bos = getattr(hf_tok, "bos_token_id", None)
    eos = list(getattr(tokenizer, "eos_ids", [])) or getattr(hf_tok, "eos_token_id", None)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, bos, eos), indent=2))
    if eos is not None:
        (directory / "generation_config.json").write_text(
            json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": getattr(hf_tok, "pad_token_id", None)})
        )

    # Shard into files of at most max_shard_bytes, with an index when there is more than one.
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(v.nbytes for v in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if hf_tok is not None:
        hf_tok.save_pretrained(str(directory))
    return directory


def num_bytes(params: dict) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
