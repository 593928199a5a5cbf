"""The numeric core of training: DPO loss vs float64, gradients vs PyTorch/transformers,
sharded vs single-device steps, chunked log-probs, accumulation, schedule."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh

from mrjax import train_step as ts
from mrjax.config import DPOSettings, TrainSettings
from mrjax.data import make_batch, tokenize_rows
from mrjax.mesh import make_mesh

# ---------------------------------------------------------------- dpo_loss vs float64


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def reference_dpo64(pc, pr, rc, rr, beta, loss_type, eps):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * _log_sigmoid64(beta * delta) - eps * _log_sigmoid64(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = np.maximum(0.0, 1 - beta * delta)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    return losses.mean(), {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).mean(),
        "rewards/margins": (cr - rj).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("sigmoid", 2.0, 0.45), ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0),
     ("hinge", 0.1, 0.0), ("hinge", 0.7, 0.0)],
)
def test_dpo_loss_matches_float64_reference(loss_type, beta, eps):
    rng = np.random.default_rng(hash((loss_type, beta, eps)) % 2**32)
    pc, pr = rng.normal(-40, 15, 64), rng.normal(-40, 15, 64)
    rc, rr = pc + rng.normal(0, 5, 64), pr + rng.normal(0, 5, 64)
    loss, metrics = ts.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want_loss, want = reference_dpo64(pc, pr, rc, rr, beta, loss_type, eps)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    assert float(metrics["loss"]) == float(loss)
    for key, value in want.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-5, err_msg=key)


def test_dpo_loss_hand_worked_beta_applied_once():
    # Δ = (−10 − −12) − (−20 − −19) = 2 − (−1) = 3; β = 0.5 → loss = log(1 + e^{−1.5}).
    loss, m = ts.dpo_loss(jnp.array([-10.0]), jnp.array([-20.0]), jnp.array([-12.0]), jnp.array([-19.0]), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert float(loss) != pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-3)  # β twice would give this
    assert float(m["rewards/chosen"]) == pytest.approx(1.0)
    assert float(m["rewards/rejected"]) == pytest.approx(-0.5)
    assert float(m["rewards/margins"]) == pytest.approx(1.5)
    assert float(m["rewards/accuracies"]) == 1.0
    # Label smoothing ε = 0.25: 0.75·log(1+e^{−1.5}) + 0.25·log(1+e^{1.5}).
    loss, _ = ts.dpo_loss(-10.0, -20.0, -12.0, -19.0, beta=0.5, label_smoothing=0.25)
    assert float(loss) == pytest.approx(0.75 * math.log1p(math.exp(-1.5)) + 0.25 * math.log1p(math.exp(1.5)), rel=1e-6)
    # IPO: (3 − 1/(2·0.5))² = 4; hinge: max(0, 1 − 1.5) = 0, and 1 − 0.1·3 = 0.7 at β = 0.1.
    assert float(ts.dpo_loss(-10.0, -20.0, -12.0, -19.0, beta=0.5, loss_type="ipo")[0]) == pytest.approx(4.0)
    assert float(ts.dpo_loss(-10.0, -20.0, -12.0, -19.0, beta=0.5, loss_type="hinge")[0]) == 0.0
    assert float(ts.dpo_loss(-10.0, -20.0, -12.0, -19.0, beta=0.1, loss_type="hinge")[0]) == pytest.approx(0.7)


def test_dpo_loss_ties_are_not_accurate_and_unknown_type_raises():
    _, m = ts.dpo_loss(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4), jnp.zeros(4))
    assert float(m["rewards/accuracies"]) == 0.0
    assert float(m["loss"]) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        ts.dpo_loss(0.0, 0.0, 0.0, 0.0, loss_type="kto")


# ---------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def tiny():
    from train_helpers import tiny_model

    return tiny_model()


PAIRS = [
    ("What is 2+2?", "4", "It is five, I think, or maybe six."),
    ("Name a colour, any colour you like, and say why you like it.", "Blue, because it is calm.", "No."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Hello! How can I help?", "Go away"),
]


def pair_examples(tok, max_length=128):
    rows = [(i + 1, {"prompt": p, "chosen": c, "rejected": r}) for i, (p, c, r) in enumerate(PAIRS)]
    return tokenize_rows(rows, tok, "dpo", max_length)


@pytest.fixture(scope="module")
def hf_tiny(tiny, tmp_path_factory):
    """transformers' LlamaForCausalLM with the tiny model's exact weights (via mrjax's HF export)."""
    import torch
    from transformers import LlamaForCausalLM

    model, tok = tiny
    directory = model.save_pretrained(tmp_path_factory.mktemp("tiny_hf"), tok)
    hf = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager")
    return hf.train()


def torch_sequence_logps(hf, prompt_ids, completion_ids):
    """Summed log p(completion | prompt) from one unpadded forward (the textbook way)."""
    import torch

    ids = torch.tensor(np.concatenate([prompt_ids, completion_ids])[None].astype(np.int64))
    logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    n = len(prompt_ids)
    return logp[n - 1:].gather(-1, targets[n - 1:, None]).sum()


def torch_dpo_loss(hf, examples, ref, dpo):
    import torch.nn.functional as F

    losses = []
    for i in range(len(examples)):
        (c, r), p = examples.completions[i], examples.prompts[i]
        pc, pr = torch_sequence_logps(hf, p, c), torch_sequence_logps(hf, p, r)
        rc, rr = float(ref[i, 0]), float(ref[i, 1])
        if dpo.loss_type == "ipo":
            pc, pr, rc, rr = pc / len(c), pr / len(r), rc / len(c), rr / len(r)
        delta = (pc - rc) - (pr - rr)
        if dpo.loss_type == "sigmoid":
            eps = dpo.label_smoothing
            losses.append(-(1 - eps) * F.logsigmoid(dpo.beta * delta) - eps * F.logsigmoid(-dpo.beta * delta))
        elif dpo.loss_type == "ipo":
            losses.append((delta - 1 / (2 * dpo.beta)) ** 2)
        else:
            losses.append(F.relu(1 - dpo.beta * delta))
    return sum(losses) / len(losses)


def torch_grads_by_hf_name(hf):
    return {name: p.grad.detach().numpy().copy() for name, p in hf.named_parameters() if p.grad is not None}


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("loss_type,eps,share,max_logits_mb", [("sigmoid", 0.1, True, 1024), ("ipo", 0.0, False, 1)])
def test_dpo_gradients_match_pytorch_transformers(tiny, hf_tiny, loss_type, eps, share, max_logits_mb):
    """Shared-prompt and concatenated forwards, whole and chunked (1 MiB) logits: the same gradients as torch."""
    from mrjax.model.weights import params_to_hf_tensors

    model, tok = tiny
    examples = pair_examples(tok)
    # Reference log-probs: fixed offsets from the policy's, so Δ ≠ 0 and every loss has a gradient.
    examples.ref_logps = np.array([[-30.0, -90.0], [-70.0, -20.0], [-60.0, -40.0]], np.float32)
    dpo = DPOSettings(beta=0.1, loss_type=loss_type, label_smoothing=eps, share_prompt=share)
    batch = make_batch(examples, [0, 1, 2], 4, 1, tok.pad_id, 128)  # 4th row is weight-0 padding
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    rows, length = batch["targets"].shape[1:]
    assert (ts.logits_chunk(rows, length, model.config.vocab_size, max_logits_mb) < length) == (max_logits_mb == 1)
    objective = ts.dpo_objective(model.module, dpo, max_logits_mb)
    (loss, _), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(model.params, mb, jnp.float32(3.0))

    hf_tiny.zero_grad()
    torch_loss = torch_dpo_loss(hf_tiny, examples, examples.ref_logps, dpo)
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5, abs=1e-6)

    ours = params_to_hf_tensors(model.config, grads)
    theirs = torch_grads_by_hf_name(hf_tiny)
    assert set(theirs) == set(ours)
    for name in theirs:
        assert _rel_err(ours[name], theirs[name]) < 2e-4, name


def test_sft_loss_and_gradients_match_pytorch(tiny, hf_tiny):
    from mrjax.model.weights import params_to_hf_tensors

    model, tok = tiny
    rows = [(1, {"prompt": "Rate this.", "completion": "Good answer.\nScore: 4"}),
            (2, {"prompt": [{"role": "user", "content": "Judge it"}], "completion": "Off topic.\nScore: 1"})]
    examples = tokenize_rows(rows, tok, "sft", 128)
    batch = make_batch(examples, [0, 1], 2, 1, tok.pad_id, 128)
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    n_tokens = float(batch["mask"].sum())
    (loss, _), grads = jax.jit(jax.value_and_grad(ts.sft_objective(model.module, 1024), has_aux=True))(
        model.params, mb, jnp.float32(n_tokens))

    hf_tiny.zero_grad()
    total = sum(torch_sequence_logps(hf_tiny, examples.prompts[i], examples.completions[i][0]) for i in range(2))
    torch_loss = -total / n_tokens
    torch_loss.backward()
    assert n_tokens == sum(len(c[0]) for c in examples.completions)
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    ours, theirs = params_to_hf_tensors(model.config, grads), torch_grads_by_hf_name(hf_tiny)
    for name in theirs:
        assert _rel_err(ours[name], theirs[name]) < 2e-4, name


def _train_settings(**kw):
    base = dict(learning_rate=1e-3, warmup_ratio=0.0, schedule="constant", weight_decay=0.01, max_grad_norm=0.5,
                adam_eps=1e-3, batch_size=4)
    base.update(kw)
    return TrainSettings(**base)


# ---------------------------------------------------------------- sharding, accumulation, chunking


STEP_INDICES = [0, 1, 2, 0, 1, 2, 1]
STEP_REF_LOGPS = np.array([[-30.0, -90.0], [-70.0, -20.0], [-60.0, -40.0]], np.float32)


def _step_once(model, tok, mesh, params, train, batch_rows=8, grad_accum=1, share=True, **module_kw):
    from mrjax.model.pretrained import param_shardings

    examples = pair_examples(tok)
    examples.ref_logps = STEP_REF_LOGPS
    shards = param_shardings(model.config, mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shards)
    tx, schedule = ts.make_optimizer(train, total_steps=10)
    abstract = jax.eval_shape(lambda p: p, params)
    shardings = ts.state_shardings(tx, shards, abstract, mesh)
    state = ts.init_state(params, tx, shardings)
    module = type(model.module)(model.config, mesh=mesh, **module_kw)
    step = ts.make_train_step("dpo", module, tx, schedule, shardings, mesh, DPOSettings(share_prompt=share))
    indices = STEP_INDICES[: batch_rows - 1]  # the last row is weight-0 padding
    batch = make_batch(examples, indices, batch_rows, grad_accum, tok.pad_id, 128,
                       shards=ts.packing_shards(mesh, batch_rows // grad_accum))
    state, metrics = step(state, batch)
    return jax.device_get(state.params), ts.numpy_metrics(metrics), state


@pytest.fixture(scope="module")
def one_device_step(tiny):
    """The reference: one DPO step (batch 8, no accumulation, shared prompt) on one device."""
    model, tok = tiny
    p, m, _ = _step_once(model, tok, single_device_mesh(), jax.device_get(model.params), _train_settings(batch_size=8))
    return p, m


def _assert_same_step(got, want, keys=("loss", "grad_norm", "rewards/chosen", "rewards/accuracies", "logps/chosen",
                                       "logps/rejected")):
    (p_got, m_got), (p_want, m_want) = got, want
    for key in keys:
        assert m_got[key] == pytest.approx(m_want[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(p_want), jax.tree.leaves(p_got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_full_dpo_step_matches_torch_adamw_step(tiny, hf_tiny, one_device_step):
    """One optimizer step: loss, grad_norm and the parameter update equal a transformers +
    torch.optim.AdamW step (clipping active, weight decay on everything but norms)."""
    import torch

    from mrjax.model.weights import params_to_hf_tensors

    model, tok = tiny
    params, metrics = one_device_step
    examples = pair_examples(tok)
    hf = type(hf_tiny)(hf_tiny.config)
    hf.load_state_dict(hf_tiny.state_dict())
    hf.train()
    decay = [p for n, p in hf.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in hf.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-3)
    # The step's batch: pairs STEP_INDICES (with repeats) and one weight-0 padding row.
    sub = dataclasses.replace(examples, prompts=[examples.prompts[i] for i in STEP_INDICES],
                              completions=[examples.completions[i] for i in STEP_INDICES])
    loss = torch_dpo_loss(hf, sub, STEP_REF_LOGPS[STEP_INDICES], DPOSettings())
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5))
    opt.step()

    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert grad_norm > 0.5  # clipping was active
    assert metrics["learning_rate"] == pytest.approx(1e-3)
    ours = params_to_hf_tensors(model.config, params)
    before = hf_tiny.state_dict()
    for name, p in hf.named_parameters():
        # Compare the updates (params move by ~lr; the update must agree, not just the weights).
        assert _rel_err(ours[name] - before[name].numpy(), p.detach().numpy() - before[name].numpy()) < 1e-3, name


@pytest.mark.parametrize("shape", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                   dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_step_equals_single_device(tiny, one_device_step, shape):
    model, tok = tiny
    assert len(jax.devices()) == 8
    mesh = make_mesh(**shape)
    p8, m8, state8 = _step_once(model, tok, mesh, jax.device_get(model.params), _train_settings(batch_size=8))
    # The state really is sharded as declared (not silently replicated).
    q = state8.params["layers"]["attn"]["q"]
    assert q.sharding.mesh.shape == mesh.shape and len({s.device for s in q.addressable_shards}) == 8
    assert q.sharding.is_fully_replicated == (mesh.shape["fsdp"] * mesh.shape["tensor"] == 1)
    _assert_same_step((p8, m8), one_device_step)


def test_gradient_accumulation_equals_one_big_batch(tiny, one_device_step):
    model, tok = tiny
    train4 = _train_settings(batch_size=8, grad_accum=4)
    p4, m4, _ = _step_once(model, tok, single_device_mesh(), jax.device_get(model.params), train4, grad_accum=4)
    _assert_same_step((p4, m4), one_device_step)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_step_equals_plain_step(tiny, one_device_step, policy):
    model, tok = tiny
    got = _step_once(model, tok, single_device_mesh(), jax.device_get(model.params), _train_settings(batch_size=8),
                     remat=True, remat_policy=policy)
    _assert_same_step(got[:2], one_device_step)


def test_remat_policies_trade_memory():
    """XLA's own accounting of a forward+backward: "full" keeps least, "dots" (matmul outputs
    only) less than no remat. A policy that saved nothing or everything would break the order."""
    from mrjax.model.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    tokens = jnp.zeros((8, 256), jnp.int32)
    params = Llama(config).init(jax.random.key(0), tokens[:, :8])["params"]

    def temp_bytes(**kw):
        module = Llama(config, **kw)

        def loss(p):
            return jnp.mean(module.apply({"params": p}, tokens)[0] ** 2)

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    plain, full, dots = temp_bytes(), temp_bytes(remat=True, remat_policy="full"), temp_bytes(remat=True, remat_policy="dots")
    assert full < dots < plain, (full, dots, plain)
    # bfloat16 on XLA:CPU: "dots" keeps nothing (its bfloat16 saves would be copied whole at every layer)
    bf16 = dict(remat=True, dtype=jnp.bfloat16)
    assert temp_bytes(**bf16, remat_policy="dots") == temp_bytes(**bf16, remat_policy="full")


def test_chunked_token_logps_equal_whole_and_budget_picks_chunk():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 16)), jnp.int32)
    whole = ts.token_logps(hidden, unembed, targets, 16)
    # float64 numpy reference of log_softmax at the targets
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    ref = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(whole), ref, rtol=1e-5, atol=1e-5)
    for chunk in (1, 4, 8):
        np.testing.assert_allclose(np.asarray(ts.token_logps(hidden, unembed, targets, chunk)), np.asarray(whole),
                                   rtol=1e-6, atol=1e-6)
        g_chunk = jax.grad(lambda h, w: ts.token_logps(h, w, targets, chunk).sum(), argnums=(0, 1))(hidden, unembed)
        g_whole = jax.grad(lambda h, w: ts.token_logps(h, w, targets, 16).sum(), argnums=(0, 1))(hidden, unembed)
        for a, b in zip(g_chunk, g_whole):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # 16 rows × 256 tokens × 49152 vocab × 4 B = 768 MiB: fits 1024 MiB whole, 256 MiB needs chunks of 64.
    assert ts.logits_chunk(16, 256, 49152, 1024) == 256
    assert ts.logits_chunk(16, 256, 49152, 256) == 64
    assert ts.logits_chunk(16, 256, 49152, 1) == 1


# ---------------------------------------------------------------- schedule and optimizer


def _schedule_float64(step, peak, warmup, total, kind):
    """The schedule's rule, written out independently in float64."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    x = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return peak * (0.5 * (1 + math.cos(math.pi * x)) if kind == "cosine" else 1 - x)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_without_a_zero_step_then_decays_as_transformers(kind):
    """Every step's rate is the float64 rule's: warmup step s at peak·(s+1)/(W+1), never 0; from step W on
    it is transformers' get_{cosine,linear}_schedule_with_warmup (whose step 0 has a rate of 0)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total, warmup, peak = 50, 5, 3e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    sched = make(opt, warmup, total)
    ours = ts.lr_schedule(peak, warmup, total, kind)
    for step in range(total):
        got = float(ours(step))
        # float32 arithmetic: 1 + cos(πx) near x = 1 loses digits, hence the absolute bound
        assert got == pytest.approx(_schedule_float64(step, peak, warmup, total, kind), rel=1e-5, abs=peak * 1e-6), step
        assert got > 0, step
        if step >= warmup:
            assert got == pytest.approx(sched.get_last_lr()[0], rel=1e-5, abs=peak * 1e-6), step
        opt.step()
        sched.step()
    # A 5-step DPO run with warmup_ratio 0.1 (one warmup step): five steps that all learn.
    short = ts.lr_schedule(peak, ts.warmup_steps_for(_train_settings(warmup_ratio=0.1), 5), 5, kind)
    assert float(short(0)) == pytest.approx(peak / 2) and float(short(1)) == pytest.approx(peak)
    assert all(float(short(s)) > 0 for s in range(5))


def test_weight_decay_skips_norm_scales(tiny):
    model, _ = tiny
    tx, _ = ts.make_optimizer(_train_settings(weight_decay=0.5, learning_rate=0.1, max_grad_norm=0.0), 10)
    params = jax.device_get(model.params)
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients the only update is decay: −lr·wd·p for matrices, 0 for norm scales.
    np.testing.assert_array_equal(np.asarray(updates["final_norm"]["scale"]), 0.0)
    np.testing.assert_array_equal(np.asarray(updates["layers"]["attn_norm"]["scale"]), 0.0)
    np.testing.assert_allclose(np.asarray(updates["lm_head"]), -0.05 * params["lm_head"], rtol=1e-6)


def test_bfloat16_dpo_step_agrees_with_float32(tiny, one_device_step):
    """bfloat16 compute with float32 parameters and optimizer state (how configs/llama3_8b.yaml trains):
    the step's figures within BF16_STEP_RTOL of float32's, and the same parameter update to BF16_UPDATE_COS."""
    model, tok = tiny
    params = jax.device_get(model.params)
    got_params, got, _ = _step_once(model, tok, single_device_mesh(), params, _train_settings(batch_size=8),
                                    dtype=jnp.bfloat16)
    want_params, want = one_device_step
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=BF16_STEP_RTOL), key
    delta = lambda new: np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))  # noqa: E731
                                        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))])
    d16, d32 = delta(got_params), delta(want_params)
    assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) >= BF16_UPDATE_COS


def test_bfloat16_step_with_a_tied_unembedding_agrees_with_float32(tiny):
    """SmolLM2's output matrix is its embedding's transpose. In bfloat16 the logits are a mixed_matmul of
    that transpose, whose gradient reaches the embedding transposed back (on XLA:CPU a product XLA must
    not fold into a transposed-operand bfloat16 dot, which it cannot run): the step runs, and its
    figures and update agree with float32's as the untied model's do."""
    from types import SimpleNamespace

    from mrjax.model.llama import Llama

    model, tok = tiny
    config = dataclasses.replace(model.config, tie_word_embeddings=True)
    tied = SimpleNamespace(config=config, module=Llama(config))
    params = {k: v for k, v in jax.device_get(model.params).items() if k != "lm_head"}
    train = _train_settings(batch_size=8)
    want_params, want, _ = _step_once(tied, tok, single_device_mesh(), params, train)
    for split in (False, True):
        got_params, got, _ = _step_once(tied, tok, single_device_mesh(), params, train, dtype=jnp.bfloat16,
                                        split_weights=split)
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert got[key] == pytest.approx(want[key], rel=BF16_STEP_RTOL), (split, key)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=BF16_TIED_GRAD_NORM_RTOL), split
        d16, d32 = (np.ravel(np.asarray(p["embedding"], np.float64) - params["embedding"]) for p in (got_params, want_params))
        assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) >= BF16_UPDATE_COS, split


# bfloat16 rounds the matmul inputs to 8 bits of mantissa (the residual stream stays float32): measured on this
# test's step, the loss and log-probs within 2e-5 of float32 (relative), the gradient norm within 4e-4 and the
# update's direction at a cosine of 0.99998; the bounds leave margins of 50x (loss), 2.5x (gradient norm) and 5x
# (the update's angle).
BF16_STEP_RTOL = 1e-3
BF16_UPDATE_COS = 0.9999
# The logits' gradient is rounded to bfloat16 too (as under autocast); through a tied embedding, where it
# makes most of the gradient, the norm lands within 2e-3 of float32's (measured 1.6e-3 and 1.9e-3).
BF16_TIED_GRAD_NORM_RTOL = 1e-2


# ---------------------------------------------------------------- shared prompt prefix


def _judge_rows():
    from mrjax.roles import fill_judge_prompt

    qa = [("What is 2+2?", "4"), ("Name a colour.", "Blue, because it is calm."),
          ("Who wrote Hamlet?", "Shakespeare wrote it around 1600."), ("Is water wet?", "Yes.")]
    return [{"prompt": fill_judge_prompt(q, a), "completion": f"Relevant and correct.\nScore: {i + 2}"}
            for i, (q, a) in enumerate(qa)]


def test_make_batch_splits_the_shared_prefix_by_hand():
    """Hand-worked: heads (prompt minus its last token) [1..40, 50, 51], [1..40, 60] and [1..40, 50, 70]
    share 40 tokens; the shared part is left-padded to 48, each remainder continues at position 40."""
    from mrjax.data import Examples, common_prefix_length

    common = np.arange(1, 41, dtype=np.int32)
    prompts = [np.r_[common, 50, 51, 9], np.r_[common, 60, 9], np.r_[common, 50, 70, 9]]
    examples = Examples("sft", [p.astype(np.int32) for p in prompts], [(np.array([7, 8], np.int32),)] * 3, "t",
                        [1, 2, 3], "")
    assert common_prefix_length([p[:-1] for p in examples.prompts]) == 40
    batch = make_batch(examples, [0, 1, 2], 4, 1, 0, 256)  # the 4th row is weight-0 padding
    S, P = 48, 16  # 40 and 2 tokens, padded up to multiples of 16
    assert batch["shared_tokens"].shape == (1, S) and batch["prefix_tokens"].shape == (1, 4, P)
    np.testing.assert_array_equal(batch["shared_tokens"][0, S - 40:], common)
    np.testing.assert_array_equal(batch["shared_positions"][0, S - 40:], np.arange(40))
    assert batch["shared_mask"][0].sum() == 40 and batch["shared_mask"][0, S - 40:].all()
    for row, i in enumerate([0, 1, 2, 0]):
        m = batch["prefix_mask"][0, row]
        rest = batch["prefix_tokens"][0, row][m]
        # shared part + remainder + the last prompt token (the completion segment's first input) = the prompt
        np.testing.assert_array_equal(np.r_[batch["shared_tokens"][0][batch["shared_mask"][0]], rest,
                                            batch["tokens"][0, row, 0]], prompts[i])
        np.testing.assert_array_equal(batch["prefix_positions"][0, row][m], 40 + np.arange(len(rest)))
        assert batch["positions"][0, row, 0] == len(prompts[i]) - 1
    # Fewer than MIN_SHARED_TOKENS in common, one real row, or sharing off: no shared keys.
    short = Examples("sft", [np.r_[common[:20], 5, 9], np.r_[common[:20], 6, 9]], [(np.array([7], np.int32),)] * 2,
                     "t", [1, 2], "")
    assert "shared_tokens" not in make_batch(short, [0, 1], 2, 1, 0, 256)
    assert "shared_tokens" not in make_batch(examples, [0], 4, 1, 0, 256)
    assert "shared_tokens" not in make_batch(examples, [0, 1, 2], 4, 1, 0, 256, share_prefix=False)


def _mixed_examples(tok, kind):
    """Judge-format rows (the rubric shared), then actor-style rows (only the chat header shared)."""
    judge = _judge_rows()
    if kind == "sft":
        actor = [{"prompt": p, "completion": c} for p, c, _ in PAIRS]
    else:
        judge = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "Off topic.\nScore: 0"} for r in judge]
        actor = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    rows = [(i + 1, r) for i, r in enumerate(judge + actor)]
    return tokenize_rows(rows, tok, kind, 1024)


# float32 tolerance of the shared-prefix step against the unshared one (different summation orders only).
SHARED_RTOL, SHARED_ATOL = 1e-4, 1e-5


def _examples_with_reference(tok, kind):
    examples = _mixed_examples(tok, kind)
    if kind == "dpo":
        examples.ref_logps = np.stack([np.linspace(-60, -20, len(examples)), np.linspace(-30, -80, len(examples))],
                                      axis=1).astype(np.float32)
    return examples


def _assert_same_gradients(model, kind, share_prompt, pairs, got, want):
    """The accumulated loss, metric sums and gradients of batch ``got`` equal those of ``want``."""
    if kind == "dpo":
        micro = ts.dpo_objective(model.module, DPOSettings(share_prompt=share_prompt), 1024)
        denom = jnp.float32(pairs)
    else:
        micro = ts.sft_objective(model.module, 1024)
        denom = jnp.float32((want["weights"][..., None] * want["mask"]).sum())
    grad_fn = jax.jit(lambda p, b: ts._accumulate(micro, p, b, denom))
    g_got, aux_got = grad_fn(model.params, got)
    g_want, aux_want = grad_fn(model.params, want)
    for key in aux_want:
        np.testing.assert_allclose(float(aux_got[key]), float(aux_want[key]), rtol=SHARED_RTOL, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_want), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=SHARED_RTOL, atol=SHARED_ATOL,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,share_prompt,indices,accum", [
    ("sft", False, [0, 1, 2, 3], 1),          # judge rows: the rubric shared
    ("sft", False, [0, 1, 2, 3, 4, 5], 2),    # per micro-batch: judge rows (rubric), actor rows (header)
    ("sft", False, [4, 5, 6, 0], 1),          # actor + judge rows: nothing shared (S = 0)
    ("dpo", True, [0, 1, 2, 3], 1),           # judge pairs: the rubric once per micro-batch, each prompt once per pair
    ("dpo", False, [0, 1, 2, 3], 2),          # judge pairs, concatenated forward
    ("dpo", True, [0, 4, 5, 6], 1),           # judge + actor pairs: nothing shared (S = 0)
])
def test_shared_prefix_step_equals_unshared(tiny, kind, share_prompt, indices, accum):
    model, tok = tiny
    examples = _examples_with_reference(tok, kind)
    size = 4 if len(indices) <= 4 else 8
    shared = make_batch(examples, indices, size, accum, tok.pad_id, 1024)
    plain = make_batch(examples, indices, size, accum, tok.pad_id, 1024, share_prefix=False)
    judge_only = all(i < 4 for i in indices) or accum > 1
    assert ("shared_tokens" in shared) == judge_only
    if judge_only:  # the rubric (≥ 250 tokens) runs once: the rows' prefixes are much shorter
        assert shared["shared_mask"].sum(axis=1).max() >= 250
        assert shared["prefix_tokens"].shape[-1] < plain["prefix_tokens"].shape[-1]
    _assert_same_gradients(model, kind, share_prompt, len(indices), shared, plain)


def test_shared_prefix_sharded_sft_step_equals_single_device_unshared(tiny):
    """The shared prefix [A, S] is replicated while rows shard over (data, fsdp): a sharded step with it
    equals the unshared step on one device."""
    from mrjax.model.pretrained import param_shardings

    model, tok = tiny
    examples = tokenize_rows([(i + 1, r) for i, r in enumerate(_judge_rows() * 2)], tok, "sft", 1024)
    train = _train_settings(batch_size=8)

    def one_step(mesh, share):
        shards = param_shardings(model.config, mesh)
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), jax.device_get(model.params), shards)
        tx, schedule = ts.make_optimizer(train, total_steps=10)
        shardings = ts.state_shardings(tx, shards, jax.eval_shape(lambda p: p, params), mesh)
        module = type(model.module)(model.config, mesh=mesh)
        step = ts.make_train_step("sft", module, tx, schedule, shardings, mesh)
        # Sharded, the rows' real tokens pack shard by shard (4 shards of 2 rows); on one device, padded.
        batch = make_batch(examples, list(range(7)), 8, 1, tok.pad_id, 1024, share_prefix=share,
                           shards=ts.packing_shards(mesh, 8), pack=share, pack_at_most=1.0)
        assert ("shared_tokens" in batch) == share and ("slots" in batch) == share
        state, metrics = step(ts.init_state(params, tx, shardings), batch)
        return jax.device_get(state.params), ts.numpy_metrics(metrics)

    got = one_step(make_mesh(data=2, fsdp=2, tensor=2), True)
    assert got[1]["num_tokens"] > 0
    want = one_step(single_device_mesh(), False)
    _assert_same_step(got, want, keys=("loss", "grad_norm", "num_tokens"))


def _hand_pairs():
    """Two pairs: heads [1, 2, 3] and [4]; completions of 2 and 1, 3 and 1 tokens."""
    from mrjax.data import Examples

    prompts = [np.array([1, 2, 3, 9], np.int32), np.array([4, 9], np.int32)]
    completions = [(np.array([5, 6], np.int32), np.array([7], np.int32)),
                   (np.array([8, 8, 8], np.int32), np.array([6], np.int32))]
    return Examples("dpo", prompts, completions, "t", [1, 2], "")


def test_real_token_slots_by_hand():
    """Hand-worked: prefixes left-padded to 4 ([_ 1 2 3], [_ _ _ 4]), completions right-padded to 4 (2, 1,
    3, 1 real). Spare places hold the shard's slot count; sizes round up to the pad multiple (4)."""
    from mrjax.data import Examples

    examples = _hand_pairs()
    one = make_batch(examples, [0, 1], 2, 1, 0, 256, pad_multiple=4, share_prefix=False)
    np.testing.assert_array_equal(one["prefix_slots"], [[[1, 2, 3, 7]]])
    np.testing.assert_array_equal(one["slots"], [[[0, 1, 4, 8, 9, 10, 12, 16]]])
    two = make_batch(examples, [0, 1], 2, 1, 0, 256, pad_multiple=4, share_prefix=False, shards=2)
    np.testing.assert_array_equal(two["prefix_slots"], [[[1, 2, 3, 4], [3, 4, 4, 4]]])
    np.testing.assert_array_equal(two["slots"], [[[0, 1, 4, 8], [0, 1, 2, 4]]])
    # Weight-0 rows (a short batch's copies of its first row) are left out: only row 0's tokens are listed.
    short = make_batch(examples, [1], 2, 1, 0, 256, pad_multiple=4, share_prefix=False)
    np.testing.assert_array_equal(short["weights"], [[1, 0]])
    np.testing.assert_array_equal(short["prefix_slots"], [[[3, 8, 8, 8]]])
    np.testing.assert_array_equal(short["slots"], [[[0, 1, 2, 4]]])
    # Nothing to drop: no slots; packing off: none either.
    even = Examples("dpo", [np.array([1, 2, 9], np.int32)], [(np.array([5, 6], np.int32), np.array([7, 8], np.int32))],
                    "t", [1], "")
    full = make_batch(even, [0, 0], 2, 1, 0, 256, pad_multiple=1, share_prefix=False)
    assert "slots" not in full and "prefix_slots" not in full
    assert "slots" not in make_batch(examples, [0, 1], 2, 1, 0, 256, pad_multiple=4, pack=False)


def test_a_batch_packed_for_other_shards_than_the_mesh_is_refused():
    """Packed for one shard on a mesh that splits rows 4 ways, every device would compute every row's tokens."""
    batch = make_batch(_hand_pairs(), [0, 1], 4, 1, 0, 256, pad_multiple=4, share_prefix=False)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="packed for 1 shards, but the mesh splits its 4 rows 4 ways"):
        ts.check_packing(mesh, batch)
    ts.check_packing(mesh, make_batch(_hand_pairs(), [0, 1], 4, 1, 0, 256, pad_multiple=4, share_prefix=False,
                                      shards=ts.packing_shards(mesh, 4)))
    ts.check_packing(make_mesh(data=8), make_batch(_hand_pairs(), [0, 1], 4, 1, 0, 256))  # 4 rows over 8: replicated


@pytest.mark.parametrize("shards", [1, 2])
def test_concatenated_slots_are_the_real_tokens_of_the_prompt_then_completion_rows(shards):
    """The prompt-then-completion layout's real slots, derived from the two segments' slots, are exactly
    where its mask (each prompt's mask repeated for its two completions, then the completion's) is True."""
    batch = make_batch(_hand_pairs(), [0, 1], 2, 1, 0, 256, pad_multiple=4, share_prefix=False, shards=shards)
    prefix_mask, mask = batch["prefix_mask"][0], batch["mask"][0]
    P, C = prefix_mask.shape[1], mask.shape[1]
    slots = np.asarray(ts.concatenated_slots(jnp.asarray(batch["prefix_slots"][0]), jnp.asarray(batch["slots"][0]),
                                             2, P, C, 2))
    concatenated = np.concatenate([np.repeat(prefix_mask, 2, axis=0), mask], axis=1).reshape(shards, -1)
    for s in range(shards):
        local = concatenated.shape[1]
        real = slots[s][slots[s] < local]
        assert (slots[s][slots[s] >= local] == local).all()
        np.testing.assert_array_equal(np.sort(real), np.flatnonzero(concatenated[s]))


@pytest.mark.parametrize("kind,share_prompt,indices,accum,shards", [
    ("sft", False, [0, 1, 2, 3], 1, 1),          # judge rows after their shared rubric
    ("sft", False, [4, 5, 6, 0], 1, 2),          # actor + judge rows, nothing shared; two shards
    ("dpo", True, [0, 4, 5, 6], 1, 2),           # each prompt once per pair; two shards
    ("dpo", False, [0, 1, 2, 3, 4, 5], 2, 1),    # concatenated forward, two micro-batches
])
def test_packed_step_equals_padded(tiny, kind, share_prompt, indices, accum, shards):
    """The step on the real tokens only (``slots``) gives the padded step's loss, metrics and gradients."""
    model, tok = tiny
    examples = _examples_with_reference(tok, kind)
    size = 4 if len(indices) <= 4 else 8
    packed = make_batch(examples, indices, size, accum, tok.pad_id, 1024, shards=shards, pack_at_most=1.0)
    padded = make_batch(examples, indices, size, accum, tok.pad_id, 1024, pack=False)
    # Something to drop: fewer packed places than the two segments' slots.
    places = (packed["slots"].shape[-1] + packed["prefix_slots"].shape[-1]) * shards
    assert places < packed["mask"][0].size + packed["prefix_mask"][0].size
    _assert_same_gradients(model, kind, share_prompt, len(indices), packed, padded)


def test_mixed_matmul_and_its_gradients_match_float64():
    """``mixed_matmul``: x rounded to bfloat16 times w kept to about 16 bits (two bfloat16 parts), float32
    accumulation; its gradients against a float64 computation of the same rounded operands (the cotangent is
    bfloat16-exact, so only accumulation order differs). A transposed or swapped gradient would be far off."""
    from mrjax.model.llama import mixed_matmul, project

    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (24, 40), jnp.float32)
    w = jax.random.normal(kw, (40, 56), jnp.float32) * 0.05
    cot = jax.random.normal(kc, (24, 56), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
    x16 = np.asarray(x.astype(jnp.bfloat16), np.float64)
    w16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    w64 = np.asarray(w, np.float64)

    y = np.asarray(jax.jit(mixed_matmul, static_argnums=2)(x, w, True), np.float64)
    scale = np.abs(x16 @ w64).max()
    assert np.abs(y - x16 @ w64).max() <= 1e-5 * scale  # w's low part counts ...
    assert np.abs(x16 @ w16 - x16 @ w64).max() > 1e-4 * scale  # ... where rounding w alone would not do
    rounded = np.asarray(mixed_matmul(x, w), np.float64)  # without the split: w rounded, as autocast does
    assert np.abs(rounded - x16 @ w16).max() <= 1e-5 * scale

    for split in (False, True):
        dx, dw = jax.grad(lambda x, w: jnp.sum(mixed_matmul(x, w, split) * cot), argnums=(0, 1))(x, w)
        c64 = np.asarray(cot, np.float64)
        np.testing.assert_allclose(np.asarray(dx), c64 @ w16.T, rtol=0, atol=1e-5 * np.abs(c64 @ w16.T).max())
        np.testing.assert_allclose(np.asarray(dw), x16.T @ c64, rtol=0, atol=1e-5 * np.abs(x16.T @ c64).max())
        assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32

    # project() flattens and restores the einsum's axes: [B, T, h, d] x [h, d, e] over two axes.
    a = jax.random.normal(kx, (2, 3, 4, 5), jnp.float32)
    b = jax.random.normal(kw, (4, 5, 6), jnp.float32)
    want = np.einsum("bthd,hde->bte", np.asarray(a.astype(jnp.bfloat16), np.float64),
                     np.asarray(b.astype(jnp.bfloat16), np.float64))
    got = project(a, b, jnp.bfloat16, in_dims=2)
    assert got.shape == (2, 3, 6) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)


def test_train_dtype_sets_the_steps_compute_dtype_only(tiny):
    """train.dtype: bfloat16 trains (and scores log-probs) in bfloat16 while the model, its sampler and
    its float32 parameters stay as they are."""
    from mrjax.config import Config, TrainSettings
    from mrjax.trainer import Trainer

    model, tok = tiny
    config = Config(train=TrainSettings(kind="dpo", batch_size=8, dtype="bfloat16", split_weights=True))
    trainer = Trainer(config, model, tok)
    assert trainer.module.dtype == jnp.bfloat16 and model.module.dtype == jnp.float32
    assert trainer.module.split_weights and not model.module.split_weights
    assert jax.tree.leaves(model.params)[0].dtype == jnp.float32
    with pytest.raises(Exception, match="train.dtype"):
        TrainSettings(dtype="float16")
    from mrjax.model.pretrained import fast_bfloat16, training_dtype

    assert training_dtype("auto", jnp.float32) == (jnp.bfloat16 if fast_bfloat16() else jnp.float32)
    assert training_dtype("", jnp.float32) == jnp.float32 and training_dtype("float32", jnp.bfloat16) == jnp.float32
