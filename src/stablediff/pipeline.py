"""Prompt -> latents -> image.

    pipe = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")
    result = pipe("silly dog wearing a batman costume", steps=30, cfg_scale=7.0, seed=1055747)
    result.images[0].save("dog.png")

The steps, each a component reachable on the pipeline (`tokenizer`, `text_encoder`, `unet`, `vae`):
1. tokenize the prompt and the negative prompt and encode both with the CLIP text tower (once per call);
2. draw each image's latent noise on its own CPU generator seeded `seed + k`;
3. run the chosen sampler over a classifier-free-guided denoiser built on the U-Net;
4. decode latents / scaling_factor with the VAE into pixels.
With batch_size=1 the result equals diffusers' StableDiffusionPipeline given the same weights, seed and scheduler.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import __version__, cpu, embeddings, hires, images, img2img, lora, malloc, masking, rng, samplers, taesd, tome
from . import weights
from . import controls as controlnets
from .clip import CLIPTextModel
from .config import UNetConfig
from .controlnet import ControlNet, load_controlnet
from .denoiser import EpsDenoiser, ScheduledCFGDenoiser
from .nn import ResnetBlock, circular_padding
from .params import DEFAULT_MODEL, MAX_SEED, GenerationParams, txt2img_from_infotext
from .prompt_schedule import composable_schedules, prompt_schedule
from .prompts import PromptEncoder
from .safety import SafetyChecker, load_safety_checker
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .taesd import TinyAutoencoder
from .unet import DeepCache, SpatialTransformer, UNet, guidance_scale_embedding
from .vae import AutoencoderKL

# latent side from which previews on the CPU decode 2x2-averaged latents (see preview)
PREVIEW_POOL_FROM = 16
DEMO_DIR = Path(__file__).parent / "data" / "demo"  # our small offline model (`--model demo`)
# `--model demo-lcm`: the demo model with an LCM U-Net distilled from its own (tools/distill_lcm_demo.py); only the
# U-Net is shipped, the VAE, text encoder and scheduler are the demo's
DEMO_LCM_UNET = Path(__file__).parent / "data" / "demo-lcm" / "unet"


def _prompt_lists(params: GenerationParams, prompts, negatives) -> tuple[list[str], list[str]]:
    """The call's prompts and one negative prompt for each (params' own where not given)."""
    prompts = [params.prompt] if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = params.negative_prompt if negatives is None else negatives
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


class Cancelled(Exception):
    """Raised out of a pipeline call whose `cancel` event was set; the partial work is dropped."""


@dataclass
class StepInfo:
    """What a progress callback sees after each sampler step of a batch."""

    step: int  # 1-based, out of total
    total: int
    batch: int  # index of the batch within this call
    batches: int
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor | None = None  # the step's estimate of the clean latents (what previews show)


@dataclass
class GenerationResult:
    images: list  # PIL images
    latents: torch.Tensor  # (N, 4, H/f, W/f), the final latents before decoding
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    infotexts: list[str] = field(default_factory=list)  # AUTOMATIC1111 'parameters' text per image
    nsfw: list[bool] = field(default_factory=list)  # True where the safety checker flagged (and blurred) the image
    subseeds: list = field(default_factory=list)  # each image's variation seed (None without variation seeds)


@contextlib.contextmanager
def cancel_within_steps(models, cancel):
    """While inside, every resnet and transformer layer of `models` first checks `cancel` (anything with
    is_set()) and raises Cancelled: a cancel takes effect within one layer, not after a whole U-Net step or VAE
    decode (minutes for a large image on a CPU)."""
    if cancel is None:
        yield
        return

    def check(module, args):
        if cancel.is_set():
            raise Cancelled("generation was cancelled")

    layers = [m for model in models for m in model.modules() if isinstance(m, (ResnetBlock, SpatialTransformer))]
    hooks = [m.register_forward_pre_hook(check) for m in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 convolutions on the CPU run in oneDNN's channels-last kernels without reordering every activation;
    in float32 the channels-first kernels are the faster ones, so float32 stays as it is."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu.enabled("channels_last")


def _build(cls, config, state_dict, *, path, component, device, dtype):
    """The module with `state_dict`'s weights on `device` in `dtype` (weights.converted: one tensor at a time, so a
    float32 file loaded as bfloat16 never holds both whole copies)."""
    with torch.device("meta"):
        module = cls(config)
    weights.load_into(module, state_dict, path=path, component=component, device=device, dtype=dtype,
                      channels_last=_channels_last(device, dtype))
    return module.eval().requires_grad_(False)


class StableDiffusion:
    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                 noise_schedule: NoiseSchedule, *, model_name: str = "model", weights_file: Path | None = None,
                 safety_checker: SafetyChecker | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.prompts = PromptEncoder(tokenizer, text_encoder)
        self.embedding_files: dict[str, Path] = {}  # textual-inversion trigger word -> file
        self.loras = lora.LoraSet(unet, text_encoder)
        self.lora_dir = Path("loras")  # where <lora:NAME:w> tags and loras={"NAME": w} are looked up
        self.safety_checker = safety_checker
        self.unet = unet
        self.vae = self._own_vae = vae
        self.noise_schedule = noise_schedule
        self.model_name = model_name
        self.weights_file = weights_file
        self._model_hash = None
        # VAE tiling (diffusers' enable_tiling, see vae.py): True always, False never, None when one image's
        # untiled pass would need more than vae.AUTO_TILING_BYTES of activations (vae.needs_tiling)
        self.vae_tiling: bool | None = None
        self.vae_file: Path | None = None  # a separate VAE's weights file (load_vae), for the infotext
        self.vae_name: str | None = None
        self._vae_hash = None
        self.taesd: TinyAutoencoder | None = None  # previews; with taesd_output, also the image's decode/encode
        self.taesd_output = False
        self._preview_taesd: tuple | None = None  # (self.taesd, its bfloat16 decoder for previews): see preview
        self.controlnets: dict[Path, ControlNet] = {}  # loaded ControlNets by path, kept across calls
        self.blank_kept: tuple | None = None  # (key, tensor): img2img.blank_condition's last, for the next call

    @classmethod
    def from_pretrained(cls, source: str | Path = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, variant: str | None = None,
                        safety_checker: bool | str | Path = False,
                        vae_dtype: torch.dtype = torch.float32, vae: str | Path | None = None) -> "StableDiffusion":
        """Load a diffusers folder, an original single .safetensors/.ckpt file, or a Hugging Face Hub id.

        dtype: what the text encoder and U-Net run in. vae_dtype: what the VAE runs in: float32 (default, exact;
        the SD 1.x VAE overflows in float16), or bfloat16 (several times faster to decode on a CPU with bfloat16
        units, about 1/255 mean pixel error). Weights in .safetensors files stay memory-mapped.
        safety_checker: False (default), True (the model folder's own safety_checker/), or a path to a
        safety_checker folder or a diffusers model folder that has one. vae: a separate VAE to use instead of the
        model's own (see `load_vae`)."""
        if vae_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"vae_dtype {vae_dtype} is not float32 or bfloat16 (float16 overflows the SD 1.x VAE)")
        device = resolve_device(device)
        if device.type == "cpu":
            malloc.keep_freed_memory()  # no page-fault storm from PyTorch's large buffers (see malloc.py)
            dtype, vae_dtype = cpu.cpu_dtype(dtype), cpu.cpu_dtype(vae_dtype, "vae_dtype")
        if str(source) == "demo":
            source = DEMO_DIR
        ckpt = _demo_lcm() if str(source) == "demo-lcm" else weights.load_checkpoint(source, variant=variant)
        checker = None
        if safety_checker is True and not (Path(ckpt.path) / "safety_checker").is_dir():
            raise weights.CheckpointError(f"{ckpt.path}: has no safety_checker/; pass safety_checker=PATH (a "
                                          "safety_checker folder, or a diffusers model folder that has one)")
        if safety_checker:
            checker = load_safety_checker(ckpt.path if safety_checker is True else safety_checker, device=device,
                                          dtype=torch.float32)
        common = dict(path=ckpt.path, device=device)
        text_encoder = _build(CLIPTextModel, ckpt.text_config, ckpt.text_encoder, component="text_encoder",
                              dtype=dtype, **common)
        unet = _build(UNet, ckpt.unet_config, ckpt.unet, component="unet", dtype=dtype, **common)
        own_vae = _build(AutoencoderKL, ckpt.vae_config, ckpt.vae, component="vae", dtype=vae_dtype, **common)
        tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer()
        noise_schedule = NoiseSchedule.from_config(ckpt.scheduler_config)
        path = Path(ckpt.path)
        name = path.stem if path.is_file() else (path.name if path.exists() else str(source).rstrip("/").split("/")[-1])
        pipe = cls(tokenizer, text_encoder, unet, own_vae, noise_schedule, model_name=name,
                   weights_file=_weights_file(path), safety_checker=checker)
        if vae is not None:
            pipe.load_vae(vae)
        return pipe

    def load_vae(self, source: str | Path) -> None:
        """Use a separate VAE instead of the model's own: a .safetensors/.ckpt/.pt file as people download it (e.g.
        vae-ft-mse-840000-ema-pruned), a diffusers VAE folder or a diffusers model folder (weights.load_vae; a VAE
        of other latents, SDXL's or SD3's, is refused). It runs on the device and in the dtype of the VAE it
        replaces. The infotext then names it as A1111 does: "VAE" (the file's name) and "VAE hash".
        TAESD (taesd.is_taesd: the tiny autoencoder) decodes and encodes instead of the VAE, fast and approximate."""
        if taesd.is_taesd(source):
            self.load_preview_decoder(source)
            if self.taesd.config.downscale != self.downscale or \
                    self.taesd.config.latent_channels != self.vae.config.latent_channels:
                raise ValueError(f"{source}: a TAESD for other latents ({self.taesd.config.latent_channels} "
                                 f"channels, downscale {self.taesd.config.downscale}) than this model's")
            self.taesd_output, self.vae_file = True, taesd.weights_file(source)
            self.vae_name, self._vae_hash = Path(source).name, None
            return
        found = weights.load_vae(source, like=self.vae.config)
        dtype = self.vae.post_quant_conv.weight.dtype
        self.vae = _build(AutoencoderKL, found.config, found.state_dict, path=str(found.weights_file),
                          component="vae", device=self.device, dtype=dtype)
        self.vae_file = found.weights_file
        self.vae_name = Path(found.path).name  # A1111: the file's base name (a folder: its name)
        self._vae_hash, self.taesd_output = None, False

    def use_own_vae(self) -> None:
        """Back to the model's own VAE after `load_vae` (kept in memory: nothing is read again)."""
        self.vae, self.vae_file, self.vae_name, self._vae_hash = self._own_vae, None, None, None
        self.taesd_output = False

    def load_preview_decoder(self, *sources) -> None:
        """TAESD (a folder, or its decoder/encoder files) for `preview` (taesd.load_taesd), in float32. Where the CPU
        has bfloat16 units (cpu.native_bf16), previews decode with a bfloat16 copy of its decoder, made here: a
        preview is thrown away at the next step, and there bfloat16 costs a fraction of float32. An image decoded
        by TAESD (load_vae, taesd_output) stays float32."""
        self.taesd = taesd.load_taesd(*sources, device=self.device)
        self._preview_taesd = None
        if self.device.type == "cpu" and self.taesd.decoder is not None and cpu.native_bf16():
            self._preview_taesd = (self.taesd, self.taesd.decoder_copy(torch.bfloat16))

    def preview(self, latents: torch.Tensor) -> list:
        """Quick PIL images of latents (e.g. a step's denoised estimate), at the image's size: TAESD's decode when
        one is loaded, else A1111's "Approx cheap" linear map (no model; 8x nearest upscaled).

        TAESD decodes in bfloat16 where load_preview_decoder made a copy for it. On the CPU, latents of at least
        PREVIEW_POOL_FROM per side are averaged over 2x2 first (a quarter of TAESD's work) and the decode is scaled
        back up (bilinear): at 512x512 a whole decode costs 7-9% of a guided float32 step in float32, and in
        bfloat16 5.7% of a guided bfloat16 step and 11% of an LCM one (cfg 1: one U-Net batch); pooled, at most
        3.7% of any of these (benchmarks/RESULTS.md)."""
        with torch.no_grad():
            if self.taesd is None or self.taesd.decoder is None:
                return [taesd.cheap_preview(z.float().cpu(), upscale=self.downscale) for z in latents]
            decoder, pool = self.taesd, self.device.type == "cpu" and min(latents.shape[-2:]) >= PREVIEW_POOL_FROM
            if self._preview_taesd is not None and self._preview_taesd[0] is self.taesd:
                decoder = self._preview_taesd[1]
            z = latents.to(self.device, decoder.decoder.layers[0].weight.dtype)
            if pool:
                z = torch.nn.functional.avg_pool2d(z, 2, ceil_mode=True, count_include_pad=False)
            x = decoder.decode(z).float()
            if pool:
                scale = x.shape[-1] // z.shape[-1]
                x = torch.nn.functional.interpolate(x, size=(latents.shape[-2] * scale, latents.shape[-1] * scale),
                                                    mode="bilinear", align_corners=False)
            return images.to_pil(x)

    @property
    def vae_hash(self) -> str | None:
        """A1111's "VAE hash": the first 10 hex digits of the separate VAE's weights file's sha256 (None with the
        model's own VAE, which A1111 does not name either)."""
        if self._vae_hash is None and self.vae_file is not None:
            self._vae_hash = images.model_hash(self.vae_file)
        return self._vae_hash

    def compile(self, mode: str | None = None) -> "StableDiffusion":
        """torch.compile the U-Net (in place). The first image after this compiles (a minute or more); later
        images of the same size run faster, mostly on GPUs. `mode` is torch.compile's ("reduce-overhead" adds CUDA
        graphs). Results stay within float rounding of the uncompiled model."""
        self.unet.compile(mode=mode, dynamic=False)
        return self

    # -- facts about the model --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return self.vae.config.downscale

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.downscale

    @property
    def model_hash(self) -> str:
        """A1111's 'Model hash': the first 10 hex digits of the weights file's sha256 (cached on disk)."""
        if self._model_hash is None:
            self._model_hash = images.model_hash(self.weights_file) if self.weights_file else ""
        return self._model_hash

    # -- add-ons: textual inversion and LoRA ---------------------------------------------------------------------
    def load_embeddings(self, source) -> list[str]:
        """Textual-inversion embeddings from a folder or files; each file's stem becomes its trigger word in
        prompts (negative prompts too). Returns one line per file that could not be used (e.g. SDXL ones)."""
        skipped: list[str] = []
        vectors = embeddings.load_embeddings(source, width=self.text_encoder.config.hidden_size, skipped=skipped)
        self.embedding_files = {w: f for w, f in embeddings.find_embeddings(source).items() if w in vectors}
        self.prompts = PromptEncoder(self.tokenizer, self.text_encoder, embeddings=vectors)
        return skipped

    def _wanted_loras(self, prompt: str, loras: dict | None) -> dict[Path, tuple[str, float]]:
        """File -> (name for the infotext, multiplier): the prompt's <lora:NAME:w> tags (resolved inside lora_dir
        only) and the `loras` argument (a file path, or a name in lora_dir). The last mention of a file wins."""
        wanted = {}
        for net in self.prompts.extra_networks(prompt):
            if net.kind == "lora":
                wanted[lora.resolve(net.name, self.lora_dir)] = (net.name, net.multiplier)
        for key, m in (loras or {}).items():
            path = Path(key) if Path(key).is_file() else lora.resolve(str(key), self.lora_dir)
            wanted[path] = (path.stem, float(m))
        return wanted

    def _addon_hashes(self, prompt: str, negative: str, wanted: dict) -> dict[str, str | None]:
        """A1111's `Lora hashes` / `TI hashes` infotext entries for what this prompt actually used."""
        text = f"{prompt}\n{negative}".lower()
        used_ti = {w: embeddings.embedding_hash(f) for w, f in self.embedding_files.items()
                   if re.search(rf"(?<![\w]){re.escape(w.lower())}(?![\w])", text)}
        used_lora = {name: self.loras.lora(path).hash for path, (name, m) in wanted.items() if m != 0}
        return {"Lora hashes": lora.format_hashes(used_lora) or None,
                "TI hashes": lora.format_hashes(used_ti) or None}

    # -- the steps --------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str, clip_skip: int = 1) -> torch.Tensor:
        """One prompt in AUTOMATIC1111 syntax -> (1, 77 * chunks, C) text embeddings (see prompts.py)."""
        return self.prompts.encode(text, clip_skip)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1], float32, one image at a time (a batch of 512px decodes would need GBs).
        NaN latents (a float16 overflow in the U-Net) are an error, never a silent black image."""
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"the sampler produced NaN/inf latents {_nan_cause(self.dtype, self.loras)}")
        if self.taesd_output:  # TAESD takes the latents as the diffusion model sees them
            return torch.cat([self.taesd.decode(latents[i:i + 1].float().to(self.device)) for i in range(len(latents))])
        z = latents.float() / self.vae.config.scaling_factor
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        return torch.cat([self.vae.decode(z[i:i + 1].to(vae_dtype), tiled=self.vae_tiling).float()
                          for i in range(len(z))])

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int = 30,
                 cfg_scale: float = 7.0, seed: int | None = None, width: int | None = None,
                 height: int | None = None, batch_size: int = 1, sampler: str = "euler",
                 schedule: str | None = None, clip_skip: int = 1, init_image=None, mask_image=None,
                 strength: float | None = None, loras: dict | None = None, cache_interval: int = 1,
                 eta: float | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = 0.0,
                 s_noise: float = 1.0, s_min_uncond: float = 0.0, s_min_uncond_all: bool = False,
                 skip_early_cond: float = 0.0, extra_noise: float = 0.0, pad_cond_uncond: bool = False,
                 rng: str = "cpu", ensd: int = 0, subseed: int | None = None,
                 subseed_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] | None = None, tiling: bool = False,
                 token_merging_ratio: float = 0.0, resize_mode: int = 0, noise_multiplier: float = 1.0,
                 mask_blur: int | tuple[int, int] = 0,
                 inpainting_fill: int = 1, inpaint_full_res: bool = False, inpaint_full_res_padding: int = 0,
                 inpainting_mask_invert: bool = False, inpainting_mask_weight: float = 1.0,
                 controls: list[controlnets.Control] = (), callback: Callable[[StepInfo], None] | None = None,
                 cancel=None, progress: bool = False) -> GenerationResult:
        """Make batch_size images for each prompt. Image k of the call uses seed + k on its own generator.

        txt2img by default; with `init_image` (PIL image or path; or a list of them, one for each image of the batch,
        which then has as many images, as A1111's img2img takes them) img2img: the image is encoded, noised to the step
        `strength` (default 0.75) picks, and only the remaining steps run; with `mask_image` too, inpainting (white =
        repaint, strength default 1.0): a 9-channel inpainting U-Net gets mask and masked-image latents, a normal
        U-Net has the known latents blended back after every step, both as diffusers does. The output size defaults
        to the init image's (rounded down to a multiple of 8); a different width/height resizes it, with a warning.
        LoRAs come from `<lora:NAME:w>` tags in the prompt and from `loras={"file-or-NAME": w}`; they are merged
        into the weights for the call (and taken out again by the next call that does not ask for them).
        eta: the noise an ancestral or DDIM step adds, where the sampler takes one (samplers.Sampler.eta; None: its
        own, 1 for "Euler a", 0 for DDIM). s_churn, s_tmin, s_tmax (0: no bound), s_noise: k-diffusion's churn for
        A1111's "Euler", "Heun", "DPM2", and its noise scale for those and A1111's other ancestral and SDE samplers
        (samplers.Sampler.sigma_params; others leave them unused, as A1111 does). s_min_uncond (with
        s_min_uncond_all): A1111's negative guidance minimum sigma (denoiser.ScheduledCFGDenoiser's min_uncond),
        a speed-up that changes the image; skip_early_cond: A1111's "ignore negative prompt during early sampling"
        (the share of the first steps run without it). extra_noise: A1111's "extra noise multiplier for img2img and
        hires fix": that much more of the start noise in img2img and the hires pass. A prompt and a negative prompt
        of different lengths (75-token chunks) run at their own lengths, as A1111's default; pad_cond_uncond pads
        the shorter with the empty prompt (A1111's "pad prompt/negative prompt"). rng: where the noise comes from,
        as A1111's RNG setting ("cpu", "gpu", "nv": rng.py); ensd: A1111's eta noise seed delta (the samplers' own
        noise from seed + ensd). subseed / subseed_strength: A1111's variation seeds (the seed's noise slerped toward
        the subseed's; every image then keeps `seed` and image k uses subseed + k); seed_resize_from=(w, h): the
        seed's noise as drawn at that size, centred.
        resize_mode: A1111's, for an init image (and mask) of another aspect ratio than width x height: 0 stretch,
        1 crop and resize, 2 resize and fill. noise_multiplier: img2img's start noise scaled by it (A1111's "Noise
        multiplier for img2img"). Inpainting as A1111 prepares it (masking.py): mask_blur (pixels, or
        (across, down)), inpainting_fill (masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing),
        inpaint_full_res (only masked: the mask's box, grown by inpaint_full_res_padding, inpainted at width x height
        and pasted back), inpainting_mask_invert (repaint the black part: A1111's "Inpaint not masked"). A1111's
        samplers ("Euler a", ...) inpaint as A1111 does: those settings, its latent mask and blending, the init image
        laid back over the result; diffusers' ("euler_a", ...) as diffusers does, with those settings where given.
        An inpainting checkpoint (U-Net with 9 input channels) also makes txt2img and img2img images, as A1111 runs
        them: its mask channel all ones, its masked image black (txt2img) or the init image faded to gray by
        inpainting_mask_weight (A1111's "inpainting conditioning mask strength", 0..1: how much of the image the
        conditioning hides under the mask, in inpainting too).
        cache_interval=N > 1 runs the whole U-Net only every N-th call and its shallow branch in between (DeepCache):
        faster, approximate. token_merging_ratio: A1111's token merging (tome.py), approximate.
        controls: ControlNet units (controls.Control: a ControlNet, a control image, weight, guidance start/end,
        preprocessor, resize and control mode), their residuals summed into the U-Net at the steps each is active.
        `callback(StepInfo)` runs after every step; `cancel` (anything with `is_set()`, e.g. threading.Event)
        stops the call within one U-Net or VAE layer by raising Cancelled.
        """
        params = GenerationParams(
            steps=steps, cfg_scale=cfg_scale, seed=seed, width=width, height=height, batch_size=batch_size,
            sampler=sampler, schedule=schedule, clip_skip=clip_skip, strength=strength,
            loras=tuple((loras or {}).items()), cache_interval=cache_interval, eta=eta, s_churn=s_churn,
            s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, s_min_uncond=s_min_uncond,
            s_min_uncond_all=s_min_uncond_all, skip_early_cond=skip_early_cond,
            extra_noise=extra_noise, pad_cond_uncond=pad_cond_uncond, rng=rng, ensd=ensd,
            subseed=subseed, subseed_strength=subseed_strength, seed_resize_from=seed_resize_from, tiling=tiling,
            token_merging_ratio=token_merging_ratio, resize_mode=resize_mode, noise_multiplier=noise_multiplier,
            mask_blur_x=mask_blur if isinstance(mask_blur, int) else mask_blur[0],
            mask_blur_y=mask_blur if isinstance(mask_blur, int) else mask_blur[1], inpainting_fill=inpainting_fill,
            inpaint_full_res=inpaint_full_res, inpaint_full_res_padding=inpaint_full_res_padding,
            inpainting_mask_invert=inpainting_mask_invert, inpainting_mask_weight=inpainting_mask_weight)
        return self.generate(params, prompts=prompt, negatives=negative_prompt, init_image=init_image,
                             mask_image=mask_image, controls=controls, callback=callback, cancel=cancel,
                             progress=progress)

    @torch.no_grad()
    def generate(self, params: GenerationParams, *, prompts: str | list[str] | None = None,
                 negatives: str | list[str] | None = None, init_image=None, mask_image=None,
                 controls: list[controlnets.Control] = (), callback: Callable[[StepInfo], None] | None = None,
                 cancel=None, progress: bool = False, upscaler_dir: Path | None = None) -> GenerationResult:
        """The call above with its settings in one GenerationParams (as the CLI, the server, batch jobs and
        `from_infotext` build them). `prompts` / `negatives` (a text or one per prompt) replace params.prompt /
        params.negative_prompt when given. params.enable_hr runs hires fix (hires.py; txt2img only) after each
        prompt's first pass; upscaler_dir: where its upscaler models are looked up by name."""
        for control in controls:
            control.check()
        prompts, negatives = _prompt_lists(params, prompts, negatives)
        params, inits, mask_image, strength = self._settle(params, init_image, mask_image, len(prompts))
        init_size = inits[0].size if inits else None
        inits, mask_image, inpaintings = img2img.prepare(params, inits, mask_image, self.inpainting_unet)
        if inpaintings and inpaintings[0].paste_to is not None:  # only masked: each unit's image cut to the box too
            controls = [c.cropped(init_size, inpaintings[0].paste_to, params.width, params.height) for c in controls]
        upscaler = hires.load_upscaler(params.hr_upscaler, upscaler_dir) if params.enable_hr else None
        units = self._control_units(controls, params)
        image_seeds = params.image_seeds(len(prompts) * params.batch_size)
        plan = samplers.prepare(params.sampler, self.noise_schedule, params.steps, schedule=params.schedule,
                                strength=strength)
        loras = dict(params.loras)
        wanted = [self._wanted_loras(p, loras) for p in prompts]  # resolved (and missing ones named) up front
        steps = functools.partial(self._step_callback, callback=callback, cancel=cancel, progress=progress)

        # tiling (A1111's): circular padding from the init image's encoding to the decoded image, then back
        # token merging (A1111's): the U-Net's top-level self-attention on merged tokens, the hires pass's too
        with circular_padding((self.unet, self.vae), params.tiling), \
                tome.token_merging(self.unet, params.token_merging_ratio), \
                cancel_within_steps((self.unet, self.vae), cancel):  # also inside a step: between layers
            source = (img2img.encode(self, inits, mask_image, params) if inits
                      else img2img.txt2img_source(self, params))
            happened = set()  # what the guidance did, in any prompt's run (A1111 writes it for all images then)
            latents = torch.cat([
                self._one_prompt(b, prompts, negatives, params, plan, image_seeds, source, wanted, units, upscaler,
                                 steps, happened) for b in range(len(prompts))])
            weights.release(self.unet)  # (SD 1.5: its 3.2 GB leave resident memory during the decode)
            pil = images.to_pil(self.decode(latents))
            if inpaintings and (samplers.SAMPLERS[params.sampler].family == "a1111" or inpaintings[0].paste_to):
                pil = [masking.apply_overlay(im, inpaintings[i % len(inpaintings)]) for i, im in enumerate(pil)]
            weights.release(self.vae)  # (0.33 GB: the next image's U-Net steps then peak as this one's did)
        if self.device.type == "cpu":
            malloc.return_freed_memory()  # nor is what the heap kept for this image's buffers
        nsfw = [False] * len(pil)
        if self.safety_checker is not None:
            pil, nsfw = self.safety_checker.censor(pil)
        added = {} if mask_image is None else params.inpainting_infotext(
            bool(inpaintings) and inpaintings[0].paste_to is not None)
        if inits and params.noise_multiplier != 1:
            added["Noise multiplier"] = params.noise_multiplier
        if self.inpainting_unet:  # A1111 writes it for every image of an inpainting model, txt2img's too
            added["Conditional mask weight"] = params.inpainting_mask_weight
        for key, keys in (("NGMS", ("NGMS", "NGMS all steps")), ("Pad conds", ("Pad conds",))):
            if key not in happened:  # A1111 writes these only where they happened (None leaves them out)
                added.update(dict.fromkeys(keys))
        return self._result(pil, latents, nsfw, prompts, negatives, params, wanted, image_seeds, controls, added)

    def _settle(self, params: GenerationParams, init_image, mask_image, n_prompts: int):
        """(validated params with size, strength and seeds filled in, init image, mask, img2img strength): the
        images opened, the settings checked against this model, random seeds drawn where none were given."""
        hr = params.enable_hr  # its strength is the hires pass's; the first pass is txt2img
        inits, mask_image, width, height, strength = img2img.open_inits(
            init_image, mask_image, params.width, params.height, None if hr else params.strength, self.native_size,
            cropped=params.inpaint_full_res)
        if hr and inits:
            raise ValueError("enable_hr: hires fix is a txt2img setting; give no init_image")
        if inits and len(inits) > 1:  # a batch of init images, one an image, as A1111's img2img takes them
            if len(inits) > params.batch_size:
                raise ValueError(f"{len(inits)} init images for batch size {params.batch_size}: give one init "
                                 "image, or at most batch size of them")
            params = params.replace(batch_size=len(inits))
        params = params.replace(width=width, height=height, strength=params.strength if hr else strength)
        params = params.validate(prompts=n_prompts)
        self._check_fits(params)
        count = n_prompts * params.batch_size
        if params.seed is None:
            params = params.replace(seed=random.randint(0, MAX_SEED - count))
        if params.subseed is None and params.subseed_strength:
            params = params.replace(subseed=random.randint(0, MAX_SEED - count))
        return params, inits, mask_image, strength

    def _one_prompt(self, b, prompts, negatives, params, plan, image_seeds, source, wanted, units, upscaler, steps,
                    happened: set[str]):
        """Prompt b's latents: its LoRAs merged, the sampler run, then the hires pass where asked. units: the
        first and the second pass's ControlNet units (_control_units); happened: generate_latents'."""
        self.loras.apply({path: m for path, (_, m) in wanted[b].items()})
        step_cb = steps(b, len(prompts), len(plan.sigmas) - 1)
        seeds = image_seeds[b * params.batch_size:(b + 1) * params.batch_size]
        first, second = units
        try:
            latents = self.generate_latents(prompts[b], negatives[b], params, plan, seeds, source, step_cb, first,
                                            happened)
        finally:
            step_cb.close()
        if not params.enable_hr:
            return latents
        return hires.second_pass(self, prompts[b], negatives[b], params, latents, seeds, upscaler,
                                 functools.partial(steps, b, len(prompts)), second, happened)

    def from_infotext(self, text: str, **changes) -> GenerationResult:
        """Remake an image from its `parameters` text (ours or AUTOMATIC1111's), with `changes` (GenerationParams
        fields, e.g. steps=10) on top. Keys of the text that are not settings here are named in one warning (the
        model's name, hash and versions are only compared), so nothing is dropped without a word."""
        params, notes = txt2img_from_infotext(text, keep_strength="strength" in changes, model_hash=self.model_hash)
        if notes:
            warnings.warn(f"the infotext holds settings this run does not use: {'; '.join(notes)}", stacklevel=2)
        return self.generate(params.replace(**changes))

    def generate_latents(self, prompt: str, negative: str, params: GenerationParams, plan: samplers.SamplingPlan,
                         seeds: list[tuple[int, int | None]], source: img2img.Source | None = None,
                         step_callback=None, controls: list[controlnets.ActiveControl] = (),
                         happened: set[str] | None = None) -> torch.Tensor:
        """One prompt's final latents (len(seeds), C, h, w): encode the prompts, draw each image's noise on its own
        generator (seeds[k] = (seed, variation seed), params.image_seeds', on params.rng's source: rng.ImageRNG),
        run the sampler over the guided denoiser. `source`: what img2img.start starts from (img2img.encode's,
        hires fix's); `step_callback(d)` sees each step and may return the latents to go on with; `controls`:
        `_control_unit`'s, run inside the eps model (controls.ControlledEps); `happened` gets the infotext keys of
        what the guidance did (ScheduledCFGDenoiser.happened: "NGMS", "Pad conds")."""
        shape = (self.vae.config.latent_channels, params.height // self.downscale, params.width // self.downscale)
        noise = rng.ImageRNG(shape, [s for s, _ in seeds], source=params.rng, device=self.device, ensd=params.ensd,
                             subseeds=[v for _, v in seeds if v is not None],
                             subseed_strength=params.subseed_strength, seed_resize_from=params.seed_resize_from,
                             downscale=self.downscale)
        conds, uncond = self.conditioning(prompt, negative, params.steps * plan.sampler.calls_per_step,
                                          params.clip_skip)
        pad = self.prompts.encode("", params.clip_skip) if params.pad_cond_uncond else None  # (A1111's pad option)
        weights.release(self.text_encoder)  # memory-mapped weights leave resident memory till next needed
        cache = DeepCache(params.cache_interval) if params.cache_interval > 1 else None
        eps = functools.partial(self.eps, cache=cache)
        x, model, known = img2img.start(self, plan, noise, source, params.strength, eps, params.noise_multiplier,
                                        params.extra_noise)
        if controls:
            model = controlnets.ControlledEps(model, list(controls), plan.timesteps, len(seeds))
        denoiser = self.scheduled_denoiser(plan, conds, uncond, params.cfg_scale, model=model,
                                           min_uncond=(params.s_min_uncond, params.s_min_uncond_all),
                                           skip_early=params.skip_early_cond, pad=pad)
        last = len(plan.sigmas) - 2

        def on_step(d):
            """diffusers' inpainting puts the known latents back after each step (the last one after finish)."""
            if known is not None and known.noise is not None and d["i"] < last:
                d = dict(d, x=known.after_step(d["x"], float(d["sigma_next"])))
            if step_callback is not None:
                step_callback(d)
            return d["x"] if known is not None else None

        guidance = denoiser
        if known is not None:
            denoiser = known.wrap(denoiser)
        x = plan.sample(denoiser, x, generator=noise, callback=on_step, **plan.sampler.eta_options(params.eta),
                        **plan.sampler.sigma_options(params.sigma_values()))
        if happened is not None:
            happened |= guidance.happened
        x = plan.finish(x)
        return known.final(x) if known is not None else x

    def _check_fits(self, params: GenerationParams) -> None:
        """Settings valid in general that this model cannot take."""
        f = self.downscale
        if params.width % f or params.height % f:
            raise ValueError(f"size {params.width}x{params.height} is not a multiple of this VAE's downscale "
                             f"factor {f}")

    def _result(self, pil, latents, nsfw, prompts, negatives, params, wanted, image_seeds,
                controls=(), added: dict | None = None) -> GenerationResult:
        """The call's result, with one infotext per image (ControlNet units as sd-webui-controlnet writes them;
        `added`: the keys an img2img, inpainting or inpainting-model run adds, as A1111 writes them)."""
        k = params.batch_size
        all_prompts = [p for p in prompts for _ in range(k)]
        all_negatives = [n for n in negatives for _ in range(k)]
        seeds = [s for s, _ in image_seeds]
        units = {f"ControlNet {n}": c.infotext() for n, c in enumerate(controls)}
        hashes = [self._addon_hashes(p, n, w) for p, n, w in zip(prompts, negatives, wanted)]
        infotexts = [params.replace(prompt=p, negative_prompt=n, seed=s, subseed=sub).to_infotext(
            model_hash=self.model_hash, model_name=self.model_name, version=__version__,
            extra={**(added or {}), **hashes[i // k], "VAE hash": self.vae_hash, "VAE": self.vae_name, **units,
                   "NSFW": "true" if flagged else None})
            for i, (p, n, (s, sub), flagged) in enumerate(zip(all_prompts, all_negatives, image_seeds, nsfw))]
        return GenerationResult(pil, latents, seeds, all_prompts, all_negatives, infotexts, nsfw,
                                [sub for _, sub in image_seeds])

    @property
    def inpainting_unet(self) -> bool:
        """Whether the U-Net is an inpainting one: 5 more input channels for a mask and masked-image latents."""
        return self.unet.config.in_channels == 9

    def eps(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cache=None,
            timestep_cond=None, uncond_rows: int | None = None, **residuals) -> torch.Tensor:
        """The U-Net as an eps model: x_in and context in the model's dtype (EpsDenoiser casts them); residuals:
        ControlNet's (UNet.forward's down_block_additional_residuals, mid_block_additional_residual). uncond_rows
        (which rows the guidance wrapper ran unconditional, for ControlledEps) is not the U-Net's concern."""
        guidance = {} if timestep_cond is None else {"timestep_cond": timestep_cond}  # LCM U-Nets only
        return self.unet(x_in, t, context, cache=cache, **guidance, **residuals)

    def _control_units(self, controls, params: GenerationParams) -> tuple[list, list]:
        """The units of the first pass and of hires fix's second pass (params.enable_hr; the hint made again at the
        second pass's image size), each where its hr_option runs it (controls.Control.runs_in)."""
        if not params.enable_hr:
            return [self._control_unit(c, params.width, params.height) for c in controls], []
        f = self.downscale
        size = hires.target_size(params.width, params.height, params.hr_scale, params.hr_resize_x,
                                 params.hr_resize_y, f).image_size(f)
        return ([self._control_unit(c, params.width, params.height) for c in controls if c.runs_in(False)],
                [self._control_unit(c, *size) for c in controls if c.runs_in(True)])

    def _control_unit(self, control: controlnets.Control, width: int, height: int) -> controlnets.ActiveControl:
        """A checked Control with its ControlNet (loaded once per path, to fit this U-Net) and its hint at the hint
        size for a width x height image."""
        net = control.model
        if not isinstance(net, ControlNet):
            path = Path(net).expanduser().resolve()
            if path not in self.controlnets:
                self.controlnets[path] = load_controlnet(path, like=self.unet.config, device=self.device,
                                                         dtype=self.dtype)
            net = self.controlnets[path]
        f = net.config.hint_downscale
        hint = control.hint(width // self.downscale * f, height // self.downscale * f)
        return controlnets.ActiveControl(control, net, hint.to(self.device, self.dtype))

    def conditioning(self, prompt: str, negative: str, calls: int, clip_skip: int = 1):
        """The prompt's AND sub-prompts as (weight, schedule) and the negative prompt's schedule, each schedule
        [(end call, embedding)] over `calls` denoiser calls: A1111's prompt editing ([from:to:when], [a|b]) and
        composition (prompt_schedule.py). Each text at its own length (ScheduledCFGDenoiser brings them together as
        A1111 does)."""
        subs = composable_schedules(prompt, calls)
        negatives = prompt_schedule(negative, calls)
        texts = [text for sub in subs for _, text in sub.schedule] + [text for _, text in negatives]
        embeddings = {text: self.prompts.encode(text, clip_skip) for text in dict.fromkeys(texts)}
        conds = [(sub.weight, [(end, embeddings[text]) for end, text in sub.schedule]) for sub in subs]
        return conds, [(end, embeddings[text]) for end, text in negatives]

    def denoiser(self, plan: samplers.SamplingPlan, cond: torch.Tensor, uncond: torch.Tensor | None,
                 cfg_scale: float, *, model: Callable | None = None) -> ScheduledCFGDenoiser:
        """The guided denoiser D(x, sigma) a sampler steps with: `model` (default `self.eps`) in the model's
        dtype, at the timesteps `plan` (samplers.prepare) maps its sigmas to, guided by cond/uncond embeddings.
        An LCM U-Net (time_cond_proj_dim) takes the guidance scale as an embedding instead and runs once, on cond
        only, as diffusers runs it."""
        return self.scheduled_denoiser(plan, [(1.0, [(1, cond)])], None if uncond is None else [(1, uncond)],
                                       cfg_scale, model=model)

    def scheduled_denoiser(self, plan: samplers.SamplingPlan, conds, uncond, cfg_scale: float, *,
                           model: Callable | None = None,
                           min_uncond: tuple[float, bool] = (0.0, False),
                           skip_early: float = 0.0, pad: torch.Tensor | None = None) -> ScheduledCFGDenoiser:
        """`denoiser` with conditioning schedules (`conditioning`'s), for one run: it counts its calls. min_uncond:
        (A1111's NGMS level, on all calls), compared with the sigma, or the timestep for A1111's timestep samplers;
        skip_early: A1111's skip_early_cond, over the plan's steps times calls_per_step; pad: the empty prompt's
        embedding where prompt and negative prompt are to be padded to one length (A1111's pad_cond_uncond)."""
        model = model or self.eps
        dim = self.unet.config.time_cond_proj_dim
        if dim is not None:
            w = guidance_scale_embedding(torch.full((1,), cfg_scale - 1.0), dim).to(self.device, self.dtype)
            model, cfg_scale = functools.partial(model, timestep_cond=w), 1.0
        return ScheduledCFGDenoiser(EpsDenoiser(model, plan.sigma_to_t, self.dtype), conds, uncond, cfg_scale,
                                    min_uncond=min_uncond[0], min_uncond_all=min_uncond[1],
                                    level=plan.sigma_to_t if plan.sampler.timestep_space else None,
                                    skip_early=skip_early,
                                    total_calls=(len(plan.sigmas) - 1) * plan.sampler.calls_per_step, pad=pad)

    def _step_callback(self, batch, batches, total, callback, cancel, progress):
        """A sampler callback for one prompt's run: the progress bar, the user's callback, cancellation."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="step", desc=f"image {batch + 1}/{batches}" if batches > 1 else None,
                       leave=True)

        def step(d):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(StepInfo(d["i"] + 1, total, batch, batches, float(d["sigma"]), d["x"], d.get("denoised")))
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation was cancelled")

        step.close = bar.close if bar is not None else (lambda: None)
        return step


def _nan_cause(dtype: torch.dtype, loras: lora.LoraSet) -> str:
    """What most likely made NaN latents, for the error message."""
    if dtype == torch.float16:
        return "(a float16 overflow?); retry with dtype float32 or bfloat16"
    merged = " or the LoRAs merged into them" if any(loras.applied.values()) else ""
    if dtype == torch.bfloat16:
        return f"in bfloat16: the model's weights{merged} hold NaN/inf, or bfloat16 rounding; retry with dtype float32"
    return f"in {str(dtype).removeprefix('torch.')}: the model's weights{merged} hold NaN/inf or overflow"


def _demo_lcm() -> weights.Checkpoint:
    """The demo checkpoint with DEMO_LCM_UNET's U-Net (config and weights) in place of its own; named by that
    folder's parent, so that the model name is "demo-lcm" and its hash the LCM U-Net's."""
    ckpt = weights.load_checkpoint(DEMO_DIR)
    config = UNetConfig.from_dict(weights.read_json_object(DEMO_LCM_UNET / "config.json"),
                                  source=str(DEMO_LCM_UNET / "config.json"))
    _, unet = weights.read_component(DEMO_LCM_UNET, ("diffusion_pytorch_model",))
    return replace(ckpt, path=str(DEMO_LCM_UNET.parent), unet_config=config, unet=unet)


def _weights_file(path: Path) -> Path | None:
    """The file whose hash identifies the model: the single file itself, or a folder's U-Net weights."""
    if path.is_file():
        return path
    for pattern in ("unet/diffusion_pytorch_model*.safetensors", "unet/diffusion_pytorch_model*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    return None

