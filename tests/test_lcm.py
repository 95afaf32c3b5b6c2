"""LCM and TCD: timesteps, sampling and img2img against diffusers' LCMScheduler / TCDScheduler stepping loops, and
the U-Net's guidance embedding (time_cond_proj_dim) against UNet2DConditionModel. diffusers is the test oracle only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stablediff.config import UNetConfig
from stablediff.denoiser import EpsDenoiser
from stablediff.samplers import get_sampler, prepare
from stablediff.schedule import NoiseSchedule
from stablediff.unet import UNet, guidance_scale_embedding

SCHEDULER_CONFIG = Path(__file__).parent / "data" / "sd15-layout" / "scheduler" / "scheduler_config.json"
CFG = json.loads(SCHEDULER_CONFIG.read_text())
NS = NoiseSchedule.from_json(SCHEDULER_CONFIG)
SHAPE = (2, 4, 6, 6)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def diffusers_scheduler(name: str, steps: int, strength: float = 1.0, config: dict = CFG):
    import diffusers

    scheduler = getattr(diffusers, get_sampler(name)[0].diffusers_class).from_config(config)
    scheduler.set_timesteps(steps, strength=strength)
    return scheduler


@pytest.fixture(scope="module")
def eps_model():
    """A tiny random eps model that depends on the timestep: a 3x3 convolution, squashed, plus a term in t."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def model(x, t):
        t = torch.as_tensor(t).float().reshape(-1, 1, 1, 1)
        with torch.no_grad():
            return torch.tanh(conv(x) * (1 + t / 1000)) + 0.1 * torch.sin(t / 100)
    return model


def reference(name, eps_model, steps, generator, strength=1.0, init=None, eta=0.3, config=CFG):
    """diffusers' loop as its pipelines drive it: txt2img from unit noise (init_noise_sigma 1), img2img from
    add_noise(init, noise, timesteps[0]) (LatentConsistencyModelImg2ImgPipeline)."""
    scheduler = diffusers_scheduler(name, steps, strength, config)
    noise = torch.randn(SHAPE, generator=generator)
    x = noise if init is None else scheduler.add_noise(init, noise, scheduler.timesteps[:1])
    extra = {"eta": eta} if name == "tcd" else {}
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, t), t, x, generator=generator, **extra).prev_sample
    return x


def ours(name, eps_model, steps, generator, strength=1.0, init=None, ns=NS, **options):
    plan = prepare(name, ns, steps, strength=strength)
    noise = torch.randn(SHAPE, generator=generator)
    x = noise * plan.init_noise_scale if init is None else init + plan.sigmas[0] * noise
    x = plan.sample(EpsDenoiser(eps_model, plan.sigma_to_t), x, generator=generator, **options)
    return plan.finish(x)


def assert_parity(ours, ref, rel=1e-5):
    err = (ours - ref).abs().max().item()
    bound = rel * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max abs diff {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("name", ["lcm", "tcd"])
@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (50, 1.0), (4, 0.5), (3, 0.06)])
def test_timesteps_and_sigmas_equal_diffusers(name, steps, strength):
    plan = prepare(name, NS, steps, strength=strength)
    ref = diffusers_scheduler(name, steps, strength)
    assert torch.equal(plan.timesteps, ref.timesteps.float()), (plan.timesteps, ref.timesteps)
    a = ref.alphas_cumprod[ref.timesteps]
    torch.testing.assert_close(plan.sigmas[:-1], ((1 - a) / a) ** 0.5, rtol=1e-6, atol=0)
    assert torch.equal(plan.sigma_to_t(plan.sigmas[:-1]), plan.timesteps)  # the U-Net gets the integer timesteps
    # LCM ends on its last consistency output (data), TCD on its x_s at s = 0: sigma(t=0)
    assert float(plan.sigmas[-1]) == (0.0 if name == "lcm" else pytest.approx(0.029168, abs=1e-6))
    assert plan.init_noise_scale == pytest.approx((1 + float(plan.sigmas[0]) ** 2) ** 0.5, rel=1e-7)


def test_lcm_timesteps_pinned():
    assert prepare("lcm", NS, 4).timesteps.tolist() == [999, 759, 499, 259]
    assert prepare("tcd", NS, 4, strength=0.5).timesteps.tolist() == [499, 379, 259, 139]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_equals_diffusers(eps_model, steps):
    ref = reference("lcm", eps_model, steps, torch.Generator().manual_seed(1))
    assert_parity(ours("lcm", eps_model, steps, torch.Generator().manual_seed(1)), ref)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("eta", [0.3, 0.0, 1.0])
def test_tcd_equals_diffusers(eps_model, steps, eta):
    ref = reference("tcd", eps_model, steps, torch.Generator().manual_seed(1), eta=eta)
    assert_parity(ours("tcd", eps_model, steps, torch.Generator().manual_seed(1), eta=eta), ref)


def test_tcd_eta_defaults_to_0_3(eps_model):
    ref = reference("tcd", eps_model, 4, torch.Generator().manual_seed(2), eta=0.3)
    assert_parity(ours("tcd", eps_model, 4, torch.Generator().manual_seed(2)), ref)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_equals_diffusers(eps_model, name):
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = reference(name, eps_model, 4, torch.Generator().manual_seed(1), strength=0.6, init=init)
    assert_parity(ours(name, eps_model, 4, torch.Generator().manual_seed(1), strength=0.6, init=init), ref)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_the_lowest_timesteps_equal_diffusers(eps_model, name):
    """Timesteps 3, 2, 1, 0 (a 1000-step distillation schedule at strength 0.004), where LCM's boundary condition
    matters: c_skip(1) = 0.0025, and at t = 0 f is the sample itself."""
    config = dict(CFG, original_inference_steps=1000)
    assert prepare(name, NoiseSchedule.from_config(config), 4, strength=0.004).timesteps.tolist() == [3, 2, 1, 0]
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = reference(name, eps_model, 4, torch.Generator().manual_seed(1), 0.004, init, config=config)
    x = ours(name, eps_model, 4, torch.Generator().manual_seed(1), 0.004, init, NoiseSchedule.from_config(config))
    assert_parity(x, ref)


def test_lcm_scalings_equal_diffusers():
    from diffusers import LCMScheduler

    from stablediff.samplers import lcm_scalings

    ref = LCMScheduler.from_config(CFG)
    for t in (0, 1, 19, 259, 999):
        assert lcm_scalings(torch.tensor(float(t))) == ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))


@pytest.mark.parametrize("name,eta,draws", [("lcm", 0.3, 3), ("tcd", 0.3, 3), ("tcd", 0.0, 0)])
def test_noise_is_drawn_on_every_step_but_the_last(name, eta, draws):
    plan = prepare(name, NS, 4)
    gen = torch.Generator().manual_seed(0)
    options = {"eta": eta} if name == "tcd" else {}
    plan.sample(lambda x, sigma: x * 0.5, torch.zeros(2, 3), generator=gen, **options)
    expected = torch.Generator().manual_seed(0)
    for _ in range(draws):
        torch.randn(2, 3, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())


def test_bad_steps_strength_and_eta_are_errors():
    with pytest.raises(ValueError, match="51 steps"):
        prepare("lcm", NS, 51)
    with pytest.raises(ValueError, match="strength 0.1"):
        prepare("tcd", NS, 6, strength=0.1)  # int(50 * 0.1) = 5 distillation timesteps for 6 steps
    with pytest.raises(ValueError, match="karras"):
        prepare("lcm", NS, 4, schedule="karras")
    with pytest.raises(ValueError, match="eta"):
        prepare("tcd", NS, 4).sample(lambda x, sigma: x, torch.zeros(1), eta=1.5)
    with pytest.raises(ValueError, match="original_inference_steps"):
        NoiseSchedule.from_config(dict(CFG, original_inference_steps=2000))
    with pytest.raises(ValueError, match="timestep_scaling"):
        NoiseSchedule.from_config(dict(CFG, timestep_scaling=5.0))


def test_original_inference_steps_from_the_config_applies_as_in_diffusers():
    import diffusers

    ns = NoiseSchedule.from_config(dict(CFG, original_inference_steps=25))
    ref = diffusers.LCMScheduler.from_config(dict(CFG, original_inference_steps=25))
    ref.set_timesteps(4)
    assert torch.equal(prepare("lcm", ns, 4).timesteps, ref.timesteps.float())


@pytest.mark.parametrize("name,eta", [("lcm", None), ("tcd", 0.3), ("tcd", 0.0)])
def test_stable_diffusion_pipeline_parity(name, eta):
    """StableDiffusionPipeline with the scheduler and classifier-free guidance, on a tiny random U-Net (no guidance
    embedding); it hands the scheduler's step its own `eta` argument (0 unless given)."""
    from diffusers import StableDiffusionPipeline

    from conftest import TINY_UNET, diffusers_unet
    from stablediff.denoiser import CFGDenoiser

    unet = diffusers_unet(TINY_UNET, seed=0)
    cond, uncond = torch.randn(2, 1, 7, 32, generator=torch.Generator().manual_seed(1))
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=diffusers_scheduler(name, 4), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    options = {} if eta is None else {"eta": eta}
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, guidance_scale=7.5,
                   height=64, width=64, output_type="latent", generator=torch.Generator().manual_seed(3),
                   **options).images
        plan = prepare(name, NS, 4)
        gen = torch.Generator().manual_seed(3)
        model = lambda x, t, context: unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
        denoiser = CFGDenoiser(EpsDenoiser(model, plan.sigma_to_t), cond, uncond, 7.5)
        x = plan.sample(denoiser, torch.randn(1, 4, 8, 8, generator=gen) * plan.init_noise_scale, generator=gen,
                        **options)
    assert_parity(plan.finish(x), ref, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the U-Net's guidance embedding (LCM checkpoints' time_cond_proj_dim)


@pytest.mark.parametrize("dim", [256, 7])
def test_guidance_scale_embedding_equals_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.5 - 1, 0.0, 3.25])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_scale_embedding(w, dim), ref)


def test_unet_with_time_cond_proj_dim_equals_diffusers():
    from conftest import TINY_UNET, diffusers_unet

    ref = diffusers_unet(dict(TINY_UNET, time_cond_proj_dim=16), seed=3)
    with torch.no_grad():  # random weights for the projection, large enough to matter
        ref.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    cfg = UNetConfig.from_dict(dict(ref.config))
    assert cfg.time_cond_proj_dim == 16
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    t, cond = torch.tensor([999.0, 259.0]), guidance_scale_embedding(torch.tensor([7.0, 1.5]), 16)
    with torch.no_grad():
        expected = ref(x, t, ctx, timestep_cond=cond).sample
        assert_parity(model(x, t, ctx, timestep_cond=cond), expected)
        assert_parity(model(x, t, ctx), ref(x, t, ctx).sample)  # no condition: the timestep embedding alone
        assert (model(x, t, ctx) - expected).abs().max() > 1e-3  # the condition matters


def test_timestep_cond_without_time_cond_proj_dim_is_an_error():
    from conftest import TINY_UNET

    model = UNet(UNetConfig.from_dict(TINY_UNET))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        model(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 7, 32), timestep_cond=torch.zeros(1, 16))


def test_an_lcm_unet_runs_once_per_step_with_its_guidance_embedding_as_diffusers(tmp_path):
    """A full LCM checkpoint (U-Net time_cond_proj_dim) through our pipeline equals StableDiffusionPipeline with
    LCMScheduler: no unconditional pass, the guidance scale fed as w = cfg - 1 through the embedding."""
    import diffusers

    from conftest import SD15, tiny_diffusers_pipeline
    from stablediff import StableDiffusion

    scheduler = diffusers.LCMScheduler.from_pretrained(str(SD15), subfolder="scheduler")
    ref = tiny_diffusers_pipeline(unet_overrides={"time_cond_proj_dim": 16}, scheduler=scheduler)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "lcm")
    ours = StableDiffusion.from_pretrained(tmp_path / "lcm")
    calls = []
    ours.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        want = ref("a red cat", num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   output_type="latent", generator=torch.Generator().manual_seed(11)).images
    got = ours("a red cat", steps=4, cfg_scale=6.0, seed=11, sampler="lcm", width=64, height=64)
    assert calls == [1] * 4  # one pass a step, batch 1: no unconditional half
    assert_parity(got.latents, want, rel=1e-4)
