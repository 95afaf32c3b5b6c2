"""Samplers, denoiser wrappers and plans against diffusers' schedulers (the oracle), and against exact solutions.

diffusers is imported here only, as the test oracle. Shapes are tiny: the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stablediff.denoiser import CFGDenoiser, EpsDenoiser
from stablediff.samplers import SAMPLERS, get_sampler, prepare
from stablediff.schedule import NoiseSchedule

SCHEDULER_CONFIG = Path(__file__).parent / "data" / "sd15-layout" / "scheduler" / "scheduler_config.json"
CFG = json.loads(SCHEDULER_CONFIG.read_text())
NS = NoiseSchedule.from_json(SCHEDULER_CONFIG)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2 chatter

# A1111's are in tests/test_a1111.py; those that take plan fields beyond the sigmas (LCM, TCD) in tests/test_lcm.py
DIFFUSERS = {name: s for name, s in SAMPLERS.items() if s.family == "diffusers" and not s.plan_args}
VARIANTS = [(name, karras) for name, s in DIFFUSERS.items() for karras in ((False, True) if s.supports_karras else (False,))]
VARIANT_IDS = [f"{n}-karras" if k else n for n, k in VARIANTS]
DOUBLED = ("heun", "dpm2", "dpm2_a")  # diffusers lists two model calls per step in `timesteps`


def diffusers_scheduler(name: str, karras: bool = False, steps: int | None = None):
    import diffusers

    s = SAMPLERS[name]
    kwargs = dict(s.diffusers_kwargs, **({"use_karras_sigmas": True} if karras else {}))
    scheduler = getattr(diffusers, s.diffusers_class).from_config(CFG, **kwargs)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def per_step(name: str, values: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' per-model-call `timesteps` reduced to one entry per step (the first call of each)."""
    if name in DOUBLED:
        return values[0::2]
    if name == "pndm" and steps > 1:  # PLMS visits its second timestep twice
        return torch.cat([values[:1], values[2:]])
    return values


def diffusers_sigmas(name: str, scheduler, steps: int) -> torch.Tensor:
    """The sigma of each step plus where sampling ends, from the scheduler's own state."""
    if name in ("ddim", "pndm", "ddpm"):  # VP schedulers without sigmas: from alphas_cumprod at the timesteps
        a = scheduler.alphas_cumprod
        t = per_step(name, scheduler.timesteps, steps)
        final = {"ddpm": torch.tensor(1.0)}.get(name, getattr(scheduler, "final_alpha_cumprod", None))
        a = torch.cat([a[t], final.reshape(1)])
        return ((1 - a) / a) ** 0.5
    if name in DOUBLED:
        return torch.cat([scheduler.sigmas[0::2], scheduler.sigmas[-1:]]) if name == "heun" else scheduler.sigmas[0::2]
    return scheduler.sigmas


# ---------------------------------------------------------------------------------------------------------------
# 1. timesteps and sigmas


def test_euler_30_steps_pinned():
    plan = prepare("euler", NS, 30)
    assert plan.timesteps[:3].tolist() == pytest.approx([999.0, 964.5517, 930.1035], abs=1e-4)
    assert plan.sigmas[-1] == 0 and len(plan.sigmas) == 31
    assert plan.init_noise_scale == pytest.approx(14.6146, abs=1e-4)
    assert float(plan.sigma_to_t(plan.sigmas[1])) == float(plan.timesteps[1])  # exact at the plan's own sigmas


@pytest.mark.parametrize("name,karras", VARIANTS, ids=VARIANT_IDS)
def test_timesteps_and_sigmas_equal_diffusers(name, karras):
    for steps in (1, 2, 20, 30, 50):
        plan = prepare(name, NS, steps, schedule="karras" if karras else None)
        ref = diffusers_scheduler(name, karras, steps)
        assert torch.equal(plan.timesteps, per_step(name, ref.timesteps, steps).float()), (steps, ref.timesteps)
        ref_sigmas = diffusers_sigmas(name, ref, steps).float()
        if name in ("ddim", "pndm", "ddpm"):
            torch.testing.assert_close(plan.sigmas, ref_sigmas, rtol=1e-6, atol=0)
        else:
            assert torch.equal(plan.sigmas, ref_sigmas), (steps, plan.sigmas, ref_sigmas)
        torch.testing.assert_close(plan.sigma_to_t(plan.sigmas[:-1]), plan.timesteps, rtol=0, atol=0)
        vp_scale = math.sqrt(float(plan.sigmas[0]) ** 2 + 1)
        expected = float(ref.init_noise_sigma) * (vp_scale if SAMPLERS[name].vp_init else 1)
        assert plan.init_noise_scale == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["dpm2", "dpm2_a"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm2_midpoints_and_their_timesteps_equal_diffusers(name, karras):
    steps = 10
    plan = prepare(name, NS, steps, schedule="karras" if karras else None)
    ref = diffusers_scheduler(name, karras, steps)
    seen = []  # (sigma, t) of every model call
    model = lambda x, t: (seen.append(t.item()), torch.zeros_like(x))[1]  # noqa: E731
    denoiser = EpsDenoiser(model, plan.sigma_to_t)
    gen = torch.Generator().manual_seed(0)
    plan.sampler.fn(denoiser, torch.randn(1, 1, 2, 2), plan.sigmas, generator=gen)
    torch.testing.assert_close(torch.tensor(seen), ref.timesteps.float(), rtol=0, atol=2e-3)


def test_final_sigmas_and_finish():
    assert prepare("ddim", NS, 10).sigmas[-1] == pytest.approx(0.029168, abs=1e-6)  # sigma(t=0), set_alpha_to_one false
    assert prepare("deis", NS, 10).sigmas[-1] == pytest.approx(0.029168, abs=1e-6)
    assert prepare("ddpm", NS, 10).sigmas[-1] == 0
    plan = prepare("ddim", NS, 10)
    x = torch.ones(3)
    torch.testing.assert_close(plan.finish(x), x / math.sqrt(1 + 0.029168**2), rtol=1e-6, atol=0)
    assert torch.equal(prepare("euler", NS, 10).finish(x), x)
    one = NoiseSchedule.from_config(dict(CFG, set_alpha_to_one=True))
    assert prepare("ddim", one, 10).sigmas[-1] == 0


# ---------------------------------------------------------------------------------------------------------------
# 2. parity with diffusers' StableDiffusionPipeline on a tiny random U-Net


@pytest.fixture(scope="module")
def tiny():
    from diffusers import UNet2DConditionModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a U-Net this small runs ~10x faster on one thread than on contended ones
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    torch.manual_seed(1)
    cond, uncond = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    yield unet, cond, uncond
    torch.set_num_threads(threads)


def reference_latents(unet, name, karras, steps, cond, uncond, generator):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=diffusers_scheduler(name, karras), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=7.5,
                    height=64, width=64, output_type="latent", generator=generator).images


def our_latents(unet, name, karras, steps, cond, uncond, generator):
    plan = prepare(name, NS, steps, schedule="karras" if karras else None)
    shape = (cond.shape[0], 4, 8, 8)
    if isinstance(generator, list):  # randn_tensor's draw with one generator per batch element
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator)
    model = lambda x, t, context: unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
    denoiser = CFGDenoiser(EpsDenoiser(model, plan.sigma_to_t), cond, uncond, 7.5)
    with torch.no_grad():
        x = plan.sampler.fn(denoiser, noise * plan.init_noise_scale, plan.sigmas, generator=generator)
    return plan.finish(x)


def assert_parity(ours, ref, rel=5e-4):
    err = (ours - ref).abs().max().item()
    bound = rel * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max abs diff {err:.3g} > {bound:.3g}"
    return err


@pytest.mark.parametrize("name,karras", VARIANTS, ids=VARIANT_IDS)
def test_pipeline_parity(tiny, name, karras):
    unet, cond, uncond = tiny
    steps = 10
    ref = reference_latents(unet, name, karras, steps, cond[:1], uncond[:1], torch.Generator().manual_seed(3))
    ours = our_latents(unet, name, karras, steps, cond[:1], uncond[:1], torch.Generator().manual_seed(3))
    assert_parity(ours, ref)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde"])
def test_pipeline_parity_with_a_generator_per_image(tiny, name):
    unet, cond, uncond = tiny

    def gens():
        return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]

    ref = reference_latents(unet, name, False, 8, cond, uncond, gens())
    ours = our_latents(unet, name, False, 8, cond, uncond, gens())
    assert_parity(ours, ref)
    # the second image is the one a lone generator seeded 8 makes, up to the rounding that running it in another
    # batch size changes (the kernels differ by CPU): bounded by what the reference itself shows for the same
    alone = our_latents(unet, name, False, 8, cond[1:], uncond[1:], torch.Generator().manual_seed(8))
    ref_alone = reference_latents(unet, name, False, 8, cond[1:], uncond[1:], torch.Generator().manual_seed(8))
    noise = (ref[1:] - ref_alone).abs().max().item()
    torch.testing.assert_close(ours[1:], alone, rtol=0, atol=max(1e-5, 4 * noise))


@pytest.mark.parametrize("karras", [False, True])
def test_unipc_third_order_equals_diffusers(karras):
    """The general-order UniPC path (linear solves for the predictor too), against the scheduler's own loop."""
    from stablediff.samplers import sample_unipc

    def eps_model(x, t):  # a smooth toy eps model that depends on t
        t = t.reshape(-1, *[1] * (x.ndim - 1)).float()
        return torch.tanh(x * (1 + t / 1000)) * 0.9 + 0.1 * torch.sin(t / 100)

    ref = diffusers_scheduler("unipc", karras)
    ref = type(ref).from_config(ref.config, solver_order=3)
    ref.set_timesteps(12)
    x0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x = x0
    for t in ref.timesteps:
        x = ref.step(eps_model(x, t.expand(1)), t, x).prev_sample
    plan = prepare("unipc", NS, 12, schedule="karras" if karras else None)
    ours = sample_unipc(EpsDenoiser(eps_model, plan.sigma_to_t), x0 * plan.init_noise_scale, plan.sigmas, order=3)
    assert_parity(plan.finish(ours), x, rel=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# 3. img2img strength


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "heun", "ddim", "dpm2", "unipc", "lms", "pndm"])
def test_img2img_plan_equals_diffusers_get_timesteps(name):
    steps, strength = 10, 0.6
    plan = prepare(name, NS, steps, strength=strength)
    ref = diffusers_scheduler(name, False, steps)
    # StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    if name == "pndm":  # the slice starts past PLMS' repeated timestep: one step more, each timestep once
        assert len(plan.sigmas) - 1 == init_timestep + 1 and torch.equal(plan.timesteps, timesteps.float())
    else:
        assert len(plan.sigmas) - 1 == init_timestep == 6
        assert torch.equal(plan.timesteps, per_step(name, timesteps, steps).float())
    # the first sigma is where diffusers' add_noise puts the image
    x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    noisy = ref.add_noise(x0, noise, timesteps[:1])
    if SAMPLERS[name].vp_init:  # VP: sqrt(a) x0 + sqrt(1 - a) noise, i.e. sigma = sqrt((1 - a) / a)
        noisy = noisy / (1 - noisy**2) ** 0.5
    torch.testing.assert_close(noisy.flatten()[0], plan.sigmas[0], rtol=1e-5, atol=0)
    assert plan.init_noise_scale == prepare(name, NS, steps).init_noise_scale


@pytest.mark.parametrize("name,draws", [("euler_a", 6), ("ddpm", 6), ("dpmpp_2m_sde", 6), ("dpm2_a", 5), ("euler", 0)])
def test_noise_draws_per_run(name, draws):
    """Noise comes from the generator at diffusers' points: Euler a, DDPM and DPM++ 2M SDE on every step (the last
    included), DPM2 a on every step but the last."""
    plan = prepare(name, NS, 6)
    gen = torch.Generator().manual_seed(0)
    plan.sampler.fn(gaussian_denoiser, torch.zeros(2, 3), plan.sigmas, generator=gen)
    expected = torch.Generator().manual_seed(0)
    for _ in range(draws):
        torch.randn(2, 3, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())


def test_strength_too_small_is_an_error():
    with pytest.raises(ValueError, match="strength"):
        prepare("euler", NS, 10, strength=0.05)


# ---------------------------------------------------------------------------------------------------------------
# 4. analytic checks: Gaussian data has the exact denoiser D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)

MU, S = 0.5, 0.7


def gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


# DDIM CFG++ steps with the unconditional prediction apart (tests/test_a1111.py runs it under guidance)
DETERMINISTIC = [n for n, s in SAMPLERS.items() if not s.stochastic and not s.plan_args and not s.needs_uncond]
# LCM (consistency sampling) maps to the denoiser's mean at every step: its spread is not the data's
STOCHASTIC = [n for n, s in SAMPLERS.items() if s.stochastic and not s.plan_args and n != "LCM"]


def geometric_sigmas(steps: int) -> torch.Tensor:
    """14.6 down to 0.002 evenly in log-sigma, then 0: a schedule whose last jump to 0 is too small to matter."""
    return torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(2e-3), steps)), torch.zeros(1)])


def ode_error(name: str, steps: int) -> float:
    sigmas = geometric_sigmas(steps)
    x_T = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * torch.linspace(-3, 3, 101)
    x = SAMPLERS[name].fn(gaussian_denoiser, x_T, sigmas)
    exact = MU + (x_T - MU) * S / math.sqrt(S**2 + float(sigmas[0]) ** 2)  # the probability-flow ODE at sigma 0
    return (x - exact).abs().max().item() / S


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_solve_the_probability_flow_ode(name):
    err_100, err_200 = ode_error(name, 100), ode_error(name, 200)
    if name in ("euler", "ddim", "Euler", "DDIM"):  # first order: the error halves with twice the steps
        assert err_100 < 0.08 and err_200 < 0.55 * err_100, (err_100, err_200)
    else:
        assert err_100 < 5e-3 and err_200 < 2e-3, (err_100, err_200)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_sample_the_data_distribution(name):
    sigmas = geometric_sigmas(200)
    gen = torch.Generator().manual_seed(0)
    x_T = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * torch.randn(20000, generator=gen)
    x = SAMPLERS[name].fn(gaussian_denoiser, x_T, sigmas, generator=gen)
    assert abs(x.mean().item() - MU) < 0.03 * S
    assert abs(x.std().item() / S - 1) < 0.03


def test_deterministic_samplers_converge_on_their_own_plans():
    """With each class' own sigmas (ending at sigma(t=0) for DDIM/PNDM/DEIS), 200 steps land near the ODE solution
    at the last sigma; what remains is the final first-order jump from a small sigma to 0."""
    for name in DETERMINISTIC:
        plan = prepare(name, NS, 200)
        sigma_T, sigma_end = float(plan.sigmas[0]), float(plan.sigmas[-1])
        x_T = MU + math.sqrt(S**2 + sigma_T**2) * torch.linspace(-3, 3, 101)
        x = plan.sampler.fn(gaussian_denoiser, x_T, plan.sigmas)
        exact = MU + (x_T - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_T**2)
        assert (x - exact).abs().max().item() / S < 0.035, name


# ---------------------------------------------------------------------------------------------------------------
# 5. names, guidance wrapper, callbacks, config


NAMES = {  # name -> (canonical name, schedule)
    "Euler": ("Euler", None), "Euler a": ("Euler a", None), "euler a": ("Euler a", None), "Heun": ("Heun", None),
    "LMS Karras": ("LMS", "karras"), "DPM2 a Karras": ("DPM2 a", "karras"), "DPM++ 2M": ("DPM++ 2M", None),
    "DPM++ 2M Karras": ("DPM++ 2M", "karras"), "DPM++ 2M SDE Heun": ("DPM++ 2M SDE Heun", None),
    "DPM++ 2M SDE Heun Exponential": ("DPM++ 2M SDE Heun", "exponential"), "k_dpmpp_2m": ("DPM++ 2M", None),
    "Euler SGM Uniform": ("Euler", "sgm_uniform"), "DPM++ 3M SDE Align Your Steps": ("DPM++ 3M SDE", "align_your_steps"),
    "DDIM": ("DDIM", None), "PLMS": ("PLMS", None), "UniPC": ("UniPC", None), "plms": ("pndm", None),
    "ddim": ("ddim", None), "unipc": ("unipc", None), "DDPM": ("ddpm", None),
    "DEIS": ("deis", None), "euler_a": ("euler_a", None), "EULER_A": ("euler_a", None), "dpmpp_2m": ("dpmpp_2m", None),
    "dpmpp_2m karras": ("dpmpp_2m", "karras"), "euler_ancestral": ("euler_a", None), "pndm": ("pndm", None),
}


@pytest.mark.parametrize("label", list(NAMES))
def test_get_sampler_names(label):
    s, schedule = get_sampler(label)
    assert (s.name, schedule) == NAMES[label]
    assert s.family == ("diffusers" if s.name.islower() else "a1111")


def test_every_sampler_has_a_label_that_finds_it():
    for name, s in SAMPLERS.items():
        assert get_sampler(s.label) == (s, None) and get_sampler(name) == (s, None)
        for alias in s.aliases:
            assert get_sampler(alias) == (s, None)


def test_unknown_and_ambiguous_sampler_names():
    with pytest.raises(ValueError, match="unknown sampler 'xyz'; choose one of: .*euler.*DPM\\+\\+ 2M"):
        get_sampler("xyz")
    with pytest.raises(ValueError, match="sampler 'HEUN' is ambiguous: 'heun' or 'Heun'"):
        get_sampler("HEUN")


@pytest.mark.parametrize("name", ["euler_a karras", "ddim karras", "pndm karras"])
def test_karras_where_diffusers_has_none_is_an_error(name):
    with pytest.raises(ValueError, match="karras"):
        get_sampler(name)
    with pytest.raises(ValueError, match="karras"):
        prepare(name.rsplit(" ", 1)[0], NS, 10, schedule="karras")


def test_diffusers_samplers_take_only_karras_and_unknown_schedules_are_listed():
    with pytest.raises(ValueError, match="'euler' reproduces diffusers' EulerDiscreteScheduler, which has no "
                                         "'exponential' schedule"):
        prepare("euler", NS, 10, schedule="exponential")
    with pytest.raises(ValueError, match="schedule 'exotic' is not known; choose one of: automatic, uniform, karras"):
        prepare("Euler", NS, 10, schedule="exotic")
    assert prepare("euler", NS, 10, schedule="automatic").schedule is None


class CountingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context):
        self.calls.append((x.shape[0], context.clone()))
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_cfg_runs_one_batch_uncond_then_cond():
    inner = CountingModel()
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 1.0)
    d = CFGDenoiser(inner, cond, uncond, 7.5)(torch.zeros(2, 4, 2, 2), torch.tensor(3.0))
    assert len(inner.calls) == 1 and inner.calls[0][0] == 4
    assert torch.equal(inner.calls[0][1], torch.cat([uncond, cond]))
    torch.testing.assert_close(d, torch.full_like(d, 1 + 7.5 * (2 - 1)))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cfg_at_scale_one_or_less_runs_cond_only(scale):
    inner = CountingModel()
    cond = torch.full((1, 3, 4), 2.0)
    d = CFGDenoiser(inner, cond, None, scale)(torch.zeros(2, 4, 2, 2), 3.0)
    assert [c[0] for c in inner.calls] == [2] and torch.equal(inner.calls[0][1], cond.expand(2, 3, 4))
    assert torch.equal(d, torch.full_like(d, 2.0))


def test_eps_denoiser_scales_the_input_and_feeds_the_timestep():
    plan = prepare("euler", NS, 30)
    seen = {}

    def model(x_in, t):
        seen.update(x_in=x_in, t=t)
        return torch.ones_like(x_in)

    sigma = plan.sigmas[1]
    x = torch.full((2, 4, 2, 2), 3.0)
    d = EpsDenoiser(model, plan.sigma_to_t)(x, sigma)
    torch.testing.assert_close(seen["x_in"], x / (sigma**2 + 1) ** 0.5)
    assert seen["t"].shape == (2,) and seen["t"].dtype == torch.float32 and seen["t"][0] == plan.timesteps[1]
    torch.testing.assert_close(d, x - sigma)


def test_callback_sees_every_step_and_can_cancel():
    plan = prepare("dpmpp_2m", NS, 5)
    seen = []
    plan.sampler.fn(gaussian_denoiser, torch.zeros(3), plan.sigmas, callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2, 3, 4]

    def cancel(d):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plan.sampler.fn(gaussian_denoiser, torch.zeros(3), plan.sigmas, callback=cancel)


def test_noise_schedule_config():
    assert NoiseSchedule.from_config(None) == NoiseSchedule() == NS
    ac = NS.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    from diffusers import DDIMScheduler

    assert torch.equal(ac, DDIMScheduler.from_config(CFG).alphas_cumprod)
    torch.testing.assert_close(NS.sigmas[-1], torch.tensor(14.6146), atol=1e-4, rtol=0)
    linear = NoiseSchedule.from_config({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})
    assert torch.equal(linear.betas, DDIMScheduler(beta_schedule="linear").betas)
    cosine = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    assert torch.equal(cosine.betas, DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas)
    with pytest.raises(NotImplementedError, match="v_prediction"):
        NoiseSchedule.from_config(dict(CFG, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        NoiseSchedule.from_config(dict(CFG, rescale_betas_zero_snr=True))


def test_timestep_spacing_from_the_config_applies_as_in_diffusers():
    import diffusers

    leading = NoiseSchedule.from_config(dict(CFG, timestep_spacing="leading"))
    plan = prepare("euler", leading, 20)
    ref = diffusers.EulerDiscreteScheduler.from_config(dict(CFG, timestep_spacing="leading"))
    ref.set_timesteps(20)
    assert torch.equal(plan.timesteps, ref.timesteps) and torch.equal(plan.sigmas, ref.sigmas)
    assert plan.init_noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
