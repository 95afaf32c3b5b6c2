"""Distil the demo U-Net (`--model demo`) into an LCM U-Net (`--model demo-lcm`) that draws in 4 LCM steps, CPU only.

    python tools/distill_lcm_demo.py                  # writes src/stablediff/data/demo-lcm/unet/
    python tools/distill_lcm_demo.py --steps 300      # a quick try of the recipe

`--model demo-lcm` is the demo's VAE, text encoder and scheduler with this U-Net (pipeline.DEMO_LCM_UNET): only the
U-Net folder is shipped. Use it with the LCM sampler and the guidance scale as usual (it is read as the guidance
embedding w = cfg - 1; the U-Net runs once per step):

    stablediff generate "a red circle on a blue background" --model demo-lcm --sampler lcm --steps 4 --cfg-scale 7

The recipe (Luo et al. 2023, Latent Consistency Models; as diffusers' train_lcm_distill_sd.py):
  * teacher: the demo U-Net under classifier-free guidance, eps = u + cfg (c - u) with cfg drawn in [2, 8] per
    sample (the empty caption is the unconditional one, as in the demo's training);
  * ODE solver: one DDIM step of the guided teacher from t_n to t_n - 20 on the 50-step grid 19, 39, ..., 999
    (the grid the LCM sampler picks its timesteps from: 4 steps are 999, 759, 499, 259);
  * student: the teacher's weights plus a zero-initialised guidance-embedding projection (time_cond_proj_dim,
    fed guidance_scale_embedding(cfg - 1)), so that it starts as the teacher; its consistency function is
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with samplers.lcm_scalings (the sampler's own);
  * target: f of an EMA of the student (decay 0.95) at the teacher's DDIM step; Huber loss (c = 0.001) between the
    student's f at t_n and the target's at t_n - 20; AdamW with cosine decay.
Data: 4000 newly rendered training pictures (train_demo.TRAIN_COMBOS), encoded once by the demo VAE (posterior mean,
scaled), each captioned in one of train_demo.TEMPLATES' phrasings; the text encoder is frozen, so every caption is
encoded once too.

The committed U-Net came from these defaults (500 steps of batch 32, one thread, on the CPU). tools/eval_demo.py,
100 prompts each, cfg 7, background / shape colour / shape (all three right):
    demo-lcm, lcm 4 steps:   trained 100/98/97% (95%), held-out 100/96/99% (96%)
    demo, euler 30 steps:    trained 100/100/90% (90%), held-out 100/100/92% (92%)
    demo, lcm 4 steps:       trained 61/32/39% (8%), held-out 41/28/50% (11%); at cfg 1 100/85/91% (80%),
                             100/80/90% (75%)
    demo, euler 4 steps:     trained 51/29/38% (6%), held-out 43/33/53% (9%); at cfg 1 100/72/89% (65%),
                             100/73/95% (71%)
After 100 steps the student already drew 27 of 32 probe prompts right (all three), so the recipe converges fast;
the Huber loss itself rises at first (the EMA target sharpens) and falls back as the lr decays.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import (TRAIN_COMBOS, CaptionTable, cosine_lr, log,  # noqa: E402
                        random_combos, render_batched)

from stablediff import weights  # noqa: E402
from stablediff.clip import CLIPTextModel  # noqa: E402
from stablediff.samplers import lcm_scalings  # noqa: E402
from stablediff.schedule import NoiseSchedule  # noqa: E402
from stablediff.tokenizer import CLIPTokenizer  # noqa: E402
from stablediff.unet import UNet, guidance_scale_embedding  # noqa: E402
from stablediff.vae import AutoencoderKL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "stablediff" / "data" / "demo"
DEFAULT_OUT = ROOT / "src" / "stablediff" / "data" / "demo-lcm"
W_DIM = 32  # guidance-embedding width (time_cond_proj_dim); the timestep embedding it adds to is 32 wide too
GRID, SKIP = 50, 20  # the DDIM solver's grid (original_inference_steps) and its step, in timesteps


def load_teacher():
    """The demo checkpoint -> (U-Net, text encoder, VAE) in float32, frozen."""
    ckpt = weights.load_checkpoint(DEMO)
    nets = []
    for cls, config, sd in ((UNet, ckpt.unet_config, ckpt.unet), (CLIPTextModel, ckpt.text_config, ckpt.text_encoder),
                            (AutoencoderKL, ckpt.vae_config, ckpt.vae)):
        net = cls(config)
        net.load_state_dict({k: v.float() for k, v in sd.items()})
        nets.append(net.eval().requires_grad_(False))
    return nets


def student_from(teacher: UNet) -> UNet:
    """The teacher's weights under a guidance embedding whose projection starts at zero: at first, the teacher."""
    student = UNet(dataclasses.replace(teacher.config, time_cond_proj_dim=W_DIM))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


@torch.no_grad()
def make_latents(vae: AutoencoderKL, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh training pictures -> (scaled latents (n, 4, 8, 8), combination indices (n,))."""
    combos = random_combos(n, g)
    x = render_batched(combos, g)
    latents = torch.cat([vae.encode(x[i:i + 250]).mean for i in range(0, n, 250)])
    return latents * vae.config.scaling_factor, torch.tensor([TRAIN_COMBOS.index(c) for c in combos])


@torch.no_grad()
def encode_captions(text: CLIPTextModel, table: CaptionTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (combination, template) caption and the empty one -> text embeddings, computed once."""
    ids = table.ids.flatten(0, 1)
    emb = torch.cat([text(ids[i:i + 256]) for i in range(0, len(ids), 256)])
    return emb.view(*table.ids.shape[:2], *emb.shape[1:]), text(table.empty[None])


def x0_of(eps, x, a):
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency(unet: UNet, x, t, context, w_emb, a):
    """f(x, t) = c_skip(t) x + c_out(t) x0, as the LCM sampler computes it (on the VP sample x)."""
    c_skip, c_out = (s[:, None, None, None] for s in lcm_scalings(t.float()))
    return c_skip * x + c_out * x0_of(unet(x, t, context, timestep_cond=w_emb), x, a)


def huber(a, b, c: float = 1e-3):
    return (((a - b) ** 2).flatten(1).mean(1) + c * c).sqrt().sub(c).mean()


def distill(args, t0):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    teacher, text, vae = load_teacher()
    student = student_from(teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    table = CaptionTable(CLIPTokenizer(), TRAIN_COMBOS)
    captions, empty = encode_captions(text, table)
    latents, combo_idx = make_latents(vae, args.n_latents, g)
    log(f"{len(latents)} latents, {captions.shape[0] * captions.shape[1]} captions encoded", t0)
    alphas = NoiseSchedule().alphas_cumprod.float()
    grid = torch.arange(1, GRID + 1) * (1000 // GRID) - 1  # 19, 39, ..., 999
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_loss = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 50)
        idx = torch.randint(len(latents), (args.batch,), generator=g)
        x0, c = latents[idx], combo_idx[idx]
        template = torch.multinomial(table.weights, args.batch, replacement=True, generator=g)
        context = captions[c, template]
        t = grid[torch.randint(GRID, (args.batch,), generator=g)]
        s = (t - SKIP).clamp(min=0)
        a_t, a_s = alphas[t][:, None, None, None], torch.where(t - SKIP < 0, alphas[0], alphas[s])[:, None, None, None]
        noise = torch.randn(x0.shape, generator=g)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        cfg = args.cfg_min + (args.cfg_max - args.cfg_min) * torch.rand(args.batch, generator=g)
        w_emb = guidance_scale_embedding(cfg - 1, W_DIM)
        with torch.no_grad():
            cond, uncond = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                   torch.cat([context, empty.expand_as(context)])).chunk(2)
            eps = uncond + cfg[:, None, None, None] * (cond - uncond)
            x_s = a_s.sqrt() * x0_of(eps, x_t, a_t) + (1 - a_s).sqrt() * eps  # DDIM, t -> s
            want = consistency(target, x_s, s, context, w_emb, a_s)
        got = consistency(student, x_t, t, context, w_emb, a_t)
        loss = huber(got, want)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(target.parameters(), student.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            log(f"step {step}: loss {ema_loss:.5f}, lr {opt.param_groups[0]['lr']:.2e}", t0)
        if args.save_every and step and step % args.save_every == 0:
            save(args.out, target)
        if args.stop_after and step + 1 >= args.stop_after:
            log(f"stopping after step {step} (--stop-after)", t0)
            break
    return target


def save(out: Path, unet: UNet) -> None:
    """The U-Net as a diffusers unet/ folder (float16 weights); the rest of the model is the demo's."""
    folder = Path(out) / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((DEMO / "unet" / "config.json").read_text())
    config["time_cond_proj_dim"] = unet.config.time_cond_proj_dim
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=0,
                   help="end after this many steps (the lr schedule still spans --steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.95, help="the target network's EMA decay")
    p.add_argument("--cfg-min", type=float, default=2.0)
    p.add_argument("--cfg-max", type=float, default=8.0)
    p.add_argument("--n-latents", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250, help="write the target U-Net every N steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    unet = distill(args, t0)
    save(args.out, unet)
    log(f"saved {args.out / 'unet'}", t0)


if __name__ == "__main__":
    main()
