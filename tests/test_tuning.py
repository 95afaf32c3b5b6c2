"""tuning.py: each layer shape's fastest way is timed once, remembered per machine, and every way gives the layer's
numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablediff import cpu, tuning
from stablediff import nn as snn


def counting(results: dict[str, float]):
    """Ways returning a tensor of their own value each, and the names of the ways called, in order."""
    calls = []
    ways = {name: (lambda name=name, v=v: calls.append(name) or torch.tensor(v)) for name, v in results.items()}
    return ways, calls


def fake_clock(monkeypatch, seconds: dict[str, float], calls: list):
    """time.perf_counter as seen by tuning.pick: each way's call takes seconds[way]."""
    now = [0.0]

    def clock():
        if calls:
            now[0] += seconds[calls[-1]] / 2  # two readings per timed call: start and end
        return now[0]

    monkeypatch.setattr(tuning.time, "perf_counter", clock)


def test_decide_keeps_the_plain_op_on_a_near_tie():
    assert tuning.decide({"plain": [1.0, 1.1], "fast": [0.96, 0.97]}) == "plain"
    assert tuning.decide({"plain": [1.0, 1.1], "fast": [0.95, 2.0]}) == "fast"
    assert tuning.decide({"plain": [1.0], "a": [0.7], "b": [0.6]}) == "b"
    assert tuning.decide({"plain": [0.5], "a": [0.7]}) == "plain"


def test_pick_times_once_returns_the_chosen_result_and_remembers_it(tuned, monkeypatch):
    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    fake_clock(monkeypatch, {"plain": 0.01, "fast": 0.005}, calls)
    assert tuning.pick("k", ways).item() == 2.0  # the chosen way's own result
    assert calls == ["plain", "fast"] * (1 + tuning.ROUNDS)  # a first run, then the rounds, alternating
    calls.clear()
    assert tuning.pick("k", ways).item() == 2.0 and calls == ["fast"]
    data = json.loads(tuned.read_text())
    assert data == {tuning.machine_key(): {"k": "fast"}}
    tuning.forget()  # a new process: the file answers, nothing is timed
    calls.clear()
    assert tuning.pick("k", ways).item() == 2.0 and calls == ["fast"]


def test_the_first_timing_in_a_process_says_why_the_image_is_slower(tuned, monkeypatch):
    import warnings

    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    with pytest.warns(RuntimeWarning, match=r"timing this CPU's kernels .*kept in .*kernels\.json"):
        tuning.pick("first", ways)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning.pick("second", ways)  # timed too, but said once per process
        tuning.pick("first", ways)  # remembered: not timed
    tuning.forget()
    monkeypatch.setenv(tuning.ENV, "memory")
    with pytest.warns(RuntimeWarning, match="not kept: STABLEDIFF_TUNING=memory"):
        tuning.pick("third", ways)


def test_a_long_layer_is_timed_twice_per_way_and_every_run_counts(tuned, monkeypatch):
    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    times = {}
    monkeypatch.setattr(tuning, "decide", lambda t: times.update(t) or "plain")
    # perf_counter's readings, a start and an end per run: the plain op's first run takes 10 s (>= LONG), so each
    # way runs once more, not ROUNDS times
    monkeypatch.setattr(tuning.time, "perf_counter", iter([0, 10, 0, 0.5, 0, 0.5, 0, 10]).__next__)
    assert tuning.pick("k", ways).item() == 1.0
    assert calls == ["plain", "fast"] * 2 and times == {"plain": [10, 0.5], "fast": [0.5, 10]}


def test_unsettled_timings_get_more_rounds_until_two_runs_agree(tuned, monkeypatch):
    """A way whose runs disagree (a first touch of fresh memory had slowed most runs of a product 5x) is run again,
    alternating with the others, until its two best runs are within SETTLED of each other, at most MAX_ROUNDS rounds."""
    ways, calls = counting({"plain": 1.0, "fast": 2.0})

    def clock_of(runs: dict):
        """perf_counter as seen by tuning.pick: each call of a way takes its next run in `runs`."""
        now, seen = [0.0], [0]

        def clock():  # two readings per timed call: at the start nothing new has run, at the end the call has
            if len(calls) > seen[0]:
                seen[0] = len(calls)
                now[0] += next(runs[calls[-1]])
            return now[0]
        return clock

    monkeypatch.setattr(tuning.time, "perf_counter", clock_of(
        {"plain": iter([0.06, 0.18, 0.06, 0.06, 0.06]), "fast": iter([0.145, 0.155, 0.07, 0.03, 0.03])}))
    # after the first run and ROUNDS rounds "fast" (0.145, 0.155, 0.07) would lose to "plain" (0.06): two more
    assert tuning.pick("k", ways).item() == 2.0 and calls == ["plain", "fast"] * 5
    assert not tuning._settled({"fast": [0.145, 0.155, 0.07]}) and tuning._settled({"a": [0.2, 0.03, 0.034]})
    # a way that never settles (its best run 0.01, every other 0.05) stops at MAX_ROUNDS rounds
    tuning.forget()
    calls.clear()
    monkeypatch.setattr(tuning.time, "perf_counter", clock_of(
        {"plain": iter([0.01] + [0.05] * 20), "fast": iter([0.02] * 21)}))
    tuning.pick("k2", ways)
    assert len(calls) == 2 * (1 + tuning.MAX_ROUNDS)


def test_the_machine_key_names_cpu_torch_and_threads():
    key = tuning.machine_key()
    assert cpu.cpu_model() in key and torch.__version__ in key
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert tuning.machine_key() != key and f"{before + 1} threads" in tuning.machine_key()
    finally:
        torch.set_num_threads(before)


def test_other_kernel_code_is_timed_afresh_and_its_choices_dropped(tuned, monkeypatch):
    """A kernels.json written by other code for the ways (an upgrade) on this CPU and torch: its choices are not
    used, and the first write drops them; other machines', thread counts' and torch builds' choices stay."""
    ours = tuning.machine_key()
    assert f"| kernels {tuning.kernels_digest()} |" in ours
    build, threads = ours.split(f" | kernels {tuning.kernels_digest()}")
    stale = {f"{build} | kernels 000000000000{threads}": {"k": "fast"},  # other code, same CPU/torch/threads
             f"{build}{threads}": {"k": "fast"}}  # written before the key had the digest
    kept = {f"{build} | kernels 000000000000 | 99 threads": {"k": "fast"},
            f"{build.replace(torch.__version__, '0.0.0')} | kernels 000000000000{threads}": {"k": "fast"},
            "other machine": {"k": "fast"}}
    tuned.parent.mkdir(parents=True)
    tuned.write_text(json.dumps({**stale, **kept}))
    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    fake_clock(monkeypatch, {"plain": 0.01, "fast": 0.02}, calls)
    assert tuning.pick("k", ways).item() == 1.0 and calls == ["plain", "fast"] * (1 + tuning.ROUNDS)
    assert json.loads(tuned.read_text()) == {**kept, ours: {"k": "plain"}}


def test_the_kernels_digest_follows_the_kernels_code(monkeypatch, tmp_path):
    installed = Path(tuning.__file__).parent
    expected = hashlib.sha256(b"".join((installed / name).read_bytes() for name in
                                       ("nn.py", "winograd.py", "cpu.py", "tuning.py"))).hexdigest()[:12]
    assert tuning.kernels_digest() == expected
    for name in tuning.KERNEL_SOURCES:
        (tmp_path / name).write_bytes((installed / name).read_bytes())
    (tmp_path / "winograd.py").write_bytes((installed / "winograd.py").read_bytes() + b"\n# changed\n")
    monkeypatch.setattr(tuning, "__file__", str(tmp_path / "tuning.py"))
    tuning.kernels_digest.cache_clear()
    try:
        assert tuning.kernels_digest() not in ("", expected)
    finally:
        monkeypatch.undo()
        tuning.kernels_digest.cache_clear()
    assert tuning.kernels_digest() == expected


def test_memory_mode_writes_nothing_and_a_bad_file_is_ignored(tuned, monkeypatch):
    monkeypatch.setenv(tuning.ENV, "memory")
    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    fake_clock(monkeypatch, {"plain": 0.01, "fast": 0.02}, calls)
    tuning.pick("k", ways)
    assert not tuned.exists()
    monkeypatch.setenv(tuning.ENV, "on")
    tuning.forget()
    tuned.parent.mkdir(parents=True)
    for bad in ("{not json", "[1, 2]", json.dumps({tuning.machine_key(): ["x"]})):
        tuned.write_text(bad)
        tuning.forget()
        calls.clear()
        tuning.pick("k", ways)
        assert len(calls) == 2 * (1 + tuning.ROUNDS)  # timed again
        assert json.loads(tuned.read_text())[tuning.machine_key()]["k"] in ("plain", "fast")


def test_a_stored_way_no_longer_offered_runs_the_plain_op(tuned):
    tuned.parent.mkdir(parents=True)
    tuned.write_text(json.dumps({tuning.machine_key(): {"k": "winograd"}, "other machine": {"k": "x"}}))
    ways, calls = counting({"plain": 1.0, "im2col": 2.0})
    assert tuning.pick("k", ways).item() == 1.0 and calls == ["plain"]
    assert "other machine" in json.loads(tuned.read_text())


def test_at_most_max_entries_are_written(tuned, monkeypatch):
    monkeypatch.setattr(tuning, "MAX_ENTRIES", 3)
    for i in range(5):
        tuning.pick(f"k{i}", counting({"plain": 1.0})[0])
    assert sorted(json.loads(tuned.read_text())[tuning.machine_key()]) == ["k0", "k1", "k2"]


@pytest.mark.parametrize("c,k,side,stride,expected", [
    (64, 72, 16, 1, {"direct", "winograd", "winograd2x2"}),  # 256 output pixels, under 256 channels: no im2col
    (64, 64, 96, 1, {"direct", "winograd"}),  # 9216 output pixels: F(4x4) only
    (256, 264, 16, 1, {"direct", "winograd", "winograd2x2", "im2col"}),
    (256, 264, 9, 1, {"direct", "winograd2x2", "im2col"}),  # 81 pixels: F(2x2) only
    (256, 264, 11, 2, {"direct", "im2col"}),  # stride 2: no Winograd
    (40, 48, 16, 1, {"direct"}),  # too few channels for either: not timed at all
])
def test_conv2d_offers_its_ways_and_each_gives_the_convolution(tuned, monkeypatch, c, k, side, stride, expected):
    """Each Winograd way also comes with oneDNN's products where they run here (not with onednn_linear off)."""
    if snn._onednn_float32_product():
        monkeypatch.setenv(cpu.ENV, "onednn_linear")
        offered = []
        monkeypatch.setattr(tuning, "decide", lambda times: offered.append(set(times)) or list(times)[0])
        with torch.no_grad():
            snn.Conv2d(c, k, 3, stride=stride, padding=1)(torch.randn(1, c, side, side))
        assert offered == ([expected] if len(expected) > 1 else [])
        monkeypatch.setenv(cpu.ENV, "")
        expected = expected | {f"{w} onednn" for w in expected if w.startswith("winograd")}
    gen = torch.Generator().manual_seed(0)
    conv = snn.Conv2d(c, k, 3, stride=stride, padding=1)
    x = torch.randn(1, c, side, side, generator=gen)
    monkeypatch.setenv(tuning.ENV, "memory")  # forget() then forgets all
    offered = []
    for way in sorted(expected):
        monkeypatch.setattr(tuning, "decide", lambda times, way=way: offered.append(set(times)) or way)
        tuning.forget()
        with torch.no_grad():
            y = conv(x)
            torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, stride, 1), rtol=1e-4, atol=1e-4)
    assert all(o == expected for o in offered) and len(offered) == (len(expected) if len(expected) > 1 else 0)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_bfloat16_conv2d_offers_direct_and_im2col_under_its_own_key(tuned, monkeypatch, stride):
    """bfloat16 (channels-last, as the pipeline runs it): no Winograd; the key names the dtype, so a float32 layer
    of the same shape keeps its own choice. Where the CPU has no bfloat16 units only the direct way is left."""
    gen = torch.Generator().manual_seed(stride)
    conv = snn.Conv2d(256, 264, 3, stride=stride, padding=1).bfloat16().to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 9, 9, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, 1)
    direct = F.conv2d(x, conv.weight, conv.bias, stride, 1)
    bound = 2 * (direct.double() - exact).abs().max().item() + 1e-2
    monkeypatch.setenv(tuning.ENV, "memory")  # forget() then forgets all
    offered = []
    for native in (True, False):
        monkeypatch.setattr(cpu, "native_bf16", lambda native=native: native)
        for way in ("direct", "im2col"):
            monkeypatch.setattr(tuning, "decide", lambda times, way=way: offered.append(set(times)) or way)
            tuning.forget()
            with torch.no_grad():
                y = conv(x)
            assert y.dtype == torch.bfloat16 and (y.double() - exact).abs().max().item() < bound
            if native:
                key = f"conv3x3 1x256x9x9 channels-last->264 stride {stride} bfloat16"
                assert tuning._choices[tuning.machine_key()] == {key: way}
    assert offered == [{"direct", "im2col"}] * 2  # without bfloat16 units: the direct way, untimed


def test_conv2d_with_tuning_off_keeps_the_fixed_rules(monkeypatch, winograd_inputs):
    monkeypatch.setenv(tuning.ENV, "off")
    monkeypatch.setenv(cpu.ENV, "")
    monkeypatch.setattr(tuning, "pick", lambda *a: pytest.fail("timed with tuning off"))
    conv = snn.Conv2d(256, 256, 3, padding=1)
    with torch.no_grad():
        conv(torch.randn(1, 256, 24, 24))  # 576 pixels, 256 channels: Winograd by THRESHOLDS
    assert winograd_inputs == [(1, 256, 24, 24)]


def test_a_way_that_raises_is_left_out(tuned):
    def broken():
        raise RuntimeError("no kernel for this shape")

    ways, calls = counting({"plain": 1.0})
    assert tuning.pick("k", {**ways, "broken": broken}).item() == 1.0
    assert json.loads(tuned.read_text())[tuning.machine_key()]["k"] == "plain"
    with pytest.raises(RuntimeError, match="no kernel"):
        tuning.pick("k2", {"broken": broken, **ways})  # the plain op itself raising is an error


def test_trial_slab_is_the_first_rows_in_the_same_layout(monkeypatch):
    monkeypatch.setattr(tuning, "TRIAL_PIXELS", 200)
    x = torch.randn(2, 3, 40, 10)
    assert tuning.trial_slab(x, 50) is None  # not larger than TRIAL_PIXELS
    slab = tuning.trial_slab(x, 2 * 40 * 10)  # a quarter of 40 rows -> 10 rows
    assert torch.equal(slab, x[:, :, :10]) and slab.is_contiguous()
    cl = tuning.trial_slab(x.contiguous(memory_format=torch.channels_last), 4 * 2 * 40 * 10)  # 2.5 rows -> 8
    assert cl.shape[2] == tuning.TRIAL_MIN_ROWS and cl.is_contiguous(memory_format=torch.channels_last)
    assert tuning.trial_slab(x[:, :, :8], 10_000) is None  # the slab would be the whole input


def test_pick_with_a_trial_times_the_trial_and_runs_the_chosen_way_once(tuned, monkeypatch):
    ways, calls = counting({"plain": 1.0, "fast": 2.0})
    trial, trial_calls = counting({"plain": 3.0, "fast": 4.0})
    fake_clock(monkeypatch, {"plain": 0.01, "fast": 0.02}, trial_calls)
    out = tuning.pick("k", ways, trial)
    assert len(trial_calls) == 2 * (1 + tuning.ROUNDS) and len(calls) == 1
    assert out.item() == {"plain": 1.0, "fast": 2.0}[calls[0]]  # the whole input's result, by the chosen way


@pytest.mark.parametrize("stride", [1, 2])
def test_a_large_conv2d_is_timed_on_a_slab_and_gives_the_convolution(tuned, monkeypatch, winograd_inputs, stride):
    monkeypatch.setenv(tuning.ENV, "memory")
    monkeypatch.setattr(tuning, "TRIAL_PIXELS", 256)
    monkeypatch.setattr(tuning, "decide", lambda times: list(times)[1])  # Winograd at stride 1, im2col at 2
    monkeypatch.setattr(tuning, "MAX_ROUNDS", tuning.ROUNDS)  # (real timings: no extra rounds to count)
    gen = torch.Generator().manual_seed(0)
    conv = snn.Conv2d(256, 256, 3, stride=stride, padding=1)
    x = torch.randn(1, 256, 32, 20, generator=gen)
    with torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, stride, 1), rtol=1e-4, atol=1e-4)
    if stride == 1:  # F(4x4) and F(2x2) (each also with oneDNN's products where they run) timed on 256 / 640 of
        # the 32 rows (13, made even: 14), then F(4x4) on all
        ways = 4 if snn._onednn_float32_product() else 2
        assert winograd_inputs == [(1, 256, 14, 20)] * ways * (1 + tuning.ROUNDS) + [(1, 256, 32, 20)]


@pytest.mark.parametrize("way", ["upsample", "subpixel"])
def test_a_large_upsample_is_timed_on_a_slab_and_gives_upsample_then_conv(tuned, monkeypatch, way):
    monkeypatch.setenv(tuning.ENV, "memory")
    monkeypatch.setattr(tuning, "TRIAL_PIXELS", 256)
    timed = []
    monkeypatch.setattr(tuning, "decide", lambda times: timed.append(set(times)) or (way if "subpixel" in times
                                                                                  else "direct"))
    gen = torch.Generator().manual_seed(0)
    up = snn.Upsample(64)
    x = torch.randn(1, 64, 16, 12, generator=gen)
    with torch.no_grad():
        y = up(x)
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, 1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert {"upsample", "subpixel"} in timed


@pytest.mark.parametrize("heads, queries, keys, dim, budget", [
    (8, 160, 77, 40, None),  # cross-attention: keys from the text
    (1, 1024, 1024, 64, None),  # one head, as the VAE's
    (3, 120, 120, 16, 4 * 120 * 7),  # the queries in pieces of 7 rows (ATTENTION_BUDGET)
])
def test_attention_offers_onednn_products_and_each_way_gives_the_attention(tuned, monkeypatch, heads, queries, keys,
                                                                          dim, budget):
    """A float32 attention with enough scores is offered torch's flash attention and oneDNN's products
    (nn.onednn_attention) where those run here; each gives F.scaled_dot_product_attention to rounding. With
    onednn_linear turned off, or few scores, it is not timed at all."""
    if budget:
        monkeypatch.setattr(snn, "ATTENTION_BUDGET", budget)
    monkeypatch.setattr(snn, "TUNED_ATTENTION_SCORES", 2 * heads * queries * keys)  # batch 2 reaches it
    gen = torch.Generator().manual_seed(heads)
    attn = snn.Attention(heads * dim, heads, dim, context_dim=24 if keys == 77 else None)
    x = torch.randn(2, queries, heads * dim, generator=gen)
    context = torch.randn(2, keys, 24, generator=gen) if keys == 77 else x
    with torch.no_grad():
        q, k, v = (p(s).view(2, -1, heads, dim).transpose(1, 2).double()
                   for p, s in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
        out = attn.to_out[0]
        exact = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, queries, -1),
                         out.weight.double(), out.bias.double())
    expected = {"sdpa", "onednn"} if snn._onednn_float32_product() else set()
    monkeypatch.setenv(tuning.ENV, "memory")  # forget() then forgets all
    offered = []
    for way in sorted(expected) or ["sdpa"]:  # (the linear layers take their plain way)
        monkeypatch.setattr(tuning, "decide", lambda times, way=way: offered.append(set(times)) or way
                            if "sdpa" in times else list(times)[0])
        tuning.forget()
        with torch.no_grad():
            y = attn(x, None if keys != 77 else context)
        assert y.dtype == torch.float32 and (y.double() - exact).abs().max().item() < 2e-5
    assert offered == [expected] * len(expected)
    offered.clear()
    for off in (lambda: monkeypatch.setenv(cpu.ENV, "onednn_linear"),
                lambda: monkeypatch.setattr(snn, "TUNED_ATTENTION_SCORES", 2 * heads * queries * keys + 1)):
        off()
        tuning.forget()
        with torch.no_grad():
            y = attn(x, None if keys != 77 else context)
        assert (y.double() - exact).abs().max().item() < 2e-5
        assert not any(key.startswith("attention") for key in tuning._choices.get(tuning.machine_key(), {}))
