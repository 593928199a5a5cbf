"""Batched sampling for the actor, judge and meta-judge: continuous batching over a KV cache, sharded over the mesh.

    from mrjax.sampling import generate, SamplingConfig

Modules: ``sample`` (logits -> tokens), ``engine`` (the jitted programs over a pool of decode
slots), ``scheduler`` (the host side: waiting rows, refills, prefix groups), ``api`` (``generate``,
``generate_ids``, ``next_token_logprobs``, ``SamplingConfig``).
"""
from mrjax.sampling.api import (GenerationOutput, NextTokenProbe, SamplingConfig, SamplingError, generate, generate_ids,
                                next_token_logprobs, tokenize_prompts)
from mrjax.sampling.sample import sample_logits
from mrjax.sampling.scheduler import (FINISH_LENGTH, FINISH_STOP, NEW_TOKENS_ROUNDING, cache_bucket, prefix_groups,
                                      prompt_bucket, round_up, shared_prefix_length)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "GenerationOutput",
    "NEW_TOKENS_ROUNDING",
    "NextTokenProbe",
    "SamplingConfig",
    "SamplingError",
    "cache_bucket",
    "generate",
    "generate_ids",
    "next_token_logprobs",
    "prefix_groups",
    "prompt_bucket",
    "round_up",
    "sample_logits",
    "shared_prefix_length",
    "tokenize_prompts",
]
