"""The web page's own logic, run in node where it is installed: reading a PNG's parameters into the form, and the
ControlNet section (its lists, the unit Generate sends, the preprocessor preview) against a fake DOM and fetch."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stablediff import a1111, controls, preprocess
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


def test_sampler_options_of_a_png_become_override_settings():
    """Eta, churn, NGMS, early CFG skipping and padding are A1111 options: the page sends them as override_settings,
    which the API runs as A1111 does."""
    got = settings("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Sigma churn: 0.5, Sigma tmin: "
                   "0.1, Sigma tmax: 9.0, Sigma noise: 0.9, NGMS: 2.0, NGMS all steps: True, Skip Early CFG: 0.2, "
                   "Pad conds: True, Eta: 0.4, Eta DDIM: 0.3, RNG: CPU")
    assert got["override"] == {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 9.0, "s_noise": 0.9, "s_min_uncond": 2.0,
                               "s_min_uncond_all": True, "skip_early_cond": 0.2, "pad_cond_uncond": True,
                               "eta_ancestral": 0.4, "eta_ddim": 0.3, "randn_source": "CPU"}
    assert got["unused"] == [] and got["problems"] == []


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


# The whole page in node: its elements (every id in the HTML, with its attributes and a select's options) as small
# fakes, fetch answered from `routes`, and a scenario that drives the page and prints what it checks.
FAKE_DOM = r"""
class Element {
  constructor(tag, attrs = {}) {
    Object.assign(this, {tagName: tag, children: [], listeners: {}, textContent: "", className: "", src: "",
                         files: [], style: {}, hidden: "hidden" in attrs, disabled: "disabled" in attrs,
                         checked: "checked" in attrs});
    this.value = attrs.value ?? "";
  }
  addEventListener(type, listener) { (this.listeners[type] ||= []).push(listener); }
  fire(type, fields = {}) {  // resolves to the event when the listeners' promises do
    const event = {target: this, defaultPrevented: false, propagationStopped: false, ...fields,
                   preventDefault() { this.defaultPrevented = true; },
                   stopPropagation() { this.propagationStopped = true; }};
    return Promise.all((this.listeners[type] || []).map((listener) => listener(event))).then(() => event);
  }
  append(...nodes) { this.children.push(...nodes); }
  prepend(...nodes) { this.children.unshift(...nodes); }
  replaceChildren(...nodes) { this.children = nodes; }
}
class Select extends Element {
  get options() { return this.children; }
  get value() {
    const option = this.children.find((o) => o.selected) || this.children[0];
    return option ? option.value : "";
  }
  set value(value) { this.children.forEach((o) => { o.selected = o.value === value; }); }
}
class Option { constructor(text, value, defaultSelected, selected) { Object.assign(this, {text, value, selected}); } }
class Image extends Element { constructor() { super("img"); } }
class FileReader {
  readAsDataURL(file) { setTimeout(() => { this.result = `data:${file.type};base64,${file.data}`; this.onload(); }); }
}
const elements = Object.fromEntries(ELEMENTS.map(({tag, attrs, options}) => {
  const element = tag === "select" ? new Select(tag, attrs) : new Element(tag, attrs);
  element.children = options.map(([text, value, selected]) => new Option(text, value, selected, selected));
  return [attrs.id, element];
}));
const document = new Element("document");
document.getElementById = (id) => elements[id] ?? null;
document.createElement = (tag) => new Element(tag);
const requests = [];
const fetch = async (url, init = {}) => {
  requests.push({url, method: init.method || "GET", body: init.body === undefined ? null : JSON.parse(init.body)});
  const [code, data] = ROUTES[url] || [404, {detail: "Not Found"}];
  return {ok: code < 400, status: code, statusText: "", json: async () => data};
};
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
"""

SETUP_ROUTES = {
    "sdapi/v1/samplers": [200, [{"name": "Euler a"}]],
    "sdapi/v1/schedulers": [200, [{"name": "automatic", "label": "Automatic"}]],
    "sdapi/v1/sd-models": [200, [{"title": "tiny [0123456789]"}]],
    "sdapi/v1/options": [200, {"sd_model_checkpoint": "tiny [0123456789]"}],
    "sdapi/v1/txt2img": [200, {"images": [], "info": json.dumps(
        {"infotexts": [], "all_seeds": [], "seed": 1, "interrupted": False})}],
}
CONTROLNET_ROUTES = {
    "controlnet/model_list": [200, {"model_list": ["control_v11p_sd15_canny [d14c016b]",
                                                   "control_sd15_scribble [fef5e48e]"]}],
    "controlnet/module_list": [200, {"module_list": ["none", "canny", "invert", "scribble_xdog"]}],
}


class _Elements(HTMLParser):
    """Every element with an id: its tag, attributes and (a select's) options as [text, value, selected]."""

    def __init__(self):
        super().__init__()
        self.elements, self.option = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.elements.append({"tag": tag, "attrs": attrs, "options": []})
        if tag == "option":
            self.option = [attrs.get("value"), "selected" in attrs]

    def handle_data(self, data):
        if self.option is not None:
            value, selected = self.option
            self.elements[-1]["options"].append([data, data if value is None else value, selected])
            self.option = None


def page(scenario: str, routes: dict) -> dict:
    """Run the page's script in node with the fake DOM and `routes`, then `scenario` (an async function body that
    returns what the test checks), after the page's own setup calls have settled."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    html = PAGE.read_text()
    parser = _Elements()
    parser.feed(html)
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
    program = (f"const ELEMENTS = {json.dumps(parser.elements)};\nconst ROUTES = {json.dumps(routes)};\n{FAKE_DOM}\n"
               f"{script}\n(async () => {{ await settle();\n{scenario}\n}})()"
               ".then((result) => console.log(JSON.stringify(result)));")
    run = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


CHOOSE_IMAGE = """
  const file = {name: "edges.png", type: "image/png", size: 3, data: "iVBORw0K"};
  $("cn_image").files = [file];
  await $("cn_image").fire("change");
"""


def test_the_lists_fill_the_selects_and_canny_shows_its_thresholds():
    got = page("""
      const before = $("cn_canny").hidden;
      $("cn_module").value = "canny";
      await $("cn_module").fire("change");
      return {models: $("cn_model").options.map((o) => o.value), modules: $("cn_module").options.map((o) => o.value),
              model: $("cn_model").value, disabled: $("cn_fields").disabled, note: $("cn_note").hidden,
              canny: [before, $("cn_canny").hidden], requests: requests.map((r) => r.url)};
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES})
    assert got["models"] == ["control_v11p_sd15_canny [d14c016b]", "control_sd15_scribble [fef5e48e]"]
    assert got["modules"] == ["none", "canny", "invert", "scribble_xdog"]
    assert got["model"] == "control_v11p_sd15_canny [d14c016b]"
    assert got["disabled"] is False and got["note"] is True
    assert got["canny"] == [True, False]  # module "none" first: no thresholds shown
    assert {"controlnet/model_list", "controlnet/module_list"} <= set(got["requests"])


@pytest.mark.parametrize("routes, why", [
    ({**CONTROLNET_ROUTES, "controlnet/model_list": [200, {"model_list": []}]}, "the server has no models"),
    ({**CONTROLNET_ROUTES, "controlnet/model_list": [200, {"model_list": ["None"]}]}, "the server has no models"),
    ({}, "Not Found"),  # a server without the routes
])
def test_no_models_or_no_routes_leave_the_section_disabled_with_a_note(routes, why):
    got = page("""
      $("cn_enabled").checked = true;
      await $("form").fire("submit");
      return {disabled: $("cn_fields").disabled, note: $("cn_note").textContent, hidden: $("cn_note").hidden,
              body: requests.find((r) => r.url === "sdapi/v1/txt2img").body};
    """, {**SETUP_ROUTES, **routes})
    assert got["disabled"] is True and got["hidden"] is False
    assert got["note"].startswith("ControlNet is not available: ") and why in got["note"]
    assert "alwayson_scripts" not in got["body"]  # a ticked box in a disabled section sends nothing


def test_generate_sends_the_unit_only_when_enabled():
    got = page(CHOOSE_IMAGE + """
      await $("form").fire("submit");
      const off = requests.filter((r) => r.url === "sdapi/v1/txt2img").pop().body;
      $("cn_enabled").checked = true;
      $("cn_module").value = "canny";
      $("cn_model").value = "control_sd15_scribble [fef5e48e]";
      for (const [id, value] of [["cn_weight", "0.75"], ["cn_start", "0.1"], ["cn_end", "0.8"], ["cn_low", "50"],
                                 ["cn_high", "150"], ["cn_processor_res", "768"]]) $(id).value = value;
      $("cn_control_mode").value = "My prompt is more important";
      $("cn_resize_mode").value = "Resize and Fill";
      await $("form").fire("submit");
      const on = requests.filter((r) => r.url === "sdapi/v1/txt2img").pop().body;
      $("cn_module").value = "invert";
      await $("form").fire("submit");
      const invert = requests.filter((r) => r.url === "sdapi/v1/txt2img").pop().body;
      return {off, on, invert};
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES})
    assert "alwayson_scripts" not in got["off"] and got["off"]["prompt"] == ""
    assert got["on"]["alwayson_scripts"] == {"controlnet": {"args": [{
        "enabled": True, "module": "canny", "model": "control_sd15_scribble [fef5e48e]", "weight": 0.75,
        "image": "iVBORw0K", "resize_mode": "Resize and Fill", "processor_res": 768, "threshold_a": 50,
        "threshold_b": 150, "guidance_start": 0.1, "guidance_end": 0.8,
        "control_mode": "My prompt is more important"}]}}
    unit = got["invert"]["alwayson_scripts"]["controlnet"]["args"][0]
    assert (unit["module"], unit["threshold_a"], unit["threshold_b"]) == ("invert", -1, -1)  # the module's defaults


def test_the_page_offers_the_modes_controls_knows():
    parser = _Elements()
    parser.feed(PAGE.read_text())
    options = {e["attrs"]["id"]: e["options"] for e in parser.elements if e["tag"] == "select"}
    assert [text for text, _, _ in options["cn_control_mode"]] == list(controls.CONTROL_MODES)
    assert [text for text, _, _ in options["cn_resize_mode"]] == list(preprocess.RESIZE_MODES)
    assert [text for text, _, selected in options["cn_resize_mode"] if selected] == [controls.Control.resize_mode]


def test_preview_posts_detect_and_shows_the_map_next_to_the_control_image():
    got = page(CHOOSE_IMAGE + """
      $("cn_module").value = "canny";
      $("cn_low").value = "80";
      await $("cn_preview").fire("click");
      return {body: requests.find((r) => r.url === "controlnet/detect").body, map: $("cn_map").src,
              shown: [$("cn_image_preview").hidden, $("cn_map").hidden], image: $("cn_image_preview").src,
              status: $("status").textContent};
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES, "controlnet/detect": [200, {"images": ["TUFQ"], "info": "Success"}]})
    assert got["body"] == {"controlnet_module": "canny", "controlnet_input_images": ["iVBORw0K"],
                           "controlnet_processor_res": 512, "controlnet_threshold_a": 80,
                           "controlnet_threshold_b": 200}
    assert got["map"] == "data:image/png;base64,TUFQ" and got["image"] == "data:image/png;base64,iVBORw0K"
    assert got["shown"] == [False, False] and "canny" in got["status"]


def test_a_detect_error_is_shown_and_no_map():
    got = page(CHOOSE_IMAGE + """
      await $("cn_preview").fire("click");
      return {map: $("cn_map").hidden, status: $("status").textContent, error: $("status").className,
              button: $("cn_preview").disabled};
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES, "controlnet/detect": [422, {"detail": "unknown module 'x'"}]})
    assert got == {"map": True, "status": "unknown module 'x'", "error": "error", "button": False}


def test_a_control_image_over_20_mb_is_refused_and_none_is_not_sent():
    got = page("""
      $("cn_enabled").checked = true;
      const big = {name: "huge.png", type: "image/png", size: 20 * 2 ** 20 + 1, data: "AAAA"};
      $("cn_image").files = [big];
      await $("cn_image").fire("change");
      const refused = {status: $("status").textContent, error: $("status").className,
                       shown: !$("cn_image_preview").hidden};
      await $("form").fire("submit");
      return {refused, submit: $("status").textContent, posted: requests.some((r) => r.url === "sdapi/v1/txt2img")};
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES})
    assert got["refused"] == {"status": "huge.png is 20.0 MB; a control image may be at most 20.0 MB",
                              "error": "error", "shown": False}
    assert got["submit"] == "ControlNet is on: choose a control image" and got["posted"] is False


def test_an_image_dropped_on_the_section_becomes_the_control_image():
    got = page("""
      const png = {name: "pose.jpg", type: "image/jpeg", size: 3, data: "/9j/"};
      const drop = await $("controlnet").fire("drop", {dataTransfer: {files: [png]}});
      return {image: $("cn_image_preview").src, stopped: drop.propagationStopped};  // not the page's PNG-settings drop
    """, {**SETUP_ROUTES, **CONTROLNET_ROUTES})
    assert got == {"image": "data:image/jpeg;base64,/9j/", "stopped": True}
    off = page("""
      const drop = await $("controlnet").fire("drop", {dataTransfer: {files: []}});
      return {image: $("cn_image_preview").src, stopped: drop.propagationStopped};
    """, SETUP_ROUTES)  # no ControlNet: the drop goes on to the page's
    assert off == {"image": "", "stopped": False}
