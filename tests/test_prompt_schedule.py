"""Prompt editing and composition: A1111 v1.10's schedules (its prompt_parser doctests, and cases whose A1111 output
was taken from its parser and is the same whatever Python's hash seed), the AND split, and the scheduled CFG
denoiser on a stand-in model (which embedding each call gets; the composable-diffusion combine by hand)."""

import pytest
import torch

from stablediff.denoiser import CFGDenoiser, ScheduledCFGDenoiser
from stablediff.prompt_schedule import MAX_DEPTH, composable_schedules, piece_at, prompt_schedule, split_and
from stablediff.samplers import sample_euler, sample_heun

# A1111's doctests of get_learned_conditioning_prompt_schedules (10 steps; with hires_steps=10 for the last two)
DOCTESTS = [
    ("test", None, [(10, "test")]),
    ("a [b:3]", None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", None, [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", None, [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", None, [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ("a [b:.5] c", 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    # The doctest "a [{b|d{:.5] c" expects [[5, 'a  c'], [10, 'a {b|d{ c']], but v1.10's grammar has no "|" in plain
    # text, and its parser fails there: the prompt is used as it is (what A1111 really does).
    ("a [{b|d{:.5] c", None, [(10, "a [{b|d{:.5] c")]),
]

# (prompt, steps, hires_steps, A1111's schedule)
CASES = [
    ("a | b", 10, None, [(10, "a | b")]),  # "|" outside an alternation: the prompt as it is
    ("[a:b:3] | c", 10, None, [(10, "[a:b:3] | c")]),
    ("[a:b:c:3]", 10, None, [(10, "[a:b:c:3]")]),
    ("[a|b:3]", 10, None, [(10, "[a|b:3]")]),
    ("(a:b:c)", 10, None, [(10, "(a:b:c)")]),
    ("[(a:b:c):3]", 10, None, [(10, "[(a:b:c):3]")]),
    ("[a:b:-1]", 10, None, [(10, "b")]),
    ("[a:b:0]", 10, None, [(10, "b")]),
    ("[a:b:1.5]", 10, None, [(10, "a")]),  # a fraction past the end: capped at the last step
    ("[a:b:100]", 10, None, [(10, "a")]),
    ("[a:b:.99]", 10, None, [(9, "a"), (10, "b")]),  # truncated to a whole step
    ("[a:b:5 ]", 10, None, [(5, "a"), (10, "b")]),
    ("[a: b :+3]", 10, None, [(3, "a"), (10, " b ")]),
    ("[a:b:1e1]", 10, None, [(10, "a")]),  # no "." : a step count, 10
    ("[a:b:5e-1]", 10, None, [(10, "b")]),  # no "." : step int(0.5) = 0
    ("a \\[b:3\\]", 10, None, [(10, "a \\[b:3\\]")]),  # escapes stay for prompts.py
    ("a \\[b:3]", 10, None, [(10, "a \\[b:3]")]),
    ("a\\", 10, None, [(10, "a\\")]),
    ("[a:b:3]\\", 10, None, [(10, "[a:b:3]\\")]),  # a dangling backslash: the prompt as it is
    ("[[a|b]:c:3]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a|[b:c:2]]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a|b|c]", 5, None, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[a:b:3] [c:d:3]", 10, None, [(3, "a c"), (10, "b d")]),
    ("[x:x:3]", 10, None, [(3, "x"), (10, "x")]),  # pieces are not merged
    ("(masterpiece:1.2) [cat:dog:0.3] <lora:foo:0.8>", 10, None,
     [(3, "(masterpiece:1.2) cat <lora:foo:0.8>"), (10, "(masterpiece:1.2) dog <lora:foo:0.8>")]),
    ("[:3]", 10, None, [(3, ""), (10, "")]),
    ("[a::3]", 10, None, [(3, "a"), (10, "")]),
    ("", 10, None, [(10, "")]),
    ("[a:b:3]\n[c:d:.5]", 10, None, [(3, "a\nc"), (5, "b\nc"), (10, "b\nd")]),
    ("a:[b:3]", 10, None, [(3, "a:"), (10, "a:b")]),
    ("[a:b:3](c)", 10, None, [(3, "a(c)"), (10, "b(c)")]),
    ("[a:b:15]", 10, 10, [(5, "a"), (10, "b")]),  # hires: a step count counts on from the first pass
    ("[a:b:5]", 10, 10, [(10, "b")]),
    ("[a:b:1.0]", 10, 10, [(10, "b")]),
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[ in background:0.25] [shoddy:masterful:0.5]", 100, None, [  # A1111's comment at the top of prompt_parser
         (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
         (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
         (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
         (75, "fantasy landscape with a lake and an oak in background masterful"),
         (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
]


@pytest.mark.parametrize("prompt, hires, want", DOCTESTS)
def test_a1111_doctests(prompt, hires, want):
    assert prompt_schedule(prompt, 10, hires_steps=hires) == want


@pytest.mark.parametrize("prompt, steps, hires, want", CASES)
def test_a1111_schedules(prompt, steps, hires, want):
    assert prompt_schedule(prompt, steps, hires_steps=hires) == want


@pytest.mark.parametrize("prompt, want", [
    ("a cat :1.2 AND a dog :0.8", [("a cat", 1.2), (" a dog", 0.8)]),
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
    ("a cat:1.5", [("a cat", 1.5)]),  # a weight is taken off without AND too
    ("x:-0.5 AND y: 2.", [("x", -0.5), (" y", 2.0)]),
    ("[a AND b:3]", [("[a", 1.0), (" b:3]", 1.0)]),  # AND splits before the brackets are read
    ("a:1:2", [("a:1", 2.0)]),
    ("a\n:1.2 \n", [("a", 1.2)]),
    ("a:1.2.3", [("a:1.2.3", 1.0)]),
    ("x :1e3", [("x :1e3", 1.0)]),
    ("aANDb AND_x a,AND,b", [("aANDb AND_x a,", 1.0), (",b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_split_and_as_a1111(prompt, want):
    assert split_and(prompt) == want


def test_composable_schedules_give_each_sub_prompt_its_own():
    subs = composable_schedules("a [cat:dog:0.5] :1.2 AND [red|blue] :0.8", 4)
    assert [(s.text, s.weight) for s in subs] == [("a [cat:dog:0.5]", 1.2), (" [red|blue]", 0.8)]
    assert subs[0].schedule == [(2, "a cat"), (4, "a dog")]
    assert subs[1].schedule == [(1, " red"), (2, " blue"), (3, " red"), (4, " blue")]


def test_schedule_never_has_more_pieces_than_steps():
    prompt = "".join(f"[a{i}:b{i}:{i}]" for i in range(1, 60)) + "[x|y]"
    for steps in (1, 7, 30):
        ends = [end for end, _ in prompt_schedule(prompt, steps)]
        assert ends == list(range(1, steps + 1))


def test_absurd_nesting_is_refused():
    prompt_schedule("[" * MAX_DEPTH + "a:3" + "]" * MAX_DEPTH, 10)  # deep, but within the bound
    with pytest.raises(ValueError, match=f"more than {MAX_DEPTH} deep"):
        prompt_schedule("[" * (MAX_DEPTH + 1) + "a" + "]" * (MAX_DEPTH + 1), 10)
    with pytest.raises(ValueError, match="more than"):
        prompt_schedule("(" * 10_000, 10)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "10"])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match=f"steps must be a whole number >= 1, got {steps!r}"):
        prompt_schedule("a", steps)


def test_piece_at_is_a1111s_lookup():
    ends = [5, 10]  # [a:b:5] over 10 steps
    assert [piece_at(ends, k) for k in range(12)] == [0] * 6 + [1] * 6


# ---------------------------------------------------------------------------------------------------------------
# the scheduled denoiser on a stand-in model: D(x, sigma) = x * 0 + mean(context) per row


class Recorder:
    def __init__(self):
        self.contexts, self.uncond_rows = [], []

    def __call__(self, x, sigma, context, uncond_rows=None):
        self.contexts.append(context.clone())
        self.uncond_rows.append(uncond_rows)
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def embed(value):
    return torch.full((1, 3, 4), float(value))


def encode_schedule(schedule, table):
    return [(end, embed(table[text])) for end, text in schedule]


def test_prompt_edit_switches_the_embedding_at_a1111s_step():
    table = {"a": 1.0, "b": 2.0, "": -1.0}
    (sub,) = composable_schedules("[a:b:0.5]", 10)
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, [(sub.weight, encode_schedule(sub.schedule, table))],
                             encode_schedule(prompt_schedule("", 10), table), 7.0)
    sample_euler(d, torch.zeros(1, 4, 2, 2), torch.linspace(10, 0, 11))
    assert len(inner.contexts) == 10
    conds = [c[1, 0, 0].item() for c in inner.contexts]  # row 0 is uncond, row 1 the prompt
    assert conds == [1.0] * 6 + [2.0] * 4  # calls 0-5 use a (end step 5, A1111's k <= end), 6-9 use b
    assert all(c[0, 0, 0].item() == -1.0 for c in inner.contexts)


def test_heun_counts_both_calls_of_a_step_as_a1111():
    table = {"a": 1.0, "b": 2.0}
    steps = 4
    (sub,) = composable_schedules("[a:b:0.5]", 2 * steps)  # A1111: second-order samplers schedule over 2 x steps
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, [(1.0, encode_schedule(sub.schedule, table))], None, 1.0)
    sample_heun(d, torch.zeros(1, 4, 2, 2), torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0]))
    assert [c[0, 0, 0].item() for c in inner.contexts] == [1.0] * 5 + [2.0] * 2  # 7 calls: 2 + 2 + 2 + 1


def test_and_combines_as_composable_diffusion():
    inner = Recorder()
    uncond = [(4, embed(1.0))]
    conds = [(1.2, [(4, embed(3.0))]), (0.8, [(2, embed(5.0)), (4, embed(7.0))])]
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5)
    x = torch.zeros(2, 4, 2, 2)
    first = d(x, torch.tensor(3.0))
    assert len(inner.contexts) == 1 and inner.contexts[0].shape[0] == 6  # one call: [uncond; cond_1; cond_2] x B
    assert inner.contexts[0][:, 0, 0].tolist() == [1.0, 1.0, 3.0, 3.0, 5.0, 5.0]
    torch.testing.assert_close(first, torch.full_like(x, 1 + 1.2 * 7.5 * (3 - 1) + 0.8 * 7.5 * (5 - 1)))
    d(x, 2.0), d(x, 1.0)
    third = d(x, 0.5)  # call 3: past the second sub-prompt's first piece (end step 2)
    torch.testing.assert_close(third, torch.full_like(x, 1 + 1.2 * 7.5 * (3 - 1) + 0.8 * 7.5 * (7 - 1)))


def test_a_weight_other_than_one_guides_even_at_scale_one():
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, [(1.5, [(1, embed(3.0))])], [(1, embed(1.0))], 1.0)
    out = d(torch.zeros(1, 4, 2, 2), 1.0)
    torch.testing.assert_close(out, torch.full_like(out, 1 + 1.5 * (3 - 1)))
    with pytest.raises(ValueError, match="need an unconditional embedding"):
        ScheduledCFGDenoiser(inner, [(1.5, [(1, embed(3.0))])], None, 1.0)


def test_plain_cfg_is_the_one_piece_schedule_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    cond, uncond, x = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn(2, 4, 2, 2)

    def model(x, sigma, context):
        return x * context.sum(dim=(1, 2)).view(-1, 1, 1, 1).sin() + sigma.view(-1, 1, 1, 1)

    plain = CFGDenoiser(model, cond, uncond, 7.5)(x, 2.0)
    scheduled = ScheduledCFGDenoiser(model, [(1.0, [(10, cond)])], [(10, uncond)], 7.5)(x, 2.0)
    assert torch.equal(plain, scheduled)
    d_uncond, d_cond = model(x, torch.full((2,), 2.0), uncond), model(x, torch.full((2,), 2.0), cond)
    assert torch.equal(plain, d_uncond + 7.5 * (d_cond - d_uncond))


@pytest.mark.parametrize("conds, uncond, match", [
    ([], None, "at least one"),
    ([(1.0, [])], None, "rising end steps"),
    ([(1.0, [(5, embed(1)), (3, embed(2))])], None, r"rising end steps; got end steps \[5, 3\]"),
    ([(1.0, [(5, embed(1))])], [(5, torch.zeros(1, 3, 6))], r"differ in width \[4, 6\]"),
])
def test_bad_schedules_are_refused(conds, uncond, match):
    with pytest.raises(ValueError, match=match):
        ScheduledCFGDenoiser(Recorder(), conds, uncond, 7.5)


def a1111_ngms_reference(calls, sigmas, level, all_steps, uncond, conds, scale):
    """A1111's CFGDenoiser with s_min_uncond, literally: on call k (its self.step) the uncond half is skipped when
    (k odd or "NGMS all steps") and 0 < level and sigma < level; then the first cond's output stands in for the
    uncond and combine_denoised runs at scale 1.0 (each term (cond - uncond) * (weight * scale))."""
    out = []
    for k, sigma in zip(range(calls), sigmas):
        skip = (k % 2 or all_steps) and level > 0 and sigma < level
        fake = conds[0][1]
        base, s = (fake, 1.0) if skip else (uncond, scale)
        d = base
        for weight, value in conds:
            d = d + (value - base) * (weight * s)
        out.append((d, not skip))
    return out


@pytest.mark.parametrize("all_steps", [False, True])
def test_negative_guidance_minimum_sigma_as_a1111(all_steps):
    """NGMS (A1111's s_min_uncond): below the level, every other call (or every one) runs the conditional rows only
    and D is the conditional prediction (with AND, combined at scale 1); above it, or on even calls, full CFG."""
    uncond = [(8, embed(1.0))]
    conds = [(1.2, [(8, embed(3.0))]), (0.8, [(8, embed(5.0))])]
    sigmas = [9.0, 6.0, 4.0, 3.5, 2.0, 1.0, 0.5, 0.1]
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5, min_uncond=3.7, min_uncond_all=all_steps)
    x = torch.zeros(2, 4, 2, 2)
    got = [d(x, torch.tensor(s)) for s in sigmas]
    want = a1111_ngms_reference(len(sigmas), sigmas, 3.7, all_steps, 1.0, [(1.2, 3.0), (0.8, 5.0)], 7.5)
    for k, (g, (value, full)) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, torch.full_like(x, value), msg=f"call {k}")
        assert inner.contexts[k].shape[0] == (6 if full else 4), k  # [uncond; cond_1; cond_2] x B, or the conds
    skipped = [k for k, (_, full) in enumerate(want) if not full]
    assert skipped == ([3, 5, 7] if not all_steps else [3, 4, 5, 6, 7])
    # off by default; the level compared can be another measure (A1111's timestep samplers compare timesteps)
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5, min_uncond=500.0, level=lambda s: s * 100)
    d(x, torch.tensor(9.0)), d(x, torch.tensor(6.0)), d(x, torch.tensor(4.0)), d(x, torch.tensor(4.5))
    assert [c.shape[0] for c in inner.contexts] == [6, 6, 6, 4]  # 600 >= 500 on call 1; 450 < 500 on call 3
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5)
    [d(x, torch.tensor(s)) for s in sigmas]
    assert {c.shape[0] for c in inner.contexts} == {6}


@pytest.mark.parametrize("share, total, skipped", [(0.1, 20, [0, 1, 2]), (0.25, 8, [0, 1, 2]), (1.0, 4, [0, 1, 2, 3])])
def test_skip_early_cond_as_a1111(share, total, skipped):
    """A1111's skip_early_cond: call k leaves the negative prompt out while k / total_steps <= the share (k 0 always
    with any share); it comes before NGMS, which then applies to the other calls."""
    uncond, conds = [(40, embed(1.0))], [(1.0, [(40, embed(3.0))])]
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5, skip_early=share, total_calls=total)
    x = torch.zeros(1, 4, 2, 2)
    got = [d(x, torch.tensor(10.0 - k * 0.1)) for k in range(total)]
    assert [k for k, c in enumerate(inner.contexts) if c.shape[0] == 1] == skipped
    for k, g in enumerate(got):  # skipped: the prompt's prediction (3); else full CFG, 1 + 7.5 * (3 - 1)
        assert g.flatten()[0].item() == pytest.approx(3.0 if k in skipped else 16.0)
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, conds, uncond, 7.5, skip_early=0.1, total_calls=10, min_uncond=100.0)
    [d(x, torch.tensor(5.0)) for _ in range(6)]
    assert [c.shape[0] for c in inner.contexts] == [1, 1, 2, 1, 2, 1]


def test_second_order_samplers_count_two_calls_a_step():
    """A1111's "second_order" samplers (their prompt schedules and skip_early_cond count 2 a step)."""
    from stablediff.samplers import SAMPLERS

    a1111 = {n for n, s in SAMPLERS.items() if s.family == "a1111" and s.calls_per_step == 2}
    assert a1111 == {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}



def chunks(*values):
    """An embedding of len(values) 77-token chunks, each all `value`."""
    return torch.cat([torch.full((1, 77, 4), float(v)) for v in values], dim=1)


def test_prompt_and_negative_of_different_lengths_run_apart_as_a1111():
    """A1111's default: a 2-chunk prompt and a 1-chunk negative prompt run in two U-Net calls, each at its own
    length, the conditional rows first (the wrapper says which rows are unconditional); equal lengths, one."""
    inner = Recorder()
    d = ScheduledCFGDenoiser(inner, [(1.0, [(4, chunks(3.0, 5.0))])], [(4, chunks(1.0))], 7.5)
    x = torch.zeros(2, 4, 2, 2)
    got = d(x, torch.tensor(3.0))
    assert [c.shape for c in inner.contexts] == [(2, 154, 4), (2, 77, 4)] and inner.uncond_rows == [0, 2]
    torch.testing.assert_close(got, torch.full_like(x, 1 + 7.5 * (4 - 1)))  # cond's mean over its 154 tokens: 4
    inner = Recorder()
    ScheduledCFGDenoiser(inner, [(1.0, [(4, chunks(3.0))])], [(4, chunks(1.0))], 7.5)(x, 3.0)
    assert [c.shape for c in inner.contexts] == [(4, 77, 4)] and inner.uncond_rows == [None]


def test_pad_conds_continues_the_shorter_with_the_empty_prompt():
    """A1111's "pad prompt/negative prompt": the shorter gets the empty prompt's chunk (here 0) and one batch runs;
    either side may be the shorter."""
    for cond, uncond, want_rows in [(chunks(3.0, 5.0), chunks(1.0), [1.0, 0.0]), (chunks(3.0), chunks(1.0, 2.0),
                                                                              [1.0, 2.0])]:
        inner = Recorder()
        d = ScheduledCFGDenoiser(inner, [(1.0, [(4, cond)])], [(4, uncond)], 2.0, pad=chunks(0.0))
        d(torch.zeros(1, 4, 2, 2), 3.0)
        (context,) = inner.contexts
        assert context.shape == (2, 154, 4) and d.happened == {"Pad conds"}
        assert context[0, ::77, 0].tolist() == want_rows  # the unconditional row, chunk by chunk


def test_sub_prompts_of_different_lengths_repeat_their_last_vector():
    """A1111's stack_conds: AND sub-prompts (and prompt-editing pieces) at one call are brought to the longest by
    repeating their own last vector, not by the empty prompt."""
    inner = Recorder()
    short = chunks(3.0)
    short[:, -1] = 9.0
    d = ScheduledCFGDenoiser(inner, [(1.0, [(4, chunks(5.0, 5.0))]), (0.5, [(4, short)])], [(4, chunks(1.0, 1.0))],
                             7.5)
    d(torch.zeros(1, 4, 2, 2), 3.0)
    (context,) = inner.contexts
    assert context.shape == (3, 154, 4)
    assert context[2, :77, 0].tolist() == [3.0] * 76 + [9.0] and context[2, 77:, 0].tolist() == [9.0] * 77
