"""Prompts as people write them for AUTOMATIC1111's web UI: emphasis, long prompts, BREAK, textual inversion and
extra-network tags.

    text --parse--> (text, weight) fragments + extra-network tags
         --chunks--> chunks of 77 ids (BOS, 75 prompt tokens, EOS/padding) with a multiplier per position
         --encode--> the CLIP text tower on every chunk, emphasis per chunk, chunks side by side: (1, 77 * k, C)

The syntax, with A1111's `parse_prompt_attention` semantics (each case is pinned by tests/test_prompts.py):

    (text)          weight x 1.1; ((text)) x 1.21
    [text]          weight / 1.1
    (text:1.5)      weight x 1.5 (also ": 1.5 )", "-1", "+2", ".5", "1."); square brackets take no number
    nesting         weights multiply; each bracket multiplies everything inside it when it closes, so the float
                    rounding is A1111's too: "(((house:1.3))" gives 1.3 * 1.1 * 1.1 = 1.5730000000000004
    \\( \\) \\[ \\] \\\\    the literal character; a backslash before anything else is dropped ("a\\b" -> "ab")
    unbalanced      an unclosed "(" or "[" multiplies everything after it (open "(" are applied before open "[");
                    a ")" or "]" with nothing open to close is text, and so is a ":" that ends no weight
    BREAK           upper case, a word of its own: the text after it starts a new chunk; spaces around it go
    <kind:name:m>   an extra-network tag (`<lora:NAME:0.8>`, `<lora:NAME>` = 1.0, `<hypernet:NAME:0.5>`), cut out
                    of the text before anything else and returned as ExtraNetwork (A1111 `extra_networks.parse_prompt`)
Adjacent fragments of equal weight are merged, and each fragment is tokenized on its own, as A1111 does.

Where A1111 fails, this module does the following instead (also pinned by tests):
- "(a:1.2.3)", "(a:.)": A1111 raises from float(); here the ":" is text ("a:1.2.3" weighted 1.1). So is a weight
  that is not a finite float.
- BREAK inside brackets: A1111 multiplies its marker's weight (-1), after which its tokenizer no longer sees a BREAK
  and encodes the word "break" with a negative weight; here BREAK always breaks and brackets do not touch it.
- A long prompt cut at a comma carries a textual-inversion embedding's vectors along with its placeholder positions
  (A1111 leaves the vectors behind in the previous chunk, over its padding).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

ROUND = 1.1  # "(...)"
SQUARE = 1 / 1.1  # "[...]"
OPENERS = {"(": ROUND, "[": SQUARE}  # bracket -> the weight it multiplies by when it closes
CLOSERS = {")": "(", "]": "["}
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: cut at a comma no further back than this many tokens
PLACEHOLDER_ID = 0  # the id A1111 writes where textual-inversion vectors go (their token embeddings are replaced)

BREAK = ("BREAK", -1.0)  # the chunk-break marker among parse()'s fragments; test with `fragment is BREAK`

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# |multiplier| of an extra network: A1111 users stay within about -5..5; far larger ones only overflow the
# weights they are merged into (1e308 is a finite float, and inf in float32)
MAX_MULTIPLIER = 100.0
WEIGHT_END = re.compile(r":\s*([+-]?[\d.]+)\s*\)")  # ":1.5)" closes the innermost "(" with weight 1.5
PLAIN = re.compile(r"[^\\()\[\]:]+")  # text with no syntax character in it
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
ESCAPABLE = "()[]\\"


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name[:multiplier[:more]]>` tag. `args`: the items after the multiplier as written (e.g. a LoRA's
    U-Net multiplier "0.5" or "unet=0.5", "dyn=8"), for the module that applies the network to read."""

    kind: str
    name: str
    multiplier: float
    args: tuple[str, ...] = ()


@dataclass
class Chunk:
    """What the text encoder sees for 75 tokens of a prompt."""

    ids: list[int]  # 77: BOS, the prompt's ids (PLACEHOLDER_ID for embedding vectors), EOS, padding
    multipliers: list[float]  # 77: emphasis weight of each position; 1.0 for BOS, EOS and padding
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (C,) vector replacing its token embedding


# -- parsing ----------------------------------------------------------------------------------------------------------
def parse(text: str) -> tuple[list[tuple[str, float]], list[ExtraNetwork]]:
    """Prompt -> ([(text, weight), ...] with BREAK markers, extra-network tags). Only a malformed extra-network tag
    (no name, a multiplier that is not a finite number) raises, with a ValueError naming the tag."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r:.80}")
    networks = []

    def cut(m: re.Match) -> str:
        networks.append(_extra_network(m))
        return ""

    return parse_attention(EXTRA_NETWORK_TAG.sub(cut, text)), networks


def _extra_network(m: re.Match) -> ExtraNetwork:
    items = m.group(2).split(":")
    positional = [item for item in items if item.count("=") != 1]  # "key=value" items are named ones
    if not positional or not positional[0]:
        raise ValueError(f"extra-network tag {m.group(0)!r} has no name; write <{m.group(1)}:NAME:MULTIPLIER>")
    rest = list(items)
    rest.remove(positional[0])
    multiplier = 1.0
    if len(positional) > 1:
        rest.remove(positional[1])
        multiplier = _finite_float(positional[1])
        if multiplier is None:
            raise ValueError(f"extra-network tag {m.group(0)!r}: multiplier {positional[1]!r} is not a finite number")
        check_multiplier(multiplier, f"extra-network tag {m.group(0)!r}")
    return ExtraNetwork(m.group(1), positional[0], multiplier, tuple(rest))


def check_multiplier(value: float, what: str) -> None:
    """A multiplier must be a finite number within +-MAX_MULTIPLIER, else a ValueError naming `what` (the tag or
    file): one beyond that is a typo, and its product with a LoRA's weights can overflow them."""
    if not (math.isfinite(value) and abs(value) <= MAX_MULTIPLIER):
        raise ValueError(f"{what}: multiplier {value:g} is outside -{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Emphasis syntax -> [(text, weight), ...] with BREAK markers (see the module docstring)."""
    fragments: list = []  # [text, weight] lists, and BREAK
    open_brackets = {"(": [], "[": []}  # index of the first fragment inside each open "(" / "["
    i = 0
    while i < len(text):
        i = _read(text, i, fragments, open_brackets)
    for bracket in "([":  # unclosed brackets weight everything after them, open "(" first
        for start in open_brackets[bracket]:
            _multiply(fragments[start:], OPENERS[bracket])
    return _merge(fragments)


def _read(text: str, i: int, fragments: list, open_brackets: dict[str, list[int]]) -> int:
    """Read the piece of syntax or text at text[i] into `fragments` and `open_brackets`; returns where the next
    one starts."""
    c = text[i]
    if c == "\\":
        return _read_escape(text, i, fragments)
    if c in OPENERS:
        open_brackets[c].append(len(fragments))
        return i + 1
    weighted = _weight_at(text, i) if c == ":" and open_brackets["("] else None
    if weighted is not None:  # ":1.5)" closes the innermost "(" with that weight
        weight, end = weighted
        _multiply(fragments[open_brackets["("].pop():], weight)
        return end
    opener = CLOSERS.get(c)
    if opener and open_brackets[opener]:
        _multiply(fragments[open_brackets[opener].pop():], OPENERS[opener])
        return i + 1
    if c in ")]:":  # nothing to close, or no weight: text
        fragments.append([c, 1.0])
        return i + 1
    return _read_plain(text, i, fragments)


def _read_escape(text: str, i: int, fragments: list) -> int:
    """A backslash before a bracket or a backslash is that character; before anything else it is dropped."""
    escaped = text[i + 1:i + 2]
    literal = escaped if escaped and escaped in ESCAPABLE else ""
    fragments.append([literal, 1.0])
    return i + 1 + len(literal)


def _weight_at(text: str, i: int) -> tuple[float, int] | None:
    """(weight, end) of a ":1.5)" at text[i] whose number is a finite float, else None."""
    weight_end = WEIGHT_END.match(text, i)
    weight = _finite_float(weight_end.group(1)) if weight_end else None
    return None if weight is None else (weight, weight_end.end())


def _read_plain(text: str, i: int, fragments: list) -> int:
    """Text up to the next syntax character, a BREAK marker where the word BREAK stands."""
    plain = PLAIN.match(text, i).group(0)
    for k, part in enumerate(BREAK_WORD.split(plain)):
        if k:
            fragments.append(BREAK)
        fragments.append([part, 1.0])
    return i + len(plain)


def _multiply(fragments: list, multiplier: float) -> None:
    """A closing bracket multiplies every fragment inside it (BREAK markers have no weight)."""
    for f in fragments:
        if f is not BREAK:
            f[1] *= multiplier


def _merge(fragments: list) -> list[tuple[str, float]]:
    """Adjacent fragments of equal weight joined (never across a BREAK); no fragments -> one empty one."""
    merged: list = []
    for f in fragments or [["", 1.0]]:
        if merged and f is not BREAK and merged[-1] is not BREAK and merged[-1][1] == f[1]:
            merged[-1][0] += f[0]
        else:
            merged.append(f)
    return [f if f is BREAK else (f[0], f[1]) for f in merged]


def _finite_float(number: str) -> float | None:
    try:
        value = float(number)
    except ValueError:  # "1.2.3", "."
        return None
    return value if math.isfinite(value) else None


# -- emphasis ---------------------------------------------------------------------------------------------------------
def emphasize(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk: z (1, L, C) * multipliers (L,) per position, then rescaled so the
    mean over the whole chunk is what it was. Computed in float32; returned in z's dtype. All ones: z itself."""
    if bool((multipliers == 1).all()):
        return z
    zf = z.float()
    original_mean = zf.mean()
    zf = zf * multipliers.to(device=z.device, dtype=torch.float32)[:, None]
    return (zf * (original_mean / zf.mean())).to(z.dtype)


# -- encoding ---------------------------------------------------------------------------------------------------------
class _ChunkFiller:
    """The chunks of one prompt as they fill: those done, and the one being filled (prompt ids without BOS/EOS, their
    weights, embedding vectors by position, the position of its last comma or -1)."""

    def __init__(self, size: int, wrap):
        self.size, self.wrap = size, wrap  # wrap(ids, multipliers, embeds) -> Chunk
        self.done: list[Chunk] = []
        self._start()

    def _start(self) -> None:
        self.ids, self.multipliers, self.embeds, self.last_comma = [], [], {}, -1

    def close(self) -> None:
        self.done.append(self.wrap(self.ids, self.multipliers, self.embeds))
        self._start()

    def make_room(self, comma: bool) -> None:
        """Before the next token: note a comma; or, the chunk being full, move what follows its last comma (if no
        more than COMMA_BACKTRACK back) on to the next chunk. A chunk still full is closed."""
        if comma:
            self.last_comma = len(self.ids)
        elif len(self.ids) == self.size and self.last_comma != -1 and self.size - self.last_comma <= COMMA_BACKTRACK:
            self._move_on_after(self.last_comma + 1)
        if len(self.ids) == self.size:
            self.close()

    def _move_on_after(self, cut: int) -> None:
        """Close the chunk at position `cut`; the positions from there on (with their vectors) start the next one."""
        carried = self.ids[cut:], self.multipliers[cut:], {p - cut: v for p, v in self.embeds.items() if p >= cut}
        self.ids, self.multipliers = self.ids[:cut], self.multipliers[:cut]
        self.embeds = {p: v for p, v in self.embeds.items() if p < cut}
        self.close()
        self.ids, self.multipliers, self.embeds = carried

    def add(self, token: int, weight: float) -> None:
        self.ids.append(token)
        self.multipliers.append(weight)

    def add_vectors(self, vectors: torch.Tensor, weight: float) -> None:
        """An embedding's vectors stay in one chunk: when they do not fit in this one, they start the next."""
        if len(self.ids) + len(vectors) > self.size:
            self.close()
        for vector in vectors:
            self.embeds[len(self.ids)] = vector
            self.add(PLACEHOLDER_ID, weight)

    def finish(self) -> list[Chunk]:
        """All chunks, the one being filled closed too unless it is empty and follows others ("" is one chunk)."""
        if self.ids or not self.done:
            self.close()
        return self.done


class PromptEncoder:
    """Prompts in A1111 syntax -> text-encoder conditioning of any length (77 positions per chunk).

    `embeddings`: textual inversion, trigger word -> (n_vectors, C). Where the trigger's token ids occur in a
    fragment, they are replaced by n_vectors positions whose token embeddings are those vectors."""

    def __init__(self, tokenizer, text_encoder, embeddings: dict[str, torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.chunk_length = tokenizer.max_length - 2  # prompt tokens per chunk, between BOS and EOS
        self._triggers = self._index_embeddings(embeddings or {})

    def _index_embeddings(self, embeddings: dict[str, torch.Tensor]) -> dict[int, list[tuple[list[int], torch.Tensor]]]:
        """first token id -> [(trigger ids, vectors)], longest trigger first (A1111's `ids_lookup`)."""
        width = self.text_encoder.config.hidden_size
        index, owner = {}, {}
        for word, vectors in embeddings.items():
            if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[1] != width:
                shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
                raise ValueError(f"embedding {word!r}: expected a tensor of shape (n_vectors, {width}) for this "
                                 f"text encoder, got {shape}")
            if not 1 <= len(vectors) <= self.chunk_length:
                raise ValueError(f"embedding {word!r} has {len(vectors)} vectors; a chunk holds 1 to "
                                 f"{self.chunk_length}")
            ids = self.tokenizer.encode(word, add_special_tokens=False) if isinstance(word, str) else []
            if not ids:
                raise ValueError(f"embedding trigger {word!r} is not a word that tokenizes to anything")
            if tuple(ids) in owner:
                raise ValueError(f"embedding triggers {owner[tuple(ids)]!r} and {word!r} tokenize to the same ids "
                                 f"{ids}; rename one of them")
            owner[tuple(ids)] = word
            index.setdefault(ids[0], []).append((ids, vectors.detach()))
        for candidates in index.values():
            candidates.sort(key=lambda entry: len(entry[0]), reverse=True)
        return index

    def _embedding_at(self, tokens: list[int], i: int) -> tuple[int, torch.Tensor] | None:
        """(number of ids it replaces, vectors) of the longest trigger starting at tokens[i], if any."""
        for ids, vectors in self._triggers.get(tokens[i], ()):
            if tokens[i:i + len(ids)] == ids:
                return len(ids), vectors
        return None

    def extra_networks(self, text: str) -> list[ExtraNetwork]:
        return parse(text)[1]

    def chunks(self, text: str) -> list[Chunk]:
        """A1111's `tokenize_line`: fill chunks of 75 tokens; when one is full and one of its last 20 tokens is a
        comma, the tokens after that comma move on to the next chunk; BREAK closes a chunk; an embedding that does
        not fit in what is left of a chunk starts the next one. Nothing is cut off; "" is one chunk."""
        filler = _ChunkFiller(self.chunk_length, self._wrap)
        for fragment in parse(text)[0]:
            if fragment is BREAK:
                filler.close()
            else:
                self._fill(filler, *fragment)
        return filler.finish()

    def _fill(self, filler: _ChunkFiller, piece: str, weight: float) -> None:
        """One fragment's tokens into the chunks, each textual-inversion trigger as its embedding's vectors."""
        tokens = self.tokenizer.encode(piece, add_special_tokens=False)
        i = 0
        while i < len(tokens):
            filler.make_room(comma=tokens[i] == self.tokenizer.comma_id)
            found = self._embedding_at(tokens, i)
            if found is None:
                filler.add(tokens[i], weight)
                i += 1
            else:
                n_ids, vectors = found
                filler.add_vectors(vectors, weight)
                i += n_ids

    def _wrap(self, ids: list[int], multipliers: list[float], embeds: dict[int, torch.Tensor]) -> Chunk:
        """BOS + ids + EOS + padding: what `tokenizer.pad(tokenizer.encode(text))` gives for a short prompt."""
        tok, padding = self.tokenizer, self.chunk_length - len(ids)
        return Chunk(ids=[tok.bos_id, *ids, tok.eos_id] + [tok.pad_id] * padding,
                     multipliers=[1.0, *multipliers] + [1.0] * (padding + 1),
                     embeds={p + 1: v for p, v in embeds.items()})

    def encode(self, text: str, clip_skip: int = 1) -> torch.Tensor:
        """Prompt -> (1, 77 * chunks, C) on the text encoder's device and dtype."""
        return self.encode_chunks(self.chunks(text), clip_skip)

    def encode_chunks(self, chunks: list[Chunk], clip_skip: int = 1) -> torch.Tensor:
        """All chunks through the text encoder as one batch, emphasis on each, side by side: (1, 77 * k, C)."""
        token_embedding = self.text_encoder.text_model.embeddings.token_embedding
        device, dtype = token_embedding.weight.device, token_embedding.weight.dtype
        multipliers = torch.tensor([c.multipliers for c in chunks], dtype=torch.float32)
        if not torch.isfinite(multipliers).all():
            bad = multipliers[~torch.isfinite(multipliers)][0].item()
            raise ValueError(f"prompt weight {bad} is not finite (nested weights multiply); use smaller weights")
        ids = torch.tensor([c.ids for c in chunks], device=device)
        token_embeds = None
        fixes = [(row, position, vector) for row, c in enumerate(chunks) for position, vector in c.embeds.items()]
        if fixes:
            rows, positions, vectors = zip(*fixes)
            where = (torch.tensor(rows, device=device), torch.tensor(positions, device=device))
            token_embeds = token_embedding(ids).index_put(where, torch.stack(vectors).to(device, dtype))
        z = self.text_encoder(ids, clip_skip=clip_skip, token_embeds=token_embeds)  # (k, 77, C)
        return torch.cat([emphasize(z[k:k + 1], multipliers[k]) for k in range(len(chunks))], dim=1)

    def encode_pair(self, prompt: str, negative: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) of the same length: the shorter is continued with the empty prompt's chunk."""
        embeddings = self.encode_all([prompt, negative], clip_skip)
        return embeddings[prompt], embeddings[negative]

    def encode_all(self, texts, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        """Each distinct text -> (1, 77 * k, C), all of one length k: the shorter are continued with the empty
        prompt's chunk (the pieces of a prompt-editing schedule, the AND sub-prompts and the negative prompt)."""
        embeddings = {text: self.encode(text, clip_skip) for text in dict.fromkeys(texts)}
        longest = max(e.shape[1] for e in embeddings.values())
        empty = None
        for text, e in embeddings.items():
            missing = (longest - e.shape[1]) // (self.chunk_length + 2)
            if missing:
                empty = self.encode("", clip_skip) if empty is None else empty
                embeddings[text] = torch.cat([e, empty.repeat(1, missing, 1)], dim=1)
        return embeddings
