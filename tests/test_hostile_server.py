"""`stablediff serve` against hostile and careless clients (issue 19): one request must not take the server down.

`stablediff serve --model demo` runs as a subprocess on a free loopback port; after every hostile request it must
still answer a small txt2img request with the same image it made at the start. A second subprocess is stopped with
SIGINT in the middle of a job. The checks that need no server (limits, token counting, error messages, the Host
rule) run in this process.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from conftest import serve_process  # noqa: E402
from stablediff.serve.guards import HostCheck  # noqa: E402
from stablediff.limits import Limits, count_tokens  # noqa: E402
from stablediff.serve.sdapi import Txt2ImgRequest, check_request  # noqa: E402
from stablediff.serve.server import public_message  # noqa: E402
from stablediff.tokenizer import CLIPTokenizer  # noqa: E402
from stablediff.serve.worker import ClientError  # noqa: E402

READ_TIMEOUT = 2  # --read-timeout of the test server, seconds
NORMAL = {"prompt": "a red circle on a blue background", "steps": 4, "seed": 5, "width": 64, "height": 64}
LONG = {"prompt": "a long job", "steps": 500, "seed": 1, "width": 64, "height": 64}  # --max-steps' default


@contextmanager
def _serve(tmp_path, *extra):
    """(process, port, log path) of `stablediff serve --model demo ...` on a free loopback port."""
    log_path = tmp_path / f"server-{len(list(tmp_path.glob('server-*.log')))}.log"
    with serve_process(["--model", "demo", "--device", "cpu", "--output-dir", str(tmp_path), *extra], log_path,
                       wait_s=120) as (proc, port):
        yield proc, port, log_path


class Hostile:
    def __init__(self, proc, port, log_path, folders):
        self.proc, self.port, self.log_path, self.folders = proc, port, log_path, folders
        self.base = f"http://127.0.0.1:{port}/sdapi/v1/"
        self.reference = None

    def post(self, path, payload=None, **kw):
        kw.setdefault("timeout", 120)
        return httpx.post(self.base + path, json=payload, **kw)

    def progress(self) -> dict:
        return httpx.get(self.base + "progress", timeout=30).json()

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def assert_healthy(self):
        """The server answers the small request with the same image as at the start, and nothing is left running."""
        r = self.post("txt2img", NORMAL)
        assert r.status_code == 200, r.text
        [image] = r.json()["images"]
        assert image == self.reference
        state = self.progress()["state"]
        assert state["job_count"] == 0 and state["queue_size"] == 0, state


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The demo server with --max-queue 4, a 2 s read timeout, an allowed extra Host name, absolute --lora-dir and
    --embeddings-dir (one usable embedding, one for another width), and a broken checkpoint in --models-dir."""
    from safetensors.torch import save_file
    import torch

    root = tmp_path_factory.mktemp("hostile")
    folders = {name: root / name for name in ("loras", "embeddings", "models")}
    for folder in folders.values():
        folder.mkdir()
    save_file({"emb_params": torch.randn(1, 64)}, folders["embeddings"] / "goodtok.safetensors")
    save_file({"emb_params": torch.randn(1, 768)}, folders["embeddings"] / "widetok.safetensors")
    (folders["models"] / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with _serve(root, "--max-queue", "4", "--read-timeout", str(READ_TIMEOUT), "--allowed-hosts", "sd.example",
                "--lora-dir", str(folders["loras"]), "--embeddings-dir", str(folders["embeddings"]),
                "--models-dir", str(folders["models"])) as (proc, port, log_path):
        server = Hostile(proc, port, log_path, folders)
        r = server.post("txt2img", NORMAL)
        assert r.status_code == 200, r.text
        server.reference = r.json()["images"][0]
        yield server


# --- no server needed ----------------------------------------------------------------------------------------------

def test_check_request_refuses_by_the_limits_naming_the_flag():
    limits = Limits()
    cases = [  # (request, status, text in the message)
        ({"width": 4096, "height": 4096, "steps": 1000, "batch_size": 16, "n_iter": 100}, 422, "--max-pixels"),
        ({"width": 512, "height": 512, "steps": 20, "batch_size": 16, "n_iter": 100}, 422, "--max-images"),
        ({"width": 2048, "height": 2048, "steps": 150, "n_iter": 100}, 422, "--max-work"),
        ({"steps": 501}, 422, "--max-steps"),
        ({"width": 1024, "height": 1024, "batch_size": 16}, 422, "--max-batch-pixels"),
        ({"prompt": "x" * 20_001}, 413, "prompt length in characters 20,001"),
        ({"negative_prompt": "cat " * 1500}, 413, "negative prompt length in tokens"),
        ({"enable_hr": True, "width": 2048, "height": 2048}, 422, "image size 4096x4096 = 16,777,216"),
    ]
    for fields, status, text in cases:
        with pytest.raises(ClientError) as e:
            check_request(Txt2ImgRequest(**fields), limits, 512)
        assert e.value.status == status and text in str(e.value), (fields, str(e.value))
    # left-out width/height: the native size given, or the init image's rounded down to a multiple of 8
    plan = check_request(Txt2ImgRequest(steps=20), limits, 64)
    assert (plan.params.width, plan.params.height, plan.steps) == (64, 64, 20)
    plan = check_request(Txt2ImgRequest(steps=20), limits, 512, init_size=(301, 203))
    assert (plan.params.width, plan.params.height) == (296, 200)
    with pytest.raises(ClientError, match="--max-pixels"):
        check_request(Txt2ImgRequest(), Limits(max_pixels=512 * 511), 512)


def test_token_count_is_an_upper_bound_and_fast_on_hostile_text():
    tokenizer = CLIPTokenizer()
    for text in ("a photo of a cat, (masterpiece:1.2), 8k", "über-große Äpfel, ΣΑΣ", "😂😂😂 🇺🇸 ok", ""):
        assert count_tokens(text) == len(tokenizer.encode(text))
    word = "qzjxv" * 4000  # one 20,000-letter piece: BPE would take seconds, its count a byte a token is at once
    start = time.perf_counter()
    assert count_tokens(word) >= 20_000
    assert count_tokens(" ".join(["qzjxvkwp" * 8] * 300)) >= 300 * 2
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ClientError, match="prompt length in tokens"):
        check_request(Txt2ImgRequest(prompt=word[:19_000]), Limits(), 512)
    assert count_tokens("a BREAK b BREAK c") == 7 + 2 * 75  # each BREAK pads a chunk to 75 tokens (and is one)
    with pytest.raises(ClientError, match="prompt length in tokens"):
        check_request(Txt2ImgRequest(prompt="a BREAK " * 14), Limits(), 512)


def test_public_messages_show_no_absolute_paths():
    roots = [("/srv/sd/loras", "<lora-dir>"), ("/srv/sd/models", "<models-dir>")]
    text = ("<lora:x>: no LoRA named 'x' in /srv/sd/loras/ (it has a); cannot load /srv/sd/models/sub/m.safetensors; "
            "see /usr/lib/python3/site-packages/stablediff/weights.py line 3, C:\\Users\\me\\m.ckpt")
    message = public_message(text, roots)
    assert "<lora-dir>/" in message and "<models-dir>/sub/m.safetensors" in message
    assert ".../weights.py" in message and ".../m.ckpt" in message
    assert "/srv" not in message and "/usr" not in message and "Users" not in message
    assert public_message("width 100 is not a multiple of 8; 1/2 at http://127.0.0.1:7860/x", []) == \
        "width 100 is not a multiple of 8; 1/2 at http://127.0.0.1:7860/x"
    assert "\n" not in public_message("line one\nTraceback (most recent call last):\n  File", [])


def test_host_rule():
    check = HostCheck(None, allowed=("sd.example",))
    for ok in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "::1", "10.1.2.3", "LOCALHOST.",
               "sd.example:80", "Sd.Example"):
        assert check.allows(ok), ok
    for bad in ("evil.example", "evil.example:7860", "localhost.evil.example", "127.0.0.1.nip.io", "sd.example.evil",
                "[evil]:80"):
        assert not check.allows(bad), bad


def test_serve_flags_reach_the_limits_and_uvicorn(capsys):
    from fastapi import FastAPI

    from stablediff.cli import main
    from stablediff.serve.server import ServeConfig, make_server

    assert main(["serve", "--max-steps", "0"]) == 2
    assert main(["serve", "--read-timeout", "0"]) == 2
    assert main(["serve", "--limit-concurrency", "1"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps 0 must be a whole number >= 1" in err and "--read-timeout 0" in err
    app = FastAPI()
    app.state.worker = None
    config = make_server(ServeConfig(read_timeout=3, limit_concurrency=7), app).config
    assert (config.http.timeout, config.limit_concurrency, config.timeout_keep_alive) == (3.0, 7, 5)
    assert config.timeout_graceful_shutdown == ServeConfig().shutdown_timeout


# --- hostile requests against the live server ----------------------------------------------------------------------

def test_serve_model_demo_with_lora_and_embeddings_dirs(hostile):
    models = httpx.get(hostile.base + "sd-models").json()
    assert [m["title"] for m in models] == ["demo", "broken.safetensors"]
    r = hostile.post("txt2img", {**NORMAL, "prompt": "goodtok on a blue background"})
    assert r.status_code == 200
    assert "TI hashes: \"goodtok: " in json.loads(r.json()["info"])["infotexts"][0]  # --embeddings-dir is used
    assert "skipped embedding" in hostile.log_path.read_text()  # the 768-wide one, named in the log
    hostile.assert_healthy()


def test_oversized_work_is_refused_at_once_and_the_server_goes_on(hostile):
    cases = [
        ({"width": 4096, "height": 4096, "steps": 1000, "batch_size": 16, "n_iter": 100}, 422, "--max-pixels"),
        ({"steps": 500, "batch_size": 16, "n_iter": 100}, 422, "--max-images"),
        ({"width": 2048, "height": 2048, "steps": 400, "n_iter": 20}, 422, "--max-work"),
        ({"prompt": "cat " * 1200}, 413, "--max-prompt-tokens"),
        ({"prompt": "qzjxv" * 3900}, 413, "--max-prompt-tokens"),  # 19,500 letters in one piece
        ({"negative_prompt": "x" * 30_000}, 413, "--max-prompt-tokens"),
    ]
    for payload, status, flag in cases:
        start = time.monotonic()
        r = hostile.post("txt2img", payload)
        assert time.monotonic() - start < 2.0, payload
        assert r.status_code == status and flag in r.json()["detail"], (payload, r.text)
        hostile.assert_healthy()
    init = base64.b64encode(base64.b64decode(hostile.reference)).decode()
    r = hostile.post("img2img", {"init_images": [init], "steps": 500, "batch_size": 16, "n_iter": 100})
    assert r.status_code == 422 and "--max-images" in r.json()["detail"]
    hostile.assert_healthy()


def test_a_10_mb_prompt_or_a_json_bomb_is_refused_without_the_memory_growing(hostile):
    hostile.assert_healthy()
    before = hostile.rss()
    for field in ("prompt", "negative_prompt"):
        start = time.monotonic()
        r = hostile.post("txt2img", {**NORMAL, field: "a red dog " * 1_050_000})  # 10.5 MB
        assert time.monotonic() - start < 10
        assert r.status_code == 413 and "--max-prompt-tokens" in r.json()["detail"]
        assert len(r.content) < 1000  # the prompt is not echoed back
    # 45 MB of `[{},{},...]` would be 1.3 GB of Python dicts once parsed
    start = time.monotonic()
    r = httpx.post(hostile.base + "txt2img", content=b'{"styles": [' + b"{}," * 15_000_000 + b"{}]}", timeout=60,
                   headers={"Content-Type": "application/json"})
    assert time.monotonic() - start < 10
    assert r.status_code == 413 and "JSON values" in r.json()["detail"]
    assert hostile.rss() - before < 200 * 2**20, (before, hostile.rss())
    hostile.assert_healthy()


def test_the_response_to_a_long_prompt_is_bounded(hostile):
    prompt = ("a" + " " * 19) * 990  # 19,800 characters, 992 tokens: just under both prompt limits
    r = hostile.post("txt2img", {**NORMAL, "prompt": prompt, "steps": 1, "batch_size": 4, "n_iter": 2})
    assert r.status_code == 200 and len(r.json()["images"]) == 8
    info = json.loads(r.json()["info"])
    assert info["all_prompts"] == [prompt] * 8  # repeated per image, as A1111 does
    # per image: all_prompts and infotexts (1 byte a character here) and the PNG text chunk (4/3 in base64)
    assert len(r.content) < 8 * (3.5 * len(prompt) + 20_000) + 10 * len(prompt)
    hostile.assert_healthy()


def test_progress_is_right_from_the_start_and_interrupt_stops_only_the_running_job(hostile):
    webuiapi = pytest.importorskip("webuiapi")  # only this test drives the client
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(hostile.post, "txt2img", LONG)
        deadline = time.monotonic() + 30
        while (state := hostile.progress()["state"])["job_count"] == 0:
            assert time.monotonic() < deadline and not long.done()
            time.sleep(0.02)
        assert state["sampling_steps"] == 500 and state["job"] == "txt2img"  # not 0/0 before the first step
        short = pool.submit(hostile.post, "txt2img", NORMAL)
        while hostile.progress()["state"]["queue_size"] != 1:
            assert time.monotonic() < deadline and not long.done()
            time.sleep(0.02)
        start = time.monotonic()
        assert webuiapi.WebUIApi(host="127.0.0.1", port=hostile.port).interrupt() == {}  # a bodiless POST
        r = long.result(timeout=30)
        assert time.monotonic() - start < 3.0
        info = json.loads(r.json()["info"])
        assert r.status_code == 200 and info["interrupted"] is True and r.json()["images"] == []
        r = short.result(timeout=60)  # the waiting job was not touched
        assert r.status_code == 200 and r.json()["images"] == [hostile.reference]
    hostile.assert_healthy()


def _raw_post(port: int, payload: dict) -> socket.socket:
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_a_job_whose_client_went_away_is_cancelled_and_a_waiting_one_never_runs(hostile):
    run_no = json.loads(hostile.post("txt2img", NORMAL).json()["info"])["run_no"]
    running = _raw_post(hostile.port, LONG)
    deadline = time.monotonic() + 30
    while hostile.progress()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = _raw_post(hostile.port, {**LONG, "prompt": "never run"})
    while hostile.progress()["state"]["queue_size"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting.close()
    start = time.monotonic()
    while (state := hostile.progress()["state"])["queue_size"]:
        assert time.monotonic() - start < 2.0, state  # dropped from the queue within DISCONNECT_POLL_S
        time.sleep(0.05)
    assert state["job_count"] == 1 and not state["interrupted"]  # the other client's job goes on
    running.close()
    start = time.monotonic()
    while (state := hostile.progress()["state"])["job_count"]:
        assert time.monotonic() - start < 3.0, state  # noticed within DISCONNECT_POLL_S, stopped within a block
        time.sleep(0.05)
    r = hostile.post("txt2img", NORMAL)
    assert json.loads(r.json()["info"])["run_no"] == run_no + 2  # the long job ran (and stopped); the other never
    hostile.assert_healthy()


def test_slow_clients_are_cut_off_and_do_not_block_others(hostile):
    partial = b"GET /sdapi/v1/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    slow = [socket.create_connection(("127.0.0.1", hostile.port), timeout=READ_TIMEOUT + 5) for _ in range(20)]
    for i, sock in enumerate(slow):
        if i % 4 == 1:  # a body that stops half way
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        elif i % 4 != 2:  # headers that never end (every fourth sends nothing at all)
            sock.sendall(partial)
    start = time.monotonic()
    assert httpx.get(hostile.base + "progress", timeout=10).status_code == 200
    assert time.monotonic() - start < 1.0
    time.sleep(1.0)
    for sock in slow:  # still sending, one more byte a second: the deadline does not move
        try:
            sock.sendall(b"x")
        except OSError:
            pass
    answers = []
    for sock in slow:
        try:
            answers.append(sock.recv(200))
        except OSError:
            answers.append(b"")
        sock.close()
    took = time.monotonic() - start
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 4, took  # the stalled bodies: 1 s + READ_TIMEOUT
    for i, answer in enumerate(answers):
        if i % 4 in (0, 3):
            assert answer.startswith(b"HTTP/1.1 408"), answer
        else:
            assert not answer.startswith(b"HTTP/1.1 200"), answer
    hostile.assert_healthy()


def test_other_hosts_and_cross_site_posts_are_refused(hostile):
    port = hostile.port
    r = httpx.get(hostile.base + "sd-models", headers={"Host": f"rebind.evil.example:{port}"})
    assert r.status_code == 400 and "rebind.evil.example" in r.json()["detail"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"sd.example:{port}"):
        assert httpx.get(hostile.base + "sd-models", headers={"Host": host}).status_code == 200, host
    r = hostile.post("txt2img", NORMAL, headers={"Host": "evil.example"})
    assert r.status_code == 400

    evil = {"Origin": "http://evil.example"}
    assert httpx.post(hostile.base + "interrupt", headers=evil).status_code == 403  # a bodiless cross-site POST
    r = hostile.post("txt2img", NORMAL, headers=evil)
    assert r.status_code == 403 and "evil.example" in r.json()["detail"]
    assert httpx.post(hostile.base + "interrupt", headers={"Origin": "null"}).status_code == 403
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(hostile.base + "txt2img", content=json.dumps(NORMAL), headers=headers)
        assert r.status_code == 415, (content_type, r.text)
    # the server's own page (same origin) and JSON clients go through
    r = hostile.post("txt2img", NORMAL, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200 and r.json()["images"] == [hostile.reference]
    assert hostile.post("interrupt", {}, headers={"Origin": f"http://localhost:{port}",
                                                  "Host": f"localhost:{port}"}).status_code == 200
    hostile.assert_healthy()


def test_error_bodies_name_no_server_paths(hostile):
    secret = str(hostile.folders["loras"].parent)
    r = hostile.post("txt2img", {**NORMAL, "prompt": "<lora:nope:1> a cat"})
    assert r.status_code == 422 and "nope" in r.json()["detail"], r.text
    assert "in the LoRA folder" in r.json()["detail"] and secret not in r.text and "/" not in r.json()["detail"]
    r = hostile.post("options", {"sd_model_checkpoint": "broken.safetensors"})
    assert r.status_code == 500 and "broken.safetensors" in r.json()["detail"], r.text
    assert secret not in r.text and "Traceback" not in r.text and "/" + "tmp" not in r.text
    assert secret in hostile.log_path.read_text()  # the whole error is in the server's log
    assert httpx.get(hostile.base + "options").json()["sd_model_checkpoint"] == "demo"
    hostile.assert_healthy()


def test_sigint_in_the_middle_of_a_job_exits_within_seconds(tmp_path):
    with _serve(tmp_path, "--max-queue", "4") as (proc, port, log_path):
        base = f"http://127.0.0.1:{port}/sdapi/v1/"
        with ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(httpx.post, base + "txt2img", json=LONG, timeout=60) for _ in range(3)]
            deadline = time.monotonic() + 30
            while (state := httpx.get(base + "progress").json()["state"])["sampling_step"] < 1 or \
                    state["queue_size"] < 2:
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(15)
            assert time.monotonic() - start < 8, log_path.read_text()
            answers = [job.result(timeout=10) for job in jobs]
        assert [r.status_code for r in answers] == [503] * 3
        assert sum("shutting down" in r.json()["detail"] for r in answers) == 3
        assert "Application shutdown complete" in log_path.read_text()
