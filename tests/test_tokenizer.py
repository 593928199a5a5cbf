"""GGUF tokenizers built without torch (``gguf`` + ``tokenizers``) against transformers' own GGUF
loader (which imports torch): the same ids, decoded text, special tokens and chat template, on the
shipped SmolLM2 GGUF (byte-level BPE) and on a SentencePiece GGUF written here (Llama-2 style)."""
import json
import random

import numpy as np
import pytest

from mrjax.data import SEED_PROMPTS, jsonl_objects
from mrjax.tokenizer import gguf_tokenizer, load_tokenizer


def _strings() -> list[str]:
    """A few hundred texts: prompts, special tokens, unicode, whitespace runs, code, digits, long text."""
    rng = random.Random(0)
    seed = [row["prompt"] for row in jsonl_objects(SEED_PROMPTS)[:120]]
    crafted = [
        "", " ", "  ", "\n", "\n\n\n", "\t\tindented", "a  b   c    d", "trailing   ", "   leading",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|endoftext|>", "<s> </s> <unk>",
        "Score: 4", "Winner: Judgement A", "12345678901234567890", "3.14159 and 2,718 and 1e-6",
        "naïve café résumé", "日本語のテキスト", "emoji 🙂🚀 and ✓", "Ελληνικά", "Русский текст", "עברית", "العربية",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "<html><body class='x'>Hi</body></html>",
        "it's they're we've I'm you'll he'd", "ALL CAPS SHOUTING", "mixedCASE camelCase snake_case",
        "\u00a0non-breaking\u2009thin\u200bzero-width", "tab\tseparated\tvalues", "CRLF\r\nline\r\n",
        "<think>reasoning</think>", "[INST] wrapped [/INST]",
    ]
    pieces = seed + crafted
    mixed = [" ".join(rng.sample(pieces, 3)) for _ in range(80)]
    long = ["\n\n".join(seed[i:i + 25]) for i in range(0, 100, 25)]
    return pieces + mixed + long


def _compare(ours, ref, texts):
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text  # with the BOS rule of each file
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert ours.chat_template == ref.chat_template
    chats = [[{"role": "user", "content": t}] for t in texts[:40]] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for chat in chats:
        for gen in (True, False):
            a = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert a == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(a, add_special_tokens=False) == ref.encode(a, add_special_tokens=False)


def _reference(path):
    from transformers import AutoTokenizer  # its GGUF reader imports torch (the dev extra)

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_embedded_gguf_tokenizer_matches_transformers():
    from mrjax.model.registry import embedded_gguf_path

    path = embedded_gguf_path()
    ref, ours = _reference(path), gguf_tokenizer(path)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    _compare(ours, ref, _strings())
    wrapped = load_tokenizer(path)
    assert wrapped.eos_ids[0] == ref.eos_token_id and wrapped.chat("Hi") == ref.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)


def _sentencepiece_gguf(directory):
    """A Llama-2-style GGUF: a SentencePiece BPE vocabulary (byte fallback, a user-defined token)
    trained here on the README, with scores and no merges, as llama.cpp's converter writes it."""
    import gguf
    import sentencepiece as spm

    from loop_helpers import REPO

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(line for line in (REPO / "README.md").read_text().splitlines() if line.strip()))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["<think>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if tokens[i] == "<think>" else 1 for i in range(len(tokens))]
    path = directory / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    path = _sentencepiece_gguf(tmp_path)
    ref, ours = _reference(path), gguf_tokenizer(path)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    _compare(ours, ref, _strings())
    assert ours("hello")["input_ids"][0] == ours.bos_token_id  # SentencePiece files add BOS


def test_gguf_without_a_tokenizer_is_a_clear_error(tmp_path):
    import gguf

    from mrjax.tokenizer import TokenizerError

    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "junk.gguf")
