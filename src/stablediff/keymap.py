"""The original single-file layout (LDM/CompVis) <-> our naming, and what each config's weights look like.

Our modules are named like diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel`
(with the `text_model.` prefix). The original single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`, prefixes in `PREFIXES`) goes through ONE key table (`unet_key_table`,
`vae_key_table`): rows of (our module prefix, original prefix, leaf renames), read in either direction, so
`split_original` and `to_original` are exact inverses. `detect` tells SD 1.x from the files it is not.

Single files carry no configs: `infer_*_config` read them from tensor shapes (what keys and shapes a config
builds comes from the model itself, built on the meta device: `weights.expected_shapes`). Nothing here reads
files; that is `weights.py`, which raises the same `CheckpointError` defined here.
"""

from __future__ import annotations

import torch

from .config import CLIPTextConfig, UNetConfig, VAEConfig

__all__ = ["CheckpointError", "PREFIXES", "unet_key_table", "vae_key_table", "split_original", "to_original",
           "detect", "infer_unet_config", "infer_vae_config",
           "infer_text_config", "OLD_DIFFUSERS_ATTENTION", "rename_keys", "unet_table", "vae_table", "text_keys",
           "family_error", "check_widths", "diffusers_vae_keys", "standalone_vae"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, said in one line: the file, what it looks like, what to do."""


# ----------------------------------------------------------------------------------------------------------------
# The key table: rows of (our module prefix, original module prefix, leaf renames ours -> original or None when
# the leaves are named alike, True where our Linear weights are stored as 1x1 convolutions)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_LINEAR_AS_CONV = {"to_q", "to_k", "to_v", "to_out.0"}
# diffusers folders saved before diffusers 0.14 (the SD 1.5 repo's VAE among them) name the VAE attention like this
OLD_DIFFUSERS_ATTENTION = {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value",
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


def rename_keys(sd: dict, rows: list[tuple], *, to_ours: bool) -> tuple[dict, list[str]]:
    """Map every key through the row with the longest matching module prefix; returns (renamed, keys left over)."""
    lookup = _row_lookup(rows, to_ours)
    out, left = {}, []
    for key, value in sd.items():
        renamed = _rename(key, value, lookup, to_ours)
        if renamed is None:
            left.append(key)
        else:
            out[renamed[0]] = renamed[1]
    return out, left


def _row_lookup(rows: list[tuple], to_ours: bool) -> dict[str, tuple]:
    """The table read in one direction: module prefix -> (new prefix, leaf renames or None, Linear stored as conv)."""
    lookup = {}
    for ours, theirs, leaves, *conv in rows:
        if leaves is not None and to_ours:
            leaves = {v: k for k, v in leaves.items()}
        source, target = (theirs, ours) if to_ours else (ours, theirs)
        lookup[source] = (target, leaves, bool(conv and conv[0]))
    return lookup


def _rename(key: str, value, lookup: dict[str, tuple], to_ours: bool) -> tuple[str, object] | None:
    """(new key, value reshaped where a Linear weight is stored as a 1x1 conv), or None when no row takes the key."""
    parts = key.split(".")
    found = _longest_prefix(parts, lookup)
    if found is None:
        return None
    d, (prefix, leaves, conv) = found
    leaf = ".".join(parts[d:-1])  # the module inside the row's block ("" for a plain layer)
    new_leaf = leaf if leaves is None else leaves.get(leaf)
    if new_leaf is None:  # a module inside the block that the row does not name
        return None
    our_leaf = new_leaf if to_ours else leaf
    if conv and parts[-1] == "weight" and our_leaf in _LINEAR_AS_CONV:
        value = _linear_as_conv(value, to_ours)
    return ".".join(p for p in (prefix, new_leaf, parts[-1]) if p), value


def _linear_as_conv(weight, to_ours: bool):
    """The original layout's 1x1 convolution (out, in, 1, 1) <-> our Linear (out, in); None (a key renamed without
    its tensor) stays None."""
    if weight is None:
        return None
    return weight.flatten(1) if to_ours else weight[:, :, None, None]


def _longest_prefix(parts: list[str], lookup: dict[str, tuple]) -> tuple[int, tuple] | None:
    """(number of parts, row) of the longest module prefix of the key (its last part, the tensor, excluded)."""
    for d in range(len(parts) - 1, 0, -1):
        if (row := lookup.get(".".join(parts[:d]))) is not None:
            return d, row
    return None


def _indices(keys, prefix: str) -> list[int]:
    """The distinct block numbers right after `prefix` (e.g. "down_blocks." -> [0, 1, 2, 3])."""
    heads = (k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix))
    return sorted({int(h) for h in heads if h.isdigit()})


def unet_table(c: UNetConfig) -> list[tuple]:
    """unet_key_table for a U-Net config: the rows that rename its original keys to ours."""
    return unet_key_table(len(c.block_out_channels), c.layers_per_block,
                          [t.startswith("CrossAttn") for t in c.down_block_types],
                          [t.startswith("CrossAttn") for t in c.up_block_types])


def vae_table(c: VAEConfig) -> list[tuple]:
    """vae_key_table for a VAE config."""
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


def diffusers_vae_keys(sd: dict) -> dict:
    """A diffusers VAE state dict in our naming: the attention names of diffusers before 0.14 renamed."""
    rows = [(f"{p}.mid_block.attentions.0", f"{p}.mid_block.attentions.0", OLD_DIFFUSERS_ATTENTION)
            for p in ("encoder", "decoder")]
    renamed, left = rename_keys(sd, rows, to_ours=True)
    return {**{k: sd[k] for k in left}, **renamed}


def standalone_vae(sd: dict, path: str = "") -> tuple[dict, list[str]]:
    """A VAE file as people download it -> (its weights in our naming, the keys not used). The original layout
    (encoder.down.*, decoder.up.*, quant_conv, post_quant_conv), also under `first_stage_model.` (a whole SD 1.x
    checkpoint: its VAE is taken), or diffusers' naming (encoder.down_blocks.*). Training leftovers (loss.*,
    model_ema.*) are unused; in diffusers' naming they stay in the dict for the caller's shape check to drop.
    Whole checkpoints of other families are refused here; the caller checks the shapes against the config they
    describe."""
    where = path or "VAE file"
    for prefix, family, evidence in _OTHER_FAMILIES:
        if _first_key(list(sd), prefix) is not None:
            raise family_error(where, family, evidence)
    unused = []
    if _first_key(list(sd), PREFIXES["vae"]) is not None:
        parts, others = _split_by_prefix(sd)
        sd = parts["vae"]
        unused = list(others) + [PREFIXES[c] + k for c in ("unet", "text_encoder") for k in parts[c]]
    if _first_key(list(sd), "encoder.down_blocks.") is not None:  # keys of no module stay for the shape check
        return diffusers_vae_keys(sd), unused
    ours, left = rename_keys(sd, _original_vae_table(sd), to_ours=True)
    return ours, unused + left


def _original_vae_table(sd) -> list[tuple]:
    return vae_key_table(len(_indices(sd, "encoder.down.")), len(_indices(sd, "encoder.down.0.block.")))


def text_keys(sd: dict) -> tuple[dict, list[str]]:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix: add it; drop the position_ids buffer."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            dropped.append(k)
        else:
            out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out, dropped


# ----------------------------------------------------------------------------------------------------------------
# Configs from shapes (single files carry none)

def _infer(what: str, path: str, build):
    """build(), a missing tensor or a config the shapes make out of range said as a CheckpointError."""
    where = path or what + " weights"
    try:
        return build()
    except (KeyError, IndexError, StopIteration) as e:
        raise CheckpointError(f"{where}: cannot infer the {what} config from the weights (no {e}); not a Stable "
                              f"Diffusion 1.x {what}?") from None
    except ValueError as e:  # e.g. layers_per_block 40 is outside 1..16
        raise CheckpointError(f"{where}: the {what} config its weights describe is not usable ({e})") from None


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
    sd, _ = text_keys(text_sd)

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

def family_error(where: str, family: str, evidence: str) -> CheckpointError:
    """The error for a checkpoint of another model family (SD 2.x, SDXL, ...), with what gave it away."""
    return CheckpointError(f"{where}: looks like an {family} checkpoint ({evidence}); "
                           f"stablediff supports Stable Diffusion 1.x only")


def check_widths(where: str, cross_attention: int, text_hidden: int | None, evidence: str):
    """SD 1.x conditions a 768-wide CLIP; 1024 is SD 2.x's OpenCLIP, 2048 SDXL's pair of encoders."""
    if cross_attention == 1024:
        raise family_error(where, "SD 2.x", f"1024-wide cross-attention, {evidence}")
    if cross_attention in (1280, 2048):
        raise family_error(where, "SDXL", f"{cross_attention}-wide cross-attention, {evidence}")
    if text_hidden is not None and text_hidden != cross_attention:
        raise CheckpointError(f"{where}: the U-Net attends to {cross_attention}-wide text features but the text "
                              f"encoder is {text_hidden} wide; the file mixes parts of different models")


# files that are no SD 1.x checkpoint, told by a key prefix: (prefix, family, evidence)
_OTHER_FAMILIES = [("conditioner.embedders.", "SDXL", "conditioner.embedders.*"),
                   ("cond_stage_model.model.", "SD 2.x", "OpenCLIP text encoder cond_stage_model.model.*")]
# files with no U-Net in the original layout, by the first row any key fits: (key prefixes, key infixes, what)
_PARTS = [(("down_blocks.", "conv_in."), (),
           "a diffusers U-Net weights file (down_blocks.*), not a whole checkpoint; pass the diffusers folder"),
          (("encoder.down", "decoder.up"), (), "a standalone VAE (encoder.*, decoder.*), not a whole checkpoint"),
          (("lora_",), (".lora_",), "a LoRA (lora_* keys), not a whole checkpoint"),
          (("text_model.", "cond_stage_model.", "embeddings.token_embedding"), (),
           "a text encoder only, not a whole checkpoint")]


def detect(sd, path="") -> str:
    """"sd1" for a Stable Diffusion 1.x single-file checkpoint; otherwise a CheckpointError saying what it is."""
    where, keys = path or "checkpoint", list(sd)
    for prefix, family, evidence in _OTHER_FAMILIES:
        if _first_key(keys, prefix) is not None:
            raise family_error(where, family, evidence)
    unet_key = _first_key(keys, PREFIXES["unet"])
    if unet_key is None:
        raise CheckpointError(f"{where}: looks like {_what_part(keys)}; stablediff needs a Stable Diffusion 1.x "
                              f"checkpoint")
    if PREFIXES["unet"] + "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{where}: looks like another diffusion architecture (model.diffusion_model.* has no "
                              f"input_blocks; e.g. {unet_key}); stablediff supports Stable Diffusion 1.x only")
    to_k = _first_key(keys, PREFIXES["unet"], "attn2.to_k.weight")
    tokens = _first_key(keys, PREFIXES["text_encoder"], "token_embedding.weight")
    if to_k is not None:
        check_widths(where, sd[to_k].shape[-1], None if tokens is None else sd[tokens].shape[-1], to_k)
    return "sd1"


def _first_key(keys: list[str], prefix: str, suffix: str = "") -> str | None:
    return next((k for k in keys if k.startswith(prefix) and k.endswith(suffix)), None)


def _what_part(keys: list[str]) -> str:
    """What a file without the original U-Net is, as far as its keys tell."""
    for prefixes, infixes, what in _PARTS:
        if any(k.startswith(prefixes) or any(i in k for i in infixes) for k in keys):
            return what
    return f"something other than Stable Diffusion: no model.diffusion_model.* keys (it has {keys[:3]}...)"


def split_original(sd, *, use_ema=False, path="") -> dict[str, dict]:
    """Original single-file layout -> {"unet", "vae", "text_encoder"} state dicts in our naming, plus "unused":
    every original key not used (model_ema.* unless use_ema, schedule buffers, keys the table has no place for)."""
    parts, unused = _split_by_prefix(sd)
    if use_ema:
        ema = _ema_keys(sd, parts["unet"], path or "checkpoint")
        unused.update({PREFIXES["unet"] + k: v for k, v in parts["unet"].items()})
        parts["unet"] = {k: unused.pop(e) for k, e in ema.items()}
    unet, left_u = rename_keys(parts["unet"], _original_unet_table(parts["unet"]), to_ours=True)
    vae, left_v = rename_keys(parts["vae"], _original_vae_table(parts["vae"]), to_ours=True)
    text, left_t = text_keys(parts["text_encoder"])  # with or without text_model.
    for comp, left in (("unet", left_u), ("vae", left_v), ("text_encoder", left_t)):
        unused.update({PREFIXES[comp] + k: parts[comp][k] for k in left})
    return {"unet": unet, "vae": vae, "text_encoder": text, "unused": unused}


def _split_by_prefix(sd: dict) -> tuple[dict[str, dict], dict]:
    """({component: its keys without the component's prefix}, the keys of no component as they are)."""
    parts, others = {c: {} for c in PREFIXES}, {}
    for k, v in sd.items():
        comp = next((c for c, p in PREFIXES.items() if k.startswith(p)), None)
        if comp is None:
            others[k] = v
        else:
            parts[comp][k[len(PREFIXES[comp]):]] = v
    return parts, others


def _ema_keys(sd: dict, unet: dict, where: str) -> dict[str, str]:
    """U-Net key -> the key of its EMA copy, stored flat (model_ema.diffusion_modelinput_blocks00weight); every
    U-Net weight must have one."""
    ema = {k: "model_ema.diffusion_model" + k.replace(".", "") for k in unet}
    missing = [e for e in ema.values() if e not in sd]
    if len(missing) == len(ema):
        raise CheckpointError(f"{where}: use_ema=True but the file has no EMA weights (no model_ema.* keys); load it "
                              f"without use_ema")
    if missing:
        raise CheckpointError(f"{where}: use_ema=True but {len(missing)} of {len(ema)} U-Net weights have no EMA "
                              f"copy (e.g. {missing[0]}); load it without use_ema")
    return ema


def to_original(unet_sd, vae_sd, text_sd) -> dict[str, torch.Tensor]:
    """Our naming -> one original-layout state dict (the inverse of `split_original`)."""
    text, _ = text_keys(text_sd)
    out = {}
    for comp, sd, rows in (("unet", unet_sd, unet_table(infer_unet_config(unet_sd))),
                           ("vae", vae_sd, vae_table(infer_vae_config(vae_sd))),
                           ("text_encoder", text, [("text_model", "text_model", None)])):
        mapped, left = rename_keys(sd, rows, to_ours=False)
        if left:
            raise CheckpointError(f"to_original: {len(left)} {comp} keys have no place in the original layout "
                                  f"(e.g. {left[:3]})")
        out.update({PREFIXES[comp] + k: v for k, v in mapped.items()})
    return out
