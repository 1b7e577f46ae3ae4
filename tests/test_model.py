"""The decoder: shapes, analytic size and cost, causality, RoPE and attention against hand-written
references, loss, deterministic init, and the Hugging Face Llama parameter names."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge import model as model_module
from lmforge.model import (
    Transformer,
    apply_rope,
    decode_attention,
    fold_sign,
    explicit_causal_attention,
    flops_per_token,
    linear,
    num_params,
    rope_tables,
    use_explicit_attention,
)

TINY = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64)
REFERENCE = ModelConfig(vocab_size=65, n_layer=4, n_head=4, d_model=256, max_seq_len=256)


def build(cfg: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- shapes and loss ------------------------------------------------------------------------


def test_shapes_and_loss_equals_cross_entropy_of_logits() -> None:
    model = build()
    idx, targets = tokens(TINY, 3, 10), tokens(TINY, 3, 10, seed=2)
    targets[0, :4] = -100  # ignored positions (e.g. padding or prompt tokens)
    logits = model(idx)
    assert logits.shape == (3, 10, TINY.vocab_size) and logits.dtype == torch.float32
    logits2, loss = model(idx, targets)
    assert torch.equal(logits, logits2)
    assert loss.shape == () and loss.dtype == torch.float32
    expected = F.cross_entropy(logits.view(-1, TINY.vocab_size), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    # a fresh model predicts roughly uniformly: loss near ln(V) on random targets
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5


def test_bf16_autocast_loss_is_fp32_and_close_to_fp32() -> None:
    model = build()
    idx, targets = tokens(TINY, 2, 16), tokens(TINY, 2, 16, seed=2)
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05
    loss16.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_sequence_longer_than_max_seq_len_is_a_clear_error() -> None:
    model = build()
    with pytest.raises(LmforgeError, match="max_seq_len"):
        model(tokens(TINY, 1, TINY.max_seq_len + 1))


# ---- analytic size and FLOPs ----------------------------------------------------------------

CONFIGS = [
    TINY,
    replace(TINY, n_kv_head=2),  # grouped-query attention
    replace(TINY, n_kv_head=1),  # multi-query attention
    replace(TINY, tie_embeddings=False),
    replace(TINY, d_ff=48),
    replace(TINY, n_layer=3, n_head=2, n_kv_head=1, d_model=64, d_ff=100, tie_embeddings=False),
    REFERENCE,
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c.n_layer}h{c.n_head}kv{c.kv_heads}ff{c.ff_dim}tie{int(c.tie_embeddings)}")
def test_num_params_equals_built_model(cfg: ModelConfig) -> None:
    model = Transformer(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    embedding = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    assert num_params(cfg, include_embedding=False) == body


@settings(max_examples=25, deadline=None)
@given(
    n_layer=st.integers(1, 3),
    n_kv_head=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 8]),
    d_ff=st.integers(0, 40),
    vocab=st.integers(2, 50),
    tie=st.booleans(),
)
def test_num_params_property(n_layer: int, n_kv_head: int, head_dim: int, d_ff: int, vocab: int, tie: bool) -> None:
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head, d_model=4 * head_dim,
        d_ff=d_ff, max_seq_len=8, tie_embeddings=tie,
    )
    assert num_params(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_reference_size_and_flops_golden() -> None:
    # d=256, ff=704: per layer q,k,v,o 4*256^2 + gate,up,down 3*256*704 + two norms 2*256
    per_layer = 4 * 256 * 256 + 3 * 256 * 704 + 2 * 256
    body = 4 * per_layer + 256
    assert num_params(REFERENCE, include_embedding=False) == body == 3_213_568
    assert num_params(REFERENCE) == body + 65 * 256 == 3_230_208  # tied head counted once
    assert num_params(replace(REFERENCE, tie_embeddings=False)) == 3_230_208 + 65 * 256
    # 6 * (body + lm_head) + 12 * n_layer * d_model * seq_len
    assert flops_per_token(REFERENCE, 256) == 6 * (body + 65 * 256) + 12 * 4 * 256 * 256 == 22_526_976
    # the head matmul costs the same whether or not it is tied
    assert flops_per_token(replace(REFERENCE, tie_embeddings=False), 256) == 22_526_976
    assert flops_per_token(REFERENCE, 512) - flops_per_token(REFERENCE, 256) == 12 * 4 * 256 * 256


# ---- causality ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(n_kv_head: int) -> None:
    cfg = replace(TINY, n_kv_head=n_kv_head)
    model = build(cfg)
    idx = tokens(cfg, 2, 20)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % cfg.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # and the change does reach later positions


# ---- RoPE and attention against references --------------------------------------------------


def test_rope_matches_complex_rotation_in_hf_half_layout() -> None:
    hd, T, theta = 8, 11, 10000.0
    x = torch.randn(2, 3, T, hd)
    cos, sin = rope_tables(hd, 32, theta)
    got = apply_rope(x, cos[:T], fold_sign(sin[:T]))
    # HF layout: dimension i pairs with i + hd/2 as the real and imaginary part of one complex number
    half = hd // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # (2, 3, T, hd/2)
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd/2)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat((rotated.real, rotated.imag), dim=-1).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_roll_form_equals_hf_rotate_half_bit_for_bit() -> None:
    """apply_rope's roll and sign-folded table give HF's x * cos + rotate_half(x) * sin exactly
    (the same products and one sum: a checkpoint decodes the same tokens as before the change)."""
    hd, T = 64, 37
    x = torch.randn(3, T, 5, hd)
    cos, sin = rope_tables(hd, T, 10000.0)
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, hd): broadcast over the heads
    hf = x * cos + torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1) * sin
    assert torch.equal(apply_rope(x, cos, fold_sign(sin)), hf)


def test_rope_scores_depend_only_on_relative_position() -> None:
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m], fold_sign(sin[m]))
        kn = apply_rope(k, cos[n], fold_sign(sin[n]))
        return float(qm @ kn)

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Grouped-query causal attention written out with explicit per-head loops and softmax."""
    B, T, C = x.shape
    hd, group = cfg.head_dim, cfg.n_head // cfg.kv_heads
    cos, sin = rope_tables(hd, T, cfg.rope_theta)
    q = (x @ attn.q_proj.weight.T).view(B, T, cfg.n_head, hd)
    k = (x @ attn.k_proj.weight.T).view(B, T, cfg.kv_heads, hd)
    v = (x @ attn.v_proj.weight.T).view(B, T, cfg.kv_heads, hd)

    def rot(t: torch.Tensor) -> torch.Tensor:  # (B, T, hd), HF rotate_half
        return t * cos + torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), dim=-1) * sin

    heads = []
    for h in range(cfg.n_head):
        qh, kh, vh = rot(q[:, :, h]), rot(k[:, :, h // group]), v[:, :, h // group]
        scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ vh)  # (B, T, hd)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_attention_matches_hand_written_reference(n_kv_head: int) -> None:
    cfg = replace(TINY, n_kv_head=n_kv_head)
    model = build(cfg)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 13, cfg.d_model)
    cos, sin = model.rope_cos[:13], model.rope_sin[:13]
    torch.testing.assert_close(attn(x, cos, sin, None), reference_attention(attn, x, cfg), rtol=1e-5, atol=1e-5)


def test_whole_model_matches_reference_forward() -> None:
    cfg = replace(TINY, n_kv_head=2, tie_embeddings=False)
    model = build(cfg)
    idx = tokens(cfg, 2, 9)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.model.embed_tokens.weight[idx]
    for layer in model.model.layers:
        x = x + reference_attention(layer.self_attn, rms(x, layer.input_layernorm.weight), cfg)
        h = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    expected = rms(x, model.model.norm.weight) @ model.lm_head.weight.T
    torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [19, model_module.CAUSAL_SPLIT_MIN_LEN + 3, 2 * model_module.CAUSAL_SPLIT_MIN_LEN])  # whole; split, odd; split, even
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_explicit_attention_equals_sdpa(kv: int, T: int) -> None:
    q = torch.randn(2, 4, T, 8, requires_grad=True)
    k, v = torch.randn(2, kv, T, 8, requires_grad=True), torch.randn(2, kv, T, 8, requires_grad=True)
    grad_y = torch.randn(2, 4, T, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != 4)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_y)
    got = explicit_causal_attention(q, k, v)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(got, (q, k, v), grad_y), expected_grads):  # backward through the split too
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_attention_kernel_choice() -> None:
    def q(dtype: torch.dtype, T: int) -> torch.Tensor:
        return torch.empty(1, 2, T, 4, dtype=dtype)

    assert use_explicit_attention(q(torch.bfloat16, 16))
    assert use_explicit_attention(q(torch.bfloat16, model_module.EXPLICIT_ATTENTION_MAX_LEN))
    assert not use_explicit_attention(q(torch.bfloat16, model_module.EXPLICIT_ATTENTION_MAX_LEN + 1))
    assert not use_explicit_attention(q(torch.float32, 16))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_decode_attention_equals_each_rows_own_sdpa(kv: int) -> None:
    """One query per row over strided views of a longer cache, each row masked to its own length:
    the same numbers as SDPA over that row's keys alone (and as SDPA with the mask)."""
    B, H, hd, S, L = 5, 4, 8, 40, 23
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, 1, hd, generator=g)
    K, V = torch.randn(B, kv, S, hd, generator=g), torch.randn(B, kv, S, hd, generator=g)
    lengths = torch.tensor([L, 1, 7, 16, L - 1])
    mask = torch.arange(L)[None, None, :] < lengths[:, None, None]  # (B, 1, L)
    k, v = K[:, :, :L], V[:, :, :L]  # views, as the serve cache returns them
    with torch.inference_mode():
        got = decode_attention(q, k, v, mask)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=kv != H)
        torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-6)
        for b, n in enumerate(lengths.tolist()):
            alone = F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], enable_gqa=kv != H)
            torch.testing.assert_close(got[b : b + 1], alone, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[1], decode_attention(q, k, v, torch.ones_like(mask))[1])  # the mask is applied


def test_bf16_explicit_attention_and_sdpa_give_the_same_loss_and_gradients(monkeypatch) -> None:
    cfg = replace(TINY, n_kv_head=2)
    model = build(cfg)
    idx, targets = tokens(cfg, 2, 24), tokens(cfg, 2, 24, seed=2)

    def run() -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    explicit_loss, explicit_grad = run()
    monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_LEN", 0)  # force SDPA
    sdpa_loss, sdpa_grad = run()
    assert explicit_loss == pytest.approx(sdpa_loss, abs=0.02)
    cosine = F.cosine_similarity(explicit_grad.flatten(), sdpa_grad.flatten(), dim=0)
    assert cosine > 0.99


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa_cfg = replace(TINY, n_kv_head=2)
    gqa = build(gqa_cfg)
    mha = Transformer(TINY).eval()
    state = gqa.state_dict()
    hd, group = TINY.head_dim, TINY.n_head // 2
    for i in range(TINY.n_layer):
        for name in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            w = state[key].view(2, hd, TINY.d_model)  # (kv heads, hd, C)
            state[key] = w.repeat_interleave(group, dim=0).reshape(TINY.n_head * hd, TINY.d_model)
    mha.load_state_dict(state)
    idx = tokens(TINY, 2, 12)
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


# ---- init and names -------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_unpadded_rows_give_the_padded_forwards_states_and_gradients(bidirectional: bool, n_kv_head: int) -> None:
    # hidden_states(lengths=...) runs only the real tokens (model.Unpadded); each real token's state
    # and every gradient must be those of the padded forward, and the padding's states are zeros.
    model = build(replace(TINY, n_kv_head=n_kv_head)).train()
    idx, lengths = tokens(TINY, 3, 12), torch.tensor([12, 5, 9])
    real = torch.arange(12)[None, :] < lengths[:, None]  # (B, T)
    attn = real[:, None, :].expand(-1, 12, -1) if bidirectional else None
    weights = torch.randn(3, 12, TINY.d_model, generator=torch.Generator().manual_seed(2)) * real[..., None]
    grads = []
    for unpad in (None, lengths):
        model.zero_grad()
        h = model(idx, attn_mask=attn, hidden=True, lengths=unpad)
        (h * weights).sum().backward()  # padding's states weigh nothing: the loss sees the real tokens only
        grads.append([p.grad.clone() for p in model.parameters()])
        if unpad is None:
            padded = h.detach()
        else:
            assert torch.equal(h.detach()[~real], torch.zeros_like(h.detach()[~real]))
            torch.testing.assert_close(h.detach()[real], padded[real], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        model.hidden_states(idx, positions=torch.zeros_like(idx), lengths=lengths)


def test_unpadded_index_scatter_and_gather_golden() -> None:
    up = model_module.Unpadded.of(torch.tensor([2, 0, 3]), 3)
    assert up.index.tolist() == [0, 1, 6, 7, 8]  # row 0: t 0-1, row 1: none, row 2: t 0-2
    x = torch.arange(1.0, 6.0).view(1, 5, 1)
    assert up.scatter(x)[..., 0].tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 5.0]]
    assert torch.equal(up.gather(up.scatter(x)), x)


def test_init_is_deterministic_under_a_seed_and_has_the_documented_scales() -> None:
    cfg = replace(REFERENCE, tie_embeddings=False)
    a, b, c = build(cfg, seed=3), build(cfg, seed=3), build(cfg, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    layer = a.model.layers[1]
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert a.model.embed_tokens.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert a.lm_head.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.d_model))


def expected_keys(cfg: ModelConfig, with_head: bool) -> list[str]:
    keys = ["model.embed_tokens.weight"]
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}"
        keys += [f"{p}.input_layernorm.weight"]
        keys += [f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"]
        keys += [f"{p}.post_attention_layernorm.weight"]
        keys += [f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    keys += ["model.norm.weight"] + (["lm_head.weight"] if with_head else [])
    return keys


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_are_hf_llama_keys(tie: bool) -> None:
    cfg = replace(TINY, n_kv_head=2, tie_embeddings=tie)
    model = Transformer(cfg)
    # named_parameters lists a shared tensor once; the state dict names it under both keys
    assert [n for n, _ in model.named_parameters()] == expected_keys(cfg, with_head=not tie)
    assert list(model.state_dict()) == expected_keys(cfg, with_head=True)
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * cfg.head_dim, cfg.d_model)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (cfg.ff_dim, cfg.d_model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_tied_head_trains_as_one_tensor() -> None:
    model = build()
    idx = tokens(TINY, 2, 8)
    _, loss = model(idx, idx)
    loss.backward()
    assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad


def test_logits_match_hf_llama_when_transformers_is_installed() -> None:
    transformers = pytest.importorskip("transformers")  # not a dependency; the interop CI installs it
    cfg = replace(TINY, n_kv_head=2, tie_embeddings=False)
    model = build(cfg)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict())  # a pure key map: the keys are the same
    idx = tokens(cfg, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_compiled_one_row_product_is_inductors_loop_and_equals_the_plain_one(dtype: torch.dtype) -> None:
    """`model.linear`: inside torch.compile one row without grad (a single stream's decode step) is
    a reduction that inductor generates (no call out to the sgemv), equal to F.linear up to float
    rounding, fp16 weights in fp32; several rows, a column-major weight and a product with grad keep
    the plain product, bit for bit."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    w = torch.randn(48, 32).to(dtype)
    product = torch.compile(lambda x, w: linear(x, w), dynamic=False)
    # (fp16 weights reach `linear` only for one row: F16Linear multiplies several itself)
    cases = [(1, w, True)] + ([(3, w, False), (1, w.t().contiguous().t(), False)] if dtype == torch.float32 else [])
    for rows, weight, loop in cases:
        x = torch.randn(rows, 1, 32)
        with torch.no_grad():
            got, code = run_and_get_code(product, x, weight)
        want = F.linear(x, weight.float())
        assert ("extern_kernels.mm(" in "".join(code)) is not loop
        assert got.dtype == torch.float32 and got.shape == (rows, 1, 48)
        if loop:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)
    if dtype == torch.float32:  # with grad (a training step of one row): the plain product, whose backward torch knows
        x = torch.randn(1, 1, 32, requires_grad=True)
        got, code = run_and_get_code(product, x, w)
        assert "extern_kernels.mm(" in "".join(code) and torch.equal(got, F.linear(x, w))
    torch._dynamo.reset()
