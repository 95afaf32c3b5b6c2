"""Prompt editing and composition as AUTOMATIC1111 (v1.10) schedules them: which text each step conditions on.

Syntax (A1111's `prompt_parser`; the rules below are its behaviour, pinned by tests/test_prompt_schedule.py):
  [from:to:when]  `from` up to step `when`, `to` after it;  [to:when] adds `to` after `when`;  [from::when] removes
                  `from` after `when`. `when` is a number, optionally surrounded by whitespace: written with a "."
                  it is a fraction of the steps (0.25, 1.0), otherwise a step count (3, 1e1); it is truncated to a
                  whole step and capped at the step count.
  [a|b|c]         alternation: a on step 1, b on step 2, c on step 3, a on step 4, ... (an option may be empty)
  (a) (a:1.2) [a] emphasis, \\[ \\( \\: ...  escapes, <lora:...>: kept verbatim for prompts.py.
  x :1.2 AND y :0.8   composition (composable diffusion): sub-prompts split at the word AND, each with an optional
                  trailing ":weight" (default 1), which is taken off even when there is no AND.

Parsing. Inside brackets everything must be well formed: plain text, escapes, (P), (P:P), [P], [P|P|...], [P:N],
[P:P:N]. At the top level a bracket or ":" that starts nothing well formed is plain text (so "a [unbalanced" is
fine), and a well-formed bracket is always taken as one. (Where a stray bracket or colon also lets A1111's Earley
parser read it as plain text, as in "a [b:3]]", A1111 picks either reading depending on Python's hash seed; this
is one of its two answers, and the one its documentation describes.) A "|" outside an alternation, or a backslash at the end or
before a line break, makes the whole prompt plain text (one piece, unedited), as A1111's grammar fails there.

A schedule is a list of (end_step, text): the text is used up to and including step end_step (steps counted from 1
to `steps`, the last end_step is `steps`). Its end steps are the step count and every edit's `when` in 1..steps
(all steps when there is an alternation), so it never has more pieces than steps. Pieces are not merged when their
texts agree (A1111 encodes each). A1111's `reconstruct_cond_batch` looks the text up for the k-th call of its
denoiser (k counted from 0) as the first piece with k <= end_step: see `piece_at`.

The hires pass (`hires_steps`, A1111's new scheduling, the default since its `use_old_scheduling` option): a step
count `when` counts on from the first pass's `steps`, a fraction counts from 1.0 (1.5 is halfway through the hires
pass), so one prompt can edit across both passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DEPTH = 32  # brackets nested deeper than this are refused (no real prompt comes near)

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")  # a sub-prompt's trailing ":weight"
_TRAILING_SPACE = re.compile(r"\s*$")
# lark's SIGNED_NUMBER, which A1111's grammar takes for `when`, with the whitespace it allows around it
_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*")
_SPECIAL = "\\[]():|"


@dataclass(frozen=True)
class SubPrompt:
    """One AND sub-prompt: its text, its weight and its schedule of (end_step, text) pieces."""

    text: str
    weight: float
    schedule: list[tuple[int, str]]


@dataclass(frozen=True)
class _Edit:
    before: list | None  # None for [to:when]
    after: list
    when: str  # the number as written: "." in it makes it a fraction


@dataclass(frozen=True)
class _Alternation:
    options: list[list]


# ---------------------------------------------------------------------------------------------------------------
# public API


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A prompt's AND sub-prompts as (text, weight): "a cat :1.2 AND a dog" -> [("a cat", 1.2), (" a dog", 1.0)].
    The text keeps its leading space and loses its trailing one, as A1111's `get_multicond_prompt_list`."""
    _check_text(prompt)
    parts = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.search(sub)
        if m:
            parts.append((sub[: m.start()], float(m.group(1))))
        else:
            parts.append((_TRAILING_SPACE.sub("", sub, count=1), 1.0))
    return parts


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The (end_step, text) pieces of one prompt over `steps` steps (A1111's
    `get_learned_conditioning_prompt_schedules`; no AND splitting: that is `composable_schedules`, and the negative
    prompt, which A1111 does not split, takes this directly). With `hires_steps` the schedule is the hires pass's,
    over hires_steps steps, `steps` being the first pass's."""
    _check_text(prompt)
    _check_steps(steps, "steps")
    if hires_steps is not None:
        _check_steps(hires_steps, "hires_steps")
    tree = _Parser(prompt).parse()
    if tree is None:
        return [(hires_steps or steps, prompt)]
    when = _When(steps, hires_steps)
    ends = sorted(_end_steps(tree, when) | {when.steps})
    return [(end, _render(tree, end, when)) for end in ends]


def composable_schedules(prompt: str, steps: int, *, hires_steps: int | None = None) -> list[SubPrompt]:
    """Each AND sub-prompt of `prompt` with its weight and schedule (A1111's `get_multicond_learned_conditioning`,
    without the encoding): the conditioning of a step is sum_i weight_i * (D(cond_i) - D(uncond)) on top of D(uncond)
    (denoiser.ScheduledCFGDenoiser)."""
    return [SubPrompt(text, weight, prompt_schedule(text, steps, hires_steps=hires_steps))
            for text, weight in split_and(prompt)]


def piece_at(ends: list[int], call: int) -> int:
    """Index of the piece the denoiser's `call`-th evaluation (from 0) uses: the first with call <= end_step, as
    A1111's `reconstruct_cond_batch`. So [a:b:5] uses a for calls 0-5 and b from call 6 (A1111 issue #7279 calls
    this off by one; it is kept so that A1111's prompts give A1111's images). Past the last end step (which A1111's
    second-order step doubling never reaches) the last piece goes on."""
    for i, end in enumerate(ends):
        if call <= end:
            return i
    return len(ends) - 1


# ---------------------------------------------------------------------------------------------------------------
# parsing: each method returns (nodes, end index) or None where the text there is not of that form


class _Parser:
    """Recursive descent over the prompt; a node list holds strings, _Edit and _Alternation. Bracket groups are
    memoised by position, so a top-level bracket that fails is not parsed again from an enclosing attempt."""

    def __init__(self, text: str):
        self.text, self.groups = text, {}

    def parse(self) -> list | None:
        """The whole prompt, or None where A1111's grammar fails (the prompt is then used as it is)."""
        text, nodes, i = self.text, [], 0
        while i < len(text):
            c = text[i]
            if c in "[(":
                group = self.group(i, 1)
                if group is not None:
                    nodes += group[0]
                    i = group[1]
                    continue
            if c in "[]():":  # a bracket or colon that starts nothing: plain text at the top level
                nodes.append(c)
                i += 1
                continue
            end = self.plain(i)
            if end == i:  # "|" outside an alternation, or a dangling backslash
                return None
            nodes.append(text[i:end])
            i = end
        return nodes

    def plain(self, i: int) -> int:
        """End of the run of plain text (any character but the special ones, or a backslash and the next
        character other than a line break) from i."""
        text = self.text
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 == len(text) or text[i + 1] == "\n":
                    break
                i += 2
            elif c in _SPECIAL:
                break
            else:
                i += 1
        return i

    def prompt(self, i: int, depth: int) -> tuple[list, int] | None:
        """A well-formed run from i up to the next "]", ")", ":", "|" or the end."""
        text, nodes = self.text, []
        while i < len(text) and text[i] not in "]):|":
            if text[i] in "[(":
                group = self.group(i, depth + 1)
                if group is None:
                    return None
                nodes += group[0]
                i = group[1]
                continue
            end = self.plain(i)
            if end == i:
                return None
            nodes.append(text[i:end])
            i = end
        return nodes, i

    def group(self, i: int, depth: int) -> tuple[list, int] | None:
        if depth > MAX_DEPTH:
            raise ValueError(f"prompt nests brackets more than {MAX_DEPTH} deep (at character {i})")
        if i not in self.groups:
            parts = self.parts(i, depth)
            close = ")" if self.text[i] == "(" else "]"
            self.groups[i] = None if parts is None or parts[2] != close else self.classify(i, *parts)
        return self.groups[i]

    def parts(self, i: int, depth: int):
        """The prompts between an opening bracket at i and the next closing bracket or stop, the separators
        (":" or "|") between them, and the closing character (None at the end of the text)."""
        text, parts, seps = self.text, [], []
        while True:
            got = self.prompt(i + 1, depth)
            if got is None:
                return None
            parts.append((got[0], i + 1, got[1]))
            i = got[1]
            c = text[i] if i < len(text) else None
            if c not in (":", "|"):
                return parts, seps, c, i + 1
            seps.append(c)

    def classify(self, start: int, parts, seps, close, end) -> tuple[list, int] | None:
        """Which construct the parts make, if any."""
        nodes = [p[0] for p in parts]
        if close == ")":  # (P) or (P:P): emphasis, kept as written
            if seps not in ([], [":"]):
                return None
            return ["(", *nodes[0], *([":", *nodes[1]] if seps else []), ")"], end
        if not seps:  # [P]: emphasis
            return ["[", *nodes[0], "]"], end
        if set(seps) == {"|"}:
            return [_Alternation(nodes)], end
        if seps not in ([":"], [":", ":"]):
            return None
        when = _WHEN.fullmatch(self.text, parts[-1][1], parts[-1][2])
        if when is None:
            return None
        before = nodes[0] if len(seps) == 2 else None
        return [_Edit(before, nodes[-2], when.group(1))], end


# ---------------------------------------------------------------------------------------------------------------
# scheduling


class _When:
    """The step an edit's number stands for: a step count, or with a "." a fraction of the steps; in a hires pass
    counted on from the first pass (A1111's new scheduling)."""

    def __init__(self, steps: int, hires_steps: int | None):
        self.steps = steps if hires_steps is None else hires_steps
        self.step_offset, self.fraction_offset = (0, 0.0) if hires_steps is None else (steps, 1.0)

    def __call__(self, number: str) -> int:
        v = float(number)
        v = (v - self.fraction_offset) * self.steps if "." in number else v - self.step_offset
        return int(max(min(v, self.steps), 0.0))  # as min(steps, int(v)) for every step >= 1 (and no overflow)


def _end_steps(nodes: list, when: _When) -> set[int]:
    ends = set()
    for node in nodes:
        if isinstance(node, _Edit):
            step = when(node.when)
            if step >= 1:
                ends.add(step)
            ends |= _end_steps(node.before or [], when) | _end_steps(node.after, when)
        elif isinstance(node, _Alternation):
            ends |= set(range(1, when.steps + 1))
    return ends


def _render(nodes: list, step: int, when: _When) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_render(node.before or [] if step <= when(node.when) else node.after, step, when))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, when))
    return "".join(out)


def _check_text(prompt) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__} {prompt!r:.80}")


def _check_steps(steps, name: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {steps!r}")
