"""Train the small offline demo model (`--model demo`) from scratch on synthetic pictures, CPU only.

    python tools/train_demo.py                      # all phases in turn; writes src/stablediff/data/demo/
    python tools/train_demo.py --phase vae          # or one phase at a time (each leaves its result in --work)
    python tools/train_demo.py --phase decoder; python tools/train_demo.py --phase unet
    python tools/train_demo.py --phase save

The committed model (VAE 2.59M parameters, U-Net 1.08M, text encoder 3.27M of which 3.16M is the token table;
13.3 MiB in float16) came from these defaults, one phase at a time, one thread, on the 2-core machine with the
other core busy: vae 21 min (4000 steps 20 min, then encoding 8000 latents), decoder 4.4 min (600 steps), unet
41 min (7000 steps, ~0.35 s each), save 1 s: about 66 minutes in all. tools/eval_demo.py on it (euler, 30 steps,
trained combinations, cfg 7): background/shape colour/shape 100/100/90%; held-out combinations 100/100/92%.

The pictures: one shape (circle, square, triangle) of one colour on a background of another colour, 64x64,
anti-aliased, at random positions and sizes, captioned in several phrasings ("a red circle on a blue background",
"blue background, red circle", "a red circle", "a circle", ...). The combinations in HELD_OUT never appear in
training, so the evaluation (tools/eval_demo.py) can ask how well the model composes what it learnt.

The recipe, in phases, all with the package's own modules and the SD 1.x conventions:
1. VAE (AutoencoderKL, 4 levels, block channels 16/32/64/128, one resnet per level, no attention:
   64x64x3 <-> 8x8x4): reconstruction loss (MSE + 0.5 L1) on the posterior *mean*, a tiny KL weight, AdamW with
   cosine decay, 4000 steps of 32 fresh pictures cropped to 32x32 (fully convolutional, so 4x cheaper than whole
   pictures; tried: whole pictures at batch 16 learn far slower per step). The VAE is what caps the whole model's
   score: a round trip (encode -> decode -> tools/eval_demo.py's classifier) must keep colours and shapes
   (tools/eval_demo.py --sets vae); 250 steps of a 0.7M VAE kept only 76% of shape colours and 62% of shapes
   (triangles came back round).
2. Latents of a fixed set of training pictures are encoded once (posterior mean) and cached; `scaling_factor`
   = 1 / std of those latents.
3. decoder: the decoder alone fine-tuned on the fixed latents, on whole 64x64 pictures. This matters: GroupNorm
   normalises over the whole feature map, so a decoder trained on 32x32 crops sees other statistics than on the
   64x64 pictures it serves. After phase 1 the round trip kept backgrounds/colours/shapes 99/91/96% (orange came
   back yellow, red orange, blue purple, although their latents differ); 1500 more steps on crops changed
   nothing, 600 steps on whole pictures gave 100/100/98%.
4. U-Net + CLIP text encoder trained jointly on the cached latents: epsilon prediction under SD 1.5's
   scaled_linear schedule (NoiseSchedule().alphas_cumprod), min-SNR-5 loss weights plus 0.05/snr (the high-noise
   end is where this small model fails: its samples collapse to one dark picture), 10% empty captions (for
   classifier-free guidance), an EMA of the weights, and a small auxiliary loss that makes the text encoder's last
   token name the shape colour / shape / background (a classifier head that is thrown away afterwards).
   Prompt following keeps improving with steps (GPU probe of this recipe, trained prompts at cfg 7: 1500 steps
   85/64/58% background/colour/shape, 3500 steps 100/93/68%), so this phase gets most of the time.
The result is saved as a diffusers folder (float16 weights) that `stablediff.weights.load_checkpoint` reads; the
tokenizer is the package's bundled CLIP vocabulary, so there is no tokenizer/ folder. `--device cuda` runs the
same recipe on a GPU (for trying recipes; the committed model is trained on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stablediff.clip import CLIPTextModel
from stablediff.config import CLIPTextConfig, UNetConfig, VAEConfig
from stablediff.schedule import NoiseSchedule
from stablediff.tokenizer import CLIPTokenizer
from stablediff.unet import UNet
from stablediff.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "stablediff" / "data" / "demo"
SD15_SCHEDULER = ROOT / "tests" / "data" / "sd15-layout" / "scheduler" / "scheduler_config.json"

SIZE = 64  # pixels; latents are SIZE // 8
COLOURS = {  # name -> RGB
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225), "yellow": (245, 225, 30),
    "orange": (250, 140, 20), "purple": (140, 40, 180), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
# (shape colour, shape, background) never shown in training
HELD_OUT = (
    ("green", "triangle", "white"), ("blue", "square", "yellow"), ("yellow", "circle", "purple"),
    ("orange", "triangle", "black"), ("purple", "square", "green"), ("white", "circle", "red"),
    ("black", "square", "orange"), ("red", "triangle", "green"), ("blue", "circle", "orange"),
    ("yellow", "square", "black"), ("green", "circle", "purple"), ("white", "triangle", "blue"),
)
ALL_COMBOS = tuple((c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in COLOUR_NAMES if b != c)
TRAIN_COMBOS = tuple(x for x in ALL_COMBOS if x not in HELD_OUT)
# caption phrasings and their sampling weights; which of (colour, shape, background) each one names
TEMPLATES = (
    ("a {c} {s} on a {b} background", 3.0, "csb"),
    ("{b} background, {c} {s}", 1.5, "csb"),
    ("a {c} {s} on {b}", 1.0, "csb"),
    ("{c} {s}, {b} background", 1.0, "csb"),
    ("a {c} {s}", 1.5, "cs"),
    ("{c} {s}", 0.5, "cs"),
    ("a {s} on a {b} background", 1.0, "sb"),
    ("a {s}", 0.5, "s"),
    ("a {c} shape", 0.3, "c"),
    ("{c}", 0.3, "c"),
    ("a {b} background", 0.3, "b"),
)
P_EMPTY = 0.1  # caption dropout for classifier-free guidance
GROUP = 4  # U-Net training pictures per caption in a batch


def caption(c: str, s: str, b: str, template: int = 0) -> str:
    return TEMPLATES[template][0].format(c=c, s=s, b=b)


# ------------------------------------------------------------------------------------------------------------------
# Pictures

def render(combos: list[tuple[str, str, str]], g: torch.Generator, supersample: int = 4) -> torch.Tensor:
    """One picture per (colour, shape, background), random centre and size -> (N, 3, 64, 64) in [-1, 1]."""
    n, S = len(combos), SIZE * supersample
    r = torch.empty(n).uniform_(8, 19, generator=g)  # circle radius / half side / half base, in pixels
    margin = r + 3  # keep the border pixels background
    cx = margin + torch.rand(n, generator=g) * (SIZE - 2 * margin)
    cy = margin + torch.rand(n, generator=g) * (SIZE - 2 * margin)
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / supersample
    y, x = coords[None, :, None], coords[None, None, :]
    cx, cy, r = cx[:, None, None], cy[:, None, None], r[:, None, None]
    shape = torch.tensor([SHAPES.index(s) for _, s, _ in combos])[:, None, None]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    square = ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    triangle = (y <= cy + r) & ((x - cx).abs() <= (y - cy + r) / 2)
    mask = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle)).float()
    mask = F.avg_pool2d(mask[:, None], supersample)  # (N, 1, 64, 64) coverage
    rgb = lambda name: torch.tensor(COLOURS[name], dtype=torch.float32) / 127.5 - 1
    fg = torch.stack([rgb(c) for c, _, _ in combos])[:, :, None, None]
    bg = torch.stack([rgb(b) for _, _, b in combos])[:, :, None, None]
    return bg + (fg - bg) * mask


def random_combos(n: int, g: torch.Generator, combos=TRAIN_COMBOS) -> list[tuple[str, str, str]]:
    return [combos[i] for i in torch.randint(len(combos), (n,), generator=g).tolist()]


def render_batched(combos, g, chunk=256):
    return torch.cat([render(combos[i:i + chunk], g) for i in range(0, len(combos), chunk)])


# ------------------------------------------------------------------------------------------------------------------
# Configs

VAE_CHANNELS = (16, 32, 64, 128)


def vae_config(scaling_factor: float = 1.0) -> VAEConfig:
    # no mid-block attention: the VAE is then fully convolutional and trains on 32x32 crops (4x cheaper), all but
    # the decoder's last phase (see the module docstring)
    return VAEConfig(block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8, sample_size=SIZE,
                     scaling_factor=scaling_factor, mid_block_add_attention=False)


def text_config() -> CLIPTextConfig:
    # 64 wide heads, as CLIP's: the same head count `infer_text_config` assumes for a single-file conversion
    return CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1)


def unet_config() -> UNetConfig:
    return UNetConfig(sample_size=SIZE // 8, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Phase 1: VAE

def train_vae(vae: AutoencoderKL, steps: int, lr: float, args, t0, seed: int, decoder_only: bool = False):
    """Reconstruction training on fresh pictures of any combination (the VAE may see them all), each a random
    crop. decoder_only: the encoder (and so every cached latent) stays fixed and only the decoder side learns."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in vae.named_parameters()
              if not decoder_only or n.startswith(("decoder.", "post_quant_conv."))]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    what = "decoder" if decoder_only else "vae"
    batch, crop = (args.decoder_batch, args.decoder_crop) if decoder_only else (args.vae_batch, args.vae_crop)
    ema_loss = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 20)
        x = render(random_combos(batch, g, ALL_COMBOS), g)
        i, j = torch.randint(0, SIZE - crop + 1, (2,), generator=g).tolist()
        x = x[:, :, i:i + crop, j:j + crop].to(args.device)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x)
        rec = vae.decode(post.mean)
        loss = F.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean()
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).mean()
        if not decoder_only:
            loss = loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.9 * ema_loss + 0.1 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"{what} step {step}: loss {ema_loss:.4f} (mse {F.mse_loss(rec, x).item():.4f}, kl {kl.item():.2f})",
                t0)
        if decoder_only and args.save_every and step and step % args.save_every == 0:
            torch.save(vae.state_dict(), args.work / "vae-final.pt")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    dev = vae.post_quant_conv.weight.device
    return torch.cat([vae.encode(x[i:i + chunk].to(dev)).mean.cpu() for i in range(0, len(x), chunk)])


# ------------------------------------------------------------------------------------------------------------------
# Phase 3: U-Net + text encoder

class CaptionTable:
    """Token ids of every (combination, template) caption, plus the aux-loss labels of each."""

    def __init__(self, tokenizer: CLIPTokenizer, combos):
        self.combos = list(combos)
        self.weights = torch.tensor([w for _, w, _ in TEMPLATES])
        ids, labels = [], []
        for c, s, b in self.combos:
            for text, _, names in TEMPLATES:
                ids.append(tokenizer.pad(tokenizer.encode(text.format(c=c, s=s, b=b))))
                labels.append([COLOUR_NAMES.index(c) if "c" in names else len(COLOURS),
                               SHAPES.index(s) if "s" in names else len(SHAPES),
                               COLOUR_NAMES.index(b) if "b" in names else len(COLOURS)])
        self.ids = torch.tensor(ids).view(len(self.combos), len(TEMPLATES), -1)
        self.labels = torch.tensor(labels).view(len(self.combos), len(TEMPLATES), 3)
        self.empty = torch.tensor(tokenizer.pad(tokenizer.encode("")))

    def sample(self, combo_idx: torch.Tensor, g: torch.Generator):
        t = torch.multinomial(self.weights, len(combo_idx), replacement=True, generator=g)
        ids, labels = self.ids[combo_idx, t].clone(), self.labels[combo_idx, t].clone()
        drop = torch.rand(len(combo_idx), generator=g) < P_EMPTY
        ids[drop] = self.empty
        labels[drop] = torch.tensor([len(COLOURS), len(SHAPES), len(COLOURS)])
        return ids, labels


class AuxHead(torch.nn.Module):
    """Reads the last token's text embedding -> logits for shape colour, shape, background (each + 'unnamed')."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(dim, len(SHAPES) + 1)
        self.background = torch.nn.Linear(dim, len(COLOURS) + 1)

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        last = h[:, -1]
        return sum(F.cross_entropy(head(last), labels[:, i])
                   for i, head in enumerate((self.colour, self.shape, self.background))) / 3


@torch.no_grad()
def identity_init(unet: UNet) -> None:
    """Start the U-Net at eps = x_t, about right at high t, where the sampler's first x0 estimates magnify any eps
    error 1/sqrt(alphas_cumprod) ~ 15 times. conv_in puts +x_t and -x_t on channels 0-3 and 4-7; the last up
    resnet's 1x1 shortcut carries them over from conv_in's skip and its residual branch leaves them alone;
    conv_out takes silu(+x) - silu(-x) = x (the GroupNorm before it is near identity on unit noise). The
    architecture is the standard one; only the starting weights differ."""
    z = unet.config.in_channels
    w = unet.conv_in.weight
    w[: 2 * z].zero_()
    unet.conv_in.bias[: 2 * z].zero_()
    for k in range(z):
        w[k, k, 1, 1], w[z + k, k, 1, 1] = 1.0, -1.0
    last = unet.up_blocks[-1].resnets[-1]
    ch_h = last.conv_shortcut.weight.shape[1] - w.shape[0]  # cat([h, skip from conv_in])
    last.conv_shortcut.weight[: 2 * z].zero_()
    last.conv_shortcut.bias[: 2 * z].zero_()
    for k in range(2 * z):
        last.conv_shortcut.weight[k, ch_h + k, 0, 0] = 1.0
    last.conv2.weight[: 2 * z].zero_()
    last.conv2.bias[: 2 * z].zero_()
    if unet.up_blocks[-1].attentions is not None:  # the spatial transformer after it adds nothing there either
        attn = unet.up_blocks[-1].attentions[-1]
        attn.proj_out.weight[: 2 * z].zero_()
        attn.proj_out.bias[: 2 * z].zero_()
    unet.conv_out.weight.zero_()
    unet.conv_out.bias.zero_()
    for k in range(z):
        unet.conv_out.weight[k, k, 1, 1], unet.conv_out.weight[k, z + k, 1, 1] = 1.0, -1.0


def train_unet(args, latents: torch.Tensor, combo_idx: torch.Tensor, table: CaptionTable, t0):
    torch.manual_seed(args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    unet, text = UNet(unet_config()), CLIPTextModel(text_config())
    if args.identity_init:
        identity_init(unet)
    with torch.no_grad():  # CLIP-like init of the token table; rows of unused tokens stay as they are
        text.text_model.embeddings.token_embedding.weight.normal_(0, 0.02, generator=g)
        text.text_model.embeddings.position_embedding.weight.normal_(0, 0.01, generator=g)
    aux = AuxHead(text.config.hidden_size)
    unet, text, aux = unet.to(args.device), text.to(args.device), aux.to(args.device)
    log(f"U-Net: {n_params(unet):,} parameters; text encoder: {n_params(text):,}", t0)
    decay, no_decay = [], []
    for m in (unet, text, aux):
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.unet_lr, betas=(0.9, 0.99))
    ema_models = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)]
    live = [unet, text]
    alphas_cumprod = NoiseSchedule().alphas_cumprod.float().to(args.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # min-SNR-5 for epsilon prediction, plus extra weight where snr is tiny: near t = 999 the sampler's first x0
    # estimates divide the eps error by sqrt(alphas_cumprod) ~ 0.07, so eps must be nearly exact there
    weight = snr.clamp(max=5.0) / snr + args.high_t_weight / snr
    order = torch.argsort(combo_idx)
    counts = torch.bincount(combo_idx, minlength=len(table.combos))
    starts = torch.cumsum(counts, 0) - counts
    ema_loss = None
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, 100)
        # groups of GROUP pictures of one combination share one caption: the text encoder runs once per group
        first = torch.randint(len(latents), (args.unet_batch // GROUP,), generator=g)
        c = combo_idx[first]
        idx = starts[c, None] + (torch.rand(len(c), GROUP, generator=g) * counts[c, None]).long()
        idx = order[idx.view(-1)]
        x0 = latents[idx].to(args.device)
        ids, labels = table.sample(c, g)
        ids, labels = ids.to(args.device), labels.to(args.device)
        t = torch.randint(0, 1000, (len(idx),), generator=g).to(args.device)
        eps = torch.randn(x0.shape, generator=g).to(args.device)
        a = alphas_cumprod[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = text(ids)
        pred = unet(xt, t, context.repeat_interleave(GROUP, dim=0))
        mse = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        loss_diff = (mse * weight[t]).mean()
        loss_aux = aux.loss(context, labels)
        loss = loss_diff + args.aux_weight * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in (unet, text, aux) for p in m.parameters()], 1.0)
        opt.step()
        decay_now = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema_models, live):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay_now)
        ema_loss = loss_diff.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_diff.item()
        if step % 25 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}: diffusion loss {ema_loss:.4f}, aux {loss_aux.item():.3f}, "
                f"lr {opt.param_groups[0]['lr']:.2e}", t0)
        if args.save_every and step and step % args.save_every == 0:
            torch.save({"unet": ema_models[0].state_dict(), "text": ema_models[1].state_dict(), "step": step},
                       args.work / "unet-final.pt")
        if args.stop_after and step + 1 >= args.stop_after:
            log(f"stopping after step {step} (--stop-after)", t0)
            break
    torch.save({"unet": ema_models[0].state_dict(), "text": ema_models[1].state_dict(), "step": step},
               args.work / "unet-final.pt")
    return ema_models[0].eval(), ema_models[1].eval()


# ------------------------------------------------------------------------------------------------------------------
# Saving as a diffusers folder

def _half(sd: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def _config_json(cfg, class_name: str, extra: dict) -> str:
    return json.dumps({"_class_name": class_name, **cfg.to_dict(), **extra}, indent=2) + "\n"


def save(out: Path, vae_and_scale: tuple, unet: UNet, text: CLIPTextModel) -> None:
    vae, scale = vae_and_scale
    out = Path(out)
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2) + "\n")
    ucfg = unet.config
    (out / "unet" / "config.json").write_text(_config_json(ucfg, "UNet2DConditionModel", {
        "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional"}))
    save_file(_half(unet.state_dict()), out / "unet" / "diffusion_pytorch_model.safetensors")
    vcfg = VAEConfig(**{**vae.config.to_dict(), "scaling_factor": scale})
    n = len(vcfg.block_out_channels)
    (out / "vae" / "config.json").write_text(_config_json(vcfg, "AutoencoderKL", {
        "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}))
    save_file(_half(vae.state_dict()), out / "vae" / "diffusion_pytorch_model.safetensors")
    tcfg = text.config
    (out / "text_encoder" / "config.json").write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **tcfg.to_dict(),
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": tcfg.hidden_size,
        "torch_dtype": "float16"}, indent=2) + "\n")
    save_file(_half(text.state_dict()), out / "text_encoder" / "model.safetensors")
    shutil.copyfile(SD15_SCHEDULER, out / "scheduler" / "scheduler_config.json")


# ------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=Path("/tmp/demo-work"), help="where phases leave their results")
    p.add_argument("--phase", choices=("all", "vae", "decoder", "unet", "save"), default="all",
                   help="all = vae, decoder, unet, save in turn; decoder and unet only need vae's output, so they "
                        "can run at the same time as two processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--decoder-steps", type=int, default=600, help="decoder fine-tuning after the latents are fixed")
    p.add_argument("--vae-channels", default=",".join(map(str, VAE_CHANNELS)), help="the VAE's block_out_channels")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32, help="VAE training crop size (pixels)")
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-crop", type=int, default=SIZE,
                   help="whole pictures: GroupNorm statistics of 32x32 crops differ from those of the 64x64 pictures "
                        "the decoder serves (crop-trained: round trip 91%% colours, whole pictures: 100%%)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--n-latents", type=int, default=8000, help="training pictures for the U-Net")
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--stop-after", type=int, default=0, help="end the U-Net phase after this many steps")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--aux-weight", type=float, default=0.1)
    p.add_argument("--identity-init", type=int, default=0,
                   help="1: start the U-Net at eps = x_t (tried: no better than 0 after 1200 steps)")
    p.add_argument("--high-t-weight", type=float, default=0.05, help="adds high_t_weight / snr to the loss weights")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint the decoder / EMA U-Net every N steps")
    p.add_argument("--device", default="cpu", help="the committed model is trained on the CPU")
    p.add_argument("--threads", type=int, default=1,
                   help="1 is far faster than 2 on a busy 2-core machine (OpenMP threads wait on each other)")
    args = p.parse_args(argv)
    globals()["VAE_CHANNELS"] = tuple(int(c) for c in args.vae_channels.split(","))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    phases = ("vae", "decoder", "unet", "save") if args.phase == "all" else (args.phase,)
    cache = args.work / "vae-and-latents.pt"
    if "vae" in phases:
        vae = AutoencoderKL(vae_config()).to(args.device)  # initialised from torch's fixed default seed
        log(f"VAE: {n_params(vae):,} parameters", t0)
        vae = train_vae(vae, args.vae_steps, args.vae_lr, args, t0, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed + 2)
        combo_idx = torch.randint(len(TRAIN_COMBOS), (args.n_latents,), generator=g)
        latents = []
        for i in range(0, args.n_latents, 1000):
            x = render_batched([TRAIN_COMBOS[j] for j in combo_idx[i:i + 1000].tolist()], g)
            latents.append(encode_all(vae, x))
            if i == 0:
                with torch.no_grad():
                    rec = vae.decode(latents[0][:200].to(args.device)).cpu()
                log(f"reconstruction mse on 64x64 training pictures {F.mse_loss(rec, x[:200]).item():.5f}", t0)
        latents = torch.cat(latents)
        torch.save({"vae": vae.state_dict(), "latents": latents, "combo_idx": combo_idx}, cache)
        log(f"encoded {len(latents)} latents -> {cache}", t0)
    saved = torch.load(cache, map_location="cpu")
    if "decoder" in phases:
        vae = AutoencoderKL(vae_config()).to(args.device)
        vae.load_state_dict(saved["vae"])
        train_vae(vae, args.decoder_steps, args.vae_lr / 3, args, t0, seed=args.seed + 3, decoder_only=True)
        torch.save(vae.state_dict(), args.work / "vae-final.pt")
    if "unet" in phases:
        latents = saved["latents"]
        scale = 1.0 / latents.std().item()
        log(f"latent mean {latents.mean().item():.3f}, std {latents.std().item():.3f} -> scaling_factor "
            f"{scale:.5f}", t0)
        train_unet(args, latents * scale, saved["combo_idx"], CaptionTable(CLIPTokenizer(), TRAIN_COMBOS), t0)
    if "save" in phases:
        vae, unet, text = AutoencoderKL(vae_config()), UNet(unet_config()), CLIPTextModel(text_config())
        vae.load_state_dict(torch.load(args.work / "vae-final.pt", map_location="cpu"))
        nets = torch.load(args.work / "unet-final.pt", map_location="cpu")
        unet.load_state_dict(nets["unet"])
        text.load_state_dict(nets["text"])
        save(args.out, (vae, 1.0 / saved["latents"].std().item()), unet, text)
        size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
        log(f"saved {args.out} (U-Net step {nets['step']}; {size / 2**20:.1f} MiB)", t0)


if __name__ == "__main__":
    main()
