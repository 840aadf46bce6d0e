"""The fast path's weights (server.quant, weights setting): oracles are the gguf package's
own dequantizer, llama.cpp's permutation as its converter writes it, float64 matmuls, and
the fp32 model; fast-path comparisons are tolerance-based (KL, top-1), never exact."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from server import quant
from server.loading import ModelSourceError, load_model, resolve_weights

pytestmark = pytest.mark.skipif(not quant.int4_kernel_available(), reason="no int4 kernel")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_decode_like_the_gguf_package(kind: str) -> None:
    """Codes, scale and zero from our block decoder reproduce gguf's own dequantization."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 96)).astype(np.float32)
    qt = getattr(GGMLQuantizationType, kind)
    raw = quantize(w, qt)  # (6, bytes per row) uint8, llama.cpp's block layout
    expected = dequantize(raw, qt)  # (6, 96) float32
    codes, scale, zero = quant.gguf_q4_blocks(raw, kind, 6, 96)
    assert codes.min() >= 0 and codes.max() <= 15
    q = codes.astype(np.float64).reshape(6, 3, 32)
    ours = (q - 8) * scale[..., None].astype(np.float64) + zero[..., None]
    np.testing.assert_allclose(ours.reshape(6, 96), expected, rtol=0, atol=1e-6)


def test_unpermute_undoes_llamacpp_permutation() -> None:
    """llama.cpp's convert_hf_to_gguf ``permute`` (reshape(h, 2, N/h/2).swapaxes(1, 2)),
    written here from its definition, followed by our gather is the identity."""
    for n_rows, n_head in [(576, 9), (192, 3), (32, 4)]:
        w = np.arange(n_rows * 3).reshape(n_rows, 3)
        gguf_order = w.reshape(n_head, 2, n_rows // n_head // 2, 3).swapaxes(1, 2)
        gguf_order = gguf_order.reshape(n_rows, 3)
        np.testing.assert_array_equal(gguf_order[quant._unpermute_rows(n_rows, n_head)], w)


def test_int4_linear_matches_float64_of_its_weights() -> None:
    """The kernel computes x·Wᵀ for W = (q-8)·bf16(scale) + bf16(zero)."""
    torch.manual_seed(0)
    N, K = 48, 64
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale = torch.rand(N, K // 32) * 0.05 + 0.01
    zero = torch.randn(N, K // 32) * 0.05
    lin = quant.Int4Linear(codes, scale, zero)
    s16 = scale.bfloat16().double().repeat_interleave(32, 1)
    z16 = zero.bfloat16().double().repeat_interleave(32, 1)
    w = (codes.double() - 8) * s16 + z16
    # dequantized() reads W through the kernel, which rounds its output to bf16.
    assert torch.allclose(lin.dequantized().double(), w, rtol=2**-8, atol=0)
    x = torch.randn(5, 3, K)
    y = lin(x)
    assert y.shape == (5, 3, N)
    ref = x.bfloat16().double() @ w.t()
    # bf16 output rounding (2⁻⁸ relative) plus float32 accumulation.
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=1e-3)
    # From 8 rows on the dense bf16 copy runs (weight rounded to bf16 once more): same
    # oracle, a little wider; fewer rows still take the int4 kernel.
    lin.keep_dense(8)
    assert lin.dense is not None and lin.dense.shape == (N, K)
    x8 = torch.randn(2, 4, K).bfloat16().double()
    ref8 = x8 @ w.t()
    # bf16 weight and output roundings: 2⁻⁸ of Σ|w·x| plus half an output ulp (2⁻⁹ rel.).
    bound = 2**-8 * (x8.abs() @ w.abs().t()) + 2**-8 * ref8.abs() + 1e-6
    assert ((lin(x8).double() - ref8).abs() <= bound).all()
    assert torch.allclose(lin(x[0]).double(), ref[0], rtol=2**-7, atol=1e-3)  # 3 rows
    lin.dense.zero_()  # proves which path ran: 8 rows read the copy, 7 rows do not
    assert lin(x8).abs().max() == 0 and lin(x8[:, :3].reshape(-1, K)[:7]).abs().max() > 0


def test_minmax_quantization_error_is_within_half_a_step() -> None:
    torch.manual_seed(1)
    w = torch.randn(20, 96)
    codes, scale, zero = quant.quantize_minmax(w)
    deq = (codes.float() - 8).reshape(20, 3, 32) * scale[..., None] + zero[..., None]
    err = (deq.reshape(20, 96) - w).abs().reshape(20, 3, 32)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


def test_resolve_weights_auto_and_explicit() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights("auto", "auto", cuda, None) == "bf16"
    assert resolve_weights("auto", "float32", cpu, None) == "fp32"
    assert resolve_weights("fp32", "auto", cpu, None) == "fp32"
    assert resolve_weights("auto", "auto", cpu, None) == ("bf16" if quant.cpu_has_bf16()
                                                           else "fp32")
    with pytest.raises(ModelSourceError, match="int4"):
        resolve_weights("int4", "auto", cuda, None)
    with pytest.raises(ModelSourceError, match="weights"):
        resolve_weights("int8", "auto", cpu, None)


def _kl_top1(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean KL(softmax a ‖ softmax b) over rows and the share of rows whose argmax agrees."""
    lp, lq = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (a.argmax(-1) == b.argmax(-1)).double().mean().item()


@torch.inference_mode()
@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_tiny_fast_path_close_to_fp32(weights: str, tmp_path: Path) -> None:
    """Low-precision tiny models give float32 logits close to an fp32 model with the
    *same* weights (for int4: the kernel's weights copied into the fp32 linears), so what
    is left is bf16 activation rounding. Bounds are loose multiples of what is measured."""
    ref = load_model("random:tiny", tmp_path, weights="fp32")
    fast = load_model("random:tiny", tmp_path, weights=weights)
    assert fast.weights == weights and fast.dtype == "bfloat16"
    if weights == "int4":
        for name, mod in fast.model.named_modules():
            if isinstance(mod, quant.Int4Slice) or (
                    isinstance(mod, quant.Int4Linear) and "." not in name.rpartition(".")[2]
                    and not name.endswith(".linear")):
                ref.model.get_submodule(name).weight.copy_(mod.dequantized())
    ids = torch.tensor([list(ref.tokenizer("The quick brown fox jumps over it")["input_ids"])])
    a = ref.model(input_ids=ids).logits[0]
    b = fast.model(input_ids=ids).logits[0]
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    kl, top1 = _kl_top1(a, b)
    assert kl < 0.01, kl  # measured ~0.001
    assert top1 >= 0.9, top1


def test_int4_cache_is_reused(tmp_path: Path) -> None:
    """Packed buffers written once, then loaded (identical), never half-read."""
    m1 = load_model("random:tiny", tmp_path, weights="fp32").model
    m2 = load_model("random:tiny", tmp_path, weights="fp32").model
    first = quant.to_int4(m1, cache_dir=tmp_path)
    second = quant.to_int4(m2, cache_dir=tmp_path)
    assert first["cached"] == 0 and first["minmax"] > 0 and second["cached"] == 1
    for (n, a), (_, b) in zip(m1.named_buffers(), m2.named_buffers(), strict=True):
        assert torch.equal(a, b), n
    cache = next(tmp_path.glob("int4-pack-*.safetensors"))
    cache.write_bytes(cache.read_bytes()[:100])  # truncated: ignored and rebuilt
    m3 = load_model("random:tiny", tmp_path, weights="fp32").model
    assert quant.to_int4(m3, cache_dir=tmp_path)["cached"] == 0


@pytest.mark.skipif(not quant.int8_head_available(), reason="no CPU torch._int_mm")
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int8_head_is_its_weights_times_14bit_activations(rows: int) -> None:
    """The int8 head's float32 logits equal a float64 matmul of its int8 weights with the
    input, up to the 14-bit activation step: per logit at most ``step/2 · Σ_k |W[v, k]|``
    (``step = max|h| / 16256``), which this checks with float64 arithmetic as the oracle;
    and its weights are within half an int8 step of the original."""
    torch.manual_seed(2)
    V, D = 300, 96
    w = torch.randn(V, D) * 0.05
    w[7] *= 40  # a row with a much larger range gets its own scale
    head = quant.Int8Head(w)
    wq = head.dequantized().double()  # (V, D)
    assert ((wq - w.double()).abs() <= head.scale.double()[:, None] / 2 + 1e-9).all()
    h = torch.randn(2, rows, D) * 3
    h[0, 0, 5] = 200.0  # an outlier feature sets the row's activation step
    y = head(h.bfloat16() if rows == 3 else h)
    assert y.dtype == torch.float32 and y.shape == (2, rows, V)
    x = (h.bfloat16() if rows == 3 else h).double().reshape(-1, D)
    ref = x @ wq.t()
    step = x.abs().amax(-1, keepdim=True) / (127 * 128)
    bound = step / 2 * wq.abs().sum(-1)[None, :] + 1e-5 * ref.abs() + 1e-6
    assert ((y.double().reshape(-1, V) - ref).abs() <= bound).all()


@torch.inference_mode()
@pytest.mark.skipif(not quant.int8_head_available(), reason="no CPU torch._int_mm")
def test_int8_head_close_to_float32_head(tmp_path: Path) -> None:
    """Same int4 model, int8 head vs float32 head: KL and top-1 bounds (measured on the
    embedded model: KL 0.0018 vs 0.0009 nats against fp32, docs/fastpath.md)."""
    a = load_model("random:tiny", tmp_path, weights="int4", head="float32").model
    b = load_model("random:tiny", tmp_path, weights="int4", head="int8").model
    assert isinstance(b.lm_head, quant.Int8Head) and isinstance(a.lm_head, quant.Float32Head)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    kl, top1 = _kl_top1(a(input_ids=ids).logits.flatten(0, 1),
                        b(input_ids=ids).logits.flatten(0, 1))
    assert kl < 1e-3, kl
    assert top1 >= 0.8, top1  # a random model's logits are nearly flat: many near-ties


@torch.inference_mode()
def test_fused_int4_equals_separate_int4(tmp_path: Path) -> None:
    """q/k/v and gate/up fused into one kernel each give the separate kernels' outputs
    (same codes, one launch) to bf16 tolerance, on the whole model and per member, in any
    call order; and the model's forward still calls every member slice."""
    fused = load_model("random:tiny", tmp_path, weights="fp32").model
    plain = load_model("random:tiny", tmp_path, weights="fp32").model
    counts = quant.to_int4(fused, head="float32")
    n_layers = len(fused.model.layers)
    assert counts["fused"] == 2 * n_layers
    # The oracle: the same model with one Int4Linear per projection (fusion switched off).
    saved, quant.FUSED_GROUPS = quant.FUSED_GROUPS, {}
    try:
        assert quant.to_int4(plain, head="float32")["fused"] == 0
    finally:
        quant.FUSED_GROUPS = saved
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.q_proj, quant.Int4Slice) and isinstance(mlp.up_proj, quant.Int4Slice)
    assert isinstance(attn.qkv_proj, quant.Int4Fused)
    h = torch.randn(3, 5, attn.q_proj.in_features).bfloat16()
    p_attn = plain.model.layers[0].self_attn
    for order in ([0, 1, 2], [2, 0, 1], [1, 1, 2, 0]):
        for i in order:
            member = ("q_proj", "k_proj", "v_proj")[i]
            got, want = getattr(attn, member)(h), getattr(p_attn, member)(h)
            assert got.shape == want.shape
            assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-3), member
    with torch.inference_mode(False), torch.no_grad():  # a tensor with a version counter
        h = torch.randn(2, attn.q_proj.in_features).bfloat16()
        h2 = h.clone()
        first = attn.q_proj(h)
        h.add_(1.0)  # modified in place after q read it: k must not reuse the old product
        assert torch.allclose(attn.k_proj(h).float(), p_attn.k_proj(h).float(),
                              rtol=2**-7, atol=1e-3)
        assert torch.allclose(first.float(), p_attn.q_proj(h2).float(), rtol=2**-7,
                              atol=1e-3)
    ids = torch.randint(3, 200, (2, 9))
    a, b = fused(input_ids=ids).logits, plain(input_ids=ids).logits
    twin = copy.deepcopy(fused)  # the engine's tests and tools deep-copy served models
    t_attn = twin.model.layers[0].self_attn
    assert t_attn.q_proj._fused[0] is t_attn.qkv_proj and t_attn.qkv_proj is not attn.qkv_proj
    assert torch.allclose(twin(input_ids=ids).logits, a, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a, b, rtol=1e-2, atol=2e-2)
    kl, top1 = _kl_top1(a.flatten(0, 1), b.flatten(0, 1))
    assert kl < 1e-4 and top1 == 1.0, (kl, top1)


@torch.inference_mode()
def test_lean_rmsnorm_against_float64_and_only_on_fast_paths(tmp_path: Path) -> None:
    """The fused norm is within one bf16 rounding of the float64 formula (transformers'
    eager bf16 norm, which rounds twice, is the yardstick it must not exceed by much), and
    it replaces the norms of bf16/int4 models only: fp32 keeps transformers' modules."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(4)
    hf = LlamaRMSNorm(96, eps=1e-5)
    hf.weight.normal_()
    hf = hf.bfloat16()
    lean = quant.LeanRMSNorm(hf.weight, 1e-5)
    x = (torch.randn(3, 5, 96) * 4).bfloat16()
    xd, wd = x.double(), hf.weight.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    got = lean(x)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()
    assert (got.double() - ref).abs().max() <= (hf(x).double() - ref).abs().max()
    fast = load_model("random:tiny", tmp_path, weights="bf16").model
    exact = load_model("random:tiny", tmp_path, weights="fp32").model
    assert isinstance(fast.model.norm, quant.LeanRMSNorm)
    assert isinstance(fast.model.layers[0].input_layernorm, quant.LeanRMSNorm)
    assert type(exact.model.norm).__name__ == "LlamaRMSNorm"
