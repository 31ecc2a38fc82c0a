"""Rewrite attention modules that hide their projections into equivalent modules with explicit
``nn.Linear`` projections, so each projection can be analyzed and compressed.

``torch.nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` used through a fused
functional call that fx cannot see into; ``ExplicitMultiheadAttention`` computes the same function with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wasi_compress.passes.base import PassResult, WasiPass


class ExplicitMultiheadAttention(nn.Module):
    """Same forward contract as nn.MultiheadAttention (self- or cross-attention, batch_first or not,
    key_padding_mask, attn_mask, need_weights), with explicit projection linears."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        e, kd, vd = mha.embed_dim, mha.kdim, mha.vdim
        has_bias = mha.in_proj_bias is not None
        factory = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = e, mha.num_heads, mha.dropout, mha.batch_first
        self.q_proj = nn.Linear(e, e, bias=has_bias, **factory)
        self.k_proj = nn.Linear(kd, e, bias=has_bias, **factory)
        self.v_proj = nn.Linear(vd, e, bias=has_bias, **factory)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, **factory)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in ((self.q_proj, wq), (self.k_proj, wk), (self.v_proj, wv)):
                lin.weight.copy_(w)
            if has_bias:
                for lin, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.training = mha.training

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, e = query.shape
        lk = key.shape[1]
        h = self.num_heads
        d = e // h
        q = self.q_proj(query).reshape(b, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(b, lk, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(b, lk, h, d).transpose(1, 2)
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, lq, lk)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(b, 1, 1, lk)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = scores.softmax(dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = (attn @ v).transpose(1, 2).reshape(b, lq, e)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (attn.mean(dim=1) if average_attn_weights else attn)

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """The equivalent fused module (for reversal)."""
        kd, vd = self.k_proj.in_features, self.v_proj.in_features
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=self.q_proj.bias is not None, kdim=kd, vdim=vd, batch_first=self.batch_first,
                                    device=self.q_proj.weight.device, dtype=self.q_proj.weight.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            else:
                mha.q_proj_weight.copy_(self.q_proj.weight)
                mha.k_proj_weight.copy_(self.k_proj.weight)
                mha.v_proj_weight.copy_(self.v_proj.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if mha.out_proj.bias is not None:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha


class ExplicitAttentionPass(WasiPass):
    """Replace every nn.MultiheadAttention submodule by ExplicitMultiheadAttention (in place)."""

    name = "explicit_attention"
    preserves_computation = True
    reversible = True

    def call(self, module: nn.Module) -> PassResult:
        targets = [n for n, m in module.named_modules() if type(m) is nn.MultiheadAttention]
        for name in targets:
            module.set_submodule(name, ExplicitMultiheadAttention(module.get_submodule(name)))
        return PassResult(module, bool(targets))

    def reverse(self, module: nn.Module) -> PassResult:
        targets = [n for n, m in module.named_modules() if isinstance(m, ExplicitMultiheadAttention)]
        for name in targets:
            module.set_submodule(name, module.get_submodule(name).to_multihead_attention())
        return PassResult(module, bool(targets))
