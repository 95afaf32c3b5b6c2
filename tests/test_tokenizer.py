"""CLIPTokenizer: ids equal transformers' CLIPTokenizer (the tokenizer diffusers feeds the text encoder).

The oracle tests need transformers and skip cleanly without it; the rest pin the behaviour on their own.
"""

import json
import shutil
import subprocess
import sys

import pytest

from stablediff.tokenizer import DATA_DIR, CLIPTokenizer

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

# Prompts as people write them, plus the corners of the normalization. Every one is checked against transformers.
CORPUS = [
    "dog in batman costume",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT Riding A Horse",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "(masterpiece:1.2), (best quality:1.4), [bad hands], <lora:x:0.5>",
    "((((ultra detailed)))), [[[blurry]]], {fancy braces}",
    "a cat:1.5 AND a dog:0.5",
    "portrait of a woman, by greg rutkowski and alphonse mucha, trending on artstation",
    "<lora:add_detail:0.8> <hypernet:anime:1> embedding:EasyNegative",
    "landscape | mountains | lake | sunrise",
    "[cat:dog:0.5] [cat|dog] (red:1.1) (blue:0.9)",
    "4k, 8k, uhd, hdr, f/1.8, 85mm, iso 100, 1/250s",
    "photo of a 25 year old man, 3.14159, 1,000,000 dollars, 2024-01-31",
    "0123456789 ٠١٢٣٤٥٦٧٨٩ ½ ¾ Ⅻ ① ²",
    "it's a dog's life, don't you think? we're here, they've gone, I'm fine, we'll see, he'd go",
    "IT'S A DOG'S LIFE, DON'T, WE'RE, THEY'VE, I'M, WE'LL, HE'D",
    "don’t it’s ‘quoted’ “double quoted” «guillemets» „low“",
    "''s '''t 's 't x's y'sz 'rex 'llama",
    "café naïve Zürich résumé façade jalapeño Ångström",
    "cafe\u0301 nai\u0308ve Zu\u0308rich",
    "crème brûlée à la française, smørrebrød, łódź, ğüşıöç",
    "ΑΒΓΔ ΟΔΟΣ σοφός ΣΟΦΟΣ Σ",
    "İstanbul DİYARBAKIR ıi",
    "Straße STRASSE ẞ ß",
    "emoji 🐶🐱🦊 🔥🔥🔥 😂😂",
    "family 👨‍👩‍👧‍👦 and 👩🏽‍💻 and 👍🏿 👋🏻",
    "flags 🇯🇵 🇺🇸 🏳️‍🌈 and keycaps 1️⃣ #️⃣",
    "❤️ ♥ ★☆ ✨ ☀️ ⚡",
    "東京の夜景、ネオン、雨",
    "一只可爱的猫，坐在窗台上，阳光明媚",
    "한국어 프롬프트 고양이",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ｶﾀｶﾅ halfwidth katakana",
    "مرحبا بالعالم قطة جميلة",
    "שלום עולם",
    "Привет мир, красивая кошка на окне",
    "ПРИВЕТ МИР Ёё",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Đây là một con mèo",
    "a     lot     of     spaces",
    "   leading and trailing spaces   ",
    "tabs\tand\ttabs\t\t\tmore",
    "new\nlines\n\n\nand\r\nwindows\rlines",
    "nbsp\u00a0here\u00a0\u00a0and\u2003em\u2009thin\u3000ideographic",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "control\x00chars\x01\x07\x1b[31mred\x1b[0m\x7f",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",
    "next\x85line\u2028line\u2029paragraph",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 200,
    "xyzzyplughfoobarbazquux" * 9,
    "".join(chr(0x4E00 + i * 37) for i in range(200)),
    "😀" * 50,
    "!" * 200,
    "...!!!???,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@",
    "a,b,c,d;e.f!g?h",
    "hello,world. hello ,world hello , world",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp; &amp;amp;",
    "AT&T R&D rock&roll",
    "<b>bold</b> <i>italic</i> <br/>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|startoftext|>a photo<|endoftext|>",
    "before<|endoftext|>after",
    "(<|endoftext|>) <|endoftext|>!! <<|endoftext|>>",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|endoftext|\u0338 <|endoftext|>\u0338",
    "<|endoftext <endoftext|> |endoftext|",
    "",
    " ",
    "     ",
    "\t\n\r ",
    "\u200b",
    "a",
    "A",
    ",",
    "'",
    "'s",
    "1",
    "12",
    "http://example.com/path?query=1&b=2#frag",
    "user@example.com @mention #hashtag #SD15",
    "C:\\Users\\name\\file.png /usr/local/bin",
    "snake_case_words kebab-case-words CamelCaseWords",
    "x^2 + y^2 = z^2, α β γ ∑ ∫ √ ∞ ≠ ≤ ≥",
    "°C 90° ±5 ×2 ÷3 µm Ω ™ © ®",
    "ﬁne ﬂower ﬀ ligatures",
    "ǅ ǈ ǋ titlecase digraphs",
    "ⓐⓑⓒ 🅰🅱 𝐛𝐨𝐥𝐝 𝓼𝓬𝓻𝓲𝓹𝓽",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ zalgo text",
    "q\u0345\u0301 a\u0328\u0301 o\u031b\u0323 ordering of marks",
    "\u1100\u1161\u11a8 decomposed hangul \u1112\u1161\u11ab",
    "\u0915\u093c \u09a1\u09bc \u0b47\u0b3e \u0dd9\u0dcf composing indic",
    "\U00011935\U00011930 dives akuru, \u0d3b\u0d3c late marks",
    "\ue000\U000f0000 private use",
    "\ufffd replacement \ufffe\uffff noncharacters",
    "wow!! great! amazing!!!",
    "very detailed, intricate, sharp focus, octane render, unreal engine 5, cinematic lighting",
    "(worst quality, low quality:1.4), lowres, bad anatomy, bad hands, text, error, missing fingers",
    "a painting in the style of van gogh's starry night",
    "a\u00adsoft\u00adhyphen and a\u2011non\u2011breaking hyphen and an en–dash and em—dash",
    "ellipsis… bullet • middle·dot",
]

LONG_PROMPT = ", ".join(["a very detailed photograph of a red fox in a snowy forest"] * 12)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(DATA_DIR)


def make_folder(path, special=None, config=None, files=("vocab.json", "merges.txt")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy(DATA_DIR / name, path / name)
    if special is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# --- on its own ---------------------------------------------------------------------------------------------------


def test_known_prompt(tok):
    assert tok.encode("dog in batman costume") == [49406, 1929, 530, 7223, 7235, 49407]
    assert tok.encode("dog in batman costume", add_special_tokens=False) == [1929, 530, 7223, 7235]


def test_attributes(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length, tok.vocab_size) == (49406, 49407, 49407, 77, 49408)
    assert tok.comma_id == tok.vocab[",</w>"] == 267
    assert tok.encode("a,b", add_special_tokens=False)[1] == tok.comma_id


def test_normalization_facts(tok):
    # per-character lower case: a final capital sigma becomes σ, not ς
    assert tok.encode("ΟΔΟΣ") == tok.encode("οδοσ") != tok.encode("οδος")
    # no html unescaping, no quote uncurling, no control-character removal
    assert tok.encode("&amp;", add_special_tokens=False) == [261, 6259, 282]
    assert tok.encode("don’t") != tok.encode("don't")
    assert len(tok.encode("a\x00b")) == 5
    # NFC, whitespace collapsing, case folding
    assert tok.encode("cafe\u0301") == tok.encode("café")
    assert tok.encode(" A \t\n  DOG ") == tok.encode("a dog")
    # the literal special tokens are cut out of the raw text; once lower-cased they are ordinary text
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [49407]
    assert len(tok.encode("<|ENDOFTEXT|>", add_special_tokens=False)) > 1


def test_pad_and_truncate(tok):
    ids = tok.encode("a dog")
    assert tok.pad(ids) == ids + [49407] * (77 - len(ids))
    assert tok.pad(ids, length=3) == [49406, ids[1], 49407]
    long = tok.encode(LONG_PROMPT)
    assert len(long) > 77
    padded = tok.pad(long)
    assert len(padded) == 77 and padded[0] == 49406 and padded[-1] == 49407 and padded[:76] == long[:76]
    assert tok("a dog") == [tok.pad(ids)]
    assert tok(["a dog", LONG_PROMPT]) == [tok.pad(ids), padded]
    with pytest.raises(ValueError, match="length"):
        tok.pad(ids, length=1)


def test_decode_round_trip(tok):
    text = "a photo of a cat, highly detailed, 8k"
    assert tok.decode(tok.encode(text)) == "a photo of a cat , highly detailed , 8 k"
    for text in ["a photo of a cat", "astronaut riding a horse on mars", "café naïve 🐶 東京"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("a dog"), skip_special_tokens=False) == "<|startoftext|>a dog <|endoftext|>"
    assert tok.decode([128]) == "\ufffd"  # a lone UTF-8 continuation byte
    with pytest.raises(ValueError, match="99999"):
        tok.decode([99999])


def test_bad_input(tok):
    with pytest.raises(TypeError, match="int"):
        tok.encode(5)
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\ud800b")


def test_from_folder_reads_tokens_and_length(tmp_path, tok):
    folder = make_folder(
        tmp_path / "tokenizer",
        special={"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!"},
        config={"model_max_length": 64, "pad_token": "<|endoftext|>"},
    )
    custom = CLIPTokenizer.from_folder(folder)
    assert (custom.pad_id, custom.max_length) == (0, 64)  # special_tokens_map.json wins over tokenizer_config.json
    assert custom("a dog") == [[49406, 320, 1929, 49407] + [0] * 60]
    same = CLIPTokenizer.from_folder(DATA_DIR)
    assert (same.pad_id, same.max_length) == (49407, 77)
    assert [same.encode(t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]


@pytest.mark.parametrize("missing", ["merges.txt", "vocab.json"])
def test_from_folder_missing_file(tmp_path, missing):
    files = [f for f in ("vocab.json", "merges.txt") if f != missing]
    folder = make_folder(tmp_path / "broken_tokenizer", files=files)
    with pytest.raises(ValueError, match=rf"broken_tokenizer.*{missing}"):
        CLIPTokenizer.from_folder(folder)


def test_from_folder_bad_token(tmp_path):
    folder = make_folder(tmp_path / "tokenizer", special={"pad_token": "<|notatoken|>"})
    with pytest.raises(ValueError, match="notatoken"):
        CLIPTokenizer.from_folder(folder)


def test_from_folder_refuses_extra_added_tokens(tmp_path):
    entry = {"content": "<my-concept>", "lstrip": False, "normalized": True, "rstrip": False, "special": False}
    folder = make_folder(tmp_path / "tokenizer", config={"added_tokens_decoder": {"49408": entry}})
    with pytest.raises(ValueError, match="my-concept"):
        CLIPTokenizer.from_folder(folder)


def test_from_folder_foreign_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError, match="tokenizer.json: not a CLIP BPE tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)


def test_import_is_light_and_exported():
    code = "import sys, stablediff; t = stablediff.CLIPTokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- against transformers -----------------------------------------------------------------------------------------


def mismatches(ours, hf, texts, **kwargs):
    return [(t, hf(t, **kwargs).input_ids, ours.encode(t, **kwargs)) for t in texts
            if hf(t, **kwargs).input_ids != ours.encode(t, **kwargs)]


def test_corpus_matches_transformers(tok, hf):
    assert len(CORPUS) >= 100
    assert mismatches(tok, hf, CORPUS) == []
    assert mismatches(tok, hf, CORPUS, add_special_tokens=False) == []


def test_pad_matches_transformers(tok, hf):
    texts = CORPUS + [LONG_PROMPT]
    assert tok(texts) == hf(texts, padding="max_length", max_length=77, truncation=True).input_ids
    for length in (2, 3, 10):
        expected = hf(texts, padding="max_length", max_length=length, truncation=True).input_ids
        assert [tok.pad(tok.encode(t), length) for t in texts] == expected


def test_decode_matches_transformers(tok, hf):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


def test_sd2_style_folder_matches_transformers(tmp_path):
    """SD 2 folders pad with "!"; transformers then treats "!" as a special token and cuts it out of the text."""
    transformers = pytest.importorskip("transformers")
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special = {
        "bos_token": {"content": "<|startoftext|>", **token},
        "eos_token": {"content": "<|endoftext|>", **token},
        "unk_token": {"content": "<|endoftext|>", **token},
        "pad_token": "!",
    }
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    folder = make_folder(tmp_path / "sd2" / "tokenizer", special=special, config=config)
    ours, hf = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_id == hf.pad_token_id == 0
    assert ours.encode("wow!! great!") == [49406, 2781, 0, 0, 830, 0, 49407]
    assert mismatches(ours, hf, CORPUS) == []
    texts = CORPUS + [LONG_PROMPT]
    assert ours(texts) == hf(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert [ours.decode(ours.encode(t)) for t in CORPUS] == [hf.decode(hf(t).input_ids, True) for t in CORPUS]

    # SD 1.5's folder: eos is a normalized token, pad the same text as a plain string (which wins: not normalized)
    special["pad_token"] = "<|endoftext|>"
    folder = make_folder(tmp_path / "sd15" / "tokenizer", special=special, config=config)
    ours, hf = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert mismatches(ours, hf, ["<|ENDOFTEXT|>"] + CORPUS) == []

    # a newer tokenizer_config.json: added_tokens_decoder settings win over the plain strings
    entry = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {"49406": {"content": "<|startoftext|>", **entry},
                                      "49407": {"content": "<|endoftext|>", **entry}}
    folder = make_folder(tmp_path / "new" / "tokenizer", special={"pad_token": "<|endoftext|>"}, config=config)
    ours, hf = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert mismatches(ours, hf, ["<|ENDOFTEXT|>"] + CORPUS) == []


def test_folder_saved_by_transformers(tmp_path, hf):
    """transformers 5 saves only tokenizer.json + tokenizer_config.json (no vocab.json / merges.txt)."""
    transformers = pytest.importorskip("transformers")
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    ours, saved = CLIPTokenizer.from_folder(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert (ours.pad_id, ours.max_length) == (saved.pad_token_id, saved.model_max_length) == (49407, 77)
    assert mismatches(ours, saved, CORPUS) == []


if given is not None:
    # Characters unassigned in Python's own Unicode database are left out: for those, Python (Unicode 14 in 3.11),
    # `regex` and `tokenizers` each know a different Unicode version (letters and case mappings of Unicode 15-17).
    CHARS = st.characters(exclude_categories=("Cs", "Cn"))
    FRAGMENTS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s", "'T", "’", "Σ", "İ", "!!", "&amp;",
                 " ", "  ", "\t", "\n", "\xa0", "\x1c", "e\u0301", "\u0338", "👨‍👩‍👧", "👍🏽", "(a:1.2)", "12"]
    PART = st.one_of(st.sampled_from(FRAGMENTS), st.text(CHARS, max_size=6), st.text("aAbB", max_size=3))
    TEXT = st.lists(PART, max_size=12).map("".join)

    @settings(max_examples=300, deadline=None)
    @given(text=st.one_of(TEXT, st.text(CHARS, max_size=40)))
    def test_random_text_matches_transformers(tok, hf, text):
        assert tok.encode(text) == hf(text).input_ids

    @settings(max_examples=100, deadline=None)
    @given(ids=st.lists(st.integers(0, 49407), max_size=20))
    def test_random_ids_decode_like_transformers(tok, hf, ids):
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
