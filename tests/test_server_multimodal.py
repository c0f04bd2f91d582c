"""Images and videos through `qwen35 serve` (a real server process on a tiny multimodal checkpoint, driven by the
`openai` client and httpx): answers equal `LLM.chat` for the same content, streaming included; bad or forbidden
media get a 400 naming the problem and the server stays healthy; remote media come only from allowed hosts, and a
slow one holds up no other request."""

import asyncio
import base64
import io
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import qwen35.serve.context as app_module  # where the routes call prepare_prompt
from qwen35 import LLM, SamplingParams
from qwen35.multimodal.fetch import FAILED
from qwen35.serve.app import build_app
from tests.test_media_fetch import BODY, MediaServer
from tests.test_mm_processing import write_video
from tests.test_server import Server
from tests.tiny_models import build
from tests.tokenizer_fixtures import add_qwen35_tokenizer

PREPROCESSOR = {"size": {"shortest_edge": 1024, "longest_edge": 16384}, "patch_size": 8, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
VIDEO_PREPROCESSOR = {**PREPROCESSOR, "size": {"shortest_edge": 1024, "longest_edge": 24576}, "max_frames": 16}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-mm-ckpt")
    build("dense_vl", path, seed=5, vocab_size=248320)
    return add_qwen35_tokenizer(path, preprocessor_config=PREPROCESSOR, video_preprocessor_config=VIDEO_PREPROCESSOR)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((80, 60))
    img.save(root / "cat.png")
    write_video(root / "clip.mp4", n=20, fps=10, w=48, h=32)
    (root / "loop.png").symlink_to(root / "loop.png")
    return root


@pytest.fixture(scope="module")
def server(ckpt, media, tmp_path_factory):
    # remote media from "localhost" only (the tests' own HTTP servers), each fetch within 5 s
    llm_kw = {"allowed_local_media_path": str(media), "limit_mm_per_prompt": {"image": 2, "video": 1},
              "allow_remote_media": True, "allowed_media_domains": ["localhost"], "media_fetch_timeout": 5.0}
    s = Server(ckpt, tmp_path_factory.mktemp("logs") / "server.log", llm=llm_kw, max_body_bytes=8 * 2**20)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(ckpt, media):
    return LLM(ckpt, dtype="float32", max_model_len=512, allowed_local_media_path=media)


def data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def ask(client, content, stream=False, max_tokens=8):
    kw = dict(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
              extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices)


def reference(llm, content, max_tokens=8):
    out = llm.chat([{"role": "user", "content": content}],
                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   chat_template_kwargs={"enable_thinking": False})[0]
    assert out.messages[0]["content"]
    return out.messages[0]["content"]


def test_image_and_video_answers_equal_llm_chat(client, llm, media):
    image = {"type": "image_url", "image_url": {"url": data_url(media / "cat.png", "image/png")}}
    video = {"type": "video_url", "video_url": {"url": data_url(media / "clip.mp4", "video/mp4")}}
    local = {"type": "image_url", "image_url": {"url": (media / "cat.png").as_uri()}}
    for content in ([{"type": "text", "text": "What is in the picture?"}, image],
                    [image, {"type": "text", "text": "and"}, local],
                    [video, {"type": "text", "text": "What happens?"}]):
        want = reference(llm, content)
        assert ask(client, content) == want
        assert ask(client, content, stream=True) == want


def post(server, content):
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "max_tokens": 2, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": content}]})


def img(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_bad_and_forbidden_media_are_400(server, media, tmp_path):
    good = img(data_url(media / "cat.png", "image/png"))
    truncated = "data:image/png;base64," + base64.b64encode((media / "cat.png").read_bytes()[:100]).decode()
    buf = io.BytesIO()
    Image.new("RGB", (1, 300)).save(buf, format="PNG")
    thin = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    cases = {
        "truncated": ([img(truncated)], "truncated|corrupt"),
        "not base64": ([img("data:image/png;base64,@@@@")], "base64"),
        "remote": ([img("https://example.com/cat.png")], "example.com/cat.png: cannot fetch"),
        "outside folder": ([img(str(tmp_path / "x.png"))], "outside the allowed"),
        "missing file": ([img(str(media / "nope.png"))], "nope.png"),
        "symlink loop": ([img(str(media / "loop.png"))], "loop.png: cannot resolve"),
        "aspect ratio": ([img(thin)], "aspect ratio"),
        "too many images": ([good, good, good], "too many images"),
        "video as image": ([img(data_url(media / "clip.mp4", "image/png"))], "not an image"),
        "image as video": ([{"type": "video_url", "video_url": {"url": data_url(media / "cat.png", "video/mp4")}}],
                           "an image .*not a video"),
        "no url": ([{"type": "image_url", "image_url": {}}], "URL"),
        "unknown part": ([{"type": "input_audio", "input_audio": {}}], "not supported"),
    }
    for name, (content, match) in cases.items():
        r = post(server, content)
        assert r.status_code == 400, (name, r.text)
        message = r.json()["error"]["message"]
        assert message and (not match or re.search(match, message)), (name, message)
    assert httpx.get(server.url + "/health").status_code == 200
    assert post(server, [good]).status_code == 200
    metrics = server.metrics()
    assert metrics["qwen35_num_requests_running"] == 0


def test_remote_media_from_allowed_hosts_only(server):
    with MediaServer() as web:
        local = f"http://localhost:{web.port}"
        fetched = post(server, [img(f"{local}/ok")])
        assert fetched.status_code == 200, fetched.text
        inline = post(server, [img("data:image/png;base64," + base64.b64encode(BODY).decode())])
        assert fetched.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]
        refused = [f"http://127.0.0.1:{web.port}/ok", f"http://2130706433:{web.port}/ok", "http://0.0.0.0/",
                   f"{local}/redirect?http://127.0.0.1:{web.port}/metadata", f"{local}/missing",
                   "http://localhost:1/closed-port"]
        hits = len(web.hits)
        for url in refused:
            r = post(server, [img(url)])
            assert r.status_code == 400 and r.json()["error"]["message"] == f"image URL {url[:80]}: {FAILED}", r.text
        assert web.hits[hits:] == [f"/redirect?http://127.0.0.1:{web.port}/metadata", "/missing"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_slow_remote_media_holds_up_no_other_request(server, media):
    # more dripping fetches than the default worker pool has threads, then a data: URL request
    n = min(32, (os.cpu_count() or 1) + 4) + 1
    inline = [img(data_url(media / "cat.png", "image/png"))]
    assert post(server, inline).status_code == 200  # warm: the timed request below is not the server's first
    with MediaServer() as web, ThreadPoolExecutor(n) as pool:
        start = time.monotonic()
        slow = [pool.submit(post, server, [img(f"http://localhost:{web.port}/drip")]) for _ in range(n)]
        while web.hits.count("/drip") < n and time.monotonic() - start < 20:
            time.sleep(0.05)
        assert web.hits.count("/drip") == n
        assert post(server, inline).status_code == 200
        assert not any(f.done() for f in slow)  # the data: URL did not wait for the dripping fetches
        answers = [f.result() for f in slow]
        assert time.monotonic() - start < 5.0 + 4.0  # each fetch ended at its 5 s deadline
    assert {(a.status_code, a.json()["error"]["message"]) for a in answers} == {
        (400, f"image URL http://localhost:{web.port}/drip: {FAILED}")}


def test_media_preprocessing_in_flight_is_bounded(llm, media, monkeypatch):
    # Six image requests at once through the app in-process: at most max_media_jobs of them preprocess together.
    lock, state = threading.Lock(), {"now": 0, "most": 0}
    real = app_module.prepare_prompt

    def tracked(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(app_module, "prepare_prompt", tracked)
    app = build_app(llm, "tiny", max_media_jobs=2)
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(media / "cat.png", "image/png")}},
        {"type": "text", "text": "What is it?"}]}]}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(6)])

    try:
        responses = asyncio.run(run())
    finally:
        app.state.engine.shutdown()
    assert [r.status_code for r in responses] == [200] * 6, responses[0].text
    assert state["most"] == 2
