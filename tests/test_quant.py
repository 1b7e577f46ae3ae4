"""Weights for inference (lmforge/quant.py): int8 numbers, the decoding layout, f16 and int8 models
against fp32, model directories that store int8 (a Q8_0 GGUF kept as it is, and exported back
byte for byte), damaged int8 directories, and `sample` / `serve` with --quantize."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import subprocess

import pytest
import torch

from conftest import lmforge_cmd, subprocess_env
from lmforge import convert, kernels
from lmforge import quant as Q
from lmforge.artifacts import MODEL_FILE, load_model, load_safetensors
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.generate import generate, load_for_decoding
from lmforge.model import Linear, Transformer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=64, tie_embeddings=tie)
    return Transformer(cfg).eval()


# ---- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [0, 32])
def test_int8_is_within_half_a_step_and_dequantizes_exactly(group: int) -> None:
    w = torch.randn(48, 128) * torch.rand(48, 1)  # rows of different ranges
    q, scale = Q.quantize_int8(w, group)
    assert q.dtype == torch.int8 and scale.shape == (48, 1 if group == 0 else 128 // group)
    assert int(q.abs().max()) <= 127
    back = Q.dequantize_int8(q, scale)
    step = scale.repeat_interleave(128 // scale.shape[1], dim=1)
    assert bool(((back - w).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(Q.dequantize_int8(q, scale), q.float() * step)  # exactly q * scale
    q2, s2 = Q.per_row(q, scale)
    if group == 0:
        assert q2 is q  # one scale per row already: unchanged
    else:
        assert s2.shape == (48, 1) and bool(((Q.dequantize_int8(q2, s2) - back).abs() <= s2 / 2 + 1e-7).all())


def test_zero_rows_and_bad_groups() -> None:
    q, scale = Q.quantize_int8(torch.zeros(2, 64))
    assert not q.any() and torch.equal(scale, torch.ones(2, 1))
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize_int8(torch.randn(2, 64), 48)
    with pytest.raises(ConfigError, match="--quantize must be one of fp32, f16, int8"):
        Q.check_weights("int4")


@pytest.fixture
def fbgemm_form(monkeypatch):
    """Int8 layers made in the test take fbgemm's form, as on a CPU without AVX-512 VNNI."""
    monkeypatch.setattr(Q, "_int8_kernel", lambda n, k: False)


def test_int8_linear_runs_the_stored_numbers(fbgemm_form) -> None:
    """Without lmforge's VNNI kernel every path (a decoding step of up to FBGEMM_MAX_ROWS rows:
    fbgemm's 7-bit copy; a prompt or more rows: weight-only int8; no fbgemm: the dequantised
    matrix) stays within int8's error of the fp32 product."""
    torch.manual_seed(1)
    w, x = torch.randn(96, 128), torch.randn(Q.FBGEMM_MAX_ROWS + 1, 128)
    lin = Q.Int8Linear.from_float(w)
    assert lin.kw is None and lin.packed is not None
    exact = x @ Q.dequantize_int8(lin.q, lin.scale).t()
    scale = (x @ w.t()).abs().max()
    assert float((lin(x) - exact).abs().max()) < 0.02 * scale  # above the row limit (bf16 activations)
    assert float((lin(x[:5]) - exact[:5]).abs().max()) < 0.05 * scale  # several rows, fbgemm
    assert float((lin(x[:1]) - exact[:1]).abs().max()) < 0.05 * scale  # one row
    assert torch.equal(lin(x[:5].view(5, 1, 128)), lin(x[:5]).view(5, 1, 96))  # a step of 5 sequences
    assert torch.equal(lin(x[None, :5]), Q._weight_only(x[None, :5], lin.q, lin.scale))  # a 5-token prompt
    lin.packed = None  # as without fbgemm
    assert float((lin(x[:1]) - exact[:1]).abs().max()) < 0.02 * scale


def test_with_the_vnni_kernel_every_product_is_the_kernels() -> None:
    """Where lmforge's VNNI kernel runs, one row, a step of several sequences, a prompt and more
    rows than a decoding step all multiply with it (Q8_0's arithmetic: `kernels.int8_reference`),
    within int8's error of the fp32 product; fbgemm's form is not made. Without gradients only:
    a product that needs one takes the weight-only path."""
    if not kernels.int8_ready():
        pytest.skip("no AVX-512 VNNI here (or no compiler): int8 stays fbgemm's")
    torch.manual_seed(1)
    w, x = torch.randn(96, 128), torch.randn(Q.FBGEMM_MAX_ROWS + 1, 128)
    lin = Q.Int8Linear.from_float(w)
    assert lin.kw is not None and lin.packed is None
    exact = x @ Q.dequantize_int8(lin.q, lin.scale).t()
    for rows in (x[:1], x[:5].view(5, 1, 128), x[None, :5], x):
        want = kernels.int8_reference(rows, lin.q, lin.scale)
        got = lin(rows)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert float((lin(x) - exact).abs().max()) < 0.02 * float(exact.abs().max())
    twin = copy.deepcopy(lin)  # a copy lays out its own
    assert twin.kw.data_ptr() != lin.kw.data_ptr() and torch.equal(twin(x), lin(x))
    grad = x[:3].clone().requires_grad_()
    assert torch.equal(lin(grad).detach(), Q._weight_only(x[:3], lin.q, lin.scale))


@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_a_prompts_weight_only_product_is_the_int8_op_in_either_form(monkeypatch, fbgemm_form, bf16_matmul) -> None:
    """From DEQUANT_MIN_ROWS rows on a CPU with bf16 matrix instructions, the int8 rows converted
    to bf16 for oneDNN's matmul; below, or without them, `aten._weight_int8pack_mm`. Both are the
    product of bf16 activations with the exact int8 weights: within bf16's rounding of each other
    and of that product computed in float64."""
    monkeypatch.setattr(Q, "_bf16_matmul", lambda: bf16_matmul)
    torch.manual_seed(5)
    lin = Q.Int8Linear.from_float(torch.randn(80, 96))
    for rows in (Q.DEQUANT_MIN_ROWS - 1, Q.DEQUANT_MIN_ROWS, 100):
        x = torch.randn(1, rows, 96)  # a prompt's positions
        exact = x.bfloat16().double() @ Q.dequantize_int8(lin.q, lin.scale).double().t()
        got = lin(x)
        op = torch.ops.aten._weight_int8pack_mm(x[0].bfloat16(), lin.q, lin.scale[:, 0].bfloat16()).float()
        tol = 2 ** -7 * float(exact.abs().max())  # bf16's rounding of the sums and of the scales
        assert got.dtype == torch.float32 and got.shape == (1, rows, 80)
        assert float((got.double() - exact).abs().max()) < tol
        assert float((got[0] - op).abs().max()) < 2 * tol
        if not (bf16_matmul and rows >= Q.DEQUANT_MIN_ROWS):
            assert torch.equal(got[0], op)


def test_int8_rows_of_any_size_keep_their_precision() -> None:
    """fbgemm quantises a call's activations with one scale; each row is scaled alone first, so a
    small row beside a large one (another request in serve's batch) is as exact as on its own."""
    torch.manual_seed(2)
    lin = Q.Int8Linear.from_float(torch.randn(64, 128))
    x = torch.randn(3, 128) * torch.tensor([[1e-3], [1.0], [1e3]])
    exact = x @ Q.dequantize_int8(lin.q, lin.scale).t()
    together = lin(x)
    alone = torch.cat([lin(row[None]) for row in x])
    for r in range(3):
        row_scale = float(exact[r].abs().max())
        assert float((together[r] - exact[r]).abs().max()) < 0.05 * row_scale
        assert torch.allclose(together[r], alone[r], rtol=0, atol=0.05 * row_scale)


def packed_layer(w: torch.Tensor) -> Q.PackedLinear:
    base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    base.weight.data = w
    return Q.PackedLinear(base, 24)


def weight_of(layer: torch.nn.Module) -> torch.Tensor:
    """The fp32 matrix a layer multiplies by (int8: q * scale exactly)."""
    if isinstance(layer, Q.Int8Linear):
        return Q.dequantize_int8(layer.q, layer.scale)
    return layer.weight.float()


@pytest.mark.parametrize("weights", ["int8", "int8-fbgemm", "f16", "packed"])
def test_compiled_layers_are_one_graph_and_equal_eager(monkeypatch, weights: str) -> None:
    """Under torch.compile the fbgemm product (and serve's oneDNN-packed fp32 one) is an opaque op
    (the packed weight cannot enter a graph), and so is lmforge's VNNI int8 kernel where it runs
    ("int8"; fbgemm's elsewhere): no graph break (fullgraph), one graph for every layer of a shape,
    the eager numbers. One row is `model.linear`'s loop over the layer's own weights: the exact
    product of those (for int8 weight-only, not 8-bit activations)."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    if weights == "int8-fbgemm":
        monkeypatch.setattr(Q, "_int8_kernel", lambda n, k: False)
    make = {"int8": Q.Int8Linear.from_float, "int8-fbgemm": Q.Int8Linear.from_float, "f16": Q.F16Linear,
            "packed": packed_layer}[weights]
    mlp = torch.nn.ModuleList(make(torch.randn(n, k) / k**0.5) for n, k in ((256, 128), (256, 128), (128, 256)))

    def forward(layers: torch.nn.ModuleList, x: torch.Tensor) -> torch.Tensor:  # a SwiGLU MLP's products
        gate, up, down = layers
        return down(torch.nn.functional.silu(gate(x)) * up(x))

    compiled = torch.compile(forward, dynamic=True, fullgraph=True)
    one = torch.compile(lambda layer, x: layer(x), dynamic=True, fullgraph=True)
    other = torch.nn.ModuleList(make(torch.randn(n, k) / k**0.5) for n, k in ((256, 128), (256, 128), (128, 256)))
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for layers in (mlp, other):
            for rows in (1, 3):
                x = torch.randn(rows, 1, 128)
                eager, got = forward(layers, x), compiled(layers, x)
                # each layer's product is the eager one bit for bit (next line); the fused silu * up may
                # round differently in the last bit, which int8's activation quantisation can move a step
                tol = 0.05 if weights.startswith("int8") else 1e-5
                assert torch.allclose(got, eager, rtol=0, atol=tol * float(eager.abs().max()))
                if rows == 1:  # one row: `model.linear`'s loop over the layer's own weights (int8: weight-only)
                    exact = x @ weight_of(layers[0]).t()
                    torch.testing.assert_close(one(layers[0], x), exact, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(one(layers[0], x), layers[0](x))
    # one graph per row count (one row is specialised), not per layer: 2 for `forward`, 2 for `one`
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_the_compiled_op_without_a_form_multiplies_all_the_same(fbgemm_form) -> None:
    """A handle whose layer is gone (or a torch without fbgemm) runs the weight-only product; a
    copy of a layer has its own form; a layer's form leaves the registry with the layer."""
    torch.manual_seed(4)
    lin = Q.Int8Linear.from_float(torch.randn(32, 64))
    x = torch.randn(2, 64)
    exact = x @ Q.dequantize_int8(lin.q, lin.scale).t()
    stray = torch.tensor(-1)
    got = torch.ops.lmforge.int8_linear(x, lin.q, lin.scale, stray)
    assert torch.equal(got, Q._weight_only(x, lin.q, lin.scale))
    assert float((got - exact).abs().max()) < 0.02 * float(exact.abs().max())
    handle = int(lin.handle)
    assert handle in Q._FORMS and torch.equal(torch.ops.lmforge.int8_linear(x, lin.q, lin.scale, lin.handle), lin(x))
    for layer in (lin, Q.F16Linear(torch.randn(32, 64))):  # a copy packs its own form, under its own handle
        twin = copy.deepcopy(layer)
        assert int(twin.handle) != int(layer.handle) and torch.equal(twin(x), layer(x))
    del lin, layer, twin
    gc.collect()
    assert handle not in Q._FORMS


# ---- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_the_fp32_decoding_layout_changes_no_token(tie: bool) -> None:
    model = random_model(tie)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        greedy = generate(model, ids[0, :8].tolist(), max_tokens=24, temperature=0)
        Q.prepare(model, "fp32")
        after = model(ids)
    assert model.weights == "fp32" and not model.lm_head.weight.is_contiguous()  # column-major
    mlp = model.model.layers[0].mlp  # wide matrices column-major, narrow ones (out < in) row-major
    assert not mlp.gate_proj.weight.is_contiguous() and mlp.down_proj.weight.is_contiguous()
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert generate(model, ids[0, :8].tolist(), max_tokens=24, temperature=0) == greedy


@pytest.mark.parametrize("tie", [False, True])
def test_a_compiled_decode_step_keeps_fp32_weights_row_major(tie: bool) -> None:
    """The compiled one-row products read weight rows (`model.linear`): `prepare(compiled=True)`
    transposes nothing, and `compile_decode` turns the eager decoding layout back, the same bytes,
    the head still the embedding's tensor when tied."""
    from lmforge.generate import compile_decode
    from lmforge.model import eager_blocks

    model = random_model(tie)
    Q.prepare(model, "fp32", compiled=True)
    weights = [getattr(parent, attr).weight for parent, attr in Q.projections(model)]
    assert model.weights == "fp32" and all(w.is_contiguous() for w in weights)
    other = Q.prepare(random_model(tie), "fp32")  # the eager layout: wide matrices column-major
    before = [getattr(parent, attr).weight.detach().clone() for parent, attr in Q.projections(other)]
    assert not other.lm_head.weight.is_contiguous()
    compile_decode(other)
    after = [getattr(parent, attr).weight for parent, attr in Q.projections(other)]
    assert all(w.is_contiguous() for w in after) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert (other.lm_head.weight is other.model.embed_tokens.weight) is tie
    eager_blocks(other)


@pytest.mark.parametrize("weights", ["f16", "int8"])
def test_a_compiled_decode_step_keeps_a_tied_models_reduced_head(weights: str) -> None:
    """`compile_decode` re-ties only an fp32 head: a tied model prepared as f16 or int8 keeps its
    head's own fp16 / int8 copy, which the compiled one-row product reads (re-tying once replaced
    the F16Linear's fp16 buffer by the fp32 embedding: twice the head's bytes a token)."""
    from lmforge.generate import compile_decode
    from lmforge.model import eager_blocks

    model = Q.prepare(random_model(tie=True), weights)
    head = model.lm_head
    before = dict(head.named_buffers())
    compile_decode(model)
    assert model.lm_head is head and not list(head.named_parameters())  # no fp32 weight attached
    after = dict(head.named_buffers())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    if weights == "f16":
        assert head.weight.dtype == torch.float16
    eager_blocks(model)


@pytest.mark.skipif(not Q._onednn(), reason="this torch has no oneDNN")
def test_packed_linear_equals_the_plain_product_at_every_row_count() -> None:
    """One row runs the plain product (the same bits); several rows oneDNN's packed copy, within
    fp32 rounding, in any leading shape; a product with grad runs the plain product."""
    torch.manual_seed(4)
    base = torch.nn.Linear(96, 700, bias=False)
    base.weight.data = base.weight.data.t().contiguous().t()  # the decoding layout of a wide matrix
    lin = Q.PackedLinear(base)
    assert lin.weight is base.weight and list(dict(lin.named_parameters())) == ["weight"]
    with torch.inference_mode():
        for shape in [(1, 96), (1, 1, 96), (2, 96), (4, 96), (8, 1, 96), (16, 1, 96), (3, 5, 96)]:
            x = torch.randn(*shape)
            ref = torch.nn.functional.linear(x, base.weight)
            got = lin(x)
            assert got.shape == ref.shape
            if x.numel() == 96:
                assert torch.equal(got, ref)
            else:
                assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), shape
        assert not torch.equal(lin(torch.ones(4, 96)), torch.zeros(4, 700))
        lin.packed = Q.PackedLinear(torch.nn.Linear(96, 700, bias=False)).packed  # another matrix
        x = torch.randn(4, 96)
        assert not torch.allclose(lin(x), torch.nn.functional.linear(x, base.weight), atol=1e-3)  # the pack is what runs
    x = torch.randn(4, 96, requires_grad=True)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, base.weight))  # with grad: the plain product


def made_up_timer(wins: dict[tuple[int, int], dict[int, float]]):
    """A `packed_rows` timer: the plain product takes 1 s; the packed one wins[shape][rows] (1.0: not faster)."""
    def timer(form: str, shape: tuple[int, ...], rows: int, call) -> float:
        call()  # the product runs (its shapes must fit), its time is made up
        return 1.0 if form == "plain" else wins.get(shape, {}).get(rows, 1.0)
    return timer


@pytest.mark.skipif(not Q._onednn(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("times,most", [
    ({16: 0.5, 64: 0.5, 256: 0.5}, Q.PACK_UNLIMITED),  # faster at every count: no limit
    ({16: 0.5, 64: 0.8, 256: 1.2}, 64),  # slower from a long prompt: up to 64 rows
    ({16: 0.89, 64: 0.95, 256: 0.5}, 16),  # within the margin at 64: not faster; the 256 win is never reached
    ({16: 0.95, 64: 0.5, 256: 0.5}, 0),  # not at serve's batch of 16: left as it is
])
def test_packed_rows_is_the_last_count_the_packed_product_wins_at(times: dict[int, float], most: int) -> None:
    w = torch.randn(48, 32)
    assert Q.packed_rows(w, made_up_timer({(48, 32): times})) == most
    assert Q.packed_rows(w) in (0, *Q.PACK_ROWS, Q.PACK_UNLIMITED)  # the real timer: whatever this machine says


@pytest.mark.parametrize("tie", [False, True])
def test_pack_measured_packs_the_shapes_that_measured_faster_and_keeps_greedy_tokens(tie: bool) -> None:
    """serve's model: layers whose shape measured faster prepacked become PackedLinears up to their
    row count (within fp32 rounding there), the plain product above it (the same bits); names, ties,
    greedy tokens and layers that are not plain linears stay; a second call packs nothing more."""
    from lmforge.lora import LoRALinear

    model = random_model(tie)
    timer = made_up_timer({(512, 128): {16: 0.5, 64: 0.5, 256: 0.5}, (384, 128): {16: 0.5, 64: 0.5, 256: 2.0}})
    assert Q.pack_measured(model, timer) == {}  # not prepared: left as it is
    Q.prepare(model, "fp32")
    adapted = LoRALinear(model.model.layers[1].mlp.up_proj, rank=2, alpha=4.0)
    model.model.layers[1].mlp.up_proj = adapted  # an adapter's wrapper is never packed
    few = torch.randint(0, 512, (16, 1), generator=torch.Generator().manual_seed(7))  # 16 rows: a decode step
    many = torch.randint(0, 512, (8, 12), generator=torch.Generator().manual_seed(8))  # 96 rows: a prefill
    with torch.inference_mode():
        before_few, before_many = model(few), model(many)
        greedy = generate(model, many[0].tolist(), max_tokens=16, temperature=0)
    names = list(model.state_dict())
    packed = Q.pack_measured(model, timer)
    if not Q._onednn():
        assert packed == {}
        return
    # the head (512x128) at any count; gate and up (384x128) up to 64 rows; the rest (q 128x128, k/v 64x128,
    # o, down 128x384) measured no faster
    assert packed == {"lm_head": Q.PACK_UNLIMITED, "gate_proj": 64, "up_proj": 64}
    assert Q.pack_measured(model, timer) == {}  # packed already
    mlp = model.model.layers[0].mlp
    assert isinstance(model.lm_head, Q.PackedLinear) and model.lm_head.max_rows is None
    assert isinstance(mlp.gate_proj, Q.PackedLinear) and mlp.gate_proj.max_rows == 64
    assert type(mlp.down_proj) is Linear and type(model.model.layers[0].self_attn.q_proj) is Linear
    assert model.model.layers[1].mlp.up_proj is adapted and list(model.state_dict()) == names
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    with torch.inference_mode():
        got_few, got_many = model(few), model(many)
        assert torch.allclose(got_few, before_few, atol=1e-4, rtol=0)
        assert torch.allclose(got_many, before_many, atol=1e-4, rtol=0)  # the head packed, gate/up above their limit
        assert generate(model, many[0].tolist(), max_tokens=16, temperature=0) == greedy


def test_pack_measured_leaves_other_weights_and_torch_without_onednn_alone(monkeypatch) -> None:
    everything = made_up_timer({})
    for weights in ("f16", "int8"):
        model = Q.prepare(random_model(), weights)
        head = model.lm_head
        assert Q.pack_measured(model, everything) == {} and model.lm_head is head
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = Q.prepare(random_model(), "fp32")
    ids = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        before = model(ids)
        assert Q.pack_measured(model) == {} and type(model.lm_head) is Linear
        assert torch.equal(model(ids), before)


@pytest.mark.parametrize("weights,tol", [("f16", 2e-3), ("int8", 5e-2)])
def test_reduced_weights_stay_close_to_fp32(weights: str, tol: float) -> None:
    model = random_model()
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids), -1)
        Q.prepare(model, weights)
        got = torch.log_softmax(model(ids), -1)
    kinds = {type(getattr(p, a)).__name__ for p, a in Q.projections(model)}
    assert kinds == {"F16Linear" if weights == "f16" else "Int8Linear"}
    # mean |log p difference| over the vocabulary, per position: measured ~3e-4 (f16), ~1e-2 (int8)
    assert float((got - ref).abs().mean()) < tol


def test_int8_of_a_trained_model_keeps_its_greedy_tokens(tiny_run) -> None:
    fp32 = load_for_decoding(tiny_run).model
    int8 = load_for_decoding(tiny_run, "int8").model
    assert fp32.weights == "fp32" and int8.weights == "int8"
    prompt = [5, 17, 42, 99, 7]
    a = generate(fp32, prompt, max_tokens=16, temperature=0)
    b = generate(int8, prompt, max_tokens=16, temperature=0)
    assert a[:4] == b[:4]  # a near tie may part them later; the first tokens are clear-cut on a trained model


# ---- int8 model directories --------------------------------------------------------------------


@pytest.fixture
def q8_dir(tiny_run, tmp_path):
    """tiny_run exported as a Q8_0 GGUF and imported back with --keep-quantized."""
    gguf = tmp_path / "tiny-q8.gguf"
    convert.export_command(str(tiny_run), "gguf", str(gguf), dtype="q8_0")
    out = tmp_path / "tiny-q8"
    convert.import_command(str(gguf), str(out), keep_quantized=True)
    return gguf, out


def test_a_q8_0_gguf_is_kept_as_int8_and_exports_back_byte_for_byte(q8_dir, tmp_path) -> None:
    import gguf as G

    gguf, out = q8_dir
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["quantization"] == {"format": "int8", "group_size": 32}
    raw = load_safetensors(out / MODEL_FILE)
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert raw["model.layers.0.self_attn.q_proj.weight" + Q.SCALE_SUFFIX].shape[1] == 64 // 32
    assert raw["model.norm.weight"].dtype == torch.float32  # norms stay fp32
    loaded = load_model(out)  # as stored: int8
    assert loaded.model.weights == "int8"
    again = tmp_path / "again.gguf"
    convert.export_command(str(out), "gguf", str(again), dtype="q8_0")
    first = {t.name: bytes(t.data) for t in G.GGUFReader(gguf).tensors}
    second = {t.name: bytes(t.data) for t in G.GGUFReader(again).tensors}
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first)


def test_an_int8_directory_loads_as_fp32_when_asked(q8_dir) -> None:
    _, out = q8_dir
    model = load_model(out, quantize="fp32").model
    raw = load_safetensors(out / MODEL_FILE)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = Q.dequantize_int8(raw[name], raw[name + Q.SCALE_SUFFIX])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, expected)  # the stored numbers, exactly


def test_int8_tensors_without_a_manifest_record_are_refused(q8_dir) -> None:
    _, out = q8_dir
    raw = load_safetensors(out / MODEL_FILE)
    with pytest.raises(CheckpointError, match="manifest records no quantization"):
        Q.read_stored(raw, None, "x/model.safetensors")
    lonely = dict(raw)
    del lonely["model.layers.0.mlp.up_proj.weight" + Q.SCALE_SUFFIX]
    with pytest.raises(CheckpointError, match="lacks a matching model.layers.0.mlp.up_proj.weight_scale"):
        Q.read_stored(lonely, {"format": "int8", "group_size": 32}, "x/model.safetensors")
    with pytest.raises(CheckpointError, match="unsupported quantization record"):
        Q.read_stored(raw, {"format": "int4"}, "x/model.safetensors")


def test_keep_quantized_needs_a_quantized_gguf(tiny_run, tmp_path) -> None:
    with pytest.raises(ConfigError, match="--keep-quantized applies to a quantized .gguf file"):
        convert.import_command(str(tiny_run), str(tmp_path / "out"), keep_quantized=True)
    f32 = tmp_path / "f32.gguf"
    convert.export_command(str(tiny_run), "gguf", str(f32), dtype="f32")
    with pytest.raises(ConfigError, match="holds no quantized matrices"):
        convert.import_command(str(f32), str(tmp_path / "out"), keep_quantized=True)


# ---- verbs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["int8", "f16"])
def test_sample_quantize(tiny_run, tmp_path, weights: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = subprocess.run(lmforge_cmd("sample", str(run), "--prompt", "ROMEO:", "--max-tokens", "12", "--temperature", "0",
                                      "--quantize", weights, "--threads", "1"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = load_for_decoding(run, weights)  # the same weights in this process: the same greedy text
    stop = list(loaded.tokenizer.end_ids)
    new = generate(loaded.model, loaded.tokenizer.encode("ROMEO:"), max_tokens=12, temperature=0, stop_ids=stop)
    assert new and proc.stdout.split("\n", 1)[1] == "ROMEO:" + loaded.tokenizer.decode(new) + "\n"


def test_sample_refuses_an_unknown_quantize(tiny_run) -> None:
    proc = subprocess.run(lmforge_cmd("sample", str(tiny_run), "--quantize", "int4"), capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2 and "--quantize" in proc.stderr and "int8" in proc.stderr


def test_serve_an_int8_model(tiny_run) -> None:
    from fastapi.testclient import TestClient

    from lmforge.serve.api import create_app

    loaded = load_for_decoding(tiny_run, "int8")
    expected = generate(loaded.model, loaded.tokenizer.encode("ROMEO:"), max_tokens=8, temperature=0)
    with TestClient(create_app(loaded.model, loaded.tokenizer, max_batch=2, max_threads=1)) as client:
        r = client.post("/v1/completions", json={"model": "lmforge", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == loaded.tokenizer.decode(expected)
