"""CLIP ViT-L/14 transformers: the text tower SD 1.x conditions on, and the vision tower its safety checker uses.

Text: ids (B, 77) -> token + position embeddings -> 12 pre-LN blocks with a causal mask -> final LayerNorm
-> (B, 77, 768). Module names equal transformers' CLIPTextModel keys, `text_model.` prefix included.

Vision: pixels (B, 3, 224, 224) -> 14x14 patches (16x16 of them) -> [class token, patches] + position embeddings
-> LayerNorm -> 24 pre-LN blocks, no mask (the same block code as the text tower) -> the class token through the
final LayerNorm -> (B, 1024) pooled. Module names equal the checkpoint keys of transformers' CLIPVisionModel,
`vision_model.` prefix included (`pre_layrnorm` is spelled as there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig, CLIPVisionConfig
from .nn import ACTIVATIONS


def embedding(n: int, dim: int) -> nn.Embedding:
    """nn.Embedding, skipping its random init on the meta device: `normal_` there first imports torch's
    reference-op machinery, seconds that every model load would pay for values it then overwrites."""
    weight = torch.empty(n, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(n, dim, _weight=weight)


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
        self.token_embedding = embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = embedding(cfg.max_position_embeddings, cfg.hidden_size)

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


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, 16, 16)
        patches = patches.flatten(2).transpose(1, 2)  # (B, 256, C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 257, C)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, S, S), normalised as CLIP's image processor does -> every layer's output (B, 1 + N, C):
        [embeddings after pre_layrnorm, after block 1, ..., after block N], as transformers' `hidden_states`."""
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"pixel values of shape {tuple(pixels.shape)}; this vision tower takes "
                             f"(B, {self.config.num_channels}, {size}, {size})")
        vm = self.vision_model
        return vm.encoder(vm.pre_layrnorm(vm.embeddings(pixels)), causal=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> the pooled output (B, C): the class token of the last layer, post_layernorm'd."""
        return self.vision_model.post_layernorm(self.hidden_states(pixels)[-1][:, 0])
