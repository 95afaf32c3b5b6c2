"""A1111 prompt syntax: the parser's pinned cases and properties, chunking, emphasis, textual inversion, clip skip,
cond/uncond padding; on a tiny random text tower (transformers' weights loaded into ours)."""

import math
import unicodedata
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BUNDLED_TOKENIZER, TINY_TEXT, text_state_dict, transformers_text
from stablediff.clip import CLIPTextModel
from stablediff.config import CLIPTextConfig
from stablediff.prompts import BREAK, PLACEHOLDER_ID, Chunk, ExtraNetwork, PromptEncoder, parse
from stablediff.tokenizer import CLIPTokenizer

TOK = CLIPTokenizer()
BOS, EOS, PAD, COMMA = TOK.bos_id, TOK.eos_id, TOK.pad_id, TOK.comma_id
CAT, DOG, RED, SUN = 2368, 1929, 736, 2176  # one token each
C = TINY_TEXT["hidden_size"]


def ids(text):
    return TOK.encode(text, add_special_tokens=False)


def words(n, word="cat"):
    return " ".join([word] * n)


def frags(text):
    return parse(text)[0]


@pytest.fixture(scope="module")
def reference():
    return transformers_text(TINY_TEXT, seed=5).requires_grad_(False)


@pytest.fixture(scope="module")
def model(reference):
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT))
    ours.load_state_dict(text_state_dict(reference), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def enc(model):
    return PromptEncoder(TOK, model)


def plain(model, text, clip_skip=1):
    """The pipeline's plain path (77 tokens, truncated)."""
    return model(torch.tensor([TOK.pad(TOK.encode(text))]), clip_skip=clip_skip)


# -- parser: A1111's docstring examples, then its behaviour on everything else -----------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_a1111_docstring_examples(text, expected):
    assert frags(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(a (b:2) c:1.5)", [("a ", 1.5), ("b", 3.0), (" c", 1.5)]),  # nesting multiplies
    ("(word: 1.5 )", [("word", 1.5)]),
    ("(word:+2)", [("word", 2.0)]),
    ("(word:.5)", [("word", 0.5)]),
    ("x (word:1.) y", [("x word y", 1.0)]),  # weight 1 merges with its neighbours
    ("(word:0)", [("word", 0.0)]),  # A1111 allows zero and negative weights
    ("(word:-1)", [("word", -1.0)]),
    # unbalanced: an unclosed bracket weights the rest (open "(" applied before open "["); stray closers are text
    ("a (b", [("a ", 1.0), ("b", 1.1)]),
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1))]),
    ("[((a:2.1)", [("a", 2.1000000000000005)]),  # 2.1 * 1.1 / 1.1: "(" first (2.1 / 1.1 * 1.1 would be 2.1)
    ("a) b] c", [("a) b] c", 1.0)]),
    ("((a)", [("a", 1.1 * 1.1)]),
    ("(a))", [("a", 1.1), (")", 1.0)]),
    ("(a[b)c]", [("a", 1.1), ("b", 1.1 * (1 / 1.1)), ("c", 1 / 1.1)]),  # "(" and "[" close independently
    # colons: a weight only right before ")" with a "(" open; otherwise text
    ("a:b", [("a:b", 1.0)]),
    ("x:1.5) y", [("x:1.5) y", 1.0)]),
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),
    ("(a:1.5]", [("a:1.5]", 1.1)]),
    ("(a:1e5)", [("a:1e5", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # A1111 raises ValueError from float() here
    ("(a:.)", [("a:.", 1.1)]),
    ("(a:" + "9" * 400 + ")", [("a:" + "9" * 400, 1.1)]),  # inf is no weight
    # backslashes
    (r"\(a\) \[b\] \\", [(r"(a) [b] \ ".rstrip(), 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    ("\\", [("", 1.0)]),
    (r"(a\)", [("a)", 1.1)]),
    # empty
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[(", [("", 1.0)]),
])
def test_emphasis_syntax(text, expected):
    assert frags(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would weight its marker and encode "break"
    ("aBREAK BREAKs break Break", [("aBREAK BREAKs break Break", 1.0)]),
])
def test_break(text, expected):
    result = frags(text)
    assert result == expected
    assert [f is BREAK for f in result] == [f == BREAK for f in expected]


def test_extra_network_tags():
    assert parse("a <lora:foo:0.8> b <lora:bar>, <hypernet:h:0.5>") == (
        [("a  b , ", 1.0)],
        [ExtraNetwork("lora", "foo", 0.8), ExtraNetwork("lora", "bar", 1.0), ExtraNetwork("hypernet", "h", 0.5)])
    assert parse("<lora:x:0.8:0.5:dyn=8>")[1] == [ExtraNetwork("lora", "x", 0.8, ("0.5", "dyn=8"))]
    assert parse("<lora:x:unet=0.3:0.7>")[1] == [ExtraNetwork("lora", "x", 0.7, ("unet=0.3",))]
    assert parse("(<lora:x:1>cat)") == ([("cat", 1.1)], [ExtraNetwork("lora", "x", 1.0)])  # cut before emphasis
    assert frags("<a b> <lora:x") == [("<a b> <lora:x", 1.0)]  # not tags
    for bad, what in [("<lora:x:abc>", "'abc'"), ("<lora:x:inf>", "'inf'"), ("<lora::1>", "no name"),
                      ("<lora:te=1>", "no name")]:
        with pytest.raises(ValueError, match=f"{bad}.*{what}"):
            parse(f"a {bad} b")


# -- parser properties -------------------------------------------------------------------------------------------------
SYNTAX = list("()[]:\\<>.,-+ 0123456789=") + ["BREAK", "<lora:", "<hypernet:", ":1.5)", "\\(", "\\\\", "cat "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(SYNTAX) | st.characters(), max_size=60).map("".join))
def test_parse_never_fails_on_any_text(text):
    try:
        fragments, _ = parse(text)
    except ValueError as e:  # only a malformed extra-network tag may be refused
        assert "extra-network tag" in str(e) and "<" in text
        return
    no_sign_or_zero = "-" not in text and not any(c.isdecimal() and unicodedata.decimal(c) == 0 for c in text)
    for f in fragments:
        if f is BREAK:
            continue
        piece, weight = f
        assert isinstance(piece, str) and math.isfinite(weight)
        assert weight > 0 or not no_sign_or_zero
    assert all(a is BREAK or b is BREAK or a[1] != b[1] for a, b in zip(fragments, fragments[1:]))  # merged


def _nest(inner, opener, weight):
    src, chars = inner
    if opener == "(":
        return f"({src})", [(c, w * 1.1) for c, w in chars]
    if opener == "[":
        return f"[{src}]", [(c, w * (1 / 1.1)) for c, w in chars]
    return f"({src}:{weight})", [(c, w * weight) for c, w in chars]


LEAF = st.text(alphabet="ab ,é狗", max_size=4).map(lambda s: (s, [(c, 1.0) for c in s]))
TREE = st.recursive(LEAF, lambda kids: st.one_of(
    st.lists(kids, min_size=2, max_size=3).map(lambda xs: ("".join(x[0] for x in xs), sum((x[1] for x in xs), []))),
    st.builds(_nest, kids, st.sampled_from("([:"), st.sampled_from([0.5, 1.5, 2.0, 0.25]))), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(TREE)
def test_balanced_prompts_keep_their_text_and_multiply_weights(tree):
    """Text = input minus the syntax; each character's weight = product of its brackets, innermost first."""
    source, expected = tree
    got = [(c, w) for piece, w in frags(source) for c in piece]
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]:\\<"), max_size=40).filter(lambda s: "BREAK" not in s))
def test_text_without_syntax_is_one_fragment(text):
    assert parse(text) == ([(text, 1.0)], [])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="ab ,", max_size=5), st.from_regex(r"\w+", fullmatch=True),
                          st.floats(-4, 4, allow_nan=False).map(lambda x: round(x, 3))), max_size=4))
def test_tags_are_all_cut_out(parts):
    text = "".join(f"{t}<lora:{name}:{m}>" for t, name, m in parts)
    fragments, networks = parse(text)
    assert networks == [ExtraNetwork("lora", name, m) for _, name, m in parts]
    assert "".join(f[0] for f in fragments) == "".join(t for t, _, _ in parts)


# -- chunks ------------------------------------------------------------------------------------------------------------
def padded(prompt_ids):
    return [BOS, *prompt_ids, EOS] + [PAD] * (75 - len(prompt_ids))


def test_plain_prompt_is_exactly_the_plain_path(enc, model):
    for text in ["a photo of an astronaut riding a horse, award winning", "", "Ünïcödé 🐶 狗", words(75)]:
        (chunk,) = enc.chunks(text)
        assert chunk == Chunk(TOK.pad(TOK.encode(text)), [1.0] * 77, {})
        assert torch.equal(enc.encode(text), plain(model, text))
    assert torch.equal(enc.encode("(cat:1.0) (dog:1.)"), enc.encode("cat dog"))


def test_plain_prompt_equals_diffusers_encode_prompt(enc, reference):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    pipe = SimpleNamespace(tokenizer=HFTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)), text_encoder=reference)
    text = "a red circle on a blue background, blurry"
    theirs, _ = StableDiffusionPipeline.encode_prompt(pipe, text, "cpu", 1, False)
    assert torch.equal(enc.encode(text), theirs)


def test_emphasis_is_a1111_original(enc, model):
    z = plain(model, "a cat")
    assert not torch.equal(enc.encode("a (cat)"), z)
    m = torch.ones(77)
    m[2] = 1.1
    expected = z * m[:, None]
    expected = expected * (z.mean() / expected.mean())
    assert torch.equal(enc.encode("a (cat)"), expected)
    assert enc.chunks("a (cat) [dog]")[0].multipliers[:5] == [1.0, 1.0, 1.1, 1 / 1.1, 1.0]


def test_long_prompt_is_chunked_not_truncated(enc, model):
    text = words(149) + " dog"
    assert len(ids(text)) == 150
    chunks = enc.chunks(text)
    assert [c.ids for c in chunks] == [padded([CAT] * 75), padded([CAT] * 74 + [DOG])]
    z = enc.encode(text)
    assert z.shape == (1, 154, C)
    other = enc.encode(words(149) + " sun")
    assert torch.equal(z[:, :77], other[:, :77])
    assert not torch.allclose(z[:, 77:], other[:, 77:])
    assert torch.equal(z[:, :77], plain(model, words(75)))
    assert len(enc.chunks(words(76))) == 2


def test_comma_backtrack(enc):
    # 70 cats, a comma, 4 reds fill the chunk; the 5th red finds the comma 5 <= 20 back: the reds move on
    chunks = enc.chunks(words(70) + ", red red red red (red) sun")
    assert [c.ids for c in chunks] == [padded([CAT] * 70 + [COMMA]), padded([RED] * 5 + [SUN])]
    assert chunks[1].multipliers[:8] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.1, 1.0, 1.0]  # weights move with their tokens
    # a comma 25 back is too far: a hard cut
    chunks = enc.chunks(words(50) + "," + words(30, "red"))
    assert [c.ids for c in chunks] == [padded([CAT] * 50 + [COMMA] + [RED] * 24), padded([RED] * 6)]
    # a comma as the 75th token: the next chunk starts after it
    chunks = enc.chunks(words(74) + ", red")
    assert [c.ids for c in chunks] == [padded([CAT] * 74 + [COMMA]), padded([RED])]


def test_break_starts_a_chunk(enc):
    assert [c.ids for c in enc.chunks("cat BREAK dog")] == [padded([CAT]), padded([DOG])]
    assert [c.ids for c in enc.chunks("cat BREAK")] == [padded([CAT])]
    assert [c.ids for c in enc.chunks("BREAK cat")] == [padded([]), padded([CAT])]
    assert [c.ids for c in enc.chunks("cat BREAK BREAK dog")] == [padded([CAT]), padded([]), padded([DOG])]
    assert [c.ids for c in enc.chunks(words(75) + " BREAK dog")] == [padded([CAT] * 75), padded([DOG])]
    assert enc.encode("cat BREAK dog").shape == (1, 154, C)


def test_clip_skip(enc, model):
    text = "a red cat"
    x = torch.tensor([TOK.pad(TOK.encode(text))])
    penultimate = model.text_model.final_layer_norm(model.hidden_states(x)[-2])
    assert torch.equal(enc.encode(text, clip_skip=2), penultimate)
    assert torch.equal(enc.encode(text, clip_skip=2), plain(model, text, clip_skip=2))
    with pytest.raises(ValueError, match="clip_skip=9"):
        enc.encode(text, clip_skip=9)


# -- textual inversion -------------------------------------------------------------------------------------------------
def vectors(n, seed=0):
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


def test_embedding_vectors_replace_the_trigger(model):
    vec = vectors(3)
    enc = PromptEncoder(TOK, model, {"mytoken": vec})
    assert len(ids("mytoken")) == 2
    (chunk,) = enc.chunks("a mytoken cat")
    assert chunk.ids == padded([320, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, CAT])
    assert list(chunk.embeds) == [2, 3, 4] and all(torch.equal(chunk.embeds[2 + k], vec[k]) for k in range(3))
    x = torch.tensor([chunk.ids])
    token_embeds = model.text_model.embeddings.token_embedding(x)
    token_embeds[0, 2:5] = vec
    assert torch.equal(enc.encode("a mytoken cat"), model(x, token_embeds=token_embeds))
    # emphasis multiplies the vectors' positions too
    assert enc.chunks("a (mytoken:1.5) cat")[0].multipliers[:6] == [1.0, 1.0, 1.5, 1.5, 1.5, 1.0]


def test_embedding_that_does_not_fit_moves_whole(model):
    enc = PromptEncoder(TOK, model, {"mytoken": vectors(3)})
    chunks = enc.chunks(words(73) + " mytoken dog")
    assert [c.ids for c in chunks] == [padded([CAT] * 73), padded([PLACEHOLDER_ID] * 3 + [DOG])]
    assert list(chunks[0].embeds) == [] and list(chunks[1].embeds) == [1, 2, 3]
    z = enc.encode(words(73) + " mytoken dog")
    assert z.shape == (1, 154, C) and torch.equal(z[:, :77], enc.encode(words(73)))


def test_comma_backtrack_carries_embedding_vectors(model):
    vec = vectors(3)
    enc = PromptEncoder(TOK, model, {"mytoken": vec})
    chunks = enc.chunks(words(65) + "," + words(6, "red") + " mytoken sun")
    assert [c.ids for c in chunks] == [padded([CAT] * 65 + [COMMA]), padded([RED] * 6 + [PLACEHOLDER_ID] * 3 + [SUN])]
    assert chunks[0].embeds == {} and list(chunks[1].embeds) == [7, 8, 9]
    assert torch.equal(chunks[1].embeds[9], vec[2])


def test_longest_trigger_wins_and_bad_embeddings_are_refused(model):
    short, long = vectors(1, 1), vectors(2, 2)
    enc = PromptEncoder(TOK, model, {"cat": short, "cat dog": long})
    assert [c.ids for c in enc.chunks("cat dog cat")] == [padded([PLACEHOLDER_ID] * 3)]
    embeds = enc.chunks("cat dog cat")[0].embeds
    assert [torch.equal(embeds[p], v) for p, v in zip([1, 2, 3], [long[0], long[1], short[0]])] == [True] * 3
    for embeddings, message in [({"x": torch.zeros(2, C + 1)}, r"\(n_vectors, 32\).*\(2, 33\)"),
                                ({"x": torch.zeros(C)}, r"\(32,\)"),
                                ({"x": torch.zeros(0, C)}, "0 vectors"),
                                ({"x": torch.zeros(76, C)}, "76 vectors"),
                                ({"  ": torch.zeros(1, C)}, "'  '"),
                                ({"Emb": torch.zeros(1, C), "emb": torch.zeros(1, C)}, "'Emb' and 'emb'")]:
        with pytest.raises(ValueError, match=message):
            PromptEncoder(TOK, model, embeddings)


# -- cond / uncond, devices and dtypes -----------------------------------------------------------------------------------
def test_encode_pair_pads_the_shorter_with_the_empty_prompt(enc):
    long = words(100)
    cond, uncond = enc.encode_pair(long, "")
    assert cond.shape == uncond.shape == (1, 154, C)
    empty = enc.encode("")
    assert torch.equal(cond, enc.encode(long)) and torch.equal(uncond, torch.cat([empty, empty], dim=1))
    cond, uncond = enc.encode_pair("dog", "ugly BREAK blurry BREAK bad")
    assert cond.shape == uncond.shape == (1, 231, C)
    assert torch.equal(cond[:, :77], enc.encode("dog")) and torch.equal(cond[:, 77:154], empty)
    a, b = enc.encode_pair("cat", "dog")
    assert torch.equal(a, enc.encode("cat")) and torch.equal(b, enc.encode("dog"))


def test_output_follows_the_encoders_dtype(model):
    enc = PromptEncoder(TOK, model.to(torch.bfloat16), {"mytoken": vectors(2)})
    try:
        z = enc.encode("a (mytoken) [cat]")
        assert z.dtype == torch.bfloat16 and z.shape == (1, 77, C) and torch.isfinite(z).all()
    finally:
        model.to(torch.float32)


def test_extra_networks_and_non_finite_weights(enc):
    assert enc.extra_networks("a <lora:x:0.5> cat") == [ExtraNetwork("lora", "x", 0.5)]
    huge = "(" * 3 + "cat:" + "9" * 200 + ")" + ":" + "9" * 200 + ")" + ")"
    with pytest.raises(ValueError, match="not finite"):
        enc.encode(huge)
