"""Tokenizer and chat template: transformers for HF directories, ``tokenizers`` for GGUF files.

Chat models end a turn with one of several ids (Llama-3: ``<|eot_id|>`` and
``<|end_of_text|>``; SmolLM2: ``<|im_end|>``); ``Tokenizer.eos_ids`` lists them all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

# transformers advises at import that it found no PyTorch; the runtime uses its tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

Message = dict[str, str]
Prompt = str | Sequence[Message]

# Tokens that end an assistant turn in common chat formats; added to the EOS list when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "</s>", "<|eom_id|>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A transformers tokenizer plus what generation needs: end-of-turn ids and a pad id."""

    def __init__(self, hf: Any, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf
        ids: list[int] = []
        for candidate in [hf.eos_token_id, *extra_eos_ids]:
            if isinstance(candidate, int) and candidate not in ids:
                ids.append(candidate)
        vocab = hf.get_vocab()
        for token in END_OF_TURN_TOKENS:
            if token in vocab and vocab[token] not in ids:
                ids.append(vocab[token])
        if not ids:
            raise TokenizerError("the tokenizer has no end-of-sequence token; generation could never stop")
        self.eos_ids: tuple[int, ...] = tuple(ids)
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else self.eos_ids[0]

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def chat(self, prompt: Prompt, add_generation_prompt: bool = True) -> str:
        """The prompt (a user message string, or a list of chat messages) in the chat template."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages:
            raise TokenizerError("empty chat: a prompt needs at least one message")
        if self.hf.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; pass pre-formatted text instead")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as is (chat templates already carry their special tokens)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From an HF directory (tokenizer.json / sentencepiece) or a GGUF file (its header read by
    ``mrjax.model.gguf_file``, built with ``tokenizers``: no torch needed)."""
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.set_verbosity_error()
    try:
        if path.suffix == ".gguf":
            hf = gguf_tokenizer(path)
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise TokenizerError(f"{path}: could not load a tokenizer ({err})") from None
    extra: list[int] = []
    gen = path / "generation_config.json" if path.is_dir() else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return Tokenizer(hf, extra)


# ---------------------------------------------------------------- GGUF tokenizers
# A GGUF stores no tokenizer.json, only llama.cpp's description of one: the vocabulary, its token
# types, merges (or scores), special token ids, a pre-tokenizer name and the chat template. The two
# kinds a Llama-architecture file carries are built here the way transformers' GGUF loader builds
# them (so ids are the same; tests/test_tokenizer.py compares the two):
#   gpt2  - byte-level BPE (Llama-3, SmolLM2): the GPT-2 split, or Llama-3's for its named pre-tokenizers;
#   llama - SentencePiece BPE (Llama-2, TinyLlama): Metaspace, byte fallback, merges from the scores.

_CONTROL, _USER_DEFINED = 3, 4

# The Llama-3 split regex, for the pre-tokenizer names llama.cpp gives Llama-3-style vocabularies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE_TOKENIZERS = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE spells tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _gguf_fields(path: Path) -> dict[str, Any]:
    from .model.gguf_file import read_gguf

    try:
        metadata, _ = read_gguf(path)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: not a readable GGUF file ({err})") from None
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def _merges_from_scores(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary with scores: every split of a token into two
    tokens is a merge, ranked by the merged token's score (highest first), then by the pieces' lengths."""
    by_token = {token: scores[i] for token, i in vocab.items()}
    merges = []
    for token, score in by_token.items():
        local = [(token[:j], token[j:], score) for j in range(1, len(token))
                 if token[:j] in vocab and token[j:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def gguf_tokenizer(path: str | Path):
    """The tokenizer a GGUF file describes, as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    fields = _gguf_fields(path)
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # A token outside the byte alphabet (rare) is respelled in it, as transformers does.
        vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges") or []]
        raw = RawTokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
        if fields.get("tokenizer.ggml.pre") in _LLAMA3_PRE_TOKENIZERS:
            raw.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        raw.decoder = decoders.ByteLevel()
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= spelled]
    elif kind == "llama":
        merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]] \
            if fields.get("tokenizer.ggml.merges") else _merges_from_scores(vocab, fields.get("tokenizer.ggml.scores")
                                                                           or [0.0] * len(tokens))
        raw = RawTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    else:
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' "
                             "or SentencePiece 'llama')")
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user_defined = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user_defined:
        raw.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    def special(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
        add_bos_token=bool(add_bos) if add_bos is not None else kind == "llama",
        add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
