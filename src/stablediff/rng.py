"""Noise drawn as AUTOMATIC1111 draws it: its three `randn_source`s ("RNG" in its infotext), one generator per image.

- "cpu": torch's CPU generator, `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
- "gpu": `torch.randn(shape, device="cuda")` from a CUDA generator seeded the same way (A1111's default; an infotext
  without `RNG:` means this). On a device that is not CUDA it is drawn by the Philox below, which computes what CUDA
  would have drawn, so "gpu" images can be reproduced anywhere.
- "nv": that Philox computation on any device, A1111's reproduction of CUDA's numbers.

What CUDA computes (torch's `normal_` kernel, ATen `distribution_nullary_kernel`, and cuRAND's Philox4_32_10):
a grid-stride loop over the flat output in which thread t runs `curand_init(seed, subsequence=t, offset)`, i.e.
Philox4x32-10 with key = (seed low 32 bits, seed high 32 bits) and counter = (offset/4 + call, 0, t, 0) as 64-bit
halves; each call yields four 32-bit words, turned into two Box-Muller pairs (sin, cos); element t + j*T (T threads
in all) takes component j % 4 of call j // 4. T is 256 times the number of blocks, ceil(numel / 256) capped at
SMs * (threads per SM / 256): below that cap every element is its own thread and takes the sin of the first pair,
on every GPU; above it the numbers depend on the card (`cuda_max_threads`). Every call advances the generator's
offset by 4 per call each thread makes. A1111's "nv" is the uncapped case, which is PhiloxGenerator's default.

The integer to float step follows cuRAND: u = x * 2^-32 + 2^-33 and v = y * c + c/2 with c = 2^-32 * 2pi in float32;
the result is sqrt(-2 ln u) * sin(v) (or cos). It is computed in float64 and rounded once to float32, as A1111's
numpy version computes it; CUDA's float32 logf and __sincosf differ from that in the last bits (about 1e-6).
This is CUDA's float32 (and float16, rounded from it) randn; float64 randn takes another path, not reproduced here.
"""

from __future__ import annotations

import torch

from .params import RNG_SOURCES as SOURCES  # "cpu", "gpu", "nv": the one list (params is torch-free)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and key increments (golden ratio, sqrt(3) - 1)
MASK32 = 0xFFFFFFFF
TWO_POW32_INV = 2.0 ** -32
TWO_POW32_INV_2PI = (torch.tensor(TWO_POW32_INV, dtype=torch.float32)
                     * torch.tensor(6.2831855, dtype=torch.float32)).item()  # cuRAND's float32 product
BLOCK = 256  # threads per block in torch's distribution kernels


def mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * m for uint32 values held in int64, without overflowing 64 bits."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    t = (p_lo >> 16) + p_hi  # a * m >> 16
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32-R (Salmon et al. 2011, Random123): four counter words and two key words (uint32 in int64
    tensors, broadcastable) to four random words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def cuda_max_threads(sm_count: int, threads_per_sm: int) -> int:
    """The most threads torch's distribution kernels launch on a GPU (`torch.cuda.get_device_properties`'
    multi_processor_count and max_threads_per_multi_processor): up to this many elements, CUDA's numbers are the
    same on every card."""
    return sm_count * (threads_per_sm // BLOCK) * BLOCK


def grid_threads(numel: int, max_threads: int | None) -> int:
    """Threads of torch's launch for numel elements: whole blocks of 256, at most max_threads (None: no cap)."""
    threads = -(-numel // BLOCK) * BLOCK
    return threads if max_threads is None else min(threads, max_threads)


def philox_normal(seed: int, offset: int, index: torch.Tensor, numel: int,
                  max_threads: int | None = None) -> torch.Tensor:
    """Element `index` (int64 tensor of flat positions) of CUDA's randn of numel elements, float32, with the
    generator at `offset` (torch's units: a multiple of 4)."""
    threads = grid_threads(numel, max_threads)
    thread, k = index % threads, index // threads
    ctr = offset // 4 + k // 4  # curand4 calls are counted in the counter's low 64 bits
    zero = torch.zeros_like(index)
    words = philox4x32([ctr & MASK32, ctr >> 32, thread & MASK32, thread >> 32],
                       [zero + (seed & MASK32), zero + (seed >> 32)])
    lane = k % 4  # which of the call's four normals: (sin, cos) of words 0-1, then of words 2-3
    x = torch.where(lane < 2, words[0], words[2]).double()
    y = torch.where(lane < 2, words[1], words[3]).double()
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    radius = torch.sqrt(-2.0 * torch.log(u))
    return (radius * torch.where(lane % 2 == 0, torch.sin(v), torch.cos(v))).float()


class PhiloxGenerator:
    """torch's CUDA generator after `manual_seed(seed)`, computed on any device: `randn` draws what
    `torch.randn(shape, device="cuda", generator=g)` would, and successive calls continue as CUDA's would.
    max_threads: the card's `cuda_max_threads` for its numbers above one wave of threads; None (A1111's "nv")
    for every element its own thread, which is every card's result up to that size."""

    def __init__(self, seed: int, offset: int = 0, max_threads: int | None = None):
        if not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed {seed} is outside 0..2**64-1")
        if offset < 0 or offset % 4:
            raise ValueError(f"offset {offset} is not a non-negative multiple of 4 (torch's Philox offsets are)")
        self.seed, self.offset, self.max_threads = seed, offset, max_threads

    def initial_seed(self) -> int:
        return self.seed

    def randn(self, shape, *, device=None) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        out = philox_normal(self.seed, self.offset, torch.arange(numel), numel, self.max_threads)
        calls = (numel - 1) // (grid_threads(numel, self.max_threads) * 4) + 1 if numel else 0
        self.offset += 4 * calls
        return out.reshape(tuple(shape)).to(device)


def create_generator(source: str, seed: int, device="cpu"):
    """A fresh generator for one image: a CPU or CUDA torch.Generator, or a PhiloxGenerator ("nv", and "gpu" when
    `device` is not CUDA)."""
    if source not in SOURCES:
        raise ValueError(f"unknown noise source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "cpu":
        return torch.Generator("cpu").manual_seed(seed)
    if source == "gpu" and torch.device(device).type == "cuda":
        return torch.Generator(device).manual_seed(seed)
    return PhiloxGenerator(seed)


def draw(generator, shape, device="cpu") -> torch.Tensor:
    """Unit normal float32 noise of `shape` from one generator, drawn on the generator's device, moved to device."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape, device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from low (t=0) to high (t=1) as A1111 does it for variation seeds: per column along
    dim 1 (the latent's rows), for (C, H, W) noise. Columns within 0.9995 of parallel on average are lerped (A1111
    weighs that branch the other way round, which only matters when the two noises nearly coincide)."""
    a = low / low.norm(dim=1, keepdim=True)
    b = high / high.norm(dim=1, keepdim=True)
    cos = (a * b).sum(1)
    if cos.mean() > 0.9995:
        return torch.lerp(low, high, t)
    omega = torch.acos(cos)
    return (torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low + \
        (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high


def paste_centered(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst with src's centre pasted over its centre ((C, H, W) each), with A1111's rounding: the offsets are
    floor((dst - src) / 2) and a larger src is cut to src - 2 * its margin, so an odd difference leaves one row or
    column of dst."""
    out = dst.clone()
    spans = []
    for d, s in zip(dst.shape[1:], src.shape[1:]):
        delta = (d - s) // 2
        n = s if delta >= 0 else s + 2 * delta
        spans.append((slice(max(delta, 0), max(delta, 0) + n), slice(max(-delta, 0), max(-delta, 0) + n)))
    (dy, sy), (dx, sx) = spans
    out[:, dy, dx] = src[:, sy, sx]
    return out


def batch_seeds(seed: int, count: int, subseed: int = 0, subseed_strength: float = 0.0):
    """A1111's seeds for `count` images: seed + k each, except that with variation seeds (subseed_strength != 0)
    every image keeps `seed` and the subseed counts up instead. Returns (seeds, subseeds)."""
    step = 1 if subseed_strength == 0 else 0
    return [seed + k * step for k in range(count)], [subseed + k for k in range(count)]


class ImageRNG:
    """The noise of a batch as A1111's ImageRNG draws it: one generator per image, seeded with that image's seed.

    `next()` first returns the starting noise (B, *shape) and afterwards the noise a sampler asks for, one draw per
    image from its own generator in turn. With ensd (A1111's eta_noise_seed_delta) != 0, every image's generator is
    replaced by a fresh one seeded seed + ensd after the starting noise, so only the later noise changes.
    Variation seeds: with subseed_strength s != 0, the starting noise of image k is slerp(s, noise, subnoise), the
    subnoise drawn by a fresh generator seeded subseeds[k] (0 past the end of the list). seed_resize_from=(w, h) in
    pixels (latent size = pixels // downscale, the VAE's factor) draws the seed's noise (and the subnoise) at that
    size and pastes its centre into the image's own first draw, so a seed keeps its composition at another size.
    Noise is float32 on `device`."""

    def __init__(self, shape, seeds, *, source: str = "cpu", device="cpu", subseeds=None,
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None, ensd: int = 0,
                 downscale: int = 8):
        if not 0.0 <= subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength {subseed_strength} is outside 0..1")
        if seed_resize_from is not None and min(seed_resize_from) < 8:
            raise ValueError(f"seed_resize_from {seed_resize_from} must be a (width, height) of at least 8 pixels")
        self.shape, self.seeds, self.source, self.device = tuple(shape), list(seeds), source, device
        self.subseeds, self.subseed_strength, self.ensd = list(subseeds or []), subseed_strength, ensd
        self.seed_shape = self.shape if seed_resize_from is None else \
            (self.shape[0], seed_resize_from[1] // downscale, seed_resize_from[0] // downscale)
        self.generators = [create_generator(source, s, device) for s in self.seeds]
        self.started = False

    def fresh(self, seed: int) -> torch.Tensor:
        """The first draw of a new generator seeded `seed`, at the seed's size."""
        return draw(create_generator(self.source, seed, self.device), self.seed_shape, self.device)

    def first_noise(self, k: int) -> torch.Tensor:
        """Image k's starting noise; draws once from its generator."""
        resized = self.seed_shape != self.shape
        noise = self.fresh(self.seeds[k]) if resized else draw(self.generators[k], self.shape, self.device)
        if self.subseed_strength != 0:
            subseed = self.subseeds[k] if k < len(self.subseeds) else 0
            noise = slerp(self.subseed_strength, noise, self.fresh(subseed))
        if resized:
            noise = paste_centered(draw(self.generators[k], self.shape, self.device), noise)
        return noise

    def first(self) -> torch.Tensor:
        """The starting noise of every image, then the ENSD reseed."""
        noise = torch.stack([self.first_noise(k) for k in range(len(self.seeds))])
        if self.ensd:
            self.generators = [create_generator(self.source, s + self.ensd, self.device) for s in self.seeds]
        self.started = True
        return noise

    def next(self) -> torch.Tensor:
        """The next noise of the batch, (B, *shape): the starting noise on the first call."""
        if not self.started:
            return self.first()
        return torch.stack([draw(g, self.shape, self.device) for g in self.generators])
