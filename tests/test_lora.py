"""LoRA and textual inversion against diffusers' own loaders (load_lora_weights + fuse_lora, load_textual_inversion)
on the tiny random models, plus the file-handling guarantees: names stay inside their folder, unknown keys and
wrong shapes are errors naming the file, pickles go through the restricted loader, removal is bit-exact."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_close, tiny_diffusers_pipeline
from safetensors.torch import save_file

from stablediff import embeddings, lora
from stablediff.clip import CLIPTextModel
from stablediff.config import CLIPTextConfig, UNetConfig
from stablediff.unet import UNet

# our module names -> the U-Net's original (LDM) names, as some kohya files write them
UNET_TARGETS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0":
        "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",  # 1x1 conv
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "middle_block.1.transformer_blocks.0.ff.net.2",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",  # 3x3 conv (LoCon)
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.1.resnets.2.time_emb_proj": "output_blocks.5.0.emb_layers.1",
    "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
}
TEXT_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.3.self_attn.out_proj",
                "text_model.encoder.layers.1.mlp.fc1"]


# ----------------------------------------------------------------------------------------------------------------
# fixtures: the diffusers oracle, our models with the same weights, random LoRAs written in every layout

@pytest.fixture(scope="module")
def oracle():
    pipe = tiny_diffusers_pipeline()
    base = (copy.deepcopy(pipe.unet.state_dict()), copy.deepcopy(pipe.text_encoder.state_dict()))
    return pipe, base


@pytest.fixture(scope="module")
def configs(oracle):
    """Taken before any test: load_textual_inversion grows the oracle's vocabulary in its config."""
    pipe, _ = oracle
    return UNetConfig.from_dict(dict(pipe.unet.config)), CLIPTextConfig.from_dict(pipe.text_encoder.config.to_dict())


def our_text_encoder(config, text_sd) -> CLIPTextModel:
    text = CLIPTextModel(config).eval().requires_grad_(False)
    text.load_state_dict({k if k.startswith("text_model.") else "text_model." + k: v
                          for k, v in text_sd.items() if not k.endswith("position_ids")})
    return text


@pytest.fixture()
def models(oracle, configs):
    """Our U-Net and text encoder holding the oracle's base weights (fresh per test)."""
    _, (unet_sd, text_sd) = oracle
    unet = UNet(configs[0]).eval().requires_grad_(False)
    unet.load_state_dict(unet_sd)
    return unet, our_text_encoder(configs[1], text_sd)


def random_pairs(unet, text, seed, rank=4, targets=None):
    """{(component, our module): (up, down, alpha)} for the target layers; alphas 2, 3, 4 against rank 4."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    targets = targets or [("unet", n) for n in UNET_TARGETS] + [("te", n) for n in TEXT_TARGETS]
    for i, (comp, name) in enumerate(targets):
        w = (unet if comp == "unet" else text).get_submodule(name).weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3  # (r, in) or (r, in, kh, kw)
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
        out[comp, name] = (up, down, float(2 + i % 3))
    return out


def write_kohya(path, pairs, ldm=False):
    sd = {}
    for (comp, name), (up, down, alpha) in pairs.items():
        written = UNET_TARGETS.get(name, name) if ldm and comp == "unet" else name
        flat = ("lora_unet_" if comp == "unet" else "lora_te_") + written.replace(".", "_")
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path)) if str(path).endswith(".safetensors") else torch.save(sd, path)
    return path


def write_peft(path, pairs):
    """diffusers/PEFT layout; it has no alpha, so alpha / rank is folded into lora_B."""
    sd = {}
    for (comp, name), (up, down, alpha) in pairs.items():
        prefix = "unet." if comp == "unet" else "text_encoder."
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = (up * (alpha / down.shape[0])).contiguous()
    save_file(sd, str(path))
    return path


@pytest.fixture()
def lora_files(models, tmp_path):
    unet, text = models
    a, b = random_pairs(unet, text, 0), random_pairs(unet, text, 1)
    # diffusers 0.42 keeps a kohya file's per-layer alphas only for some layers (attention and text-encoder layers
    # fall back to one shared alpha), so the kohya files diffusers is compared on share one alpha (2, rank 4);
    # per-layer alphas reach diffusers through the PEFT file, where alpha / rank is folded into lora_B
    uniform = {k: (up, down, 2.0) for k, (up, down, _) in a.items()}
    return {"kohya": write_kohya(tmp_path / "a_kohya.safetensors", uniform),
            "ldm": write_kohya(tmp_path / "a_ldm.safetensors", uniform, ldm=True),
            "kohya_alphas": write_kohya(tmp_path / "a_alphas.safetensors", a),
            "peft": write_peft(tmp_path / "a_peft.safetensors", a),
            "b": write_kohya(tmp_path / "b.safetensors", b)}


def state(unet, text) -> dict:
    return {**{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in text.state_dict().items()}}


# ----------------------------------------------------------------------------------------------------------------
# parity with diffusers

@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("layout", ["kohya", "ldm", "peft"])
def test_fused_weights_and_unet_match_diffusers(oracle, models, lora_files, layout, scale):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the test extra installs it)")
    pipe, (unet_sd, text_sd) = oracle
    unet, text = models
    path = lora_files[layout]
    # diffusers maps kohya's original (LDM) block names only when handed the U-Net config
    extra = {"unet_config": pipe.unet.config} if layout == "ldm" else {}
    try:
        pipe.load_lora_weights(str(path), adapter_name=layout, **extra)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
        ref_unet, ref_text = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
        touched = [k for k in ref_unet if not torch.equal(ref_unet[k], unet_sd[k])]
        assert len(touched) == len(UNET_TARGETS)  # diffusers did apply every layer

        lora.LoraSet(unet, text).apply({path: scale})
        ours_unet, ours_text = unet.state_dict(), text.state_dict()
        for k, v in ref_unet.items():
            assert_close(ours_unet[k], v, 5e-4)
        for k, v in ref_text.items():
            if not k.endswith("position_ids"):
                assert_close(ours_text[k if k.startswith("text_model.") else "text_model." + k], v, 5e-4)

        g = torch.Generator().manual_seed(3)
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
        ids = torch.randint(0, 49407, (1, 12), generator=g)
        with torch.no_grad():
            assert_close(unet(x, 10, ctx), pipe.unet(x, 10, ctx).sample, 5e-4)
            assert_close(text(ids), pipe.text_encoder(ids).last_hidden_state, 5e-4)
    finally:
        pipe.unet.load_state_dict(unet_sd)
        pipe.text_encoder.load_state_dict(text_sd)


def test_layouts_parse_to_the_same_deltas(models, lora_files, tmp_path):
    unet, text = models
    kohya = lora.read_lora(lora_files["kohya"], unet, text).deltas
    ldm = lora.read_lora(lora_files["ldm"], unet, text).deltas
    alphas = lora.read_lora(lora_files["kohya_alphas"], unet, text).deltas
    peft = lora.read_lora(lora_files["peft"], unet, text).deltas
    assert set(kohya) == set(ldm) == set(alphas) == set(peft)
    assert len(kohya) == len(UNET_TARGETS) + len(TEXT_TARGETS) and "unet.down_blocks.0.resnets.0.conv1.weight" in kohya
    assert sorted({d.scale for d in alphas.values()}) == [0.5, 0.75, 1.0]  # alpha / rank per layer
    for k, d in kohya.items():
        shape = unet.get_parameter(k[5:]).shape if k.startswith("unet.") else text.get_parameter(k[13:]).shape
        assert torch.equal(d.weight_delta(shape, "cpu"), ldm[k].weight_delta(shape, "cpu"))
        assert_close(alphas[k].weight_delta(shape, "cpu"), peft[k].weight_delta(shape, "cpu"), 1e-6)
    # the older diffusers layouts: LoRACompatible layers and attention processors
    (up, down) = peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"][:2]
    (tup, tdown) = peft["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"][:2]
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
           "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": tdown,
           "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": tup,
           "unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.ones(2, 64, 1, 1),
           "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.ones(64, 2, 1, 1)}
    save_file(old, str(tmp_path / "old.safetensors"))
    got = lora.read_lora(tmp_path / "old.safetensors", unet, text).deltas
    assert sorted(got) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
                           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                           "unet.mid_block.attentions.0.proj_in.weight"]


def test_ldm_name_diffusers_drops_is_applied(models, tmp_path):
    """output_blocks.2.1.conv is up_blocks.0's upsampler (that level has no attention): diffusers' key guessing
    sends it to a non-existent attentions slot and silently skips it; the key table places it."""
    unet, text = models
    name = "up_blocks.0.upsamplers.0.conv"
    pairs = random_pairs(unet, text, 5, targets=[("unet", name)])
    (up, down, alpha), = pairs.values()
    sd = {"lora_unet_output_blocks_2_1_conv.lora_down.weight": down,
          "lora_unet_output_blocks_2_1_conv.lora_up.weight": up, "lora_unet_output_blocks_2_1_conv.alpha":
          torch.tensor(alpha)}
    save_file(sd, str(tmp_path / "up.safetensors"))
    before = unet.get_parameter(f"{name}.weight").clone()
    lora.LoraSet(unet, text).apply({tmp_path / "up.safetensors": 1.0})
    expected = before + (alpha / 4) * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
    assert_close(unet.get_parameter(f"{name}.weight"), expected, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# applying and removing

def test_remove_is_bit_exact_and_switching_equals_fresh(models, lora_files):
    unet, text = models
    base = state(unet, text)
    a, b = lora_files["kohya_alphas"], lora_files["b"]
    loras = lora.LoraSet(unet, text)
    loras.apply({a: 1.0})
    assert loras.applied == {a: 1.0}
    loras.apply({a: 0.5, b: 1.0})
    switched = state(unet, text)
    loras.apply({})
    assert loras.applied == {}
    assert all(torch.equal(v, base[k]) for k, v in state(unet, text).items())
    fresh = lora.LoraSet(unet, text)
    fresh.apply({b: 1.0, a: 0.5})
    assert all(torch.equal(v, switched[k]) for k, v in state(unet, text).items())
    fresh.apply({b: 1.0, a: 0.5})  # asking again changes nothing
    assert all(torch.equal(v, switched[k]) for k, v in state(unet, text).items())
    fresh.apply({a: 0.0})
    assert all(torch.equal(v, base[k]) for k, v in state(unet, text).items())


def test_half_precision_weights_get_the_float32_delta_cast_once(models, lora_files):
    unet, text = models
    text = copy.deepcopy(text).to(torch.bfloat16)
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    before = text.get_parameter(name).clone()
    loras = lora.LoraSet(unet, text)
    loras.apply({lora_files["kohya"]: 0.7})
    d = lora.read_lora(lora_files["kohya"], unet, text).deltas[f"text_encoder.{name}"]
    expected = (before.float() + 0.7 * d.weight_delta(before.shape, "cpu")).to(torch.bfloat16)
    assert torch.equal(text.get_parameter(name), expected)
    loras.apply({})
    assert torch.equal(text.get_parameter(name), before)


# ----------------------------------------------------------------------------------------------------------------
# errors, each naming the file or tag

def test_unknown_keys_are_listed(models, lora_files, tmp_path):
    unet, text = models
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
          "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
          "something_else": torch.zeros(1)}
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(lora.LoraError, match=r"odd\.safetensors.*2 of 4 keys.*down_blocks_9.*something_else"):
        lora.read_lora(tmp_path / "odd.safetensors", unet, text)
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(lora.LoraError, match="xl.safetensors: looks like an SDXL LoRA"):
        lora.read_lora(tmp_path / "xl.safetensors", unet, text)
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(lora.LoraError, match="half.safetensors: unet.conv_in.lora_A.weight has no matching up"):
        lora.read_lora(tmp_path / "half.safetensors", unet, text)
    save_file({"unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(lora.LoraError, match="half.safetensors: unet.conv_in.lora_B.weight has no matching down"):
        lora.read_lora(tmp_path / "half.safetensors", unet, text)


Q_PROJ = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize("key,parsed", [
    (f"{Q_PROJ}.alpha", ("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj", "alpha")),
    ("unet.a.lora.up.weight", ("unet", "a", "up")),
    ("unet.a.lora_linear_layer.down.weight", ("unet", "a", "down")),  # the longest suffix wins
    ("unet.x.attn1.processor.to_out_lora.up.weight", ("unet", "x.attn1.to_out.0", "up")),
    ("text_encoder.x.self_attn.to_v_lora.down.weight", ("text_encoder", "x.self_attn.v_proj", "down")),
    ("unet.x.attn1.processor.to_z_lora.down.weight", None),  # no such processor slot
    ("text_encoder.x.to_z_lora.down.weight", None),
    ("text_encoder.to_q_lora.down.weight", None),  # a slot with no layer path before it
    ("unet.processor.to_q_lora.down.weight", None),
    ("lora_unet_.alpha", None),  # no module path between prefix and suffix
    ("lora_unet_conv_in.weight", None),  # no suffix
    ("conv_in.lora_down.weight", None),  # no prefix
])
def test_key_table(key, parsed):
    assert lora._parse_key(key) == parsed


def test_pairs_and_alphas(models, tmp_path):
    unet, text = models
    pair = {f"{Q_PROJ}.lora_down.weight": torch.ones(2, 32), f"{Q_PROJ}.lora_up.weight": torch.ones(32, 2)}
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for alpha, scale in [(0.0, 1.0), ([3.0, 5.0], 1.5)]:  # alpha 0 means none; the first value is the alpha
        save_file({**pair, f"{Q_PROJ}.alpha": torch.tensor(alpha)}, str(tmp_path / "ok.safetensors"))
        assert lora.read_lora(tmp_path / "ok.safetensors", unet, text).deltas[name].scale == scale
    for alpha in ("inf", "nan"):
        save_file({**pair, f"{Q_PROJ}.alpha": torch.tensor(float(alpha))}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(lora.LoraError) as err:
            lora.read_lora(tmp_path / "bad.safetensors", unet, text)
        assert str(err.value) == f"{tmp_path / 'bad.safetensors'}: {Q_PROJ}.alpha is {alpha}, not a finite number"
    peft_down = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**pair, peft_down: torch.ones(2, 32)}, str(tmp_path / "twice.safetensors"))
    with pytest.raises(lora.LoraError) as err:
        lora.read_lora(tmp_path / "twice.safetensors", unet, text)
    assert str(err.value) == (f"{tmp_path / 'twice.safetensors'}: two tensors for the down of "
                              f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj (one is {peft_down})")


def test_shapes_that_do_not_fit_name_file_and_key(models, tmp_path):
    unet, text = models
    sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
          torch.zeros(4, 768), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
          torch.zeros(32, 4)}
    save_file(sd, str(tmp_path / "sd2.safetensors"))
    loras = lora.LoraSet(unet, text)
    with pytest.raises(lora.LoraError, match=r"sd2\.safetensors: does not fit this model.*attn2_to_k\.lora_down"
                                             r"\.weight \(4, 768\).*\(32, 32\)"):
        loras.apply({tmp_path / "sd2.safetensors": 1.0})
    assert loras.applied == {}


def test_resolve_stays_inside_the_folder(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "mine.safetensors").write_bytes(b"x")
    (folder / "styles" / "ink.pt").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", folder / "escape.safetensors")
    os.symlink(folder / "mine.safetensors", folder / "alias.safetensors")
    assert lora.resolve("mine", folder) == folder / "mine.safetensors"
    assert lora.resolve("mine.safetensors", folder) == folder / "mine.safetensors"
    assert lora.resolve("ink", folder) == folder / "styles" / "ink.pt"  # found in a subfolder by name
    assert lora.resolve("styles/ink", folder) == folder / "styles" / "ink.pt"
    assert lora.resolve("alias", folder) == folder / "alias.safetensors"  # a link inside the folder is fine
    with pytest.raises(lora.LoraError, match=r"<lora:missing>: no LoRA named 'missing' in the LoRA folder \(no "):
        lora.resolve("missing", folder)
    with pytest.raises(lora.LoraError, match=r"<lora:mime>: .* \(did you mean mine\?\)") as err:
        lora.resolve("mime", folder)
    assert str(tmp_path) not in str(err.value)  # a server sends this to whoever wrote the tag
    for bad in ("../secret", "/etc/passwd", "styles/../../secret", "..\\secret", ""):
        with pytest.raises(lora.LoraError, match="refused") as err:
            lora.resolve(bad, folder)
        assert f"<lora:{bad}>" in str(err.value)
    with pytest.raises(lora.LoraError, match=r"<lora:escape>: refused: escape.safetensors leads outside"):
        lora.resolve("escape", folder)
    with pytest.raises(lora.LoraError, match="the LoRA folder does not exist"):
        lora.resolve("mine", tmp_path / "nowhere")


def test_resolve_edge_cases(tmp_path):
    folder = tmp_path / "loras"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for rel in ("a/dup.safetensors", "b/dup.safetensors", "b/ink.pt", "both.safetensors", "both.pt"):
        (folder / rel).write_bytes(b"x")
    os.symlink(folder / "nothing", folder / "dangling.safetensors")
    assert lora.resolve("a/dup", folder) == folder / "a" / "dup.safetensors"
    assert lora.resolve("ink.pt", folder) == folder / "b" / "ink.pt"  # a file name found in a subfolder
    assert lora.resolve("both", folder) == folder / "both.safetensors"  # extensions in EXTENSIONS order
    refused = ("refused: a LoRA is named by its file name inside the LoRA folder ('..', absolute paths and drive "
               "letters are not allowed)")
    for name, said in [
            ("dup", "<lora:dup>: ambiguous: a/dup.safetensors, b/dup.safetensors; name it with its subfolder, e.g. "
                    "<lora:a/dup:1>"),
            ("dup.safetensors", "<lora:dup.safetensors>: ambiguous: a/dup.safetensors, b/dup.safetensors; name it "
                                "with its subfolder, e.g. <lora:a/dup:1>"),
            ("b/missing", "<lora:b/missing>: no LoRA named 'b/missing' in the LoRA folder (no similar names there)"),
            ("ink.safetensors", "<lora:ink.safetensors>: no LoRA named 'ink.safetensors' in the LoRA folder (no "
                                "similar names there)"),  # an extension given is the one looked for
            ("dangling", "<lora:dangling>: refused: dangling.safetensors leads outside the LoRA folder (a link?)"),
            ("x\x00y", f"<lora:x\x00y>: {refused}"), ("   ", f"<lora:   >: {refused}"),
            ("\\x", f"<lora:\\x>: {refused}"), ("C:x", f"<lora:C:x>: {refused}"), ("c:/x", f"<lora:c:/x>: {refused}")]:
        with pytest.raises(lora.LoraError) as err:
            lora.resolve(name, folder)
        assert str(err.value) == said


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pt_files_go_through_the_restricted_loader(models, lora_files, tmp_path):
    unet, text = models
    pairs = random_pairs(unet, text, 0)
    pt = write_kohya(tmp_path / "a.pt", pairs)
    got = lora.read_lora(pt, unet, text).deltas
    ref = lora.read_lora(lora_files["kohya"], unet, text).deltas
    assert set(got) == set(ref) and all(torch.equal(got[k].up, ref[k].up) for k in ref)
    marker = tmp_path / "pwned"
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "x": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(lora.LoraError, match=r"evil\.pt: refused to load: .*system"):
        lora.read_lora(tmp_path / "evil.pt", unet, text)
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "x": _Exploit(marker)}, tmp_path / "evil_emb.pt")
    with pytest.raises(embeddings.EmbeddingError, match=r"evil_emb\.pt: refused to load: .*system"):
        embeddings.load_embeddings([tmp_path / "evil_emb.pt"])
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# textual inversion

def write_embeddings(folder: Path, vec: torch.Tensor) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a1111_pt = folder / "inkstyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()},
                "name": "inkstyle", "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5"}, a1111_pt)
    legacy = folder / "legacy" / "oldstyle.pt"  # string_to_param pickled as a torch.nn.ParameterDict
    legacy.parent.mkdir()
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())}), "name": "x"},
               legacy)
    a1111_st = folder / "watercolor.safetensors"
    save_file({"emb_params": vec.clone()}, str(a1111_st))
    concept = folder / "cat-toy" / "learned_embeds.safetensors"
    concept.parent.mkdir()
    save_file({"<cat-toy>": vec.clone()}, str(concept))
    return {"inkstyle": a1111_pt, "oldstyle": legacy, "watercolor": a1111_st, "<cat-toy>": concept}


def test_embedding_formats_load_to_the_same_tensor(tmp_path):
    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    files = write_embeddings(tmp_path / "embeddings", vec)
    got = embeddings.load_embeddings(tmp_path / "embeddings", width=32)
    assert sorted(got) == sorted(files)
    for word, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, vec), word
    assert embeddings.load_embeddings(tmp_path / "none") == {}  # the default folder may not exist
    single = tmp_path / "one.safetensors"
    save_file({"emb_params": vec[0]}, str(single))  # one vector stored 1-D
    assert embeddings.load_embeddings([single])["one"].shape == (1, 32)

    with pytest.raises(embeddings.EmbeddingError, match=r"inkstyle\.pt: embedding vectors are 32 wide but this "
                                                        r"model's text encoder is 768 wide"):
        embeddings.load_embeddings([files["inkstyle"]], width=768)
    skipped = []
    assert embeddings.load_embeddings(tmp_path / "embeddings", width=768, skipped=skipped) == {}
    assert len(skipped) == 4 and all("768 wide" in s for s in skipped)
    save_file({"emb_params": vec}, str(tmp_path / "embeddings" / "legacy" / "inkstyle.safetensors"))
    with pytest.raises(embeddings.EmbeddingError, match="trigger word 'inkstyle' is also"):
        embeddings.load_embeddings(tmp_path / "embeddings")
    save_file({"clip_l": vec, "clip_g": vec.clone()}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(embeddings.EmbeddingError, match=r"xl\.safetensors: an SDXL embedding"):
        embeddings.load_embeddings([tmp_path / "xl.safetensors"])


def test_prompt_with_trigger_words_matches_diffusers(oracle, configs, tmp_path):
    prompts = pytest.importorskip("stablediff.prompts", reason="prompts.py (PromptEncoder) has not landed yet")
    from stablediff.tokenizer import CLIPTokenizer

    pipe, (_, text_sd) = oracle
    g = torch.Generator().manual_seed(8)
    ink, toy = torch.randn(3, 32, generator=g), torch.randn(2, 32, generator=g)
    ink_file = write_embeddings(tmp_path / "a", ink)["inkstyle"]  # A1111 .pt
    toy_file = write_embeddings(tmp_path / "b", toy)["<cat-toy>"]  # diffusers learned_embeds
    text = our_text_encoder(configs[1], text_sd)
    found = embeddings.load_embeddings([ink_file, toy_file], width=32)
    assert sorted(found) == ["<cat-toy>", "inkstyle"]
    encoder = prompts.PromptEncoder(CLIPTokenizer(), text, embeddings=found)
    pipe.load_textual_inversion([str(ink_file), str(toy_file)], token=["inkstyle", None])
    try:
        prompt = "a <cat-toy> on a table, inkstyle drawing"
        with torch.no_grad():
            ref = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            plain = pipe.encode_prompt("a cat toy on a table, drawing", "cpu", 1, False)[0]
            ours = encoder.encode(prompt)
        assert ours.shape == ref.shape
        assert (ref - plain).abs().max() > 0.1  # the embeddings do change the conditioning
        assert_close(ours, ref, 5e-4)
    finally:
        pipe.unload_textual_inversion()


# ----------------------------------------------------------------------------------------------------------------
# infotext hashes, as AUTOMATIC1111 writes them

def test_hashes(lora_files, tmp_path):
    path = lora_files["kohya"]
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora.lora_hash(path) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert lora.Lora(path, {}).hash == lora.lora_hash(path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata={"sshs_model_hash": "f" * 64})
    assert lora.lora_hash(tmp_path / "meta.safetensors") == "f" * 12
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(2)}, pt)
    assert lora.lora_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    assert embeddings.embedding_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    assert lora.format_hashes({"my:lora,v2": "0123456789ab", "b": "ba9876543210"}) == \
        "mylorav2: 0123456789ab, b: ba9876543210"
