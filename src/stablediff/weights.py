"""Reading Stable Diffusion 1.x weights in every layout users have, into one naming.

Our modules are named like diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel`
(with the `text_model.` prefix), so a diffusers folder loads as is. The original single-file layout (LDM/CompVis:
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) goes through ONE key table
(`unet_key_table`, `vae_key_table`): rows of (our module prefix, original prefix, leaf renames), read in either
direction, so `split_original` and `to_original` are exact inverses. Single files carry no configs: they are
inferred from tensor shapes, then every key and shape is checked against what that config builds.

Files are read without running code: safetensors are memory-mapped (copy-on-write, nothing is read until used),
and pickled `.ckpt/.pt/.bin` files go through an unpickler that only rebuilds tensors and a few containers.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CLIPTextConfig, UNetConfig, VAEConfig

__all__ = ["CheckpointError", "Checkpoint", "read_state_dict", "split_original", "to_original", "detect",
           "infer_unet_config", "infer_vae_config", "infer_text_config", "unet_key_table", "vae_key_table",
           "unet_shapes", "vae_shapes", "text_shapes", "load_checkpoint", "load_into"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, said in one line: the file, what it looks like, what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Reading files

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors are views of a copy-on-write mmap of the file: no read until touched, no copy unless written."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = _ST_DTYPES.get(info["dtype"]), [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {name}: {info})") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which stablediff does not read")
        numel = math.prod(shape)
        if e - b != numel * dtype.itemsize or not 0 <= b <= e or start + e > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {name} needs bytes "
                                  f"{start + b}..{start + e}, the file has {size}); download it again")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + b) % dtype.itemsize:  # misaligned: one copy for this tensor only
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=e - b, offset=start + b)
            out[name] = raw.clone().view(dtype).view(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + b).view(shape)
    return out


class _LightningCallbackStub:
    """Inert stand-in for Lightning's ModelCheckpoint class, which training checkpoints pickle as a key of their
    `callbacks` entry. Nothing of Lightning is imported or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _LightningCallbackStub,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): _LightningCallbackStub,
}


class _Refused(pickle.UnpicklingError):
    pass


class _WeightsUnpickler(pickle.Unpickler):
    """Resolves only tensors, storages (torch resolves those before asking us), dtypes and the globals above;
    anything else is refused when named, before it can be called."""

    def find_class(self, module, name):
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


# torch.load takes a "pickle module": this one has only our restricted unpickler in it
_weights_pickle = types.ModuleType("stablediff_weights_pickle")
_weights_pickle.Unpickler = _WeightsUnpickler
_weights_pickle.load = lambda f, **kw: _WeightsUnpickler(f, **kw).load()


def _read_pickle(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, pickle_module=_weights_pickle, weights_only=False,
                          mmap=zipfile.is_zipfile(path))
    except _Refused as e:
        raise CheckpointError(f"{path}: refused to load: its pickle asks for {e}, which is code, not weights; "
                              f"only tensors are read from .ckpt/.pt/.bin files (use a .safetensors file "
                              f"from a source you trust)") from None
    except Exception as e:  # zip, pickle and storage errors of a damaged file
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint, truncated or corrupt? "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def read_state_dict(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors or pickled torch file (`state_dict` unwrapped), read without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        sd = _read_safetensors(path)
        return sd if str(device) == "cpu" else {k: v.to(device) for k, v in sd.items()}
    obj = _read_pickle(path, device)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (a {type(obj).__name__}); expected a state dict of weights")
    return sd


# ----------------------------------------------------------------------------------------------------------------
# The key table: rows of (our module prefix, original module prefix, leaf renames ours -> original or None when
# the leaves are named alike, True where our Linear weights are stored as 1x1 convolutions)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_LINEAR_AS_CONV = {"to_q", "to_k", "to_v", "to_out.0"}
# diffusers folders saved before diffusers 0.14 (the SD 1.5 repo's VAE among them) name the VAE attention like this
_OLD_DIFFUSERS_ATTENTION = {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value",
                            "to_out.0": "proj_attn"}
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}


def unet_key_table(levels: int, layers: int, down_attn, up_attn) -> list[tuple]:
    rows = [("conv_in", "input_blocks.0.0", None), ("time_embedding.linear_1", "time_embed.0", None),
            ("time_embedding.linear_2", "time_embed.2", None), ("conv_norm_out", "out.0", None),
            ("conv_out", "out.2", None), ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
            ("mid_block.attentions.0", "middle_block.1", None), ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    for i in range(levels):  # input_blocks: conv_in, then per level `layers` x (resnet, attention), a downsampler
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET))
            if down_attn[i]:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", None))
        if i < levels - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op", None))
    for i in range(levels):  # output_blocks: per level `layers + 1` x (resnet, attention), the last one + upsampler
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET))
            if up_attn[i]:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", None))
        if i < levels - 1:
            rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if up_attn[i] else 1}.conv", None))
    return rows


def vae_key_table(levels: int, layers: int) -> list[tuple]:
    rows = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                 (f"{part}.conv_norm_out", f"{part}.norm_out", None),
                 (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                 (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                 (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, True)]
    for i in range(levels):
        for j in range(layers):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        up = levels - 1 - i  # the original decoder counts its levels from the bottom
        for j in range(layers + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv", None))
    return rows


def _rename(sd: dict, rows: list[tuple], *, to_ours: bool) -> tuple[dict, list[str]]:
    """Map every key through the row with the longest matching module prefix; returns (renamed, keys left over)."""
    lookup = {}
    for ours, theirs, leaves, *conv in rows:
        if leaves is not None and to_ours:
            leaves = {v: k for k, v in leaves.items()}
        lookup[theirs if to_ours else ours] = (ours if to_ours else theirs, leaves, bool(conv and conv[0]))
    out, left = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for d in range(len(parts) - 1, 0, -1):
            if (hit := lookup.get(".".join(parts[:d]))) is not None:
                break
        else:
            left.append(key)
            continue
        prefix, leaves, conv = hit
        leaf = ".".join(parts[d:-1])  # the module inside the row's block ("" for a plain layer)
        if leaves is not None and leaf not in leaves:
            left.append(key)
            continue
        new_leaf = leaf if leaves is None else leaves[leaf]
        if conv and value is not None and parts[-1] == "weight" and (new_leaf if to_ours else leaf) in _LINEAR_AS_CONV:
            value = value.flatten(1) if to_ours else value[:, :, None, None]
        out[".".join(p for p in (prefix, new_leaf, parts[-1]) if p)] = value
    return out, left


def _indices(keys, prefix: str) -> list[int]:
    """The distinct block numbers right after `prefix` (e.g. "down_blocks." -> [0, 1, 2, 3])."""
    heads = (k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix))
    return sorted({int(h) for h in heads if h.isdigit()})


def _unet_table(c: UNetConfig) -> list[tuple]:
    return unet_key_table(len(c.block_out_channels), c.layers_per_block,
                          [t.startswith("CrossAttn") for t in c.down_block_types],
                          [t.startswith("CrossAttn") for t in c.up_block_types])


def _vae_table(c: VAEConfig) -> list[tuple]:
    return vae_key_table(len(c.block_out_channels), c.layers_per_block)


def _original_unet_table(sd) -> list[tuple]:
    """The table for an original-layout U-Net, its structure read from the block numbering."""
    inputs, outputs = _indices(sd, "input_blocks."), _indices(sd, "output_blocks.")
    ops = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in sd]
    layers = ops[0] - 1 if ops else len(inputs) - 1
    levels = len(outputs) // (layers + 1) if layers > 0 else 0
    return unet_key_table(levels, layers,
                          [f"input_blocks.{1 + i * (layers + 1)}.1.proj_in.weight" in sd for i in range(levels)],
                          [f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in sd for i in range(levels)])


def _original_vae_table(sd) -> list[tuple]:
    return vae_key_table(len(_indices(sd, "encoder.down.")), len(_indices(sd, "encoder.down.0.block.")))


def _text_keys(sd: dict) -> tuple[dict, list[str]]:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix: add it; drop the position_ids buffer."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            dropped.append(k)
        else:
            out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out, dropped


# ----------------------------------------------------------------------------------------------------------------
# Expected shapes, per config, in our naming: what `load_checkpoint` checks a file against

class _Shapes(dict):
    def norm(self, p, c):
        self[f"{p}.weight"] = self[f"{p}.bias"] = (c,)

    def linear(self, p, o, i, bias=True):
        self[f"{p}.weight"] = (o, i)
        if bias:
            self[f"{p}.bias"] = (o,)

    def conv(self, p, o, i, k=3):
        self[f"{p}.weight"], self[f"{p}.bias"] = (o, i, k, k), (o,)

    def resnet(self, p, i, o, temb=0):
        self.norm(f"{p}.norm1", i), self.conv(f"{p}.conv1", o, i)
        self.norm(f"{p}.norm2", o), self.conv(f"{p}.conv2", o, o)
        if temb:
            self.linear(f"{p}.time_emb_proj", o, temb)
        if i != o:
            self.conv(f"{p}.conv_shortcut", o, i, 1)


def unet_shapes(c: UNetConfig) -> dict[str, tuple]:
    s, ch, n_layers, temb = _Shapes(), c.block_out_channels, c.layers_per_block, 4 * c.block_out_channels[0]

    def transformer(p, n):
        s.norm(f"{p}.norm", n)
        for proj in (f"{p}.proj_in", f"{p}.proj_out"):
            s.linear(proj, n, n) if c.use_linear_projection else s.conv(proj, n, n, 1)
        b = f"{p}.transformer_blocks.0"
        for attn, context in (("attn1", n), ("attn2", c.cross_attention_dim)):
            s.linear(f"{b}.{attn}.to_q", n, n, bias=False)
            s.linear(f"{b}.{attn}.to_k", n, context, bias=False), s.linear(f"{b}.{attn}.to_v", n, context, bias=False)
            s.linear(f"{b}.{attn}.to_out.0", n, n)
        s.norm(f"{b}.norm1", n), s.norm(f"{b}.norm2", n), s.norm(f"{b}.norm3", n)
        s.linear(f"{b}.ff.net.0.proj", 8 * n, n), s.linear(f"{b}.ff.net.2", n, 4 * n)  # GEGLU: value and gate

    s.conv("conv_in", ch[0], c.in_channels)
    s.linear("time_embedding.linear_1", temb, ch[0]), s.linear("time_embedding.linear_2", temb, temb)
    prev = ch[0]
    for i, (n, kind) in enumerate(zip(ch, c.down_block_types)):
        for j in range(n_layers):
            s.resnet(f"down_blocks.{i}.resnets.{j}", prev if j == 0 else n, n, temb)
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{i}.attentions.{j}", n)
        if i < len(ch) - 1:
            s.conv(f"down_blocks.{i}.downsamplers.0.conv", n, n)
        prev = n
    s.resnet("mid_block.resnets.0", ch[-1], ch[-1], temb), s.resnet("mid_block.resnets.1", ch[-1], ch[-1], temb)
    transformer("mid_block.attentions.0", ch[-1])
    rev = ch[::-1]
    prev = rev[0]
    for i, (n, kind) in enumerate(zip(rev, c.up_block_types)):
        skip = rev[min(i + 1, len(ch) - 1)]  # the last resnet of a level takes the skip from the level below
        for j in range(n_layers + 1):
            s.resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else n) + (skip if j == n_layers else n), n, temb)
            if kind.startswith("CrossAttn"):
                transformer(f"up_blocks.{i}.attentions.{j}", n)
        if i < len(ch) - 1:
            s.conv(f"up_blocks.{i}.upsamplers.0.conv", n, n)
        prev = n
    s.norm("conv_norm_out", ch[0]), s.conv("conv_out", c.out_channels, ch[0])
    return dict(s)


def vae_shapes(c: VAEConfig) -> dict[str, tuple]:
    s, ch, n_layers, z = _Shapes(), c.block_out_channels, c.layers_per_block, c.latent_channels

    def mid(part):
        s.resnet(f"{part}.mid_block.resnets.0", ch[-1], ch[-1]), s.resnet(f"{part}.mid_block.resnets.1", ch[-1], ch[-1])
        if c.mid_block_add_attention:
            s.norm(f"{part}.mid_block.attentions.0.group_norm", ch[-1])
            for q in ("to_q", "to_k", "to_v", "to_out.0"):
                s.linear(f"{part}.mid_block.attentions.0.{q}", ch[-1], ch[-1])

    s.conv("encoder.conv_in", ch[0], c.in_channels)
    prev = ch[0]
    for i, n in enumerate(ch):
        for j in range(n_layers):
            s.resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else n, n)
        if i < len(ch) - 1:
            s.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", n, n)
        prev = n
    mid("encoder"), s.norm("encoder.conv_norm_out", ch[-1]), s.conv("encoder.conv_out", 2 * z, ch[-1])
    s.conv("quant_conv", 2 * z, 2 * z, 1), s.conv("post_quant_conv", z, z, 1)
    s.conv("decoder.conv_in", ch[-1], z), mid("decoder")
    prev = ch[-1]
    for i, n in enumerate(ch[::-1]):
        for j in range(n_layers + 1):
            s.resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else n, n)
        if i < len(ch) - 1:
            s.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", n, n)
        prev = n
    s.norm("decoder.conv_norm_out", ch[0]), s.conv("decoder.conv_out", c.out_channels, ch[0])
    return dict(s)


def text_shapes(c: CLIPTextConfig) -> dict[str, tuple]:
    s, d = _Shapes(), c.hidden_size
    s["text_model.embeddings.token_embedding.weight"] = (c.vocab_size, d)
    s["text_model.embeddings.position_embedding.weight"] = (c.max_position_embeddings, d)
    for i in range(c.num_hidden_layers):
        p = f"text_model.encoder.layers.{i}"
        for q in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s.linear(f"{p}.self_attn.{q}", d, d)
        s.norm(f"{p}.layer_norm1", d), s.linear(f"{p}.mlp.fc1", c.intermediate_size, d)
        s.linear(f"{p}.mlp.fc2", d, c.intermediate_size), s.norm(f"{p}.layer_norm2", d)
    s.norm("text_model.final_layer_norm", d)
    return dict(s)


# ----------------------------------------------------------------------------------------------------------------
# Configs from shapes (single files carry none)

def _infer(what: str, path: str, build):
    try:
        return build()
    except (KeyError, ValueError, IndexError, StopIteration) as e:
        raise CheckpointError(f"{path or what + ' weights'}: cannot infer the {what} config from the weights "
                              f"(no {e}); not a Stable Diffusion 1.x {what}?") from None


def _dim(sd, key, axis, default):
    """A size read from one tensor, or the SD default when that tensor is missing (the key check reports it)."""
    return sd[key].shape[axis] if key in sd else default


def infer_unet_config(unet_sd, *, path="") -> UNetConfig:
    def build():
        if not (levels := len(_indices(unet_sd, "down_blocks."))):
            raise KeyError("down_blocks.*")
        attn = [[f"{part}.{i}.attentions.0.proj_in.weight" in unet_sd for i in range(levels)]
                for part in ("down_blocks", "up_blocks")]
        proj_in = next((v for k, v in unet_sd.items() if k.endswith(".proj_in.weight")), None)
        return UNetConfig(
            in_channels=_dim(unet_sd, "conv_in.weight", 1, 4), out_channels=_dim(unet_sd, "conv_out.weight", 0, 4),
            block_out_channels=tuple(unet_sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(levels)),
            layers_per_block=len(_indices(unet_sd, "down_blocks.0.resnets.")),
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn[0]),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[1]),
            cross_attention_dim=next((v.shape[1] for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight")), 768),
            use_linear_projection=proj_in is not None and proj_in.ndim == 2)
    return _infer("U-Net", path, build)


def infer_vae_config(vae_sd, *, path="") -> VAEConfig:
    def build():
        if not (levels := len(_indices(vae_sd, "encoder.down_blocks."))):
            raise KeyError("encoder.down_blocks.*")
        return VAEConfig(
            in_channels=_dim(vae_sd, "encoder.conv_in.weight", 1, 3),
            out_channels=_dim(vae_sd, "decoder.conv_out.weight", 0, 3),
            latent_channels=_dim(vae_sd, "decoder.conv_in.weight", 1, 4),
            block_out_channels=tuple(vae_sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(levels)),
            layers_per_block=len(_indices(vae_sd, "encoder.down_blocks.0.resnets.")),
            mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in vae_sd)
    return _infer("VAE", path, build)


def infer_text_config(text_sd, *, path="") -> CLIPTextConfig:
    sd, _ = _text_keys(text_sd)

    def build():
        vocab, d = sd["text_model.embeddings.token_embedding.weight"].shape
        return CLIPTextConfig(
            # heads are not in the shapes: CLIP's heads are 64 wide
            vocab_size=vocab, hidden_size=d, num_attention_heads=max(d // 64, 1),
            max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
            num_hidden_layers=len(_indices(sd, "text_model.encoder.layers.")),
            intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    return _infer("text encoder", path, build)


# ----------------------------------------------------------------------------------------------------------------
# The original single-file layout

def _family_error(where: str, family: str, evidence: str) -> CheckpointError:
    return CheckpointError(f"{where}: looks like an {family} checkpoint ({evidence}); "
                           f"stablediff supports Stable Diffusion 1.x only")


def _check_widths(where: str, cross_attention: int, text_hidden: int | None, evidence: str):
    """SD 1.x conditions a 768-wide CLIP; 1024 is SD 2.x's OpenCLIP, 2048 SDXL's pair of encoders."""
    if cross_attention == 1024:
        raise _family_error(where, "SD 2.x", f"1024-wide cross-attention, {evidence}")
    if cross_attention in (1280, 2048):
        raise _family_error(where, "SDXL", f"{cross_attention}-wide cross-attention, {evidence}")
    if text_hidden is not None and text_hidden != cross_attention:
        raise CheckpointError(f"{where}: the U-Net attends to {cross_attention}-wide text features but the text "
                              f"encoder is {text_hidden} wide; the file mixes parts of different models")


def detect(sd, path="") -> str:
    """"sd1" for a Stable Diffusion 1.x single-file checkpoint; otherwise a CheckpointError saying what it is."""
    where, keys = path or "checkpoint", list(sd)

    def first(prefix):
        return next((k for k in keys if k.startswith(prefix)), None)

    if first("conditioner.embedders."):
        raise _family_error(where, "SDXL", "conditioner.embedders.*")
    if first("cond_stage_model.model."):
        raise _family_error(where, "SD 2.x", "OpenCLIP text encoder cond_stage_model.model.*")
    if not first("model.diffusion_model."):
        if first("down_blocks.") or first("conv_in."):
            what = "a diffusers U-Net weights file (down_blocks.*), not a whole checkpoint; pass the diffusers folder"
        elif first("encoder.down") or first("decoder.up"):
            what = "a standalone VAE (encoder.*, decoder.*), not a whole checkpoint"
        elif first("lora_") or any(".lora_" in k for k in keys):
            what = "a LoRA (lora_* keys), not a whole checkpoint"
        elif first("text_model.") or first("cond_stage_model.") or first("embeddings.token_embedding"):
            what = "a text encoder only, not a whole checkpoint"
        else:
            what = f"something other than Stable Diffusion: no model.diffusion_model.* keys (it has {keys[:3]}...)"
        raise CheckpointError(f"{where}: looks like {what}; stablediff needs a Stable Diffusion 1.x checkpoint")
    if "model.diffusion_model.input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{where}: looks like another diffusion architecture (model.diffusion_model.* has no "
                              f"input_blocks; e.g. {first('model.diffusion_model.')}); stablediff supports Stable "
                              f"Diffusion 1.x only")
    to_k = next((k for k in keys if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
    tokens = next((sd[k] for k in keys if k.startswith(PREFIXES["text_encoder"])
                   and k.endswith("token_embedding.weight")), None)
    if to_k is not None:
        _check_widths(where, sd[to_k].shape[-1], None if tokens is None else tokens.shape[-1], to_k)
    return "sd1"


def split_original(sd, *, use_ema=False, path="") -> dict[str, dict]:
    """Original single-file layout -> {"unet", "vae", "text_encoder"} state dicts in our naming, plus "unused":
    every original key not used (model_ema.* unless use_ema, schedule buffers, keys the table has no place for)."""
    parts, unused = {c: {} for c in PREFIXES}, {}
    for k, v in sd.items():
        comp = next((c for c, p in PREFIXES.items() if k.startswith(p)), None)
        if comp is None:
            unused[k] = v
        else:
            parts[comp][k[len(PREFIXES[comp]):]] = v
    if use_ema:  # EMA copies are stored flat: model_ema.diffusion_modelinput_blocks00weight
        ema = {k: "model_ema.diffusion_model" + k.replace(".", "") for k in parts["unet"]}
        missing = [e for e in ema.values() if e not in sd]
        if len(missing) == len(ema):
            raise CheckpointError(f"{path or 'checkpoint'}: use_ema=True but the file has no EMA weights "
                                  f"(no model_ema.* keys); load it without use_ema")
        if missing:
            raise CheckpointError(f"{path or 'checkpoint'}: use_ema=True but {len(missing)} of {len(ema)} U-Net "
                                  f"weights have no EMA copy (e.g. {missing[0]}); load it without use_ema")
        unused.update({PREFIXES["unet"] + k: v for k, v in parts["unet"].items()})
        parts["unet"] = {k: unused.pop(e) for k, e in ema.items()}
    unet, left_u = _rename(parts["unet"], _original_unet_table(parts["unet"]), to_ours=True)
    vae, left_v = _rename(parts["vae"], _original_vae_table(parts["vae"]), to_ours=True)
    text, left_t = _text_keys(parts["text_encoder"])  # with or without text_model.
    for comp, left in (("unet", left_u), ("vae", left_v), ("text_encoder", left_t)):
        unused.update({PREFIXES[comp] + k: parts[comp][k] for k in left})
    return {"unet": unet, "vae": vae, "text_encoder": text, "unused": unused}


def to_original(unet_sd, vae_sd, text_sd) -> dict[str, torch.Tensor]:
    """Our naming -> one original-layout state dict (the inverse of `split_original`)."""
    text, _ = _text_keys(text_sd)
    out = {}
    for comp, sd, rows in (("unet", unet_sd, _unet_table(infer_unet_config(unet_sd))),
                           ("vae", vae_sd, _vae_table(infer_vae_config(vae_sd))),
                           ("text_encoder", text, [("text_model", "text_model", None)])):
        mapped, left = _rename(sd, rows, to_ours=False)
        if left:
            raise CheckpointError(f"to_original: {len(left)} {comp} keys have no place in the original layout "
                                  f"(e.g. {left[:3]})")
        out.update({PREFIXES[comp] + k: v for k, v in mapped.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checking a state dict against what a config (or a module) expects

def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")


def _validate(sd: dict, expected: dict, *, where: str, component: str, strict=False, name=lambda k: k) -> list[str]:
    """Missing keys or wrong shapes -> CheckpointError; unexpected keys are removed from `sd` and returned (or, with
    strict, an error too)."""
    missing = [name(k) for k in expected if k not in sd]
    wrong = [f"{name(k)} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    unexpected = [k for k in sd if k not in expected]
    if missing or wrong or (strict and unexpected):
        bits = [f"missing {_few(missing)}" if missing else "", f"wrong shape {_few(wrong)}" if wrong else "",
                f"unexpected {_few(unexpected)}" if strict and unexpected else ""]
        raise CheckpointError(f"{where}: {component} weights do not fit the model: " + "; ".join(b for b in bits if b))
    for k in unexpected:
        del sd[k]
    return unexpected


def load_into(module: torch.nn.Module, state_dict, *, path="", component="") -> None:
    """Load into a module built on the meta device (no random init): strict keys, shapes checked first."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _validate(dict(state_dict), expected, where=path or "state dict", component=component or type(module).__name__,
              strict=True)
    module.load_state_dict(state_dict, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints: a diffusers folder, a single file, or a Hub id

@dataclass
class Checkpoint:
    path: str
    layout: str  # "diffusers" | "single-file"
    family: str  # "sd1"
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    unet: dict[str, torch.Tensor] = field(repr=False)
    vae: dict[str, torch.Tensor] = field(repr=False)
    text_encoder: dict[str, torch.Tensor] = field(repr=False)
    scheduler_config: dict | None = None
    tokenizer_dir: Path | None = None
    unused: list[str] = field(default_factory=list, repr=False)


_WHAT = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}
_SHAPES = {"unet": unet_shapes, "vae": vae_shapes, "text_encoder": text_shapes}
# component -> (config class, weight file stems in order of preference)
_FOLDER = {"unet": (UNetConfig, ("diffusion_pytorch_model",)), "vae": (VAEConfig, ("diffusion_pytorch_model",)),
           "text_encoder": (CLIPTextConfig, ("model", "pytorch_model"))}


def _single_file(path: Path, use_ema: bool) -> Checkpoint:
    where = str(path)
    sd = read_state_dict(path)
    family = detect(sd, where)
    parts = split_original(sd, use_ema=use_ema, path=where)
    unused = list(parts.pop("unused"))
    for comp, sub in parts.items():
        if not sub:
            raise CheckpointError(f"{where}: has no {_WHAT[comp]} weights ({PREFIXES[comp]}*); stablediff needs a "
                                  f"whole SD 1.x checkpoint (U-Net, VAE and text encoder) or a diffusers folder")
    configs = {"unet": infer_unet_config(parts["unet"], path=where), "vae": infer_vae_config(parts["vae"], path=where),
               "text_encoder": infer_text_config(parts["text_encoder"], path=where)}
    tables = {"unet": _unet_table(configs["unet"]), "vae": _vae_table(configs["vae"]), "text_encoder": []}
    for comp, sub in parts.items():
        def original_name(k, comp=comp):  # report keys as the file names them
            return PREFIXES[comp] + next(iter(_rename({k: None}, tables[comp], to_ours=False)[0]), k)
        left = _validate(sub, _SHAPES[comp](configs[comp]), where=where, component=_WHAT[comp], name=original_name)
        unused += [original_name(k) for k in left]
    return Checkpoint(str(path), "single-file", family, configs["unet"], configs["vae"], configs["text_encoder"],
                      parts["unet"], parts["vae"], parts["text_encoder"], unused=unused)


def _with_variant(name: str, variant: str | None) -> str:
    head, ext = name.rsplit(".", 1)  # model.safetensors -> model.fp16.safetensors; x.index.json -> x.index.fp16.json
    return f"{head}.{variant}.{ext}" if variant else name


def _pick_weights(names, stems, variant: str | None, where) -> str:
    """The one weights file (or shard index) of a diffusers component folder: safetensors before .bin; with no
    variant asked, a variant's files when they are the only ones there."""
    names = set(names)

    def candidates(v):
        return [_with_variant(f"{s}{ext}{index}", v) for ext in (".safetensors", ".bin") for s in stems
                for index in ("", ".index.json")]

    found = [n for n in candidates(variant) if n in names]
    others = {}
    if not found and variant is None:  # e.g. only diffusion_pytorch_model.fp16.safetensors
        tokens = {t for n in names for s in stems if n.startswith(s + ".") for t in n[len(s) + 1:].split(".")}
        others = {v: hits for v in tokens if (hits := [n for n in candidates(v) if n in names])}
        if len(others) == 1:
            return others.popitem()[1][0]
    if not found:
        pick = f"; pass variant= one of {sorted(others)}" if others else ""
        raise CheckpointError(f"{where}: no {variant + ' ' if variant else ''}weights file (looked for "
                              f"{_few(candidates(variant))}; the folder has {_few(sorted(names)) or 'nothing'}){pick}")
    return found[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _folder(root: Path, variant: str | None) -> Checkpoint:
    index = root / "model_index.json"
    if not index.is_file() and not (root / "unet").is_dir():
        raise CheckpointError(f"{root}: not a diffusers folder (no model_index.json, no unet/); pass a diffusers "
                              f"folder or a single .safetensors/.ckpt file")
    pipeline = _read_json(index).get("_class_name", "") if index.is_file() else ""
    if "XL" in pipeline:
        raise _family_error(str(root), "SDXL", f"model_index.json: {pipeline}")
    configs, weights, unused = {}, {}, []
    for comp, (config_class, _) in _FOLDER.items():  # all configs first: the family shows there
        config_file = root / comp / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{root / comp}: no config.json; a diffusers folder has unet/, vae/ and "
                                  f"text_encoder/, each with config.json and weights")
        d = _read_json(config_file)
        try:
            configs[comp] = config_class.from_dict(d.get("text_config", d), source=str(config_file))
        except (ValueError, TypeError) as e:
            raise CheckpointError(str(e)) from None
    _check_widths(str(root), configs["unet"].cross_attention_dim, configs["text_encoder"].hidden_size,
                  "unet/config.json cross_attention_dim")
    for comp, (_, stems) in _FOLDER.items():
        folder = root / comp
        name = _pick_weights([p.name for p in folder.iterdir()], stems, variant, folder)
        files = sorted(set(_read_json(folder / name)["weight_map"].values())) if name.endswith(".json") else [name]
        sd = {}
        for f in files:
            sd.update(read_state_dict(folder / f))
        if comp == "text_encoder":
            sd, dropped = _text_keys(sd)
        else:
            rows = [(f"{p}.mid_block.attentions.0", f"{p}.mid_block.attentions.0", _OLD_DIFFUSERS_ATTENTION)
                    for p in ("encoder", "decoder")] if comp == "vae" else []
            renamed, left = _rename(sd, rows, to_ours=True)
            sd, dropped = {**{k: sd[k] for k in left}, **renamed}, []
        left = _validate(sd, _SHAPES[comp](configs[comp]), where=str(folder / name), component=_WHAT[comp])
        unused += [f"{comp}/{k}" for k in dropped + left]
        weights[comp] = sd
    scheduler = root / "scheduler" / "scheduler_config.json"
    return Checkpoint(str(root), "diffusers", "sd1", configs["unet"], configs["vae"], configs["text_encoder"],
                      weights["unet"], weights["vae"], weights["text_encoder"],
                      scheduler_config=_read_json(scheduler) if scheduler.is_file() else None,
                      tokenizer_dir=root / "tokenizer" if (root / "tokenizer").is_dir() else None, unused=unused)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_cache() -> str:
    """Read at call time (huggingface_hub reads HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                     "huggingface")
    return os.path.join(home, "hub")


def _hub_patterns(files: list[str], variant, repo_id) -> list[str]:
    """Only what a pipeline needs: configs, tokenizer, one weights format per component (no safety checker)."""
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    for comp, (_, stems) in _FOLDER.items():
        if f"{comp}/config.json" not in files:
            raise CheckpointError(f"{repo_id}: no {comp}/config.json; not a diffusers Stable Diffusion repository")
        names = [f[len(comp) + 1:] for f in files if f.startswith(comp + "/") and f.count("/") == 1]
        name = _pick_weights(names, stems, variant, f"{repo_id}/{comp}")
        patterns += [f"{comp}/config.json", f"{comp}/{name}"]
        if name.endswith(".json"):  # sharded: the shards are named after the file the index describes
            patterns.append(f"{comp}/{name.split('.')[0]}-*")
    return patterns


def _from_hub(repo_id: str, variant) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    cache = _hub_cache()
    hint = ("pass a local path instead: a diffusers folder (load_checkpoint('/path/to/stable-diffusion-v1-5')) "
            "or a single .safetensors/.ckpt file")
    try:  # the local cache first, and only if it holds everything we need
        local = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        _hub_patterns([p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()], variant, repo_id)
        return local
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{repo_id}: no such local file or folder, and not in the Hugging Face cache ({cache}) "
                              f"while HF_HUB_OFFLINE is set; {hint}")
    try:
        info = HfApi().model_info(repo_id, timeout=10)  # one request, no retries: fails fast when offline
        patterns = _hub_patterns([f.rfilename for f in info.siblings or []], variant, repo_id)
        return Path(snapshot_download(repo_id, revision=info.sha, cache_dir=cache, allow_patterns=patterns,
                                      etag_timeout=10))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{repo_id}: no such local file or folder, and the Hugging Face Hub did not give it "
                              f"({type(e).__name__}: {str(e)[:160]}); {hint}") from None


def load_checkpoint(source, *, variant=None, use_ema=False) -> Checkpoint:
    """A diffusers folder, a single .safetensors/.ckpt/.pt file, or a Hub id -> state dicts in our naming + configs.
    `variant` applies to diffusers folders (e.g. "fp16"), `use_ema` to single files holding model_ema.* weights."""
    path = Path(source).expanduser()
    if not path.exists():
        weights_file = str(source).endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
        if isinstance(source, str) and _HUB_ID.fullmatch(source) and not weights_file:
            return _folder(_from_hub(source, variant), variant)
        raise CheckpointError(f"{source}: no such file or directory")
    return _folder(path, variant) if path.is_dir() else _single_file(path, use_ema)
