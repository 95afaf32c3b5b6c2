"""CLIP's byte-level BPE tokenizer, as the Stable Diffusion text encoder expects it.

The target is the exact ids of transformers' `CLIPTokenizer` (v5, backed by the `tokenizers` library), which is what
diffusers feeds the text encoder. For a piece of text that means, in order:

1. Special tokens are cut out of the raw text first (`<|startoftext|>`, `<|endoftext|>`, and whatever else the
   folder declares, e.g. SD 2's pad token `!`), longest match first; tokens marked `normalized` are instead cut
   out of the normalized text (step 2).
2. Normalization of each remaining part: Unicode NFC (with Unicode 9.0 data, see LATE_NORMALIZATION), every run
   of whitespace (the White_Space property, regex `\\s`) becomes one space, then lower-casing character by
   character (so a final `Σ` becomes `σ`, not `ς`).
   Unlike OpenAI's original `simple_tokenizer` there is no ftfy, no `html.unescape` and no strip: `&amp;` stays
   `&`, `amp`, `;` and a curly `’` stays a punctuation token.
3. Splitting with CLIP's pattern (`PIECES` below); what it does not match (the spaces) is dropped. A lower-cased
   `<|endoftext|>` written in the text is one piece there, which the byte-level step splits into `<|`,
   `endoftext`, `|>`.
4. Each piece is written as UTF-8 bytes, each byte as one printable character (GPT-2's byte-to-unicode table),
   `</w>` is appended to the last one, and BPE merges are applied lowest rank first.

Checked against transformers for every code point and on random text: the ids are the same for all text made of
characters that Python's `unicodedata` knows. Characters it does not know (Unicode 15 and later on Python 3.11) can
differ, since Python, `regex` and `tokenizers` each carry their own Unicode version.

The module uses only the standard library and `regex` (no torch) so that importing it stays cheap.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import regex

DATA_DIR = Path(__file__).parent / "data" / "clip"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77  # CLIP's text position embeddings

# CLIP's split pattern. `\s`, `\p{L}` and `\p{N}` of the `regex` module match those of the Oniguruma engine
# inside `tokenizers` for every code point assigned in both Unicode versions (checked exhaustively).
PIECES = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
WHITESPACE = regex.compile(r"\s+")
# Characters whose normalization data (a combining class, a canonical decomposition, or a part in a composition)
# is newer than Unicode 9.0. `tokenizers` normalizes with Unicode 9.0 tables (the unicode-normalization-alignments
# crate), where these are inert starters, while Python's `unicodedata` knows them; so NFC runs between them only.
# Found by comparing every code point against `tokenizers` (the `regex` module's Unicode 17 names the candidates).
LATE_NORMALIZATION = regex.compile(
    "(["
    "\u07fd\u0897-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1add\u1ae0-\u1aeb"
    "\u1df6-\u1dfa\ua82c\U000105c9\U000105e4\U00010d24-\U00010d27\U00010d69-\U00010d6d"
    "\U00010eab-\U00010eac\U00010efa-\U00010efb\U00010efd-\U00010eff\U00010f46-\U00010f50"
    "\U00010f82-\U00010f85\U00011070\U0001133b\U00011383\U00011385\U0001138e\U00011391\U000113b8"
    "\U000113bb\U000113c2\U000113c5\U000113c7-\U000113c9\U000113ce-\U000113d0\U0001145e"
    "\U00011839-\U0001183a\U00011930\U00011935\U00011938\U0001193d-\U0001193e\U00011943\U000119e0"
    "\U00011a34\U00011a47\U00011a99\U00011d42\U00011d44-\U00011d45\U00011d97\U00011f41-\U00011f42"
    "\U0001611e-\U00016129\U0001612f\U00016d67-\U00016d6a\U00016ff0-\U00016ff1\U0001e08f"
    "\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef\U0001e4ec-\U0001e4ef\U0001e5ee-\U0001e5ef"
    "\U0001e6e3\U0001e6e6\U0001e6ee-\U0001e6ef\U0001e6f5"
    "]+)"
)
# The byte-level pre-tokenizer re-splits a special-token piece of the text as GPT-2's pattern does.
SPECIAL_PIECES = {
    BOS_TOKEN: ("<|", "startoftext", "|>"),
    EOS_TOKEN: ("<|", "endoftext", "|>"),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (printable latin-1 maps to itself)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def nfc(text: str) -> str:
    """Unicode NFC as `tokenizers` computes it (characters in LATE_NORMALIZATION are left alone)."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    parts = LATE_NORMALIZATION.split(text)  # odd positions hold runs of late characters
    return "".join(part if i % 2 else unicodedata.normalize("NFC", part) for i, part in enumerate(parts))


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lower case (the `tokenizers` normalizer of CLIP)."""
    text = WHITESPACE.sub(" ", nfc(text))
    # str.lower() applies the context-dependent final sigma rule; `tokenizers` lowers each character on its own.
    return text.replace("\u03a3", "\u03c3").lower()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value, source: Path) -> tuple[str, bool]:
    """A special token as written in special_tokens_map.json / tokenizer_config.json -> (content, normalized)."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    raise ValueError(f"{source}: cannot read special token {value!r} (expected a string or {{'content': ...}})")


class CLIPTokenizer:
    """Text -> CLIP token ids. `CLIPTokenizer()` uses the bundled SD 1.x vocabulary."""

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        max_length: int = DEFAULT_MAX_LENGTH,
        added_tokens: dict[str, bool] | None = None,
    ):
        """`added_tokens`: texts cut out whole before anything else -> whether they are looked for in the normalized
        text rather than the raw text. The four special tokens are always among them (raw text unless said)."""
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither for the bundled CLIP vocabulary")
        if vocab is None:
            vocab, merges = _read_vocab(DATA_DIR)
        for name, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self.vocab = vocab
        # a merge's two parts are vocabulary tokens: the pairs hold the vocabulary's own strings (5 MB less for CLIP's)
        token = {t: t for t in vocab}
        self.ranks = {(token.get(a, a), token.get(b, b)): rank for rank, (a, b) in enumerate(merges)}
        self.max_length = max_length
        self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
        self.pad_id, self.unk_id = vocab[pad_token], vocab[unk_token]
        self.comma_id = vocab.get("," + END_OF_WORD)  # where A1111-style chunking prefers to cut long prompts
        added = dict.fromkeys([bos_token, eos_token, unk_token, pad_token], False) | (added_tokens or {})
        for token in added:
            if token not in vocab:  # e.g. a textual-inversion word: its id lies past the vocabulary
                raise ValueError(f"added token {token!r} is not in the vocabulary (only tokens in it are supported)")
        self.special_ids = {vocab[t] for t in added}  # what decode(skip_special_tokens=True) leaves out
        # longest first, so that of two tokens starting at the same place the longer wins
        self._raw_split = _split_pattern(t for t, normalized in added.items() if not normalized)
        self._normalized_split = _split_pattern(t for t, normalized in added.items() if normalized)
        cached = functools.lru_cache(maxsize=1 << 16)(self._bpe_word)
        # pieces longer than any word are not cached: 65536 of them could hold gigabytes
        self._bpe = lambda word: cached(word) if len(word) <= 64 else self._bpe_word(word)

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """Read a diffusers model folder's `tokenizer/` as transformers does: tokenizer.json if there is one, else
        vocab.json + merges.txt; special_tokens_map.json / tokenizer_config.json for special tokens and length."""
        path = Path(path)
        config_file, special_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        special = _read_json(special_file) if special_file.is_file() else {}
        if (path / "tokenizer.json").is_file():
            vocab, merges, added = _read_tokenizer_json(path / "tokenizer.json")
        else:
            missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
            if missing:
                raise ValueError(f"{path}: not a CLIP tokenizer folder, missing {' and '.join(missing)}")
            vocab, merges = _read_vocab(path)
            entries = config.get("added_tokens_decoder", {}).values()
            added = dict(_token_content(entry, config_file) for entry in entries)
        # special_tokens_map.json overrides tokenizer_config.json (SD 2: pad "!" over "<|endoftext|>"). A token the
        # files above already declare keeps its settings; otherwise bos, eos, unk, pad are registered in this order
        # (the last setting wins), a plain string as matched in the raw text.
        tokens, declared = {}, {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            source, value = (special_file, special[name]) if name in special else (config_file, config.get(name))
            if value is not None:
                tokens[name], declared[tokens[name]] = _token_content(value, source)
        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 100_000:  # transformers' "no limit" placeholder
            max_length = DEFAULT_MAX_LENGTH
        try:
            return cls(vocab, merges, max_length=max_length, added_tokens=declared | added, **tokens)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @functools.cached_property
    def id_to_token(self) -> dict[int, str]:
        """The vocabulary inverted, made on first use (decode)."""
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """BOS + ids + EOS (or just the ids), never truncated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid unicode ({e.reason} at index {e.start}): {text!r:.80}") from None
        ids = []
        for part, is_special in _split(self._raw_split, text):
            if is_special:
                ids.append(self.vocab[part])
                continue
            for sub, sub_special in _split(self._normalized_split, normalize(part)):
                if sub_special:
                    ids.append(self.vocab[sub])
                    continue
                for piece in PIECES.findall(sub):
                    for word in SPECIAL_PIECES.get(piece, (piece,)):
                        ids.extend(self._bpe(word))
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """One pre-tokenized word -> its BPE token ids (the cached unit of work)."""
        chars = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.vocab.get(s, self.unk_id) for s in symbols)

    def pad(self, ids: list[int], length: int | None = None) -> list[int]:
        """Cut to `length` (default max_length) keeping the last id (EOS) at the end, then fill with pad_id."""
        length = self.max_length if length is None else length
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"pad length must be an int >= 2 (room for BOS and EOS), got {length!r}")
        ids = list(ids)
        if len(ids) > length:
            ids = ids[: length - 1] + ids[-1:]
        return ids + [self.pad_id] * (length - len(ids))

    def __call__(self, texts: str | list[str]) -> list[list[int]]:
        """Encode and pad each text to max_length: the rows the text encoder takes."""
        if isinstance(texts, str):
            texts = [texts]
        return [self.pad(self.encode(text)) for text in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text: `</w>` becomes a space, bytes that are not valid UTF-8 become U+FFFD."""
        data = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                raise ValueError(f"token id {i!r} is not in the vocabulary (size {self.vocab_size})")
            try:
                data += bytes(CHAR_TO_BYTE[c] for c in token)
            except KeyError:  # not a byte-level token (only possible with a foreign vocabulary): keep as written
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, pad_id={self.pad_id})"


def _read_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = _read_json(folder / "vocab.json")
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'merges.txt'}: cannot read tokenizer file ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{folder / 'merges.txt'}:{n}: expected two tokens separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _read_tokenizer_json(file: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, bool]]:
    """A `tokenizers` file -> vocab, merges, and its added tokens (text -> matched in the normalized text?)."""
    data = _read_json(file)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{file}: not a CLIP BPE tokenizer (model type {model.get('type')!r}, "
                         f"end_of_word_suffix {model.get('end_of_word_suffix')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{file}: merges must be pairs of tokens, got {bad[0]!r}")
    added = {t["content"]: bool(t.get("normalized", False)) for t in data.get("added_tokens", [])}
    return model.get("vocab", {}), merges, added


def _split_pattern(tokens) -> regex.Pattern | None:
    tokens = sorted(tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


def _split(pattern: regex.Pattern | None, text: str):
    """Yield (part, is_special_token) for the parts of text between (and including) the pattern's matches."""
    if pattern is None:
        yield text, False
        return
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            yield text[start : m.start()], False
        yield m.group(), True
        start = m.end()
    if start < len(text):
        yield text[start:], False
