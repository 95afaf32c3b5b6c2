"""The web page's own logic, run in node where it is installed: reading a PNG's parameters into the form."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stablediff import a1111
from stablediff.images import parse_infotext

PAGE = Path(__file__).parent.parent / "src" / "stablediff" / "static" / "index.html"
SAMPLERS = ["Euler a", "Euler", "DPM++ 2M", "euler", "dpmpp_2m"]
SCHEDULERS = [[name, label] for name, label in a1111.SCHEDULES.items()]


def settings(text: str) -> dict:
    """settingsFromParameters of the page, in node, on the parameters /png-info gives for `text`."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    source = re.search(r"// <settings-from-parameters>.*// </settings-from-parameters>", PAGE.read_text(),
                       re.S).group(0)
    args = json.dumps([parse_infotext(text), SAMPLERS, SCHEDULERS])
    script = f"{source}\nconsole.log(JSON.stringify(settingsFromParameters(...{args})));"
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def test_an_a1111_png_fills_the_form_and_names_what_it_does_not_use():
    got = settings("a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
                   "CFG scale: 7, Seed: 123, Size: 512x768, Model hash: 6ce0161689, Clip skip: 2, ENSD: 31337, "
                   "Hires upscale: 2, Version: v1.10.1")
    assert got["fields"] == {"prompt": "a castle", "negative_prompt": "blurry", "steps": "20",
                             "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": "7", "seed": "123",
                             "width": "512", "height": "768"}
    assert got["override"] == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337,
                               "randn_source": "GPU"}  # no RNG: A1111's default
    assert got["unused"] == ["Hires upscale: 2"] and got["problems"] == []


def test_legacy_names_our_own_pngs_and_missing_samplers():
    legacy = settings("a\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (legacy["fields"]["sampler_name"], legacy["fields"]["scheduler"]) == ("DPM++ 2M", "karras")
    ours = settings("a\nSteps: 2, Sampler: euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 64x64, "
                    "RNG: NV, Version: stablediff 0.1.0")
    assert ours["fields"]["sampler_name"] == "euler" and ours["override"] == {"randn_source": "NV"}
    old = settings("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Version: stablediff 0.1.0")
    assert old["override"] == {"randn_source": "CPU"}
    missing = settings("a\nSteps: 2, Sampler: DPM fast, Schedule type: Cosine, CFG scale: 7, Seed: 1")
    assert "sampler_name" not in missing["fields"] and "scheduler" not in missing["fields"]
    assert missing["problems"] == ["schedule Cosine is not available here", "sampler DPM fast is not available here"]
