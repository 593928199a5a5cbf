"""The sampler's entry points: ``generate`` (chat prompts -> texts), ``generate_ids`` (token ids -> ids),
``next_token_logprobs`` (the distribution of the token after each text), and ``SamplingConfig``, the one
type that says how to sample (the run config's ``sampling`` section is one too).

    from mrjax.sampling import generate, SamplingConfig
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=128, temperature=0.8, top_p=0.95, n=4, seed=0))
    out.texts        # per prompt, per sample: str

How a call runs: ``scheduler.Scheduler`` (the host side: waiting rows, refills, prefix groups)
drives ``engine``'s jitted programs (prefill with the model's forward, insert, a ``lax.while_loop``
decoder over a pool of slots), which draw tokens with ``sample`` (temperature, top-k, top-p,
per-row keys). A row's tokens depend only on (seed, prompt index, sample index, step), so any
``batch_size`` gives the same tokens (up to float32 rounding of near-ties).

The decode step is ``mrjax.model.decode``: the model's arithmetic in the layout XLA:CPU runs
fastest. ``tests/test_sampling.py`` checks generated tokens against HF transformers and their
log-probabilities against a teacher-forced forward of the model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrjax import mesh as mesh_lib
from mrjax.model.llama import LlamaConfig, unembedding
from mrjax.sampling import engine
from mrjax.sampling.sample import DEFAULT_TOP_P_CANDIDATES, SampleParams, candidates_needed
from mrjax.sampling.scheduler import (Scheduler, left_padded, prefill_group_prefix, prefill_shared_prefix,
                                      prefix_groups, progress_bar, prompt_bucket, row_bucket)
from mrjax.tokenizer import Prompt


class SamplingError(ValueError):
    """Bad input to ``generate``; the message says which prompt or setting."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature=0`` is greedy decoding (top_p/top_k are then ignored).

    Filters apply in HF transformers' order: temperature, then top-k (keep tokens whose
    logit is at least the k-th largest), then top-p (keep the smallest set of most likely
    tokens whose probability under the top-k-renormalised distribution reaches ``top_p``).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # end-of-turn ids cannot be drawn before this many tokens (as in HF)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt
    seed: int = 0
    batch_size: int = 32  # rows (prompts x samples) decoded together
    max_prompt_tokens: int | None = None  # default: the model's context minus max_new_tokens
    stop_ids: tuple[int, ...] | None = None  # default: the tokenizer's end-of-turn ids
    top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES

    def __post_init__(self):
        def bad(msg):
            raise SamplingError(f"SamplingConfig: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad(f"min_new_tokens must be an int in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n (samples per prompt) must be a positive int, got {self.n!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            bad(f"max_prompt_tokens must be positive, got {self.max_prompt_tokens!r}")
        if self.stop_ids is not None and not all(isinstance(i, (int, np.integer)) for i in self.stop_ids):
            bad(f"stop_ids must be token ids, got {self.stop_ids!r}")
        if self.top_p_candidates < 1:
            bad(f"top_p_candidates must be positive, got {self.top_p_candidates!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def params(self) -> SampleParams:
        """The per-call values as arrays for the engine (``stop_ids`` must be set)."""
        return SampleParams(
            seed=jnp.uint32(self.seed % 2**32),
            max_new=jnp.int32(self.max_new_tokens),
            min_new=jnp.int32(self.min_new_tokens),
            temperature=jnp.float32(self.temperature if not self.greedy else 1.0),
            top_p=jnp.float32(self.top_p),
            top_k=jnp.int32(self.top_k),
            stop_ids=jnp.asarray(self.stop_ids, jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class NextTokenProbe:
    """What to read after each generated row: log p(candidate | prompt + the row's text, cut and continued).

    ``continuation(ids)`` gets the row's generated ids (without its end-of-turn id) and returns
    ``(k, appended)``: the text to read after is its first ``k`` ids, then the ``appended`` ids (at most
    ``max_appended``). ``candidate_ids`` are the tokens whose log-probs are read. The row's prompt and
    kept tokens are read from its own cache, so nothing is prefilled again: the expected judge score
    ("Score: " -> "0".."5") and meta-judge verdict ("Winner: Judgement" -> " A" / " B") are read so.
    """

    continuation: Callable[[list[int]], tuple[int, Sequence[int]]]
    candidate_ids: tuple[int, ...]
    max_appended: int = 32


@dataclasses.dataclass
class GenerationOutput:
    """Per prompt (outer list, the caller's order), per sample (inner list).

    ``token_ids`` are the generated ids, including the end-of-turn id when
    ``finish_reasons`` is ``"stop"``; ``texts`` decode them without special tokens.
    ``logprobs[i][s][t]`` is log p(token t | prompt, tokens < t) under the *unmodified*
    model distribution (temperature 1, no top-p/top-k truncation), which is what DPO and
    analysis want, whatever the sampling settings were.
    """

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    lengths: list[list[int]]
    finish_reasons: list[list[str]]
    prompt_lengths: list[int]  # prompt tokens (after the chat template)
    # With a NextTokenProbe: per prompt, per sample, log p(candidate) for each of its candidate_ids.
    probe_logprobs: list[list[list[float]]] | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(sum(row) for row in self.lengths)


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Chat-template and tokenise; strings become one user turn. Errors name the prompt."""
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], dict)):
        raise SamplingError("prompts must be a list of prompts (strings or chat message lists), not a single prompt")
    if len(prompts) == 0:
        raise SamplingError("no prompts: generate needs at least one")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SamplingError(f"prompt {i} is empty")
        elif not prompt:
            raise SamplingError(f"prompt {i} is an empty message list")
        else:
            for m in prompt:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise SamplingError(f"prompt {i}: each message must be a dict with 'role' and 'content', got {m!r}")
        out.append(tokenizer.encode(tokenizer.chat(prompt)))
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig = SamplingConfig(),
    *,
    progress: bool | None = None,
    rows_done: Callable[[int, int], None] | None = None,
    probe: NextTokenProbe | None = None,
) -> GenerationOutput:
    """Sample ``config.n`` completions for each prompt (a user-message string or a list of
    chat messages), in the chat template with the generation prompt. See ``GenerationOutput``."""
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    stop_ids = config.stop_ids if config.stop_ids is not None else tuple(tokenizer.eos_ids)
    config = dataclasses.replace(config, stop_ids=tuple(int(i) for i in stop_ids))
    out = generate_ids(model, prompt_ids, config, progress=progress, rows_done=rows_done, probe=probe)
    stop = set(config.stop_ids)
    out.texts = [
        [tokenizer.decode([t for t in ids if t not in stop]) for ids in per_prompt] for per_prompt in out.token_ids
    ]
    return out


def generate_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    progress: bool | None = None,
    rows_done: Callable[[int, int], None] | None = None,
    probe: NextTokenProbe | None = None,
) -> GenerationOutput:
    """``generate`` on already tokenised prompts (``config.stop_ids`` must be set); texts are empty.
    ``rows_done(rows, tokens)`` hears of every batch of rows that finished, inside the call."""
    if config.stop_ids is None or len(config.stop_ids) == 0:
        raise SamplingError("generate_ids needs config.stop_ids (e.g. tokenizer.eos_ids)")
    if len(prompt_ids) == 0:
        raise SamplingError("no prompts: generate needs at least one")
    c: LlamaConfig = model.config
    max_prompt = c.max_position_embeddings - config.max_new_tokens
    if config.max_prompt_tokens is not None:
        max_prompt = min(max_prompt, config.max_prompt_tokens)
    if max_prompt < 1:
        raise SamplingError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {c.max_position_embeddings} positions"
        )
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise SamplingError(f"prompt {i} has no tokens")
        if len(ids) > max_prompt:
            raise SamplingError(
                f"prompt {i} has {len(ids)} tokens, more than the limit of {max_prompt} "
                f"(max_prompt_tokens, or the model's {c.max_position_embeddings} positions minus max_new_tokens)"
            )
        bad = [t for t in ids if not 0 <= int(t) < c.vocab_size]
        if bad:
            raise SamplingError(f"prompt {i}: token id {bad[0]} is outside the vocabulary of {c.vocab_size}")
    for t in config.stop_ids:
        if not 0 <= int(t) < c.vocab_size:
            raise SamplingError(f"stop id {t} is outside the vocabulary of {c.vocab_size}")

    candidates = candidates_needed(config, c.vocab_size)
    total_rows = len(prompt_ids) * config.n
    bar = progress_bar(total_rows, progress)

    def on_rows(rows: int, tokens: int) -> None:
        if bar is not None:
            bar.update(rows)
            bar.set_postfix(tokens=on_rows.tokens + tokens, refresh=False)
        on_rows.tokens += tokens
        if rows_done is not None:
            rows_done(rows, tokens)

    on_rows.tokens = 0
    try:
        scheduler = Scheduler(model, prompt_ids, config, config.params(), candidates, on_rows, probe)
        token_ids, logprobs, finish = scheduler.run()
    finally:
        if bar is not None:
            bar.close()
    return GenerationOutput(
        texts=[[""] * config.n for _ in prompt_ids],
        token_ids=token_ids,
        logprobs=logprobs,
        lengths=[[len(t) for t in per] for per in token_ids],
        finish_reasons=finish,
        prompt_lengths=[len(ids) for ids in prompt_ids],
        probe_logprobs=scheduler.probe_logprobs,
    )


@functools.lru_cache(maxsize=None)
def _candidate_logprobs_program(config: LlamaConfig):
    def run(params, last_hidden, candidate_ids):
        logits = last_hidden.astype(jnp.float32) @ unembedding(params, config).astype(jnp.float32)
        return jnp.take(jax.nn.log_softmax(logits, axis=-1), candidate_ids, axis=-1)

    return jax.jit(run)


def next_token_logprobs(
    model, prompt_ids: Sequence[Sequence[int]], candidate_ids: Sequence[int], batch_size: int = 32
) -> np.ndarray:
    """log p(candidate | text) [n, len(candidate_ids)] of the token after each already tokenised
    text, under the unmodified model distribution. What the expected judge score and the expected
    meta-judge verdict read. As in ``generate``, the texts' shared prefix and group prefixes are
    prefilled once; each text's rest is prefilled after their caches, bucketed like ``generate``."""
    c: LlamaConfig = model.config
    if len(prompt_ids) == 0:
        return np.zeros((0, len(candidate_ids)), np.float32)
    for i, ids in enumerate(prompt_ids):
        if not 0 < len(ids) <= c.max_position_embeddings:
            raise SamplingError(f"text {i} has {len(ids)} tokens; it needs 1..{c.max_position_embeddings}")
    mesh: Mesh = model.mesh
    ways = mesh_lib.batch_ways(mesh)
    score = _candidate_logprobs_program(c)
    candidates = jnp.asarray(list(candidate_ids), jnp.int32)
    out = np.zeros((len(prompt_ids), len(candidate_ids)), np.float32)
    put = functools.partial(mesh_lib.put_batch, mesh)
    C, prefix, prefix_mask = prefill_shared_prefix(model, prompt_ids, ways)
    suffixes = [ids[C:] for ids in prompt_ids]
    group, group_len = prefix_groups(suffixes)
    for g in sorted(set(group)):
        members = sorted((i for i in range(len(prompt_ids)) if group[i] == g), key=lambda i: (len(suffixes[i]), i))
        G = group_len[members[0]]
        cache, mask_of_cache = prefill_group_prefix(model, prompt_ids[members[0]], C, G, ways)[:2] if G else (
            prefix, prefix_mask)
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            tokens, positions, mask = left_padded([suffixes[i][G:] for i in rows], row_bucket(len(rows), ways),
                                                   prompt_bucket(max(len(suffixes[i]) - G for i in rows)), start=C + G)
            last_hidden, _ = engine.prefill_after(model.module, model.params, cache, mask_of_cache, put(tokens), put(positions),
                                                    put(mask))
            out[rows] = mesh_lib.fetch(score(model.params, last_hidden, candidates))[: len(rows)]
    return out
