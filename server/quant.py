"""Low-precision weights for the CPU fast path: 4-bit group-32 linears, bf16 elsewhere.

``weights = int4`` swaps every ``nn.Linear`` of a causal LM but the output head for an
:class:`Int4Linear` that runs on ``torch.ops.aten._weight_int4pack_mm_for_cpu``: bf16
activations ``x (M, K)``, 4-bit codes packed two per byte ``(N, K/2)``, and per group of
32 input features a bf16 scale and zero ``scales_and_zeros (K/32, N, 2)``; the kernel's
weight is ``(q - 8) * scale + zero``. Projections that read the same input (q/k/v,
gate/up) share one kernel (:class:`Int4Fused`); from ``DENSE_ROWS`` input rows a bf16
copy of the kernel's weight runs instead. The output head gives float32 logits
(:class:`Int8Head` on integer matmuls, or :class:`Float32Head`). The rest of the model
(embedding, norms as :class:`LeanRMSNorm`, attention arithmetic) runs in bf16.

Where the codes come from:

* a GGUF whose tensor is ``Q4_0`` / ``Q4_1``: the file's own blocks. A ``Q4_1`` block of
  32 weights stores ``d, m`` (fp16) and codes ``q ∈ [0, 15]`` with ``w = d·q + m``; that
  is the kernel's group with ``scale = d`` and ``zero = m + 8d``. ``Q4_0`` is
  ``w = d·(q - 8)``: ``scale = d``, ``zero = 0``. The codes are taken as they are; only the
  two per-group numbers are rounded to bf16 (8 significant bits against fp16's 11), so
  the kernel's weight differs from the file's by at most ``|q-8|·|Δd| + |Δzero|`` with
  ``|Δd| ≤ 2⁻⁹·|d|`` — :func:`block_rounding_error` measures it (docs/fastpath.md).
* anything else (other GGUF types, safetensors, random models): group-wise min/max
  quantization of the float32 weight (``scale = (max - min)/15``, codes by rounding).

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` for Llama (its RoPE
layout); transformers un-permutes them on load, and :func:`_unpermute_rows` applies the
same row permutation to the codes and group parameters, so a packed row is the same output
feature as the HF weight's row. The test suite checks this against transformers' own
dequantization.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("steerserve.quant")

GROUP = 32
_INNER_K_TILES = 8

# GGUF tensor-name stems (per block) → HF module path under ``model.layers.{i}``.
_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_Q4_TYPES = ("Q4_0", "Q4_1")


def int4_kernel_available() -> bool:
    """True when this torch build has the CPU int4 packing and matmul ops."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(
        ops, "_convert_weight_to_int4pack_for_cpu"
    )


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Int4Linear(nn.Module):
    """``y = x Wᵀ (+ b)`` with ``W (N, K)`` held as 4-bit group-32 codes.

    Buffers: ``packed (N, K/2) uint8`` (the kernel's layout), ``scales_and_zeros
    (K/32, N, 2) bf16``, and with :meth:`keep_dense` a bf16 copy ``dense (N, K)`` of the
    kernel's weight for many-row inputs. ``forward`` takes ``x (..., K)`` of any float
    dtype and returns ``(..., N)`` in bf16 (the kernel accumulates in float32).
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None
    dense: torch.Tensor | None

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        """``codes (N, K)`` integers in [0, 15]; ``scale, zero (N, K/32)`` float."""
        super().__init__()
        N, K = codes.shape
        if K % GROUP:
            raise ValueError(f"in_features must be a multiple of {GROUP}, got {K}")
        self.in_features, self.out_features = K, N
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), _INNER_K_TILES
        )
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)  # (K/32, N, 2)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        self.register_buffer("dense", None, persistent=False)  # see keep_dense
        self.dense_rows = 0

    @classmethod
    def from_packed(
        cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None
    ) -> Int4Linear:
        """Rebuild from the kernel-ready buffers (the packed-weights cache)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features = int(packed.shape[0])
        self.in_features = int(scales_and_zeros.shape[0]) * GROUP
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        self.register_buffer("dense", None, persistent=False)  # see keep_dense
        self.dense_rows = 0
        return self

    def keep_dense(self, rows: int | None) -> None:
        """From ``rows`` input rows on (a decode step's batch size, or prefill's tokens),
        multiply by a bf16 copy ``dense (N, K)`` of the kernel's own weight instead: the
        int4 kernel's cost grows about linearly with the rows while a dense bf16 GEMM
        amortizes its weight read (measured crossover 20-24 rows for SmolLM2 here,
        ``DENSE_ROWS``). ``None`` drops the copy (int4 at every size)."""
        if rows is None:
            self.dense, self.dense_rows = None, 0
            return
        self.dense = self.dequantized().to(torch.bfloat16).contiguous()
        self.dense_rows = int(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.dense is not None and x2.shape[0] >= self.dense_rows:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, GROUP, self.scales_and_zeros
            )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The kernel's effective weight ``(N, K)`` as float32, read by multiplying the
        identity (so rounded to bf16, the kernel's output dtype)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        cols = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP, self.scales_and_zeros
        )
        return cols.float().t().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


def _version_of(x: torch.Tensor) -> int:
    """``x``'s in-place version counter; inference-mode tensors have none (-2): there the
    identity check alone applies (nothing between a module's sibling projections writes
    into their shared input)."""
    return -2 if x.is_inference() else int(x._version)


class Int4Fused(nn.Module):
    """Several :class:`Int4Linear` that read the same input, as one kernel call.

    A Llama block multiplies its normed hidden state by ``q, k, v`` and later by
    ``gate, up``: five small int4 matmuls whose launches and per-call overhead dominate
    at batch 1 (7 kernel calls a layer → 4). ``linear`` holds the members' rows stacked
    ``(N_1 + … + N_n, K)``; the members are replaced by :class:`Int4Slice` modules, so the
    model's own forward (which calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in turn)
    is unchanged: the first slice called computes the stacked product ``(…, ΣN)`` and
    keeps it with the input it was computed for; the other slices return their columns
    of it when called with that very tensor (same object, unmodified since: its version
    counter is checked where autograd keeps one, i.e. outside inference mode), and
    the kept product is dropped once every slice has read it.
    Any other call recomputes, so the result never depends on call order.
    """

    def __init__(self, linear: Int4Linear, sizes: list[int]) -> None:
        super().__init__()
        if sum(sizes) != linear.out_features:
            raise ValueError(f"sizes {sizes} do not add up to {linear.out_features} rows")
        self.linear = linear
        self.sizes = list(sizes)
        self._x: torch.Tensor | None = None
        self._version = -1
        self._parts: list[torch.Tensor] = []
        self._unread: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., K)`` → all members' outputs side by side ``(..., ΣN)`` bf16."""
        return self.linear(x)

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s output ``(..., N_i)`` for ``x (..., K)`` (a column view)."""
        version = _version_of(x)
        if self._x is not x or self._version != version or i not in self._unread:
            self._parts = list(self.linear(x).split(self.sizes, dim=-1))
            self._x, self._version = x, version
            self._unread = set(range(len(self.sizes)))
        out = self._parts[i]
        self._unread.discard(i)
        if not self._unread:  # every member read it: free the product and the input
            self._x, self._parts = None, []
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_x=None, _version=-1, _parts=[], _unread=set())
        return state

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class Int4Slice(nn.Module):
    """Member ``index`` of an :class:`Int4Fused`: behaves as that member's own linear
    ``(..., K) → (..., N_i)``. The fused module is a plain reference, not a submodule
    (its parent owns it), so its buffers are stored and counted once."""

    def __init__(self, fused: Int4Fused, index: int) -> None:
        super().__init__()
        self._fused = [fused]  # a list: nn.Module would register a bare module attribute
        self.index = index
        self.in_features = fused.linear.in_features
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)

    def dequantized(self) -> torch.Tensor:
        """This member's rows of the fused kernel weight ``(N_i, K)`` float32."""
        start = sum(self._fused[0].sizes[: self.index])
        return self._fused[0].linear.dequantized()[start : start + self.out_features]

    def extra_repr(self) -> str:
        return f"index={self.index}, out_features={self.out_features}"


class Float32Head(nn.Module):
    """The output projection computed in float32 for a low-precision model.

    bf16 logits keep 8 significant bits (a step of 0.125 at logit 20), which turns
    near-ties into exact ties and adds rounding noise to every processor's input; the
    last position's ``hidden (N, 1, D)`` is small, so upcasting it and multiplying a
    float32 copy of the head weight ``(V, D)`` costs one extra read of that weight.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.weight)


_ACT_HI = 128  # an activation code is ``hi·128 + lo`` with hi, lo int8
_ACT_MAX = 127 * _ACT_HI  # 14-bit activation codes: |code| ≤ 16256


class Int8Head(nn.Module):
    """The output projection with int8 weights and float32 logits, on integer matmuls.

    The head ``W (V, D)`` is 40 % of a CPU int4 step when read as float32 (113 MB for
    SmolLM2's 49152 × 576); as int8 it is a quarter of that. Weights: per output row
    ``W[v] ≈ scale[v]·q[v]``, ``q ∈ [-127, 127]`` (stored transposed, ``weight_t (D, V)
    int8``, the layout ``torch._int_mm`` reads fastest). Activations ``h (..., D)`` are
    quantized per row to 14-bit codes ``c = round(h / s)``, ``s = max|h| / 16256``, and
    split exactly into two int8 halves ``c = 128·hi + lo``; one ``torch._int_mm`` of the
    stacked ``(2M, D)`` halves against ``weight_t`` gives int32 dot products that are
    exact, combined in float32: ``logit = s·scale[v]·(128·(hi·q) + lo·q)``. So the logits
    are float32 with float32-or-better accumulation (no bf16 output rounding), and the
    only approximations are the weight's int8 step (``scale/2`` per weight) and the
    activation's 14-bit step. Measured against the float32 head in docs/fastpath.md.
    """

    weight_t: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        """``weight (V, D)`` float."""
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        self.register_buffer("weight_t", q.t().contiguous())  # (D, V)
        self.register_buffer("scale", scale.contiguous())  # (V,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h (..., D)`` any float dtype → logits ``(..., V)`` float32."""
        shape = h.shape
        x = h.reshape(-1, self.in_features).float()
        m = x.shape[0]
        s = (x.abs().amax(-1, keepdim=True) / _ACT_MAX).clamp(min=1e-30)  # (M, 1)
        code = torch.round(x / s).to(torch.int32)  # (M, D), |code| ≤ 16256
        hi = torch.div(code + _ACT_HI // 2, _ACT_HI, rounding_mode="floor")  # [-127, 127]
        lo = code - hi * _ACT_HI  # [-64, 63]
        acc = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), self.weight_t)  # (2M, V)
        # int32 sums are exact; the float32 combination rounds once (~2^-24 relative).
        y = acc[:m].float().mul_(_ACT_HI).add_(acc[m:].float())
        y.mul_(s).mul_(self.scale)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight ``(V, D)`` float32 this head multiplies by (before the activation's
        14-bit rounding)."""
        return self.weight_t.t().float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_head_available() -> bool:
    """True when ``torch._int_mm`` runs on the CPU for the small M of a decode step."""
    try:
        a = torch.ones(2, 32, dtype=torch.int8)
        return bool(torch._int_mm(a, torch.ones(32, 32, dtype=torch.int8))[0, 0] == 32)
    except (RuntimeError, AttributeError):
        return False


HEADS = ("int8", "float32")


def make_head(weight: torch.Tensor, head: str) -> nn.Module:
    """The low-precision paths' output projection: :class:`Int8Head` (``"int8"``) or
    :class:`Float32Head` (``"float32"``); both return float32 logits."""
    if head == "int8":
        return Int8Head(weight)
    if head == "float32":
        return Float32Head(weight)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got '{head}'")


def quantize_minmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise (32 along ``K``) asymmetric 4-bit quantization of ``w (N, K)``.

    Returns ``codes (N, K) uint8``, ``scale (N, K/32)``, ``zero (N, K/32)`` float32 in the
    kernel's convention (``w ≈ (q - 8)·scale + zero``).
    """
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return q.reshape(N, K).to(torch.uint8), scale, lo + 8 * scale


def gguf_q4_blocks(raw: np.ndarray, kind: str, n_rows: int, n_cols: int) -> tuple[
    np.ndarray, np.ndarray, np.ndarray
]:
    """Decode the rows of a ``Q4_0``/``Q4_1`` GGUF tensor.

    ``raw (n_rows, bytes_per_row) uint8`` as ``GGUFReader`` maps it (a row is an output
    feature; its ``n_cols`` inputs are ``n_cols/32`` blocks). Block layout (llama.cpp
    ``ggml-common.h``): ``d`` fp16, (``Q4_1``: ``m`` fp16), then 16 bytes whose low nibbles
    are weights 0-15 and high nibbles weights 16-31.

    Returns ``codes (n_rows, n_cols) uint8``, ``scale, zero (n_rows, n_cols/32) float32``
    in the kernel's convention.
    """
    head = 4 if kind == "Q4_1" else 2
    blocks = np.asarray(raw).reshape(n_rows, n_cols // GROUP, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n_rows, n_cols)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    return codes, d, zero


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: ``hf = gguf[order]``.

    llama.cpp writes ``W.reshape(h, 2, dim, K).swapaxes(1, 2)``, so HF row
    ``(head a, half b, j)`` sits at GGUF row ``(a, j, b)``; this is transformers'
    ``_reverse_permute_weights`` written as a gather.
    """
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(n_rows)


def read_gguf_q4(path: Path, config: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The ``Q4_0``/``Q4_1`` linear weights of a Llama GGUF, keyed by HF module path
    (``model.layers.3.mlp.up_proj``; ``lm_head`` for ``output.weight``), rows in HF order.

    Other architectures, or tensors of other types, are left out (the caller quantizes
    them from the dequantized weights).
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
    if arch != "llama":
        log.info("GGUF architecture %r: 4-bit codes are re-derived, not read", arch)
        return {}
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in _Q4_TYPES:
            continue
        parts = t.name.split(".")
        if t.name == "output.weight":
            hf = "lm_head"
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF:
            hf = f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"
        else:
            continue
        n_cols, n_rows = (int(s) for s in t.shape[:2])  # GGUF: ne0 = inputs, ne1 = outputs
        codes, scale, zero = gguf_q4_blocks(t.data, kind, n_rows, n_cols)
        if hf != "lm_head" and parts[2] in ("attn_q", "attn_k"):
            order = _unpermute_rows(n_rows, n_head if parts[2] == "attn_q" else n_kv)
            codes, scale, zero = codes[order], scale[order], zero[order]
        out[hf] = (codes, scale, zero)
    return out


# RMSNorm classes whose forward is ``weight · x / sqrt(mean(x²) + eps)`` (Gemma's uses
# ``1 + weight``: not listed, left as it is).
_PLAIN_RMSNORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")


class LeanRMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dim in one fused op.

    transformers' ``LlamaRMSNorm`` runs ~7 eager ops per call (upcast, pow, mean, add,
    rsqrt, mul, downcast, mul): 61 calls a step for SmolLM2, a visible share of a
    bf16/int4 step's host time. ``F.rms_norm`` (``aten::_fused_rms_norm`` on the CPU)
    does it in one, accumulating in float32 and rounding to the input dtype once (the
    eager version rounds the normalized value to bf16 before the weight multiply, so
    this is if anything closer to the exact result; tests/unit/test_quant.py).
    ``x (..., D)`` → ``(..., D)`` in ``x``'s dtype.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (w.shape[-1],), w, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _lean_norms(model: nn.Module) -> int:
    """Swap plain RMSNorm modules for :class:`LeanRMSNorm` (low-precision paths only:
    ``fp32`` keeps transformers' own modules, so it stays equal to ``generate``)."""
    swaps = [(n, m) for n, m in model.named_modules() if type(m).__name__ in _PLAIN_RMSNORMS]
    for name, mod in swaps:
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
        if eps is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        _set_module(model, name, LeanRMSNorm(mod.weight, float(eps)))
    return len(swaps)


def _to_bf16_keep_rope(model: nn.Module) -> None:
    """``model.to(bf16)`` with plain RMSNorms as :class:`LeanRMSNorm`; rotary
    ``inv_freq`` buffers stay float32: transformers computes RoPE angles in float32 from
    them, and bf16 frequencies would shift every position's angle (by up to 2⁻⁹
    relative, i.e. radians at long context)."""
    keep = {
        n: b.detach().clone() for n, b in model.named_buffers()
        if n.endswith("inv_freq") and b.is_floating_point()
    }
    model.to(torch.bfloat16)
    _lean_norms(model)
    for name, buf in keep.items():
        parent_path, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, buf)


def _output_head(model: nn.Module) -> Any:
    """The model's output projection (``lm_head``), or None for a bare module."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


# Rows (batch × new tokens) from which an int4 linear multiplies by its dense bf16 copy
# instead (Int4Linear.keep_dense). Whole int4 model, decode step, one thread (CPU ms,
# loaded machine, docs/fastpath.md): int4 kernels only vs dense from here on were 39 / 41
# at 8 rows, 75 / 80 at 16, 104 / 101 at 24, 125 / 100 at 32, 269 / 208 at 64 (a kernel
# micro-benchmark with cache-hot weights puts the crossover lower, 8-16: the dense copy
# is 4x the bytes to stream from memory). With the lean forward (server.engine.lean),
# wall ms per step, medians of 6 alternating runs, loaded machine: 18.4 / 25.9 at 8 rows,
# 29.8 / 33.1 at 16, 38.3 / 42.9 at 20, 48.8 / 44.7 and 38.0 / 34.6 at 24 (two runs),
# 47.8 / 43.7 at 32: the crossover is between 20 and 24. Prefill chunks take the dense
# path too. Costs a bf16 copy of the linears' weights (≈ 210 MB for SmolLM2-135M).
DENSE_ROWS = 24

PACK_FORMAT = 2  # bump when the cached layout changes (2: fused q/k/v and gate/up)

# Members that read the same input, fused into one int4 kernel (name of the fused module).
FUSED_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _pack_cache_name() -> str:
    # The packed layout is the kernel's own (``_for_cpu``): tie the cache to torch's version.
    return f"int4-pack-v{PACK_FORMAT}-torch{torch.__version__.split('+')[0]}.safetensors"


def _load_pack_cache(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # corrupt or partial: rebuild, never use half
        log.warning("ignoring unreadable int4 cache %s (%s)", path, exc)
        return None


def _save_pack_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically: temporary sibling, fsync, rename."""
    import os
    import tempfile

    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write int4 cache %s (%s)", path, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _int4_units(
    linears: dict[str, nn.Linear], counts: dict[str, int]
) -> list[tuple[str, list[str]]]:
    """The int4 kernels to build: ``(module path, member linear paths)``, one member for
    a plain linear, several for a fused group (all present, same ``in_features``, biases
    all or none). Linears whose ``in_features`` is not a multiple of 32 stay dense."""
    units: list[tuple[str, list[str]]] = []
    taken: set[str] = set()
    for name, lin in linears.items():
        if lin.in_features % GROUP:
            counts["dense"] += 1
            taken.add(name)
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for fused_leaf, group in FUSED_GROUPS.items():
            if leaf != group[0]:
                continue
            paths = [f"{parent}.{g}" if parent else g for g in group]
            mods = [linears.get(p) for p in paths]
            if any(m is None or p in taken for m, p in zip(mods, paths, strict=True)):
                continue
            real = [m for m in mods if m is not None]
            if len({m.in_features for m in real}) != 1 or \
                    len({m.bias is None for m in real}) != 1:
                continue
            units.append((f"{parent}.{fused_leaf}" if parent else fused_leaf, paths))
            taken.update(paths)
            counts["fused"] += 1
    units += [(n, [n]) for n in linears if n not in taken]
    return units


def to_int4(
    model: nn.Module,
    gguf: Path | None = None,
    *,
    cache_dir: Path | None = None,
    head: str | None = "float32",
    dense_rows: int | None = DENSE_ROWS,
) -> dict[str, int]:
    """Convert ``model`` (float32 weights, on the CPU) in place to the int4 fast path.

    Every ``nn.Linear`` whose ``in_features`` is a multiple of 32 becomes an
    :class:`Int4Linear` (codes from ``gguf``'s Q4 blocks where it has them, else min/max
    from the float32 weight); the output head becomes :func:`make_head`'s ``head``
    (``"int8"`` or ``"float32"``: float32 logits either way) or, with ``head=None``, an
    int4 linear like the rest; everything else is cast to bf16. With ``cache_dir`` the
    packed buffers are kept there (reading a GGUF's blocks takes seconds; the cache loads
    in well under one).
    With ``dense_rows`` each int4 kernel also keeps a bf16 copy of its weight for inputs
    of at least that many rows (:meth:`Int4Linear.keep_dense`; ``None``: int4 always).
    Linears of one module that read the same input (``FUSED_GROUPS``: q/k/v, gate/up)
    become one :class:`Int4Fused` kernel with :class:`Int4Slice` members.
    Returns counts ``{"gguf": n, "minmax": n, "dense": n, "fused": n, "cached": 0|1}``
    (``gguf``/``minmax`` count linears as converted now, 0 when the cache was read;
    ``fused`` counts fused groups).
    """
    t0 = time.monotonic()
    config = getattr(model, "config", None)
    cache_path = cache_dir / _pack_cache_name() if cache_dir is not None else None
    cached = _load_pack_cache(cache_path) if cache_path and cache_path.is_file() else None
    blocks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if cached is None and gguf is not None and config is not None:
        blocks = read_gguf_q4(gguf, config)
    counts = {"gguf": 0, "minmax": 0, "dense": 0, "fused": 0,
              "cached": int(cached is not None)}
    lm = _output_head(model)
    head_weight = lm.weight.detach().float().clone() if lm is not None else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if head is not None:
        linears = {n: m for n, m in linears.items() if m is not lm}
    units = _int4_units(linears, counts)
    if cached is not None and any(f"{t}.packed" not in cached for t, _ in units):
        log.warning("int4 cache %s does not match this model's layout: rebuilding", cache_path)
        cached, counts["cached"] = None, 0
    if cached is None and not blocks and gguf is not None and config is not None:
        blocks = read_gguf_q4(gguf, config)
    fresh: dict[str, torch.Tensor] = {}
    for target, members in units:
        mods = [linears[n] for n in members]
        biases = [m.bias.detach() for m in mods if m.bias is not None]
        bias = torch.cat(biases) if len(biases) == len(mods) else None
        if cached is not None and f"{target}.packed" in cached:
            new = Int4Linear.from_packed(cached[f"{target}.packed"], cached[f"{target}.sz"],
                                         bias)
        else:
            parts = []
            for name, lin in zip(members, mods, strict=True):
                if name in blocks:
                    c, s, z = blocks[name]
                    parts.append(tuple(torch.from_numpy(a) for a in (c, s, z)))
                    counts["gguf"] += 1
                else:
                    # A tied head's weight is the embedding's: quantize the float32 copy.
                    w = head_weight if lin is lm and head_weight is not None else lin.weight
                    parts.append(quantize_minmax(w.detach()))
                    counts["minmax"] += 1
            codes, scale, zero = (torch.cat([p[k] for p in parts]) for k in range(3))
            new = Int4Linear(codes, scale, zero, bias)
            fresh[f"{target}.packed"], fresh[f"{target}.sz"] = new.packed, new.scales_and_zeros
        new.keep_dense(dense_rows)
        if len(members) == 1:
            _set_module(model, members[0], new)
            continue
        fused = Int4Fused(new, [m.out_features for m in mods])
        _set_module(model, target, fused)
        for i, name in enumerate(members):
            _set_module(model, name, Int4Slice(fused, i))
    _to_bf16_keep_rope(model)  # embedding, norms, any dense leftovers
    if head is not None and lm is not None and head_weight is not None:
        head_name = next(n for n, m in model.named_modules() if m is lm)
        _set_module(model, head_name, make_head(head_weight, head))
    if lm is not None and config is not None:
        config.tie_word_embeddings = False  # the head no longer shares the embedding
    if cache_path is not None and cached is None and fresh:
        _save_pack_cache(cache_path, fresh)
    log.info("int4 weights: %s in %.1f s", counts, time.monotonic() - t0)
    return counts


def to_bf16(model: nn.Module, *, head: str | None = "float32") -> None:
    """Cast ``model`` to bf16 in place; the output head becomes :func:`make_head`'s
    ``head`` (float32 logits), or with ``head=None`` stays a bf16 linear."""
    lm = _output_head(model)
    head_weight = lm.weight.detach().float().clone() if lm is not None else None
    _to_bf16_keep_rope(model)
    if head is not None and lm is not None and head_weight is not None:
        name = next(n for n, m in model.named_modules() if m is lm)
        _set_module(model, name, make_head(head_weight.to(lm.weight.device), head))
        config = getattr(model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False


def gguf_has_q4(path: Path) -> bool:
    """True when the GGUF file holds at least one ``Q4_0``/``Q4_1`` tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return any(t.tensor_type.name in _Q4_TYPES for t in reader.tensors)


def block_rounding_error(path: Path, config: Any) -> dict[str, float]:
    """How far the kernel's weights (bf16 scale and zero) are from the file's exact Q4
    weights, over every Q4 linear of ``path``: max and mean absolute difference, and the
    max relative to the tensor's largest weight."""
    blocks = read_gguf_q4(path, config)
    worst_abs, total, count, worst_rel = 0.0, 0.0, 0, 0.0
    for c, s, z in blocks.values():
        q = c.astype(np.float32).reshape(c.shape[0], -1, GROUP)
        exact = (q - 8) * s[..., None] + z[..., None]
        s16 = torch.from_numpy(s).to(torch.bfloat16).float().numpy()
        z16 = torch.from_numpy(z).to(torch.bfloat16).float().numpy()
        kernel = (q - 8) * s16[..., None] + z16[..., None]
        diff = np.abs(kernel - exact)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max() / max(np.abs(exact).max(), 1e-12)))
        total += float(diff.sum())
        count += diff.size
    return {"max_abs": worst_abs, "mean_abs": total / max(count, 1), "max_rel": worst_rel}
