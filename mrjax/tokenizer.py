"""Tokenizer and chat template through transformers (HF directories and GGUF files).

Chat models end a turn with one of several ids (Llama-3: ``<|eot_id|>`` and
``<|end_of_text|>``; SmolLM2: ``<|im_end|>``); ``Tokenizer.eos_ids`` lists them all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

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
    """From an HF directory (tokenizer.json / sentencepiece) or a GGUF file."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.set_verbosity_error()
    try:
        if path.suffix == ".gguf":
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            hf = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: could not load a tokenizer ({err})") from None
    extra: list[int] = []
    gen = path / "generation_config.json" if path.is_dir() else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return Tokenizer(hf, extra)
