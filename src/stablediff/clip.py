"""CLIP ViT-L/14 transformers: the text tower SD 1.x conditions on (and the vision tower's shared blocks).

Text: ids (B, 77) -> token + position embeddings -> 12 pre-LN blocks with a causal mask -> final LayerNorm
-> (B, 77, 768). Module names equal transformers' CLIPTextModel keys, `text_model.` prefix included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig
from .nn import ACTIVATIONS


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, causal: bool):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of pre-LN blocks; returns every hidden state: [input, after block 1, ..., after block N]."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                             cfg.layer_norm_eps) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, causal: bool, stop_at: int | None = None) -> list[torch.Tensor]:
        states = [x]
        for layer in self.layers[:stop_at]:
            x = layer(x, causal)
            states.append(x)
        return states


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids, token_embeds=None):
        """token_embeds (B, L, C), when given, replace the looked-up token vectors (textual inversion)."""
        tokens = self.token_embedding(ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[: tokens.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def hidden_states(self, ids: torch.Tensor, stop_at: int | None = None,
                      token_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's output before the final LayerNorm, as transformers' `output_hidden_states` gives."""
        tm = self.text_model
        return tm.encoder(tm.embeddings(ids, token_embeds), causal=True, stop_at=stop_at)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> (B, L, hidden). clip_skip counts as AUTOMATIC1111 does: 1 is the last layer, 2 the
        penultimate one; either way followed by the final LayerNorm. Layers past the one used are not run.
        token_embeds (B, L, hidden) optionally replaces the token-embedding lookup of ids."""
        n = self.config.num_hidden_layers
        if not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip={clip_skip} is out of range 1..{n}")
        h = self.hidden_states(ids, stop_at=n - clip_skip + 1, token_embeds=token_embeds)[-1]
        return self.text_model.final_layer_norm(h)
