"""maskport serve on the trained demo export: answers and masks equal to the export's own predict_forward,
every bad-input class a one-line 4xx, auth on/off, concurrent (batched) == sequential, freed slots on timeout and
disconnect, the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.serve_util import REPO, demo_samples, running

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from maskport import rle  # noqa: E402
from maskport.serve.app import Limits, create_app  # noqa: E402
from maskport.serve.client import decode_masks, decode_probabilities, segment  # noqa: E402
from maskport.serve.engine import Replica, model_info  # noqa: E402


@pytest.fixture(scope="module")
def replica(demo_export):
    return Replica.load(demo_export, "cpu")


@pytest.fixture(scope="module")
def info(demo_export, replica):
    return model_info(demo_export, [replica])


LIMITS = Limits(max_body_bytes=300_000, max_pixels=400 * 400, max_prompt_chars=200, max_new_tokens=64,
                default_max_new_tokens=32, timeout_s=60)


@pytest.fixture(scope="module")
def url(replica, info):
    app = create_app([replica], info, limits=LIMITS, max_batch=8, max_wait_s=0.05)
    with running(app) as base:
        yield base


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _direct(replica, image_path, prompt, **kw):
    """The export's own predict_forward, called as a user would (no server)."""
    return replica.model.predict_forward(image=Image.open(image_path).convert("RGB"), text="<image>" + prompt,
                                         tokenizer=replica.tokenizer, max_new_tokens=kw.get("max_new_tokens", 32),
                                         return_probabilities=kw.get("return_probabilities", False))


# ------------------------------------------------------------------------------------------------- good requests
def test_segment_equals_predict_forward(url, replica):
    s = demo_samples(1)[0]
    res = segment(url, s["image"], s["prompt"], return_probabilities=True)
    ref = _direct(replica, s["image"], s["prompt"], return_probabilities=True)
    assert res["prediction"] == ref["prediction"] and "[SEG]" in res["prediction"]
    masks = decode_masks(res)
    assert len(masks) == len(ref["prediction_masks"]) >= 1
    for m, r in zip(masks, ref["prediction_masks"]):
        assert m.shape == r[0].shape and np.array_equal(m, r[0]) and m.any()
    assert [m["seg_index"] for m in res["masks"]] == list(range(len(masks)))
    assert res["masks"][0]["size"] == list(ref["prediction_masks"][0].shape[1:])
    for p, r in zip(decode_probabilities(res), ref["prediction_probabilities"]):
        np.testing.assert_allclose(p, r[0], atol=1e-3)  # sent as float16
    t = res["timings"]
    assert t["batch_size"] == 1 and t["total_ms"] >= t["inference_ms"] > 0 and t["device"] == "cpu"

    # the same request as JSON with base64 (plain and as a data: URL), and with the image given as a PIL image
    b64 = base64.b64encode(s["image"].read_bytes()).decode()
    for image in (b64, "data:image/png;base64," + b64):
        r = httpx.post(url + "/v1/segment", json={"image": image, "prompt": s["prompt"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["prediction"] == res["prediction"]
        assert [m["counts"] for m in r.json()["masks"]] == [m["counts"] for m in res["masks"]]
    again = segment(url, Image.open(s["image"]), s["prompt"])
    assert [m["counts"] for m in again["masks"]] == [m["counts"] for m in res["masks"]]

    # a threshold changes the masks as predict_forward's does (probabilities > threshold)
    hi = segment(url, s["image"], s["prompt"], threshold=0.9)
    probs = ref["prediction_probabilities"][0][0]
    assert np.array_equal(decode_masks(hi)[0], probs > 0.9)
    assert decode_masks(hi)[0].sum() < masks[0].sum()


def test_text_only_request(url, replica):
    res = segment(url, None, "What can you do?", max_new_tokens=8)
    ref = replica.model.predict_forward(image=None, text="What can you do?", tokenizer=replica.tokenizer,
                                        max_new_tokens=8)
    assert res["prediction"] == ref["prediction"] and res["masks"] == []


def test_model_info_and_health(url, demo_export):
    r = httpx.get(url + "/v1/model", timeout=10).json()
    report = json.loads((demo_export / "conversion_report.json").read_text())
    ckpt = REPO / report["inputs"]["checkpoint"]["path"]
    assert r["source_checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert r["family"] == "sa2va-qwen2_5-vl" and r["dtype"] == "float32" and r["quantization"] is None
    assert r["replicas"] == ["cpu"] and r["batched_predict"] is True and r["auth"] is False
    h = httpx.get(url + "/healthz", timeout=10).json()
    assert h["status"] == "ok" and h["replicas"] == 1
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "v1/segment" in page.text


# --------------------------------------------------------------------------------------------------- bad inputs
S0 = demo_samples(1)[0]
GOOD_PNG = S0["image"].read_bytes()


def _bad_cases():
    big = _png(np.zeros((401, 400, 3), np.uint8))            # 160400 pixels > 400 * 400
    noise = _png(np.random.RandomState(0).randint(0, 255, (390, 390, 3), np.uint8))  # > 300 kB body
    return [
        ("no prompt", dict(files={"image": GOOD_PNG}), 400, "prompt"),
        ("empty prompt", dict(files={"image": GOOD_PNG}, data={"prompt": "  "}), 400, "prompt"),
        ("prompt too long", dict(data={"prompt": "x" * 201}), 413, "prompt"),
        ("<image> without an image", dict(data={"prompt": "<image>Please segment it."}), 400, "no image"),
        ("NUL in prompt", dict(data={"prompt": "a\x00b"}), 400, "NUL"),
        ("not an image", dict(files={"image": b"hello, not a png"}, data={"prompt": "x"}), 400, "image"),
        ("truncated image", dict(files={"image": GOOD_PNG[:200]}, data={"prompt": "x"}), 400, "image"),
        ("empty image", dict(files={"image": b""}, data={"prompt": "x"}), 400, "image"),
        ("too many pixels", dict(files={"image": big}, data={"prompt": "x"}), 413, "pixels"),
        ("body too large", dict(files={"image": noise}, data={"prompt": "x"}), 413, "body"),
        ("threshold not a number", dict(data={"prompt": "x", "threshold": "high"}), 400, "threshold"),
        ("threshold out of range", dict(data={"prompt": "x", "threshold": "1.5"}), 400, "threshold"),
        ("max_new_tokens zero", dict(data={"prompt": "x", "max_new_tokens": "0"}), 400, "max_new_tokens"),
        ("max_new_tokens above the cap", dict(data={"prompt": "x", "max_new_tokens": "65"}), 400, "max_new_tokens"),
        ("max_new_tokens not an int", dict(data={"prompt": "x", "max_new_tokens": "2.5"}), 400, "max_new_tokens"),
        ("return_probabilities not a bool", dict(data={"prompt": "x", "return_probabilities": "maybe"}), 400,
         "return_probabilities"),
        ("unknown field", dict(data={"prompt": "x", "temperature": "2"}), 400, "unknown field"),
        ("image twice", dict(files=[("image", GOOD_PNG), ("image", GOOD_PNG)], data={"prompt": "x"}), 400, ""),
        ("bad JSON", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "JSON"),
        ("JSON not an object", dict(json=["prompt"]), 400, "object"),
        ("JSON bad base64", dict(json={"prompt": "x", "image": "***"}), 400, "base64"),
        ("JSON image not a string", dict(json={"prompt": "x", "image": 5}), 400, "base64"),
        ("JSON threshold a bool", dict(json={"prompt": "x", "threshold": True}), 400, "threshold"),
        ("JSON prompt a list", dict(json={"prompt": ["x"]}), 400, "prompt"),
        ("wrong content type", dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 415,
         "content-type"),
        ("broken multipart", dict(content=b"--zz\r\nnonsense",
                                  headers={"content-type": "multipart/form-data; boundary=zz"}), 400, ""),
    ]


@pytest.mark.parametrize("name,kw,status,word", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_a_one_line_4xx(url, name, kw, status, word):
    r = httpx.post(url + "/v1/segment", timeout=30, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err, str) and err and "\n" not in err and "Traceback" not in err and word in err


def test_bad_routes_and_methods(url):
    for method, path, status in (("GET", "/v1/segment", 405), ("GET", "/v1/nothing", 404), ("DELETE", "/", 405)):
        r = httpx.request(method, url + path, timeout=10)
        assert r.status_code == status and "\n" not in r.json()["error"]
    # a client that announces a body over the limit is refused from its header, before the body is sent
    import socket

    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                (re.search(rb"content-length: (\d+)", data, re.I) or [0, b"0"])[1]):
            chunk = sock.recv(4096)  # the head and the body may come in separate segments
            if not chunk:
                break
            data += chunk
        head = data.decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and "over the limit" in head, head
    # after all of that the server still answers
    assert httpx.get(url + "/healthz", timeout=10).json()["queued_or_running"] == 0


# ---------------------------------------------------------------------------------------------------------- auth
def test_api_key(replica, info):
    app = create_app([replica], info, limits=LIMITS, api_key="s3cret-key")
    with running(app) as base:
        for path, method in (("/v1/model", "GET"), ("/v1/segment", "POST")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Basic s3cret-key"}):
                r = httpx.request(method, base + path, headers=headers, data={"prompt": "x"}, timeout=10)
                assert r.status_code == 401 and "bearer" in r.json()["error"].lower()
                assert r.headers.get("www-authenticate") == "Bearer"
        r = httpx.get(base + "/v1/model", headers={"Authorization": "Bearer s3cret-key"}, timeout=10)
        assert r.status_code == 200 and r.json()["auth"] is True
        res = segment(base, S0["image"], S0["prompt"], api_key="s3cret-key")
        assert "[SEG]" in res["prediction"]
        with pytest.raises(RuntimeError, match="HTTP 401"):
            segment(base, S0["image"], S0["prompt"])
        # the page and the health check stay open (the page asks for the key itself)
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200
        assert httpx.get(base + "/", timeout=10).status_code == 200


# -------------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_equal_sequential_ones(url, replica, info):
    samples = demo_samples(8)
    seq_app = create_app([replica], info, limits=LIMITS, max_batch=1)
    with running(seq_app) as seq_url:
        sequential = [segment(seq_url, s["image"], s["prompt"]) for s in samples]
    assert all(r["timings"]["batch_size"] == 1 for r in sequential)

    results: list = [None] * len(samples)
    barrier = threading.Barrier(len(samples))

    def one(i):
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            results[i] = segment(url, samples[i]["image"], samples[i]["prompt"], client=c)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    assert max(r["timings"]["batch_size"] for r in results) > 1, "no request was batched"
    for s, a, b in zip(samples, sequential, results):
        assert a["prediction"] == b["prediction"], s["id"]
        assert [(m["seg_index"], m["size"], m["counts"]) for m in a["masks"]] == \
            [(m["seg_index"], m["size"], m["counts"]) for m in b["masks"]], s["id"]
    assert sum(len(r["masks"]) for r in results) >= 6


def test_a_lone_client_does_not_wait_for_a_batch(replica, info):
    # max-wait applies under concurrent traffic only: one client's sequential requests are not held for it
    app = create_app([replica], info, limits=LIMITS, max_batch=8, max_wait_s=3.0)
    with running(app) as base:
        for _ in range(3):
            r = httpx.post(base + "/v1/segment", files={"image": GOOD_PNG}, data={"prompt": S0["prompt"]},
                           timeout=60).json()
            assert r["timings"]["batch_size"] == 1
            assert r["timings"]["queue_ms"] < 1500, r["timings"]  # 3000 if it had waited for companions


def test_timeouts_and_disconnects_free_their_slots(replica, info):
    # a server whose requests time out long before the model answers: every slot must come back
    slow = Limits(**{**LIMITS.__dict__, "timeout_s": 0.05})
    app = create_app([replica], info, limits=slow, max_batch=1, max_queue=4)
    with running(app) as base:
        codes = []

        def one():
            codes.append(httpx.post(base + "/v1/segment", files={"image": GOOD_PNG}, data={"prompt": S0["prompt"]},
                                    timeout=60).status_code)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes.count(504) + codes.count(503) == 4 and 504 in codes
        assert httpx.get(base + "/healthz", timeout=10).json()["queued_or_running"] == 0
        stats = app.state.batcher.stats
        assert stats["cancelled"] >= 1 and stats["batches"] < stats["requests"]  # queued ones were skipped

    # clients that give up (disconnect) while their requests wait: their slots come back, the queue is skipped
    app = create_app([replica], info, limits=LIMITS, max_batch=1, max_queue=8)
    with running(app) as base:
        def gone():
            try:
                # the whole request is sent, then the client waits 50 ms for the answer and leaves
                httpx.post(base + "/v1/segment", files={"image": GOOD_PNG}, data={"prompt": S0["prompt"]},
                           timeout=httpx.Timeout(10, read=0.05))
            except httpx.TimeoutException:
                pass

        threads = [threading.Thread(target=gone) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        t0 = time.time()
        while app.state.batcher.pending and time.time() - t0 < 20:
            time.sleep(0.05)
        assert app.state.batcher.pending == 0
        stats = app.state.batcher.stats
        assert stats["requests"] <= 6 and stats["batches"] < 6 and stats["cancelled"] >= 1
        res = segment(base, S0["image"], S0["prompt"])   # and it still serves
        assert "[SEG]" in res["prediction"]


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_serve(demo_export, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MASKPORT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "maskport.cli", "serve", str(demo_export), "--port", "0",
                             "--max-batch", "4", "--log-level", "info"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        port, lines = None, []
        t0 = time.time()
        while port is None and time.time() - t0 < 120:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "".join(lines)
        assert any("auth on" in x and "127.0.0.1" in x for x in lines)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/v1/model", timeout=10).status_code == 401
        r = httpx.get(base + "/v1/model", headers={"Authorization": "Bearer from-env"}, timeout=10).json()
        assert r["batching"]["max_batch"] == 4
    finally:
        proc.terminate()
        proc.wait(30)
    # a folder that is not an export: one error line, exit 2
    bad = subprocess.run([sys.executable, "-m", "maskport.cli", "serve", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_loading_a_replica_leaves_autograd_as_it_was(demo_export):
    """Prediction runs under inference_mode; loading a replica must not switch autograd off for the whole process
    (it did: a later training step in the same process failed with 'does not require grad')."""
    import torch

    from maskport.serve.engine import Replica

    assert torch.is_grad_enabled()
    Replica.load(demo_export)
    assert torch.is_grad_enabled()
