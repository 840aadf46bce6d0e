"""A lean decoder forward for Llama-family models: the model's own math, less machinery.

On the CPU fast paths (``weights`` bf16 / int4) the transformers forward spends about as
long in Python and small eager ops as in the int4 kernels themselves: a module call per
block, attention, MLP, norm and linear; RoPE as separate op sequences for q and k; mask
and output-capture plumbing; keyword arguments threaded through every level. This module
runs the same computation with the model's own weights and modules, written as a flat
loop:

    h = embed(ids)                                   (B, T, D)
    cos, sin = rotary(h, positions)                  once per forward, (B, T, hd)
    per block ℓ:
        x = input_norm(h)
        q|k|v = qkv(x)                               one int4 kernel when fused (quant.Int4Fused)
        q|k rotated together:  qk·cos + swap(qk)·sin±   (swap = halves exchanged,
                                                     sin± = (-sin₁, sin₂): rotate_half)
        K, V = cache layer ℓ ← append k, v           (B, H_kv, L, hd), DynamicCache
        a = SDPA(q, K, V, mask)                      decode: GQA packed (the n_rep query
                                                     heads of a KV head as its queries)
        h = h + o_proj(a)
        x = post_norm(h)
        g|u = gate_up(x)                             one int4 kernel when fused
        h = h + down(silu(g) · u)
        h = hooks.block_output(ℓ, h)                 control deltas + capture, the hooks' body
    logits = head(final_norm(h[:, -1:]))             float32 (N, V)

The KV cache stays the ``DynamicCache`` of ``server.engine.batch.BatchState`` (appending
by concatenation, as transformers does), so ``add``/``gather``/``select`` are unchanged.
The attention mask is the engine's own (``server.engine.padding.model_mask``: ``None``
when no row has padding, else the 4-D additive mask that never leaves a query row fully
masked). Steering goes through :func:`server.engine.hooks.block_output`, the very
function the forward hooks call, with the thread's phase and capture read once per
forward. Nothing here reads a tensor on the host (no ``.item()``/``.tolist()``).

Which models: ``LlamaForCausalLM`` whose blocks are the plain shape (RMSNorm, SiLU gated
MLP, no sliding window, ``pretraining_tp`` 1); anything else keeps the transformers
forward (:func:`lean_unsupported` says why). In fp32 it is off by default (the exactness
tests compare the engine with ``transformers.generate``) but selectable, and
tests/unit/test_lean.py checks it against the transformers forward in fp32, bf16 and int4.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from server.engine.hooks import ControlHooks, block_output
from server.engine.padding import attention_mask_4d, model_takes_4d_mask
from server.quant import Int4Fused, Int4Linear, Int4Slice

log = logging.getLogger("steerserve.engine")

SUPPORTED = ("LlamaForCausalLM",)

Fn = Callable[[torch.Tensor], torch.Tensor]


def lean_unsupported(model: nn.Module) -> str | None:
    """Why the lean forward cannot run ``model`` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"architecture {name} (lean forward: {', '.join(SUPPORTED)})"
    config: Any = getattr(model, "config", None)
    if config is None or not model_takes_4d_mask(config):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(inner, attr, None) is None:
            return f"no model.{attr}"
    for layer in inner.layers:  # type: ignore[union-attr]  # checked just above
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        parts += [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if any(p is None for p in parts):
            return "a block of another shape"
    return None


def _fused_of(mods: list[nn.Module]) -> Fn | None:
    """The one int4 kernel behind ``mods`` when they are, in order, all the members of one
    ``quant.Int4Fused`` (its stacked product, columns in member order); else None."""
    slices = [m for m in mods if isinstance(m, Int4Slice)]
    if len(slices) != len(mods):
        return None
    fused: Int4Fused = slices[0]._fused[0]
    if len(fused.sizes) != len(slices) or any(
        m._fused[0] is not fused or m.index != i for i, m in enumerate(slices)
    ):
        return None
    linear: Int4Linear = fused.linear
    return linear.forward


def _stacked(mods: list[nn.Module]) -> Fn:
    """``x (..., K)`` → the outputs of ``mods`` side by side ``(..., ΣN)``: one fused
    int4 kernel when there is one, else each module's own forward, concatenated."""
    fused = _fused_of(mods)
    if fused is not None:
        return fused
    fns = [m.forward for m in mods]

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f(x) for f in fns], dim=-1)

    return run


@dataclass(frozen=True)
class _Block:
    """One decoder block's callables (bound ``forward`` methods: no module-call
    machinery; the decoder block's own hooks are replaced by ``block_output``)."""

    in_norm: Fn
    qkv: Fn  # (B, T, D) → (B, T, (H + 2 H_kv) hd), q | k | v
    o_proj: Fn
    post_norm: Fn
    gate_up: Fn  # (B, T, D) → (B, T, 2 I), gate | up
    down: Fn
    inter: int  # I, the MLP's width


class LeanForward:
    """The lean forward of one model (see the module docstring); use :meth:`build`."""

    def __init__(self, model: nn.Module, hooks: ControlHooks) -> None:
        config: Any = model.config
        inner: Any = model.model
        self.hooks = hooks
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        )
        self.scale = self.head_dim**-0.5
        self.embed: Fn = inner.embed_tokens.forward
        self.rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        self.rotary = inner.rotary_emb  # a module call: keeps its dynamic-RoPE decorator
        self.final_norm: Fn = inner.norm.forward
        self.head: Fn = model.lm_head.forward  # type: ignore[union-attr]  # a causal LM's head
        self.blocks: list[_Block] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.blocks.append(_Block(
                in_norm=layer.input_layernorm.forward,
                qkv=_stacked([attn.q_proj, attn.k_proj, attn.v_proj]),
                o_proj=attn.o_proj.forward,
                post_norm=layer.post_attention_layernorm.forward,
                gate_up=_stacked([mlp.gate_proj, mlp.up_proj]),
                down=mlp.down_proj.forward,
                inter=int(mlp.down_proj.in_features),
            ))

    @classmethod
    def build(cls, model: nn.Module, hooks: ControlHooks) -> LeanForward | None:
        """The lean forward of ``model``, or None (logged) when it does not apply."""
        why = lean_unsupported(model)
        if why is not None:
            log.info("lean forward off: %s", why)
            return None
        return cls(model, hooks)

    def __call__(
        self,
        ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """One cached forward of ``ids (B, T)`` at ``positions (B, T)``; returns the
        last position's logits ``(B, V)`` float32.

        ``attn_mask``: ``None`` (no row has padding) or the additive ``(B, 1, T, K)``
        mask over cache + new tokens in the activations' dtype
        (``server.engine.padding.model_mask``). The new keys/values are appended to
        ``cache``; the thread's control phase and capture (``ControlHooks.steering`` /
        ``capture``) apply after every block, as the hooks would.
        """
        B, T = ids.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        n_rep = H // Hkv
        phase, cap = self.hooks.current()
        steer = phase is not None or cap is not None
        h = self.embed(ids)  # (B, T, D)
        cos, sin = self.rotary(h, positions)  # (B, T, hd) in h's dtype
        half = hd // 2
        # rotate_half(x)·sin == swap(x)·(-sin₁ | sin₂): the sign moves onto sin, once.
        cos = cos.unsqueeze(2)  # (B, T, 1, hd): broadcast over the q and k heads
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)
        layers: Any = cache.layers  # typed as a union with linear-attention layers
        n_qk = (H + Hkv) * hd
        past = layers[0].get_seq_length() if len(layers) else 0  # host int, no device read
        if attn_mask is None and T > 1 and past > 0:
            # A chunk over a filled cache without padding still needs the causal offset.
            ones = torch.ones(B, past + T, dtype=torch.long, device=ids.device)
            attn_mask = attention_mask_4d(ones, T, h.dtype)
        causal = attn_mask is None and T > 1
        for idx, blk in enumerate(self.blocks):
            y = blk.qkv(blk.in_norm(h))  # (B, T, (H + 2 Hkv) hd)
            qk = y[..., :n_qk].reshape(B, T, H + Hkv, hd)
            qk = qk * cos + qk.roll(half, dims=-1) * sin  # roll: the halves swapped
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
            k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, hd)
            v = y[..., n_qk:].reshape(B, T, Hkv, hd).transpose(1, 2)
            if idx < len(layers):
                keys, values = layers[idx].update(k, v)
            else:  # a cache without per-layer objects yet: let it create them
                keys, values = cache.update(k, v, idx)
            if T == 1 and n_rep > 1:
                # GQA at decode: the n_rep query heads of KV head g are g's "queries"
                # (head h reads KV head h // n_rep, as transformers' repeat_kv), so no
                # key/value copy; a (B, 1, 1, K) mask broadcasts over them.
                a = F.scaled_dot_product_attention(
                    q.reshape(B, Hkv, n_rep, hd), keys, values, attn_mask=attn_mask,
                    scale=self.scale,
                ).reshape(B, 1, H * hd)
            else:
                a = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=attn_mask, is_causal=causal,
                    scale=self.scale, enable_gqa=n_rep > 1,
                ).transpose(1, 2).reshape(B, T, H * hd)
            h = h + blk.o_proj(a)
            g, u = blk.gate_up(blk.post_norm(h)).split(blk.inter, dim=-1)
            h = h + blk.down(F.silu(g) * u)
            if steer:
                h = block_output(idx, h, phase, cap)
        return self.head(self.final_norm(h[:, -1:, :]))[:, -1, :].float()


__all__ = ["SUPPORTED", "LeanForward", "lean_unsupported"]
