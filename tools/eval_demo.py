"""Evaluate the demo model (`--model demo`) by generating through the pipeline and classifying the pixels.

    python tools/eval_demo.py                  # the full table (about 400 images)
    python tools/eval_demo.py --n 20 --neg 20  # a quick look

Each picture is read back without any learnt model:
  * background colour: the median of the 2-pixel border, snapped to the nearest palette colour;
  * the shape: the largest 4-connected region of pixels far from the background colour;
    its colour is the median of that region, snapped to the palette;
  * which shape: the region's area over its bounding box's area (circle pi/4 ~ 0.785, square 1, triangle 0.5).
The classifier is checked first on freshly rendered training pictures (it should be right on ~all of them).
Prompts are "a {colour} {shape} on a {background} background" over combinations seen in training and over the
held-out ones (train_demo.HELD_OUT), with seeds from 1,000,000 on (training draws its noise from its own
generators, never from pipeline seeds).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import ALL_COMBOS, COLOURS, HELD_OUT, SHAPES, TRAIN_COMBOS, caption, render  # noqa: E402

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)
SEED0 = 1_000_000
FAR = 60.0  # RGB distance from the background that counts as 'shape'
MIN_AREA = 12  # pixels; smaller regions are 'no shape'


def nearest(rgb) -> str:
    return NAMES[int(np.argmin(((PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)))]


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask."""
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify(image) -> dict:
    """PIL image or (H, W, 3) uint8 array -> {'background', 'colour', 'shape', 'fill'} (None where no shape)."""
    a = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    region = largest_region(np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > FAR)
    result = {"background": nearest(bg_rgb), "colour": None, "shape": None, "fill": 0.0}
    if region.sum() < MIN_AREA:
        return result
    ys, xs = np.nonzero(region)
    fill = region.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    result.update(colour=nearest(np.median(a[region], axis=0)), fill=float(fill),
                  shape="triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square")
    return result


def score(results: list[tuple[tuple[str, str, str], dict]]) -> dict:
    n = len(results)
    ok = lambda f: 100.0 * sum(f(want, got) for want, got in results) / max(n, 1)
    return {"n": n, "background": ok(lambda w, g: g["background"] == w[2]),
            "colour": ok(lambda w, g: g["colour"] == w[0]), "shape": ok(lambda w, g: g["shape"] == w[1]),
            "all": ok(lambda w, g: (g["colour"], g["shape"], g["background"]) == w)}


def check_classifier(n: int = 200) -> dict:
    g = torch.Generator().manual_seed(12345)
    combos = [ALL_COMBOS[i] for i in torch.randint(len(ALL_COMBOS), (n,), generator=g).tolist()]
    pixels = ((render(combos, g) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return score([(c, classify(p)) for c, p in zip(combos, pixels)])


@torch.no_grad()
def vae_roundtrip(vae, n: int = 300) -> dict:
    """Rendered training pictures -> encode (posterior mean) -> decode -> classify: the most the VAE lets the
    whole model score."""
    g = torch.Generator().manual_seed(123)
    combos = [TRAIN_COMBOS[i] for i in torch.randint(len(TRAIN_COMBOS), (n,), generator=g).tolist()]
    x = render(combos, g).to(vae.post_quant_conv.weight)
    y = torch.cat([vae.decode(vae.encode(x[i:i + 100]).mean) for i in range(0, n, 100)])
    pixels = ((y.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return score([(c, classify(p)) for c, p in zip(combos, pixels)])


def pick(combos, n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [combos[rng.randrange(len(combos))] for _ in range(n)] if n > len(combos) else rng.sample(list(combos), n)


def generate_set(pipe, combos, *, cfg: float, args, seed0: int) -> tuple[dict, float]:
    results, t0 = [], time.perf_counter()
    for k, combo in enumerate(combos):
        out = pipe(caption(*combo), seed=seed0 + k, steps=args.steps, cfg_scale=cfg, sampler=args.sampler)
        results.append((combo, classify(out.images[0])))
    return score(results), (time.perf_counter() - t0) / max(len(combos), 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--n", type=int, default=100, help="prompts per set")
    p.add_argument("--neg", type=int, default=50, help="seeds for the negative-prompt check")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--sets", default="vae,trained,held-out,negative",
                   help="comma-separated subset of vae (the VAE round trip), trained, held-out, negative")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stablediff import StableDiffusion

    sanity = check_classifier()
    print(f"classifier on rendered training pictures: background {sanity['background']:.0f}%, colour "
          f"{sanity['colour']:.0f}%, shape {sanity['shape']:.0f}%", flush=True)
    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    if "vae" in args.sets.split(","):
        rt = vae_roundtrip(pipe.vae)
        print(f"VAE round trip of {rt['n']} rendered training pictures: background {rt['background']:.0f}%, colour "
              f"{rt['colour']:.0f}%, shape {rt['shape']:.0f}%", flush=True)
    t0 = time.perf_counter()
    pipe("a red circle on a blue background", seed=SEED0, steps=args.steps, sampler=args.sampler)  # warm-up
    warm = time.perf_counter() - t0

    rows = []
    trained, held = pick(TRAIN_COMBOS, args.n, 1), pick(HELD_OUT, args.n, 2)
    sets = args.sets.split(",")
    for name, combos, cfg in (("trained", trained, 7.0), ("trained", trained, 1.0),
                              ("held-out", held, 7.0), ("held-out", held, 1.0)):
        if name not in sets:
            continue
        s, per_image = generate_set(pipe, combos, cfg=cfg, args=args, seed0=SEED0 + 1000)
        rows.append((name, cfg, s, per_image))
        print(f"{name} cfg {cfg:g}: {s} ({per_image:.2f} s/image)", flush=True)

    neg = {}
    for negative in ("", "red") if "negative" in sets else ():
        out = pipe("a circle", negative, seed=SEED0 + 5000, steps=args.steps, sampler=args.sampler,
                   batch_size=args.neg)
        got = [classify(im) for im in out.images]
        neg[negative] = (100.0 * sum(g["colour"] == "red" and g["shape"] == "circle" for g in got) / len(got),
                         100.0 * sum(g["shape"] == "circle" for g in got) / len(got))

    print(f"\nmodel {args.model}, {args.sampler} {args.steps} steps, {pipe.native_size}x{pipe.native_size}, "
          f"{torch.get_num_threads()} threads\n")
    print("| prompts | cfg | n | background colour | shape colour | shape | all three | s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg, s, per_image in rows:
        print(f"| {name} | {cfg:g} | {s['n']} | {s['background']:.0f}% | {s['colour']:.0f}% | {s['shape']:.0f}% "
              f"| {s['all']:.0f}% | {per_image:.2f} |")
    if neg:
        print(f"\n| \"a circle\", {args.neg} seeds, cfg 7 | red circles | circles |")
        print("|---|---|---|")
    for negative, (red, circles) in neg.items():
        print(f"| negative prompt {negative!r} | {red:.0f}% | {circles:.0f}% |")
    print(f"\nfirst image (warm-up, includes one-time costs): {warm:.2f} s")


if __name__ == "__main__":
    main()
