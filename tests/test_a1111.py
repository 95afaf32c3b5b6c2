"""The A1111 sampler family against k-diffusion (the code AUTOMATIC1111 v1.10 samples with) and A1111's schedule
formulas, on a tiny smooth eps model.

k-diffusion is imported here only, as the oracle: its `sampling` and `external` modules are loaded without the
package's __init__ (which pulls in torchvision, kornia and more), under a private name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from stablediff import a1111
from stablediff.denoiser import CFGDenoiser, EpsDenoiser
from stablediff.params import GenerationParams
from stablediff.samplers import SAMPLERS, a1111_timesteps, get_sampler, prepare, sampler_table
from stablediff.schedule import NoiseSchedule

NS = NoiseSchedule()
A1111 = [name for name, s in SAMPLERS.items() if s.family == "a1111"]
SEEDS = (11, 12)



def _load_kdiffusion():
    for dep in ("k_diffusion", "torchsde", "torchdiffeq", "scipy"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"the k-diffusion oracle needs {dep} (pip install -e '.[test]')")
    root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    name = "_kdiffusion_oracle"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(root)]
        utils = types.ModuleType(f"{name}.utils")
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    return importlib.import_module(f"{name}.sampling"), importlib.import_module(f"{name}.external")


@pytest.fixture(scope="module")
def kd():
    return _load_kdiffusion()


def ldm_alphas_cumprod() -> torch.Tensor:
    """LatentDiffusion.register_schedule for SD 1.x: 'linear' betas in float64, cumprod in numpy, stored float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas.numpy()), dtype=torch.float32)


class TinyEps(torch.nn.Module):
    """A small smooth eps model that depends on x and on the (fractional) timestep."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (0.5 + t.reshape(-1, 1, 1, 1) / 1000)

    def apply_model(self, x, t):  # the CompVis model interface k-diffusion's CompVisDenoiser calls
        return self(x, t)


@pytest.fixture(scope="module")
def model():
    with torch.no_grad():
        yield TinyEps().eval()


def model_sigmas(kd):
    return kd[1].CompVisDenoiser(TinyEps())


# ---------------------------------------------------------------------------------------------------------------
# 1. schedules: A1111's sd_schedulers formulas


def reference_schedule(kd, name: str, n: int) -> torch.Tensor:
    sampling, wrap = kd[0], model_sigmas(kd)
    lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    t_max, t_min = wrap.sigma_to_t(torch.tensor(hi)), wrap.sigma_to_t(torch.tensor(lo))
    if name == "uniform":
        return wrap.get_sigmas(n)
    if name == "karras":
        return sampling.get_sigmas_karras(n, lo, hi)
    if name == "exponential":
        return sampling.get_sigmas_exponential(n, lo, hi)
    if name == "polyexponential":
        return sampling.get_sigmas_polyexponential(n, lo, hi)
    if name == "sgm_uniform":
        return torch.tensor([wrap.t_to_sigma(t) for t in torch.linspace(t_max, t_min, n + 1)[:-1]] + [0.0])
    if name == "normal":
        return torch.tensor([wrap.t_to_sigma(t) for t in torch.linspace(t_max, t_min, n)] + [0.0])
    if name == "simple":
        return torch.tensor([float(wrap.sigmas[-(1 + int(i * 1000 / n))]) for i in range(n)] + [0.0])
    if name == "ddim":
        return torch.tensor([float(wrap.sigmas[t]) for t in range(1, 1000, max(1000 // n, 1))][::-1] + [0.0])
    if name == "kl_optimal":
        a_lo, a_hi = np.arctan(lo), np.arctan(hi)
        return torch.tensor([np.tan(i / n * a_lo + (1 - i / n) * a_hi) for i in range(n + 1)], dtype=torch.float32)
    if name == "beta":
        from scipy import stats
        q = stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
        return torch.tensor([*(lo + q * (hi - lo)), 0.0], dtype=torch.float32)
    if name == "align_your_steps":
        table = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(table):
            return torch.tensor(table + [0.0])
        log = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
        return torch.tensor([*np.exp(log)[::-1], 0.0], dtype=torch.float32)
    raise KeyError(name)


EXACT = ("uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "normal", "simple", "ddim",
         "align_your_steps")


@pytest.mark.parametrize("name", list(a1111.SCHEDULE_FUNCTIONS))
def test_schedules_equal_a1111s_formulas(kd, name):
    m = a1111.ModelSigmas.from_schedule(NS)
    for n in (1, 4, 10, 11, 30):
        ours, ref = a1111.SCHEDULE_FUNCTIONS[name](n, m), reference_schedule(kd, name, n).float()
        assert ours.dtype == torch.float32 and ours.shape == ref.shape, (n, ours.shape, ref.shape)
        if name in EXACT:
            assert torch.equal(ours, ref), (n, ours, ref)
        else:  # float64 vs float32 arithmetic on the way
            torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_schedule_pinned_values():
    m = a1111.ModelSigmas.from_schedule(NS)
    assert m.sigma_min == pytest.approx(0.0291675, abs=1e-6) and m.sigma_max == pytest.approx(14.614642, abs=1e-5)
    assert a1111.ddim(10, m)[0] == m.sigmas[901]  # t = 1, 101, ..., 901: the top step is t 901
    assert len(a1111.ddim(30, m)) == 32  # stride 33 from t 1 gives 31 steps, as A1111's ddim schedule does
    assert a1111.kl_optimal(10, m)[-1] == pytest.approx(m.sigma_min, rel=1e-6)  # ends at sigma_min, not 0
    assert a1111.align_your_steps(10, m)[:2].tolist() == pytest.approx([14.615, 6.11351], abs=1e-5)
    assert a1111.align_your_steps(11, m)[:2].tolist() == pytest.approx([14.615, 6.475], abs=1e-6)


def test_model_sigmas_and_continuous_timesteps_equal_compvis_denoiser(kd):
    wrap, m = model_sigmas(kd), a1111.ModelSigmas.from_schedule(NS)
    assert torch.equal(m.sigmas, wrap.sigmas)
    torch.testing.assert_close(m.sigmas, NS.sigmas, rtol=1e-5, atol=0)  # float64 vs diffusers' float32 cumprod
    sigmas = torch.tensor([14.6, 7.3, 1.0, 0.5, 0.1, 0.0292])
    assert torch.equal(m.sigma_to_t(sigmas), wrap.sigma_to_t(sigmas))
    t = torch.tensor([999.0, 500.25, 3.5, 0.0])
    assert torch.equal(m.t_to_sigma(t), wrap.t_to_sigma(t))


# ---------------------------------------------------------------------------------------------------------------
# 2. plans: Automatic, discard-penultimate, start noise, unrounded timesteps, img2img


@pytest.mark.parametrize("name,automatic", [("Euler", "uniform"), ("Euler a", "uniform"), ("LMS", "uniform"),
                                            ("Heun", "uniform"), ("DPM2", "karras"), ("DPM2 a", "karras"),
                                            ("DPM++ 2S a", "karras"), ("DPM++ 2M", "karras"), ("DPM++ SDE", "karras"),
                                            ("DPM++ 2M SDE", "exponential"), ("DPM++ 2M SDE Heun", "exponential"),
                                            ("DPM++ 3M SDE", "exponential")])
def test_automatic_schedule_and_discarded_sigma(kd, name, automatic):
    plan = prepare(name, NS, 10)
    ref = reference_schedule(kd, automatic, 11 if SAMPLERS[name].discard_penultimate else 10)
    if SAMPLERS[name].discard_penultimate:  # DPM2, DPM2 a, DPM++ 3M SDE
        ref = torch.cat([ref[:-2], ref[-1:]])
    assert plan.schedule is None and torch.equal(plan.sigmas, ref.float()) and len(plan.sigmas) == 11
    assert plan.init_noise_scale == float(plan.sigmas[0])  # start noise is sigmas[0], not sqrt(1 + sigma**2)
    assert torch.equal(plan.timesteps, model_sigmas(kd).sigma_to_t(plan.sigmas[:-1]))  # fractional, unrounded
    x = torch.ones(2)
    assert torch.equal(plan.finish(x), x)


def test_img2img_keeps_a1111s_steps():
    full = prepare("Euler", NS, 20)
    for strength, runs in ((0.75, 16), (0.5, 11), (0.05, 2), (1.0, 20)):
        plan = prepare("Euler", NS, 20, strength=strength)  # t_enc = int(strength * 20); t_enc + 1 steps run
        assert len(plan.sigmas) - 1 == runs and torch.equal(plan.sigmas, full.sigmas[-runs - 1:])
        assert plan.noise_range[1] == full.sigmas[0]  # the Brownian tree spans the whole schedule
        x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)  # the image noised to the first sigma
        assert plan.img2img_sigma is None and torch.equal(plan.noised(x0, noise), x0 + noise * float(plan.sigmas[0]))


def test_schedule_names_and_labels():
    assert get_sampler("DPM++ 2M SDE Karras")[1] == "karras"
    for label in ("SGM Uniform", "sgm_uniform", "SGMUniform", "kl optimal"):
        assert prepare("Euler", NS, 5, schedule=label).schedule in ("sgm_uniform", "kl_optimal")
    assert prepare("Euler", NS, 5, schedule="Automatic").schedule is None
    rows = {r["name"]: r for r in sampler_table()}
    assert rows["DPM++ 2M SDE"]["automatic"] == "exponential" and rows["Euler a"]["family"] == "a1111"
    assert rows["euler_a"]["family"] == "diffusers" and rows["euler"]["schedules"] == ["automatic", "karras"]
    assert rows["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]


# ---------------------------------------------------------------------------------------------------------------
# 3. sampling: ours against k-diffusion's sample_* with the same sigmas, model and noise

K_FUNCTIONS = {
    "Euler": "sample_euler", "Euler a": "sample_euler_ancestral", "LMS": "sample_lms", "Heun": "sample_heun",
    "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral", "DPM++ 2S a": "sample_dpmpp_2s_ancestral",
    "DPM++ 2M": "sample_dpmpp_2m", "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde",
}
SCHEDULE_CASES = [None, "karras", "exponential", "sgm_uniform", "kl_optimal", "align_your_steps"]
SEEDED = [n for n in A1111 if SAMPLERS[n].stochastic and n not in ("DPM adaptive", "Restart")]


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def reference_latents(kd, model, name, plan, x, **options):
    """k-diffusion as A1111 drives it: CompVisDenoiser, s_churn 0, eta 1, ancestral noise drawn (C, H, W) per image
    from each image's generator, Brownian trees seeded with each image's seed over the whole schedule; `options`:
    more keywords of the sample_* function (s_noise)."""
    sampling, external = kd
    fn = getattr(sampling, K_FUNCTIONS[name])
    kwargs = {}
    if SAMPLERS[name].brownian:
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, *plan.noise_range, seed=list(SEEDS))
    elif SAMPLERS[name].stochastic:
        gens = generators()
        kwargs["noise_sampler"] = lambda *_: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
    if name == "DPM++ 2M SDE Heun":
        kwargs["solver_type"] = "heun"
    return fn(external.CompVisDenoiser(model), x.clone(), plan.sigmas, disable=True, **kwargs, **options)


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=lambda s: s or "automatic")
@pytest.mark.parametrize("name", list(K_FUNCTIONS))
def test_samplers_equal_kdiffusion(kd, model, name, schedule):
    for steps in (3, 8):
        plan = prepare(name, NS, steps, schedule=schedule)
        x = torch.randn(len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(steps)) * plan.init_noise_scale
        ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators())
        ref = reference_latents(kd, model, name, plan, x)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("schedule", [None, "karras"], ids=lambda s: s or "automatic")
def test_brownian_samplers_query_inside_the_trees_interval(kd, model, schedule):
    """torchsde keeps a tree's ends rounded to 6 digits: a query at the lowest or highest sigma fell outside and
    warned ("Should have ta>=t0 ..."), once per step that reached an end. Ours clamps as torchsde would: no warning,
    the same latents as k-diffusion's (which still warns)."""
    import warnings

    for name in [n for n in K_FUNCTIONS if SAMPLERS[n].brownian]:
        plan = prepare(name, NS, 4, schedule=schedule)
        x = torch.randn(len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(1)) * plan.init_noise_scale
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators())
        assert not [w for w in caught if "Should have" in str(w.message)], name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = reference_latents(kd, model, name, plan, x)
        assert [w for w in caught if "Should have" in str(w.message)], name  # (the case does reach an end)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", SEEDED)
def test_image_k_of_a_batch_is_the_image_its_seed_makes_alone(model, name):
    plan = prepare(name, NS, 6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * plan.init_noise_scale
    both = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x, generator=generators())
    alone = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x[1:], generator=[torch.Generator().manual_seed(SEEDS[1])])
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)  # conv rounding differs by batch size
    other = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x[1:], generator=[torch.Generator().manual_seed(99)])
    assert (other - alone).abs().max() > 1e-3  # the noise does come from the seed


def test_img2img_brownian_noise_spans_the_whole_schedule(kd, model):
    """A1111 builds the tree over the full schedule's sigmas even when img2img runs only the last steps."""
    plan = prepare("DPM++ 2M SDE", NS, 10, strength=0.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * plan.init_noise_scale
    ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators())
    torch.testing.assert_close(ours, reference_latents(kd, model, "DPM++ 2M SDE", plan, x), rtol=1e-5, atol=1e-5)
    short = plan.sampler.fn(EpsDenoiser(model, plan.sigma_to_t), x.clone(), plan.sigmas, generator=generators())
    assert (short - ours).abs().max() > 1e-4  # a tree over the kept sigmas only is different noise


# ---------------------------------------------------------------------------------------------------------------
# 4. A1111's samplers outside k-diffusion's sample_*(sigmas) form: DPM fast/adaptive (k-diffusion, called with a
# sigma range), and A1111's own DDIM, PLMS, Restart and LCM against literal transcriptions of its loops


def per_image_noise(x):
    gens = generators()
    return lambda *_: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])


def start_noise(steps, scale):
    return torch.randn(len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(steps)) * scale


def run(model, plan, x):
    return plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators())


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dpm_fast_and_adaptive_equal_kdiffusion(kd, model, name, strength):
    """A1111 passes eta 1 (eta_ancestral), the model's sigma range in txt2img and the kept sigmas' in img2img, and
    n = steps to DPM fast; the noise is randn_like, i.e. each image's next noise."""
    sampling, external = kd
    wrap = external.CompVisDenoiser(model)
    for steps in (4, 9):
        plan = prepare(name, NS, steps, strength=strength)
        x = start_noise(steps, plan.init_noise_scale)
        if strength == 1:
            lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
        else:
            lo, hi = plan.sigmas[-2].item(), plan.sigmas[0].item()
        kwargs = dict(eta=1.0, noise_sampler=per_image_noise(x), disable=True)
        if name == "DPM fast":
            ref = sampling.sample_dpm_fast(wrap, x.clone(), lo, hi, len(plan.sigmas) - 1, **kwargs)
        else:
            ref = sampling.sample_dpm_adaptive(wrap, x.clone(), lo, hi, **kwargs)
        torch.testing.assert_close(run(model, plan, x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_a1111_timesteps_hand_checked():
    assert a1111_timesteps(20).tolist() == list(range(1, 1000, 50))  # 1, 51, ..., 951
    assert a1111_timesteps(30).tolist() == list(range(1, 1000, 33))  # stride 33: 31 timesteps, 30 steps
    assert a1111_timesteps(1000).tolist() == [*range(1, 1000), 999]  # clipped to 999
    plan = prepare("DDIM", NS, 20)
    assert plan.timesteps.tolist() == list(range(951, 50, -50)) and len(plan.timesteps) == 19  # 19 model calls
    m = a1111.ModelSigmas.from_schedule(NS)
    assert plan.sigmas[-1] == m.sigmas[1] and plan.sigmas[0] == m.sigmas[951]  # ends at t = 1, not at 0
    assert plan.init_noise_scale == pytest.approx((1 + m.sigmas[951].item() ** 2) ** 0.5)  # starts as VP noise
    assert len(prepare("PLMS", NS, 30).timesteps) == 30
    assert prepare("DDIM", NS, 20, strength=0.5).timesteps.tolist() == list(range(451, 50, -50))  # t_enc 10: 9 steps
    with pytest.raises(ValueError, match="1 step"):
        prepare("DDIM", NS, 1)
    for name in ("DDIM", "PLMS", "UniPC"):  # A1111 ignores the schedule type for its timestep samplers
        ignored = prepare(name, NS, 10, schedule="karras")
        assert ignored.schedule is None and torch.equal(ignored.sigmas, prepare(name, NS, 10).sigmas)
    assert get_sampler("DDIM Karras") == (SAMPLERS["DDIM"], "karras")


def test_labels_and_snake_names_pick_the_family():
    assert get_sampler("DDIM")[0].family == get_sampler("PLMS")[0].family == get_sampler("UniPC")[0].family == "a1111"
    assert get_sampler("ddim")[0].name == "ddim" and get_sampler("plms")[0].name == "pndm"
    assert get_sampler("ddim")[0].family == get_sampler("pndm")[0].family == get_sampler("unipc")[0].family \
        == "diffusers"
    for label in ("DPM fast", "DPM adaptive", "Restart", "LCM", "k_dpm_fast", "k_dpm_ad", "restart", "k_lcm"):
        assert get_sampler(label)[0].family == "a1111"
    for label in ("DDIM CFG++", "ddim cfg++", "ddim_cfgpp", "DDIM CFG++ Karras"):
        assert get_sampler(label)[0] is SAMPLERS["DDIM CFG++"]
    assert SAMPLERS["DDIM CFG++"].family == "a1111" and SAMPLERS["DDIM CFG++"].timestep_space


class Recorder(torch.nn.Module):
    """The eps model, keeping the timesteps it is fed."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x, t):
        self.seen.append(t[0].item())
        return self.inner(x, t)


def compvis_timesteps(steps):
    """CompVisSampler.get_timesteps, literally."""
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


def ddim_reference(model, x, ts):
    """A1111's `ddim` (eta 0) over timesteps `ts` (ascending), literally: VP latents, alphas_cumprod at them."""
    ac = model.alphas_cumprod
    for index in range(len(ts) - 1, 0, -1):
        a_t, a_prev = ac[ts[index]], ac[ts[index - 1]]
        e_t = model(x, torch.full((x.shape[0],), float(ts[index])))
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
    return x


def plms_reference(model, x, ts):
    """A1111's `plms` over timesteps `ts`, literally: a pseudo improved Euler first step, then Adams-Bashforth on
    up to 4 eps."""
    ac = model.alphas_cumprod
    old_eps = []

    def x_prev(x, e_t, index):
        a_t, a_prev = ac[ts[index]], ac[ts[max(index - 1, 0)]]
        return a_prev.sqrt() * (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt() + (1 - a_prev).sqrt() * e_t

    for index in range(len(ts) - 1, 0, -1):
        e_t = model(x, torch.full((x.shape[0],), float(ts[index])))
        if not old_eps:
            e_next = model(x_prev(x, e_t, index), torch.full((x.shape[0],), float(ts[index - 1])))
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(x, e_prime, index)
        old_eps = [*old_eps, e_t][-3:]
    return x


@pytest.mark.parametrize("name,reference", [("DDIM", ddim_reference), ("PLMS", plms_reference)])
def test_timestep_samplers_equal_a1111s_loops(model, name, reference):
    for steps in (2, 3, 7, 20, 30):
        plan = prepare(name, NS, steps)
        x_vp = start_noise(steps, 1.0)
        recorder = Recorder(model)
        ours = plan.finish(plan.sample(EpsDenoiser(recorder, plan.sigma_to_t), x_vp * plan.init_noise_scale))
        ref = reference(model, x_vp.clone(), compvis_timesteps(steps))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        expected = plan.timesteps.tolist()
        if name == "PLMS":  # the first step's second call, at the next timestep
            expected = [expected[0], *a1111_timesteps(steps)[-2:-1].tolist(), *expected[1:]]
        assert recorder.seen == expected  # integer timesteps only: A1111's, top down, t = 1 never fed


def unipc_reference(model, x, ts, is_img2img=False):
    """A1111's `unipc` over timesteps `ts` with its default settings (bh1, order 3, time_uniform,
    lower_order_final, predict_x0), literally in VP space: UniPC's discrete NoiseScheduleVP (log alpha linear in t
    between t_i = (i + 1) / 1000), model time (t - 1/1000) * 1000, and the multistep UniP / UniC updates (Zhao et
    al. 2023, Alg. 2/3). It runs len(ts) steps, from t = 1, or in img2img from ts[-1] / 1000 + 1 / 1000."""
    log_alphas = 0.5 * model.alphas_cumprod.double().log()
    knots = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)[1:]
    n = len(ts)
    t_start = ts[-1] / 1000 + 1 / 1000 if is_img2img else 1.0

    def log_alpha(t):
        return torch.tensor(np.interp(t.double().numpy(), knots.numpy(), log_alphas.numpy()))

    def alpha(t):
        return log_alpha(t).exp().float()

    def std(t):
        return (1 - (2 * log_alpha(t)).exp()).sqrt().float()

    def lam(t):
        return (log_alpha(t) - 0.5 * (1 - (2 * log_alpha(t)).exp()).log()).float()

    def data(x, t):
        eps = model(x, ((t - 1.0 / 1000) * 1000.0).expand(x.shape[0]))
        return (x - std(t) * eps) / alpha(t)

    def update(x, models, times, t, order, use_corrector):
        h = lam(t) - lam(times[-1])
        rks = [((lam(times[-(i + 1)]) - lam(times[-1])) / h) for i in range(1, order)]
        d1s = [(models[-(i + 1)] - models[-1]) / rk for i, rk in zip(range(1, order), rks)]
        r = torch.tensor([*rks, 1.0])
        hh = -h
        h_phi_1, h_phi_k, fact, B_h = torch.expm1(hh), torch.expm1(hh) / hh - 1, 1, hh
        R, b = [], []
        for i in range(1, order + 1):
            R.append(r ** (i - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.stack(R), torch.stack(b)
        x_t_ = std(t) / std(times[-1]) * x - alpha(t) * h_phi_1 * models[-1]
        rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_t_ - alpha(t) * B_h * sum((rho * d for rho, d in zip(rhos_p, d1s)), torch.zeros_like(x))
        if not use_corrector:
            return x_t, None
        model_t = data(x_t, t)
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        res = sum((rho * d for rho, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x)) + rhos_c[-1] * (model_t - models[-1])
        return x_t_ - alpha(t) * B_h * res, model_t

    grid = torch.linspace(t_start, 1.0 / 1000, n + 1)
    models, times = [data(x, grid[0])], [grid[0]]
    for step in range(1, n + 1):
        order = min(step, 3, n + 1 - step)
        x, model_x = update(x, models, times, grid[step], order, use_corrector=step < n)
        models, times = [*models, model_x][-3:], [*times, grid[step]][-3:]
    return x


def test_unipc_equals_a1111s_unipc(model):
    for steps in (3, 5, 20, 30):
        plan = prepare("UniPC", NS, steps)
        assert len(plan.sigmas) - 1 == len(a1111_timesteps(steps))  # 20 steps: 20; 30 steps: 31
        x_vp = start_noise(steps, 1.0)
        ours = plan.finish(plan.sample(EpsDenoiser(model, plan.sigma_to_t), x_vp * plan.init_noise_scale))
        ref = unipc_reference(model, x_vp.clone(), compvis_timesteps(steps))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    plan = prepare("UniPC", NS, 20)
    assert plan.timesteps[:3].tolist() == pytest.approx([999.0, 949.05, 899.1], abs=1e-3)  # fractional: 999 k / 20
    assert plan.sigmas[-1] == pytest.approx(a1111.ModelSigmas.from_schedule(NS).sigma_min, rel=1e-6)  # ends at t 0
    with pytest.raises(ValueError, match="too few"):
        prepare("UniPC", NS, 2)


# A1111's img2img with its timestep samplers (CompVisSampler.sample_img2img, img2img_fix_steps off)


def a1111_img2img(model, reference, x0, noise, steps, strength):
    """sample_img2img, literally: t_enc = int(min(strength, 0.999) * steps); the init latents noised (VP) to
    timesteps[t_enc]; the sampler run over timesteps[:t_enc]."""
    t_enc = int(min(strength, 0.999) * steps)
    timesteps = compvis_timesteps(steps)
    a = model.alphas_cumprod[timesteps[t_enc]]
    xi = x0 * a.sqrt() + noise * (1 - a).sqrt()
    return reference(model, xi, timesteps[:t_enc])


IMG2IMG_REFERENCES = {"DDIM": ddim_reference, "PLMS": plms_reference,
                      "UniPC": functools.partial(unipc_reference, is_img2img=True)}


def init_and_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(SEEDS), 4, 8, 8, generator=g), torch.randn(len(SEEDS), 4, 8, 8, generator=g)


@pytest.mark.parametrize("name", list(IMG2IMG_REFERENCES))
def test_timestep_samplers_img2img_equal_a1111s(model, name):
    for steps, strength in itertools.product((20, 30), (0.3, 0.75, 1.0)):
        plan = prepare(name, NS, steps, strength=strength)
        x0, noise = init_and_noise(steps)
        ours = plan.finish(plan.sample(EpsDenoiser(model, plan.sigma_to_t), plan.noised(x0, noise)))
        ref = a1111_img2img(model, IMG2IMG_REFERENCES[name], x0, noise, steps, strength)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_timestep_samplers_img2img_noise_one_timestep_above_their_first():
    m, ac = a1111.ModelSigmas.from_schedule(NS), ldm_alphas_cumprod()
    plan = prepare("DDIM", NS, 20, strength=0.5)  # t_enc 10: noised to t 501, then 451, 401, ..., 51 and to t 1
    assert plan.img2img_sigma == m.sigmas[501] and plan.sigmas[0] == m.sigmas[451] and len(plan.timesteps) == 9
    # the VP latent sqrt(1 - a_501) * noise, read at t 451: sqrt(1 - a_501) * sqrt(1 + sigma_451**2) in sigma space
    assert plan.noised(torch.zeros(1), torch.ones(1)).item() == pytest.approx(
        ((1 - ac[501]) / ac[451]).sqrt().item(), rel=1e-6)
    full = prepare("DDIM", NS, 20, strength=1.0)  # t_enc = int(0.999 * 20) = 19: not txt2img's 19 steps from t 951
    assert full.img2img_sigma == m.sigmas[951] and full.timesteps[0] == 901 and len(full.timesteps) == 18
    assert prepare("DDIM", NS, 20).img2img_sigma is None


class TinyCondEps(TinyEps):
    """TinyEps plus a term from the text embedding, so that the cond and uncond predictions differ."""

    def forward(self, x, t, context):
        return super().forward(x, t) + 0.3 * context.mean(1)[:, :, None, None]


def ddim_cfgpp_reference(model, x, ts, *, cond, uncond, cfg_scale):
    """A1111's `ddim_cfgpp` (eta 0) under its CFGDenoiserTimesteps, literally: guidance in eps space with
    cond_scale times cond_scale_miltiplier (1 / 12.5), pred_x0 from the guided eps, the direction to the next
    timestep from the unconditional eps (last_noise_uncond)."""
    ac = model.alphas_cumprod
    for index in range(len(ts) - 1, 0, -1):
        t = torch.full((x.shape[0],), float(ts[index]))
        e_uncond, e_cond = model(x, t, uncond), model(x, t, cond)
        e_t = e_uncond + (e_cond - e_uncond) * (cfg_scale * (1 / 12.5))
        a_t, a_prev = ac[ts[index]].item(), ac[ts[index - 1]].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_uncond
    return x


@pytest.mark.parametrize("strength", [None, 0.75], ids=["txt2img", "img2img"])
def test_ddim_cfgpp_equals_a1111s(strength):
    with torch.no_grad():
        model = TinyCondEps().eval()
        g = torch.Generator().manual_seed(3)
        cond, uncond = torch.randn(len(SEEDS), 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
        reference = functools.partial(ddim_cfgpp_reference, cond=cond, uncond=uncond.expand(len(SEEDS), -1, -1),
                                      cfg_scale=7.0)
        plan = prepare("DDIM CFG++", NS, 20, strength=strength)
        denoiser = CFGDenoiser(EpsDenoiser(model, plan.sigma_to_t), cond, uncond, 7.0)
        x0, noise = init_and_noise(20)
        if strength is None:
            ours = plan.finish(plan.sample(denoiser, noise * plan.init_noise_scale))
            ref = reference(model, noise.clone(), compvis_timesteps(20))
        else:
            ours = plan.finish(plan.sample(denoiser, plan.noised(x0, noise)))
            ref = a1111_img2img(model, reference, x0, noise, 20, strength)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        ddim = prepare("DDIM", NS, 20, strength=strength)
        start = noise * plan.init_noise_scale if strength is None else plan.noised(x0, noise)
        plain = ddim.finish(ddim.sample(CFGDenoiser(EpsDenoiser(model, ddim.sigma_to_t), cond, uncond, 7.0), start))
        assert (plain - ours).abs().max() > 1e-2  # not DDIM's result


def test_ddim_cfgpp_needs_the_unconditional_prediction(model):
    plan = prepare("DDIM CFG++", NS, 4)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(TypeError, match="DDIM CFG\\+\\+ needs a guidance denoiser with `with_uncond`"):
        plan.sample(EpsDenoiser(model, plan.sigma_to_t), x)
    cond = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="unconditional embedding"):
        plan.sample(CFGDenoiser(EpsDenoiser(TinyCondEps(), plan.sigma_to_t), cond, None, 1.0), x)


def test_ddim_cfgpp_is_listed_and_written_by_its_label(capsys):
    from stablediff import cli

    assert cli.main(["samplers"]) == 0
    assert "DDIM CFG++" in {line.split("  ")[0] for line in capsys.readouterr().out.splitlines()}
    p = GenerationParams(prompt="a cat", sampler="ddim_cfgpp", seed=1, width=512, height=512).validate()
    text = p.to_infotext()
    assert "Sampler: DDIM CFG++, " in text and "CFG scale: 7.0, " in text  # the scale as given
    assert GenerationParams.from_infotext(text)[0].validate() == p


def restart_reference(kd, model, x, sigmas):
    """Restart sampling (Xu et al. 2023, Alg. 2) as A1111 parametrises it: from 20 steps, Karras sigmas over the
    schedule's range with fewer steps, and one (36+ steps: two) restart from the sigma nearest 0.1 back up to the one
    nearest 2, descending again over restart steps + 1 Karras sigmas; Heun steps; fresh noise for each jump up."""
    sampling, external = kd
    wrap = external.CompVisDenoiser(model)
    steps = len(sigmas) - 1
    segments = [sigmas]
    if steps >= 20:
        n_restart, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = sampling.get_sigmas_karras(steps - n_restart * times, sigmas[-2].item(), sigmas[0].item())
        lo, hi = int((main - 0.1).abs().argmin()), int((main - 2).abs().argmin())
        restart = sampling.get_sigmas_karras(n_restart + 1, main[lo].item(), main[hi].item())[:-1]
        segments = [main[: lo + 1], *[restart] * times, main[lo:]]
    noise = per_image_noise(x)
    for k, segment in enumerate(segments):
        if k > 0 and segment[0] > segments[k - 1][-1]:
            x = x + noise() * (segment[0] ** 2 - segments[k - 1][-1] ** 2) ** 0.5
        x = sampling.sample_heun(wrap, x, segment, disable=True)
    return x


def test_restart_steps_hand_checked():
    m = a1111.ModelSigmas.from_schedule(NS)
    plan = prepare("Restart", NS, 20)
    assert torch.equal(plan.sigmas, a1111.karras(20, m))  # Automatic is Karras
    from stablediff.ksampling import restart_steps
    pairs = restart_steps(plan.sigmas)
    main = a1111.karras_range(11, m.sigma_min, m.sigma_max)  # 20 - 9 restart steps
    ups = [i for i in range(1, len(pairs)) if pairs[i][0] > pairs[i - 1][1]]
    assert len(pairs) == 20 and len(ups) == 1  # 11 main steps, 9 restart steps, one jump
    jump = ups[0]
    assert pairs[jump - 1][1] == main[int((main - 0.1).abs().argmin())]
    assert pairs[jump][0] == main[int((main - 2).abs().argmin())]
    assert len(restart_steps(prepare("Restart", NS, 40).sigmas)) == 40 + 0  # 20 main + 2 x 10 restart steps
    assert torch.equal(torch.stack([a for a, _ in restart_steps(prepare("Restart", NS, 8).sigmas)]),
                       prepare("Restart", NS, 8).sigmas[:-1])  # under 20 steps: the schedule as it is


@pytest.mark.parametrize("steps", [8, 20, 40])
def test_restart_equals_the_algorithm(kd, model, steps):
    plan = prepare("Restart", NS, steps)
    x = start_noise(steps, plan.init_noise_scale)
    ref = restart_reference(kd, model, x.clone(), plan.sigmas)
    torch.testing.assert_close(run(model, plan, x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def lcm_reference_denoiser(kd, model):
    """A1111's LCMCompVisDenoiser, transcribed onto k-diffusion's DiscreteEpsDDPMDenoiser: the training sigmas at
    t = 19, 39, ..., 999, sigma -> the nearest of those timesteps, and LCM's c_skip / c_out at 10 t."""
    external = kd[1]

    class LCMDenoiser(external.DiscreteEpsDDPMDenoiser):
        def __init__(self, model):
            valid = torch.zeros(50)
            for i in range(50):
                valid[49 - i] = model.alphas_cumprod[999 - i * 20]
            super().__init__(model, valid, quantize=None)

        def get_sigmas(self, n):
            t = torch.linspace(self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min), n)
            return kd[0].append_zero(self.t_to_sigma(t))

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * 20 + 19

        def t_to_sigma(self, t):
            return super().t_to_sigma(torch.clamp(((t - 19) / 20).float(), min=0, max=49))

        def get_eps(self, *args, **kwargs):
            return self.inner_model.apply_model(*args, **kwargs)

        def forward(self, input, sigma, **kwargs):
            c_out, c_in = [x[:, None, None, None] for x in self.get_scalings(sigma)]
            out = input + self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out
            scaled = self.sigma_to_t(sigma)[:, None, None, None] * 10.0
            return scaled / (scaled**2 + 0.25) ** 0.5 * out + 0.25 / (scaled**2 + 0.25) * input

    return LCMDenoiser(model)


def lcm_reference(denoiser, x, sigmas):
    """A1111's `sample_lcm`: x = D(x, sigma), plus fresh noise of the next sigma where that is above 0."""
    noise = per_image_noise(x)
    for i in range(len(sigmas) - 1):
        x = denoiser(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise()
    return x


@pytest.mark.parametrize("schedule", [None, "karras", "sgm_uniform"], ids=lambda s: s or "automatic")
def test_lcm_equals_a1111s_lcm(kd, model, schedule):
    denoiser = lcm_reference_denoiser(kd, model)
    m = a1111.LCMSigmas.from_schedule(NS)
    assert torch.equal(m.sigmas, denoiser.sigmas) and m.sigma_min == a1111.ModelSigmas.from_schedule(NS).sigmas[19]
    for steps in (1, 4, 8):
        plan = prepare("LCM", NS, steps, schedule=schedule)
        if schedule is None:
            assert torch.equal(plan.sigmas, denoiser.get_sigmas(steps))  # A1111's uniform is the LCM denoiser's
        assert torch.equal(plan.timesteps, denoiser.sigma_to_t(plan.sigmas[:-1]).float())  # 19, 39, ..., 999 only
        x = start_noise(steps, plan.init_noise_scale)
        ref = lcm_reference(denoiser, x.clone(), plan.sigmas)
        torch.testing.assert_close(run(model, plan, x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# eta: A1111 passes its `eta` (the request's, else its eta_ancestral / eta_ddim option) to the samplers that take one

def image_noise(gens, shape):
    """A1111's randn_like for a batch: one (C, H, W) draw from each image's generator."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


@pytest.mark.parametrize("eta", [0.0, 0.4])
@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a"])
def test_ancestral_eta_equals_kdiffusion(kd, model, name, eta):
    sampling, external = kd
    plan = prepare(name, NS, 6, schedule="karras")
    x = torch.randn(len(SEEDS), 4, 8, 8, generator=torch.Generator().manual_seed(6)) * plan.init_noise_scale
    ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators(),
                       **SAMPLERS[name].eta_options(eta))
    gens = generators()
    ref = getattr(sampling, K_FUNCTIONS[name])(external.CompVisDenoiser(model), x.clone(), plan.sigmas, disable=True,
                                               eta=eta, noise_sampler=lambda *_: image_noise(gens, x.shape))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    default = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators())
    assert (default - ours).abs().max() > 1e-3  # eta is not ignored


def ddim_eta_reference(model, x, ts, eta, gens):
    """A1111's `ddim` with eta, literally: sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)), the
    direction scaled by sqrt(1 - a_prev - sigma_t**2), and sigma_t times a fresh draw from each image's generator
    at every step."""
    ac = model.alphas_cumprod.double()
    for index in range(len(ts) - 1, 0, -1):
        a_t, a_prev = ac[ts[index]], ac[ts[index - 1]]
        sigma_t = (eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()).float()
        a_t, a_prev = a_t.float(), a_prev.float()
        e_t = model(x, torch.full((x.shape[0],), float(ts[index])))
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma_t**2).sqrt() * e_t + sigma_t * image_noise(gens, x.shape)
    return x


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ddim_eta_equals_a1111s_loop(model, eta):
    """webuiapi sends eta 1.0 with every request, which A1111's DDIM takes (eta_ddim 0 only where none is sent)."""
    for steps in (3, 10):
        plan = prepare("DDIM", NS, steps)
        x_vp = start_noise(steps, 1.0)
        ours = plan.finish(plan.sample(EpsDenoiser(model, plan.sigma_to_t), x_vp * plan.init_noise_scale,
                                       generator=generators(), **SAMPLERS["DDIM"].eta_options(eta)))
        ref = ddim_eta_reference(model, x_vp.clone(), compvis_timesteps(steps), eta, generators())
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        plain = plan.finish(plan.sample(EpsDenoiser(model, plan.sigma_to_t), x_vp * plan.init_noise_scale))
        assert (plain - ours).abs().max() > 1e-3


def test_eta_settings_infotext_and_where_it_does_not_apply():
    """eta reaches the samplers that take one; A1111's infotext keys ("Eta DDIM" where not 0 for DDIM, "Eta" where
    not 1 for the others) are written and read back; a sampler without eta leaves it unused and unwritten, as A1111
    does."""
    assert SAMPLERS["DDIM"].eta_options(1.0) == {"eta": 1.0} and SAMPLERS["Euler"].eta_options(0.5) == {}
    assert SAMPLERS["DPM++ 2M SDE"].eta_options(0.5) == {"eta": 0.5}
    for sampler, eta, key in [("DDIM", 1.0, "Eta DDIM: 1.0"), ("Euler a", 0.5, "Eta: 0.5"), ("ddim", 0.7, "Eta DDIM"),
                              ("tcd", 1.0, "Eta: 1.0")]:
        p = GenerationParams(prompt="x", steps=4, sampler=sampler, seed=1, width=64, height=64, eta=eta).validate()
        text = p.to_infotext()
        assert key in text
        assert GenerationParams.from_infotext(text)[0].eta == eta
    for sampler, eta in [("DDIM", 0.0), ("Euler a", 1.0), ("Euler", 0.5), ("DPM++ 2M", 0.3)]:
        text = GenerationParams(prompt="x", steps=4, sampler=sampler, seed=1, width=64, height=64,
                                eta=eta).validate().to_infotext()
        assert "Eta" not in text, text
    assert "Eta: 0.5" in GenerationParams(prompt="x", sampler="DPM++ SDE", eta=0.5).validate().to_infotext()
    with pytest.raises(ValueError, match="eta 1.5 is outside 0..1"):
        GenerationParams(prompt="x", sampler="DDIM", eta=1.5).validate()
    # A1111's API: the request's eta, else the option for the sampler's kind
    body = {"prompt": "x", "sampler_name": "DDIM", "override_settings": {"eta_ddim": 0.2, "eta_ancestral": 0.6}}
    assert GenerationParams.from_a1111(body).eta == 0.2
    assert GenerationParams.from_a1111({**body, "sampler_name": "Euler a"}).eta == 0.6
    assert GenerationParams.from_a1111({**body, "eta": 1.0}).eta == 1.0
    assert GenerationParams.from_a1111({"prompt": "x", "sampler_name": "DDIM"}).eta is None
    # the options at their defaults (as the server always has them) leave each sampler its own: a hires pass with
    # "Euler a" after DDIM keeps eta 1, as A1111's does
    defaults = {"eta_ddim": 0.0, "eta_ancestral": 1.0}
    p = GenerationParams.from_a1111({"prompt": "x", "sampler_name": "DDIM", "enable_hr": True,
                                     "hr_sampler_name": "Euler a", "override_settings": defaults})
    assert p.eta is None and SAMPLERS["Euler a"].eta_options(p.eta) == {}


# ---------------------------------------------------------------------------------------------------------------
# 7. k-diffusion's churn (s_churn, s_tmin, s_tmax) and noise scale (s_noise), as A1111 passes them


class RandnLike:
    """A1111's TorchHijack: k-diffusion's torch.randn_like is each image's next noise (its churn draws by it)."""

    def __init__(self, gens):
        self.gens = gens

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return image_noise(self.gens, x.shape)


CHURN_CASES = [dict(s_churn=0.8), dict(s_churn=3.0, s_tmin=0.5, s_tmax=4.0, s_noise=0.9),
               dict(s_churn=100.0, s_noise=1.003)]


@pytest.mark.parametrize("case", CHURN_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_equals_kdiffusion(kd, model, monkeypatch, name, case):
    """Churn raises each step's sigma to sigma * (1 + gamma) with fresh noise where s_tmin <= sigma <= s_tmax;
    k-diffusion draws that noise on every step, so the stream (each image's generator) must advance alike."""
    from stablediff.params import SIGMA_PARAM_DEFAULTS

    sampling, external = kd
    options = SAMPLERS[name].sigma_options({**SIGMA_PARAM_DEFAULTS, **case})
    assert options == case  # the non-default ones, s_tmax as given
    for steps, schedule in ((4, None), (7, "karras")):
        plan = prepare(name, NS, steps, schedule=schedule)
        x = start_noise(steps, plan.init_noise_scale)
        ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators(), **options)
        monkeypatch.setattr(sampling, "torch", RandnLike(generators()))
        ref = getattr(sampling, K_FUNCTIONS[name])(external.CompVisDenoiser(model), x.clone(), plan.sigmas,
                                                   disable=True, **case)
        monkeypatch.undo()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert (run(model, plan, x) - ours).abs().max() > 1e-3  # churn is not ignored


def test_churn_window_and_its_noise_stream():
    """s_tmin / s_tmax bound where churn applies (a window no sigma falls in is no churn at all), s_tmax 0 is no
    bound (A1111's convention), and a step outside the window still uses up one noise of the stream."""
    from stablediff.samplers import churn

    plan = prepare("Euler", NS, 5, schedule="karras")
    sigmas = plan.sigmas
    x = torch.zeros(1, 4, 2, 2)
    for i in range(5):
        inside = 0.5 <= float(sigmas[i]) <= 4.0
        gen = torch.Generator().manual_seed(3)
        y, sigma_hat = churn(x, sigmas, i, [gen], 1.0, 0.5, 4.0, 1.0)
        gamma = min(1.0 / 5, 2 ** 0.5 - 1) if inside else 0.0
        assert float(sigma_hat) == pytest.approx(float(sigmas[i]) * (1 + gamma), rel=1e-6)
        expected = torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(3)) * (
            (float(sigmas[i]) * (1 + gamma)) ** 2 - float(sigmas[i]) ** 2) ** 0.5
        torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())  # one noise used
    assert SAMPLERS["Euler"].sigma_options({"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}) == {
        "s_churn": 1.0}
    gen = torch.Generator().manual_seed(3)
    y, sigma_hat = churn(x, sigmas, 0, [gen], 0.0, 0.0, math.inf, 1.0)
    assert y is x and torch.equal(sigma_hat, sigmas[0])  # no churn: nothing drawn
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize("name", ["DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                                  "DPM++ 3M SDE", "DPM fast"])
def test_s_noise_equals_kdiffusion(kd, model, name):
    """A1111 passes s_noise (not churn) to its other ancestral and SDE samplers and to DPM fast."""
    sampling, external = kd
    options = SAMPLERS[name].sigma_options({"s_churn": 2.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 0.7})
    assert options == {"s_noise": 0.7}
    plan = prepare(name, NS, 6)
    x = start_noise(6, plan.init_noise_scale)
    ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators(), **options)
    if name == "DPM fast":
        wrap = external.CompVisDenoiser(model)
        ref = sampling.sample_dpm_fast(wrap, x.clone(), wrap.sigmas[0].item(), wrap.sigmas[-1].item(), 6, eta=1.0,
                                       s_noise=0.7, noise_sampler=per_image_noise(x), disable=True)
    else:
        ref = reference_latents(kd, model, name, plan, x, s_noise=0.7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (run(model, plan, x) - ours).abs().max() > 1e-3


def test_sigma_settings_reach_only_the_samplers_a1111_gives_them_to():
    """Samplers A1111 passes none of them to (Euler a, DPM++ 2M, DPM adaptive, Restart, the timestep samplers,
    diffusers' own) take none; their infotext leaves them out; the first pass's or the hires pass's sampler taking
    one writes it, and it reads back."""
    values = {"s_churn": 0.5, "s_tmin": 0.2, "s_tmax": 9.0, "s_noise": 0.8}
    takes = {n for n, s in SAMPLERS.items() if s.sigma_options(values)}
    assert takes == {"Euler", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE",
                     "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast"}
    base = dict(prompt="x", steps=4, seed=1, width=64, height=64, **values)
    for sampler in ("Euler a", "DPM++ 2M", "DDIM", "euler"):
        assert "Sigma" not in GenerationParams(sampler=sampler, **base).validate().to_infotext()
    text = GenerationParams(sampler="Heun", **base).validate().to_infotext()
    assert "Sigma churn: 0.5, Sigma tmin: 0.2, Sigma tmax: 9.0, Sigma noise: 0.8" in text
    back = GenerationParams.from_infotext(text)[0]
    assert (back.s_churn, back.s_tmin, back.s_tmax, back.s_noise) == (0.5, 0.2, 9.0, 0.8)
    text = GenerationParams(sampler="DPM++ 2M SDE", **base).validate().to_infotext()
    assert "Sigma noise: 0.8" in text and "Sigma churn" not in text
    hires = GenerationParams(sampler="DPM++ 2M", enable_hr=True, hr_sampler="Euler", **base).validate()
    assert "Sigma churn: 0.5" in hires.to_infotext()
    for name, value in [("s_churn", -0.1), ("s_churn", 101), ("s_noise", float("nan")), ("s_tmax", -1)]:
        with pytest.raises(ValueError, match=f"{name} {value!r} is outside"):
            GenerationParams(prompt="x", sampler="Euler", **{name: value}).validate()


def test_sigma_settings_from_a1111s_request_and_options():
    """A1111's Sampler.initialize: the request's value, unless its option (override_settings) is not the default,
    which then wins; s_tmax 0 is no bound."""
    body = {"prompt": "x", "sampler_name": "Euler", "s_churn": 0.4, "s_noise": 0.9}
    p = GenerationParams.from_a1111(body)
    assert (p.s_churn, p.s_tmin, p.s_tmax, p.s_noise) == (0.4, 0.0, 0.0, 0.9)
    defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
    p = GenerationParams.from_a1111({**body, "override_settings": defaults})
    assert (p.s_churn, p.s_noise) == (0.4, 0.9)
    p = GenerationParams.from_a1111({**body, "override_settings": {**defaults, "s_churn": 1.5, "s_tmax": 3.0}})
    assert (p.s_churn, p.s_tmax, p.s_noise) == (1.5, 3.0, 0.9)
    assert GenerationParams.from_a1111({"prompt": "x"}).sigma_values() == defaults
    assert GenerationParams.from_a1111(GenerationParams(prompt="x", s_churn=0.3, s_tmin=0.1).to_a1111()).s_churn == 0.3


# ---------------------------------------------------------------------------------------------------------------
# 8. A1111's negative guidance minimum sigma (NGMS) through the pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from stablediff import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("sampler, level", [("Euler", 1.0), ("Heun", 3.0), ("DDIM", 300.0)])
def test_ngms_through_the_pipeline(tiny_pipe, sampler, level):
    """Which U-Net calls leave the negative prompt out: the odd ones whose sigma (A1111's DDIM: timestep) is below
    the level, every one with s_min_uncond_all; the image changes, "NGMS" is written and read back; with DeepCache
    the calls of the other batch run the whole U-Net."""
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    kw = dict(steps=5, seed=3, width=64, height=64, sampler=sampler)
    try:
        plain = tiny_pipe("a cat", **kw)
        batches.clear()
        ngms = tiny_pipe("a cat", s_min_uncond=level, **kw)
        seen, batches[:] = list(batches), []
        every = tiny_pipe("a cat", s_min_uncond=level, s_min_uncond_all=True, cache_interval=2, **kw)
        seen_all = list(batches)
    finally:
        hook.remove()
    plan = prepare(sampler, NS, 5)
    levels = []  # each denoiser call's sigma (the timestep for DDIM), as the sampler makes them
    d = lambda x, sigma: (levels.append(float(plan.sigma_to_t(torch.as_tensor(sigma))) if sampler == "DDIM"
                                        else float(sigma)), x * 0)[1]
    plan.sample(d, torch.zeros(1, 4, 8, 8))
    assert seen == [1 if k % 2 and v < level else 2 for k, v in enumerate(levels)]
    assert seen_all == [1 if v < level else 2 for v in levels]
    assert 1 in seen and 2 in seen  # the case does cross the level
    assert (ngms.latents - plain.latents).abs().max() > 1e-4
    assert (every.latents - ngms.latents).abs().max() > 1e-4
    assert f"NGMS: {level}" in ngms.infotexts[0] and "NGMS" not in plain.infotexts[0]
    assert "NGMS all steps: True" in every.infotexts[0]
    back = GenerationParams.from_infotext(every.infotexts[0])[0]
    assert (back.s_min_uncond, back.s_min_uncond_all) == (level, True)
    never = tiny_pipe("a cat", s_min_uncond=0.001, s_min_uncond_all=True, **kw)  # below every sigma: no call skips
    assert torch.equal(never.latents, plain.latents) and "NGMS" not in never.infotexts[0]


def test_ngms_from_a1111s_request_and_options():
    """The request's s_min_uncond, else its option; "NGMS all steps" is an option only."""
    assert GenerationParams.from_a1111({"prompt": "x", "s_min_uncond": 2.0}).s_min_uncond == 2.0
    p = GenerationParams.from_a1111({"prompt": "x", "override_settings": {"s_min_uncond": 1.5,
                                                                          "s_min_uncond_all": True}})
    assert (p.s_min_uncond, p.s_min_uncond_all) == (1.5, True)
    p = GenerationParams.from_a1111({"prompt": "x", "s_min_uncond": 0, "override_settings": {"s_min_uncond": 1.5}})
    assert p.s_min_uncond == 0  # A1111: the request's value wherever it sends one
    with pytest.raises(ValueError, match="s_min_uncond -1 is outside 0..1000"):
        GenerationParams(prompt="x", s_min_uncond=-1).validate()


def test_skip_early_cond_through_the_pipeline(tiny_pipe):
    """Heun, 4 steps: A1111 counts 8 calls (second order), so 0.25 leaves the negative prompt out of calls 0-2;
    "Skip Early CFG" is written and read back; img2img counts the steps it runs."""
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        result = tiny_pipe("a cat", steps=4, seed=3, width=64, height=64, sampler="Heun", skip_early_cond=0.25)
        seen, batches[:] = list(batches), []
        tiny_pipe("a cat", steps=10, seed=3, width=64, height=64, sampler="Euler", skip_early_cond=0.25,
                  init_image=result.images[0], strength=0.5)
        img2img = list(batches)
    finally:
        hook.remove()
    assert seen == [1, 1, 1, 2, 2, 2, 2]
    assert img2img == [1, 1, 2, 2, 2, 2]  # A1111 runs t_enc + 1 = 6 steps: k / 6 <= 0.25 for k 0, 1
    assert "Skip Early CFG: 0.25" in result.infotexts[0]
    assert GenerationParams.from_infotext(result.infotexts[0])[0].skip_early_cond == 0.25
    assert GenerationParams.from_a1111({"prompt": "x", "override_settings": {"skip_early_cond": 0.3}}
                                       ).skip_early_cond == 0.3


# ---------------------------------------------------------------------------------------------------------------
# 9. A1111's extra noise for img2img and hires fix (img2img_extra_noise)


@pytest.mark.parametrize("name", ["Euler a", "DDIM", "euler"])
def test_extra_noise_start_as_a1111(name):
    """k-diffusion samplers: xi = x + noise * sigma_sched[0], then xi += noise * extra; A1111's timestep samplers add
    noise * extra * sqrt(alphas_cumprod[t]) to their VP latent x * sqrt(a) + noise * sqrt(1 - a)."""
    plan = prepare(name, NS, 10, strength=0.6)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = plan.noised(x0, noise, 0.3)
    if plan.img2img_sigma is None:
        torch.testing.assert_close(got, x0 + noise * float(plan.sigmas[0]) + noise * 0.3, rtol=0, atol=0)
    else:
        a = 1 / (1 + plan.img2img_sigma**2)  # alphas_cumprod at the noising timestep
        vp = x0 * a**0.5 + noise * (1 - a) ** 0.5 + noise * 0.3 * a**0.5
        torch.testing.assert_close(got, vp * (1 + float(plan.sigmas[0]) ** 2) ** 0.5, rtol=1e-5, atol=1e-5)
    assert torch.equal(plan.noised(x0, noise, 0.0), plan.noised(x0, noise))


def test_extra_noise_through_img2img_and_hires(tiny_pipe):
    """img2img and the hires pass start with the extra noise (the image changes, "Extra noise" is written and read
    back); txt2img has no start to add it to: the same image, nothing written."""
    kw = dict(steps=4, seed=3, width=64, height=64, sampler="Euler a")
    base = tiny_pipe("a cat", **kw)
    same = tiny_pipe("a cat", extra_noise=0.5, **kw)
    assert torch.equal(same.latents, base.latents) and "Extra noise" not in same.infotexts[0]
    plain = tiny_pipe("a cat", init_image=base.images[0], strength=0.6, **kw)
    extra = tiny_pipe("a cat", init_image=base.images[0], strength=0.6, extra_noise=0.5, **kw)
    assert (extra.latents - plain.latents).abs().max() > 1e-3
    assert "Extra noise: 0.5" in extra.infotexts[0]
    assert GenerationParams.from_infotext(extra.infotexts[0])[0].extra_noise == 0.5
    hires = GenerationParams(prompt="a cat", enable_hr=True, hr_scale=1.5, strength=0.5, extra_noise=0.2,
                             steps=3, seed=3, width=64, height=64)
    result = tiny_pipe.generate(hires)
    assert "Extra noise: 0.2" in result.infotexts[0]
    assert (result.latents - tiny_pipe.generate(hires.replace(extra_noise=0.0)).latents).abs().max() > 1e-3
    assert GenerationParams.from_a1111({"prompt": "x", "override_settings": {"img2img_extra_noise": 0.4}}
                                       ).extra_noise == 0.4


# ---------------------------------------------------------------------------------------------------------------
# 10. a prompt and a negative prompt of different lengths (A1111's defaults: no padding)


def test_long_prompt_and_short_negative_through_the_pipeline(tiny_pipe):
    """Each runs at its own length in a U-Net call of its own (A1111's default), or padded into one batch with
    pad_cond_uncond ("Pad conds: True" written and read back); DeepCache keeps the two kinds of call apart."""
    prompt = ", ".join(["a red cat on a blue mat"] * 12)  # over 75 tokens: 2 chunks
    calls = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape[0],
                                                                                  args[2].shape[1])))
    kw = dict(steps=3, seed=3, width=64, height=64, sampler="Euler")
    try:
        apart = tiny_pipe(prompt, "blurry", **kw)
        seen, calls[:] = list(calls), []
        padded = tiny_pipe(prompt, "blurry", pad_cond_uncond=True, **kw)
        seen_padded, calls[:] = list(calls), []
        cached = tiny_pipe(prompt, "blurry", cache_interval=2, **kw)
    finally:
        hook.remove()
    assert seen == [(1, 154), (1, 77)] * 3 and seen_padded == [(2, 154)] * 3
    assert (apart.latents - padded.latents).abs().max() > 1e-4
    assert "Pad conds: True" in padded.infotexts[0] and "Pad conds" not in apart.infotexts[0]
    assert GenerationParams.from_infotext(padded.infotexts[0])[0].pad_cond_uncond is True
    same = tiny_pipe("a red cat", "blurry", pad_cond_uncond=True, **kw)  # one chunk each: nothing to pad
    assert "Pad conds" not in same.infotexts[0]  # as A1111, which writes it only where it padded
    assert GenerationParams.from_a1111({"prompt": "x", "override_settings": {"pad_cond_uncond": True}}
                                       ).pad_cond_uncond is True
    assert torch.isfinite(cached.latents).all() and (cached.latents - apart.latents).abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# 11. eta for A1111's SDE samplers and DPM fast / adaptive (A1111 passes them its eta_ancestral option too)


@pytest.mark.parametrize("eta", [0.0, 0.4])
@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_sde_eta_equals_kdiffusion(kd, model, name, eta):
    plan = prepare(name, NS, 6)
    x = start_noise(6, plan.init_noise_scale)
    ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators(),
                       **SAMPLERS[name].eta_options(eta))
    ref = reference_latents(kd, model, name, plan, x, eta=eta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (run(model, plan, x) - ours).abs().max() > 1e-3  # eta is not ignored


@pytest.mark.parametrize("eta", [0.0, 0.4])
@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_dpm_fast_and_adaptive_eta_equal_kdiffusion(kd, model, name, eta):
    """With eta 0 k-diffusion still draws the noise (times 0), and DPM adaptive's step-size controller takes
    order 3 instead of 1.5."""
    sampling, external = kd
    wrap = external.CompVisDenoiser(model)
    plan = prepare(name, NS, 6)
    x = start_noise(6, plan.init_noise_scale)
    lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    kwargs = dict(eta=eta, noise_sampler=per_image_noise(x), disable=True)
    if name == "DPM fast":
        ref = sampling.sample_dpm_fast(wrap, x.clone(), lo, hi, 6, **kwargs)
    else:
        ref = sampling.sample_dpm_adaptive(wrap, x.clone(), lo, hi, **kwargs)
    ours = plan.sample(EpsDenoiser(model, plan.sigma_to_t), x.clone(), generator=generators(),
                       **SAMPLERS[name].eta_options(eta))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
