"""Independent reference implementations of InternVL's original (remote-code) model, for tests.

Written from the published formulas of InternViT, InternVL's pixel shuffle + ``mlp1`` projector and InternLM2,
with the original parameter names, so a state dict of :class:`RefInternVLChat` *is* a remote-code InternVL
checkpoint. Nothing here uses maskport or transformers' InternVL code. The Qwen2 language model is
transformers' own ``Qwen2ForCausalLM`` (an independent implementation too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---- InternViT ---------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, dim, heads, qkv_bias, qk_norm=False, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:  # InternViT-6B: RMSNorm over all heads together
            self.q_norm = _RMSNorm(dim, eps)
            self.k_norm = _RMSNorm(dim, eps)

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # 3, B, H, N, d
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.qk_norm:
            q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(b, n, self.heads, d).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(b, n, self.heads, d).transpose(1, 2)
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _VitLayer(nn.Module):
    def __init__(self, dim, heads, hidden, eps, qkv_bias, norm_type="layer_norm", qk_norm=False):
        super().__init__()
        self.attn = _Attn(dim, heads, qkv_bias, qk_norm, eps)
        self.mlp = _Mlp(dim, hidden)
        norm = (lambda: nn.LayerNorm(dim, eps=eps)) if norm_type == "layer_norm" else (lambda: _RMSNorm(dim, eps))
        self.norm1 = norm()
        self.norm2 = norm()
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class _Embeddings(nn.Module):
    def __init__(self, dim, image_size, patch):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)   # B, N, C
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class _Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RefInternViT(nn.Module):
    """InternViT: layer scale, no final norm (``last_hidden_state``); 300M style (LayerNorm, qkv bias) or 6B style
    (``norm_type="rms_norm"``, ``qk_normalization``, no qkv bias)."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["hidden_size"]
        self.embeddings = _Embeddings(dim, cfg["image_size"], cfg["patch_size"])
        self.encoder = _Encoder([_VitLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"],
                                           cfg["layer_norm_eps"], cfg["qkv_bias"], cfg.get("norm_type", "layer_norm"),
                                           cfg.get("qk_normalization", False))
                                 for _ in range(cfg["num_hidden_layers"])])

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


def pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's ``pixel_shuffle`` with ``ps_version='v2'``: (N, W, H, C) -> (N, W*s, H*s, C/s^2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


# ---- InternLM2 ---------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + self.eps)).to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _LM2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg["hidden_size"] // self.h
        self.theta = cfg["rope_theta"]
        self.wqkv = nn.Linear(cfg["hidden_size"], (self.h + 2 * self.kv) * self.d, bias=cfg["bias"])
        self.wo = nn.Linear(self.h * self.d, cfg["hidden_size"], bias=cfg["bias"])

    def forward(self, x):
        b, n, _ = x.shape
        g = self.h // self.kv
        qkv = self.wqkv(x).reshape(b, n, self.kv, g + 2, self.d)      # "b q (h gs d) -> b q h gs d"
        q = qkv[..., :g, :].reshape(b, n, self.h, self.d)              # "b q h gs d -> b q (h gs) d"
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # B, heads, N, d
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(g, dim=1)                               # q head j uses kv head j // g
        v = v.repeat_interleave(g, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
        out = scores.softmax(-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, n, self.h * self.d))


class _LM2FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=False)
        self.w3 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=False)
        self.w2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _LM2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = _LM2Attention(cfg)
        self.feed_forward = _LM2FFN(cfg)
        self.attention_norm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.ffn_norm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _LM2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([_LM2Layer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = _RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class RefInternLM2(nn.Module):
    """InternLM2ForCausalLM's parameter names and forward (no rope scaling: sequences stay short)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.model = _LM2Model(cfg)
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def forward(self, inputs_embeds):
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x)
        return self.output(self.model.norm(x))


# ---- the whole chat model ----------------------------------------------------------------------------------
class RefInternVLChat(nn.Module):
    """``vision_model`` -> drop CLS -> pixel shuffle (v2) -> ``mlp1`` -> the image-context embeddings -> LLM."""

    def __init__(self, vision_cfg: dict, llm: nn.Module, llm_hidden: int, downsample_ratio: float = 0.5):
        super().__init__()
        self.vision_model = RefInternViT(vision_cfg)
        c = vision_cfg["hidden_size"] * int(1 / downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self.language_model = llm
        self.ratio = downsample_ratio

    def image_embeds(self, pixel_values):
        x = self.vision_model(pixel_values)[:, 1:, :]
        side = int(x.shape[1] ** 0.5)
        x = pixel_shuffle_v2(x.reshape(x.shape[0], side, side, -1), self.ratio)
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))

    def forward(self, input_ids, pixel_values, img_context_id: int):
        emb = self.language_model.get_input_embeddings()(input_ids)
        img = self.image_embeds(pixel_values).reshape(-1, emb.shape[-1])
        mask = input_ids[0] == img_context_id
        assert int(mask.sum()) == img.shape[0], (int(mask.sum()), img.shape)
        emb = emb.clone()
        emb[0, mask] = img.to(emb.dtype)
        out = self.language_model(inputs_embeds=emb)
        return out if isinstance(out, torch.Tensor) else out.logits
