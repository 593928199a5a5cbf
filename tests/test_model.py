"""The Llama model and its weights against transformers' PyTorch implementation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CHAT_PROMPTS, single_device_mesh

from mrjax import load_pretrained
from mrjax.mesh import make_mesh
from mrjax.model import weights
from mrjax.model.llama import LlamaConfig, RopeScaling, rope_frequencies
from mrjax.model.pretrained import Model
from mrjax.model.registry import RANDOM_CONFIGS


def assert_logits_close(ours, reference):
    """The issue's bar: max |diff| <= 1e-3 * max |logit| and the same argmax everywhere."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 1e-3 * scale, np.abs(ours - reference).max() / scale
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def chat_ids(smol):
    _, tok = smol
    return [tok.encode(tok.chat(p)) for p in CHAT_PROMPTS]


def test_embedded_default_matches_transformers(smol, hf_smol, chat_ids):
    model, _ = smol
    assert len({len(ids) for ids in chat_ids}) == len(chat_ids)  # different lengths
    for ids in chat_ids:
        assert_logits_close(model(np.array([ids]))[0], hf_logits(hf_smol, ids))


def test_left_padded_batch_matches_each_prompt_alone(smol, hf_smol, chat_ids):
    model, tok = smol
    ids, mask = left_pad(chat_ids, tok.pad_id)
    batched = np.asarray(model(ids, mask))
    for row, prompt_ids in enumerate(chat_ids):
        n = len(prompt_ids)
        assert_logits_close(batched[row, -n:], hf_logits(hf_smol, prompt_ids))


@pytest.mark.parametrize("sizes", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                   dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_same_logits_on_an_8_device_mesh(smol, chat_ids, sizes):
    model, tok = smol
    mesh = make_mesh(**sizes)
    sharded = Model(model.config, jax.device_put(model.params, _shardings(model, mesh)), mesh)
    ids, mask = left_pad(chat_ids * 2, tok.pad_id)  # 8 rows so data=8 splits the batch
    one = np.asarray(model(ids, mask))
    many = np.asarray(sharded(ids, mask))
    np.testing.assert_allclose(many, one, atol=2e-4 * np.abs(one).max(), rtol=0)
    np.testing.assert_array_equal(many.argmax(-1), one.argmax(-1))


def _shardings(model, mesh):
    from mrjax.model.pretrained import param_shardings

    return param_shardings(model.config, mesh)


def test_parameters_are_created_sharded_by_the_table():
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    model, _ = load_pretrained("tiny-random", mesh=mesh)
    q = model.params["layers"]["attn"]["q"]  # [layers, embed, heads, head_dim]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(q.shape[0], q.shape[1] // 2, q.shape[2] // 4, q.shape[3])}
    down = model.params["layers"]["mlp"]["down"]  # [layers, mlp, embed]
    assert tuple(down.sharding.spec) == (None, "tensor", "fsdp")


def test_indivisible_heads_stay_replicated(smol):
    model, _ = smol  # SmolLM2: 9 query heads, 3 kv heads: tensor=4 cannot split them
    sh = _shardings(model, make_mesh(data=1, fsdp=2, tensor=4))
    assert tuple(sh["layers"]["attn"]["q"].spec) == (None, "fsdp", None, None)
    assert tuple(sh["layers"]["mlp"]["gate"].spec) == (None, "fsdp", "tensor")


# ------------------------------------------------------------ a random HF Llama-3 config, round-tripped


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, smol):
    """A random transformers Llama-3 model (GQA, llama3 RoPE scaling) saved as sharded safetensors."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = HFLlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large weights so logits are not all near zero
    )
    hf = LlamaForCausalLM(cfg).eval()
    directory = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(str(directory), max_shard_size="2MB")  # several shards + an index
    smol[1].hf.save_pretrained(str(directory))
    return directory, hf


def test_random_llama3_safetensors_matches_transformers(tiny_hf_dir, chat_ids):
    directory, hf = tiny_hf_dir
    assert (directory / "model.safetensors.index.json").is_file()
    model, _ = load_pretrained(str(directory), mesh=single_device_mesh(), progress=False)
    assert model.config.rope_scaling is not None and model.config.num_kv_heads == 2
    long_ids = sum(chat_ids, [])[:100]  # positions past the scaling's original context
    for ids in [*chat_ids, long_ids]:
        assert_logits_close(model(np.array([ids]))[0], hf_logits(hf, ids))


def test_llama31_rope_frequencies_match_transformers():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    hf_cfg = HFLlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling}
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_frequencies(RANDOM_CONFIGS["llama3-8b"])
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_frequencies(LlamaConfig(1, 4096, 1, 1, 32, 8, 128, rope_theta=500000.0)))


def test_export_round_trip_loads_in_transformers(tmp_path, chat_ids):
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained("tiny-random", mesh=make_mesh(data=1, fsdp=2, tensor=4))
    out = model.save_pretrained(tmp_path / "export", tok)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.rope_scaling["rope_type"] == "llama3" or hf.config.rope_parameters["rope_type"] == "llama3"
    for ids in chat_ids:
        assert_logits_close(model(np.array([ids]))[0], hf_logits(hf, ids))
    # and back into mrjax: the same parameters
    again, tok2 = load_pretrained(str(out), mesh=single_device_mesh(), progress=False)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tok2.eos_ids[0] == tok.eos_ids[0]


def test_embedded_export_round_trip(smol, hf_smol, chat_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smol
    out = model.save_pretrained(tmp_path / "smol", tok)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_logits_close(hf_logits(hf, chat_ids[1]), hf_logits(hf_smol, chat_ids[1]))


def test_hf_directory_written_by_transformers_loads(smol_hf_dir, smol, chat_ids):
    model, _ = load_pretrained(str(smol_hf_dir), mesh=single_device_mesh(), progress=False)
    np.testing.assert_allclose(
        np.asarray(model(np.array([chat_ids[0]]))), np.asarray(smol[0](np.array([chat_ids[0]]))), atol=1e-5
    )


def test_gguf_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4 * 8, 6)).astype(np.float32)  # 4 heads of dim 8

    def llama_cpp_permute(w, n_head):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    np.testing.assert_array_equal(weights._unpermute_rope(llama_cpp_permute(w, 4), 4), w)


# ------------------------------------------------------------ bad input


def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no such file or directory, and not a named model"):
        load_pretrained("/nonexistent/model/dir")


def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_non_llama_architecture_is_rejected(tiny_hf_dir, tmp_path):
    directory = _copy_dir(tiny_hf_dir[0], tmp_path / "gpt2")
    raw = json.loads((directory / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(weights.WeightsError, match="Llama-architecture models only"):
        load_pretrained(str(directory), progress=False)


def test_config_weight_shape_mismatch_names_the_tensor(tiny_hf_dir, tmp_path):
    directory = _copy_dir(tiny_hf_dir[0], tmp_path / "mismatch")
    raw = json.loads((directory / "config.json").read_text())
    raw["intermediate_size"] = 128  # the weights have 160
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(weights.WeightsError, match=r"gate_proj.weight.*shape \(160, 64\).*\(128, 64\)"):
        load_pretrained(str(directory), progress=False)


def test_vocabulary_mismatch_is_rejected(tmp_path, smol):
    from safetensors.numpy import save_file

    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    directory = tmp_path / "small_vocab"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(weights.config_to_hf(config)))
    shapes = {name.format(i=0): weights._hf_shape(config, path) for path, (name, *_ ) in weights._layouts(config).items()}
    save_file({n: np.zeros(s, np.float32) for n, s in shapes.items()}, str(directory / "model.safetensors"))
    smol[1].hf.save_pretrained(str(directory))  # 49152 tokens for a 1000-row embedding
    with pytest.raises(weights.WeightsError, match="tokenizer has 49152 tokens but the model's embedding has only 1000"):
        load_pretrained(str(directory), progress=False)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(weights.WeightsError, match="not a readable GGUF file"):
        load_pretrained(str(bad))


def _gguf_package_reading(path):
    """The ``gguf`` package's reader: (metadata, {name: (shape, type, bytes)}), the reference."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return metadata, {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type, t.data.tobytes())
                      for t in reader.tensors}


def test_gguf_header_reads_as_the_gguf_package_reads_it(tmp_path):
    """``read_gguf`` against the ``gguf`` package's reader, on the embedded model (quantised tensors, a
    49k vocabulary) and on a file with every value type, a nested array, odd-sized tensors and an
    alignment of 64; a file cut short is a clear error."""
    import gguf

    from mrjax.model.gguf_file import read_gguf
    from mrjax.model.registry import embedded_gguf_path

    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 64)
    w.add_bool("x.flag", True)
    w.add_uint8("x.u8", 200)
    w.add_int64("x.i64", -(2 ** 40))
    w.add_float32("x.f32", 0.1)
    w.add_string("x.text", "héllo")
    w.add_array("x.ints", [3, -1, 7])
    w.add_array("x.floats", [0.5, 1e-3])
    w.add_array("x.words", ["a", "", "ü"])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_tensor("a", np.arange(7, dtype=np.float32))
    w.add_tensor("b", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.add_tensor("c", np.ones((3, 5, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for source in (embedded_gguf_path(), path):
        metadata, tensors = read_gguf(source)
        want_metadata, want_tensors = _gguf_package_reading(source)
        assert metadata.keys() == want_metadata.keys()
        for key, value in want_metadata.items():
            got = sum(metadata[key], []) if key == "x.nested" else metadata[key]  # the package flattens it
            assert got == (pytest.approx(value) if isinstance(value, float) else value), key
        assert list(tensors) == list(want_tensors)
        for name, (shape, kind, data) in want_tensors.items():
            assert (tensors[name].shape, tensors[name].type, tensors[name].data.tobytes()) == (shape, kind, data), name
    assert metadata["x.nested"] == [[1, 2], [3]] and metadata["x.text"] == "héllo"
    np.testing.assert_array_equal(tensors["c"].data.view(np.float32).reshape(tensors["c"].shape), np.ones((3, 5, 2)))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(embedded_gguf_path().read_bytes()[:100_000])
    with pytest.raises(ValueError, match="header ends early"):
        read_gguf(cut)
    with pytest.raises(weights.WeightsError, match="not a readable GGUF file"):
        weights.gguf_source(cut)


def test_out_of_vocabulary_token_ids(smol):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        smol[0](np.array([[1, 2, 49152]]))


def test_rope_scaling_llama3_is_not_silently_dropped(tiny_hf_dir):
    raw = json.loads((tiny_hf_dir[0] / "config.json").read_text())
    config = weights.config_from_hf(raw)
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    raw_yarn = dict(raw, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(weights.WeightsError, match="'yarn' is not supported"):
        weights.config_from_hf(raw_yarn)


def test_attention_and_its_gradients_match_float64():
    """``attend`` against a float64 numpy formula, with grouped-query heads, a ragged mask and a fully
    masked query row (uniform over all keys)."""
    import jax.numpy as jnp

    from mrjax.model.llama import attend

    rng = np.random.default_rng(1)
    B, T, S, k, g, d = 3, 12, 21, 2, 3, 8
    q, keys, values = (rng.standard_normal(shape) for shape in ((B, T, k, g, d), (B, S, k, d), (B, S, k, d)))
    allowed = rng.random((B, T, S)) < 0.6
    allowed[:, :, 0] = True
    allowed[1, 4] = False  # a padded query row

    def reference(q, keys, values):
        scores = np.einsum("btkgd,bskd->bkgts", q, keys) / np.sqrt(d)
        scores = np.where(allowed[:, None, None], scores, -1e300)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("bkgts,bskd->btkgd", probs, values).reshape(B, T, k * g, d)

    want = reference(q, keys, values)
    cotangent = rng.standard_normal(want.shape)
    eps = 1e-6  # central differences of <cotangent, out> along one random direction of each input
    direction = [rng.standard_normal(x.shape) for x in (q, keys, values)]
    want_dir = []
    for i in range(3):
        plus = [x + eps * direction[j] * (j == i) for j, x in enumerate((q, keys, values))]
        minus = [x - eps * direction[j] * (j == i) for j, x in enumerate((q, keys, values))]
        want_dir.append(((reference(*plus) - reference(*minus)) * cotangent).sum() / (2 * eps))
    args = [jnp.asarray(x, jnp.float32) for x in (q, keys, values)]
    np.testing.assert_allclose(np.asarray(attend(*args, jnp.asarray(allowed))), want, atol=2e-6)
    grads = jax.grad(lambda *a: (attend(*a, jnp.asarray(allowed)) * cotangent).sum(), argnums=(0, 1, 2))(*args)
    for grad, v, w in zip(grads, direction, want_dir):
        np.testing.assert_allclose(float((np.asarray(grad, np.float64) * v).sum()), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shards", [1, 2])
def test_packed_forward_equals_padded(shards):
    """The per-token work on the real tokens only (``Packing``): the padded forward's hidden states at real
    tokens, zeros at padding, and the same gradients; through a KV cache too (a prompt, then a continuation)."""
    from mrjax.model.llama import KVCache, Llama, LlamaConfig, packing

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    model = Llama(config)
    B, T = 4, 8
    tokens = np.random.default_rng(0).integers(0, 100, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] >= T - np.array([8, 3, 5, 1])[:, None]  # left-padded rows
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    local = mask.reshape(shards, -1)
    slots = np.full((shards, local.sum(axis=1).max() + 2), local.shape[1], np.int32)  # two spare places
    for s in range(shards):
        slots[s, :local[s].sum()] = np.flatnonzero(local[s])
    packed = packing(jnp.asarray(slots), B, T)

    def hidden(params, packed, cache=None):
        h, cache = model.apply({"params": params}, tokens, positions, mask if cache is None else
                               np.concatenate([mask, mask], axis=1), cache, 0 if cache is None else T,
                               return_hidden=True, packed=packed)
        return h, cache

    want, _ = hidden(params, None)
    got, _ = hidden(params, packed)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-6, atol=1e-6)
    assert not np.asarray(got)[~mask].any()
    # A continuation after a prompt in the cache (the cache's keys written through the packed tokens).
    def prefill(packed):
        return model.apply({"params": params}, tokens, positions, np.concatenate([mask, mask], axis=1),
                           KVCache.zeros(config, B, 2 * T), 0, return_hidden=True, packed=packed)[1]

    cache, padded_cache = prefill(packed), prefill(None)
    for a, b in zip(cache, padded_cache):  # [layers, B, 2T, kv_heads, head_dim]: the prompt's real keys agree
        np.testing.assert_allclose(np.asarray(a)[:, :, :T][:, mask], np.asarray(b)[:, :, :T][:, mask], rtol=1e-6,
                                   atol=1e-6)
    want_next, _ = hidden(params, None, cache)
    got_next, _ = hidden(params, packed, cache)
    np.testing.assert_allclose(np.asarray(got_next)[mask], np.asarray(want_next)[mask], rtol=1e-6, atol=1e-6)

    def loss(params, packed):
        return jnp.sum(jnp.where(mask[..., None], hidden(params, packed)[0], 0.0) ** 2)

    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, None)), jax.tree.leaves(jax.grad(loss)(params, packed))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
