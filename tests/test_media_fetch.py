"""Remote media fetching (`--allow-remote-media`) against local HTTP servers on 127.0.0.1: private and loopback
addresses are refused in every spelling and on every redirect, hosts on the allowed list are fetched, every failure
reads the same, and a fetch ends at its deadline and its byte cap however the server behaves. A symlink loop in the
local media folder is a MediaError."""

import argparse
import asyncio
import io
import ipaddress
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from qwen35.multimodal import fetch as fetch_module
from qwen35.multimodal.fetch import FAILED, fetch, fetch_sync, is_public
from qwen35.multimodal.inputs import MediaPolicy, URLSource, resolve
from qwen35.multimodal.items import MediaError
from qwen35.serve.server_cli import add_media_arguments, media_kwargs


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BODY = _png()  # about 9 KiB
DRIP_SECONDS = 0.2  # a dripping server sends one byte this often, for at most DRIP_FOR seconds
DRIP_FOR = 8.0


class MediaHandler(BaseHTTPRequestHandler):
    """/ok: BODY; /redirect?URL: 302 to URL; /drip: 200 whose body comes a byte at a time; /drip-headers: headers a
    byte at a time; /close-delimited: BODY with no Content-Length; /missing: 404; anything else (e.g. /metadata):
    200 "secret". Every path asked for is recorded in server.hits."""

    def do_GET(self):
        self.server.hits.append(self.path)
        path, _, query = self.path.partition("?")
        try:
            if path == "/ok":
                self.reply(200, BODY)
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.drip(b"x" * 1000)
            elif path == "/drip-headers":
                self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-Pad: y\r\n" * 100)
            elif path == "/close-delimited":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(BODY)
                self.close_connection = True
            elif path == "/missing":
                self.reply(404, b"no")
            else:
                self.reply(200, b"secret")
        except OSError:  # the client hung up: expected for drips and refused answers
            pass

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drip(self, data):
        end = time.monotonic() + DRIP_FOR
        for i in range(len(data)):
            if time.monotonic() > end:
                break
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(DRIP_SECONDS)
        self.close_connection = True

    def log_message(self, *args):
        pass


class MediaServer:
    """A MediaHandler server on 127.0.0.1 in a thread (a context manager)."""

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
        self.httpd.daemon_threads = True
        self.httpd.hits = []
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    @property
    def hits(self):
        return self.httpd.hits

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def web():
    with MediaServer() as server:
        yield server


def get(url, max_bytes=len(BODY), timeout=5.0, allowed=None):
    return fetch_sync(url, max_bytes, timeout, None if allowed is None else frozenset(allowed))


def refusal(url, **kw) -> str:
    with pytest.raises(MediaError) as e:
        get(url, **kw)
    message = str(e.value)
    assert message == f"URL {url[:80]}: {FAILED}", message
    return message


def test_is_public():
    refused = ["127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
               "100.100.100.200", "192.0.0.192", "224.0.0.1", "239.1.1.1", "255.255.255.255", "240.0.0.1",
               "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "ff0e::1",
               "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::127.0.0.1", "2002:7f00:1::",
               "2002:a9fe:a9fe::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2001::1"]
    public = ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::",
              "64:ff9b::808:808"]
    assert [a for a in refused if is_public(ipaddress.ip_address(a))] == []
    assert [a for a in public if not is_public(ipaddress.ip_address(a))] == []


def test_loopback_in_every_spelling_is_refused_before_connecting(web):
    port = web.port
    hosts = ["127.0.0.1", "localhost", "LOCALHOST", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1",
             "0.0.0.0", "0", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]
    before = len(web.hits)
    for host in hosts:
        refusal(f"http://{host}:{port}/ok")
    refusal(f"http://user:pw@127.0.0.1:{port}/ok")
    refusal("http://169.254.169.254/latest/meta-data/")
    assert web.hits[before:] == []  # not one connection reached the server


def test_listed_host_is_fetched_and_redirects_followed(web):
    assert get(f"{web.url}/ok", allowed=["127.0.0.1"]) == BODY
    assert get(f"{web.url}/redirect?/ok", allowed=["127.0.0.1"]) == BODY
    assert get(f"{web.url}/close-delimited", allowed=["127.0.0.1"]) == BODY
    # other hosts stay refused while a list is given
    refusal(f"http://localhost:{web.port}/ok", allowed=["127.0.0.1"])


def test_every_redirect_is_checked_again(web, monkeypatch, caplog):
    before = len(web.hits)
    # a listed host may not send the fetch on to an unlisted one
    refusal(f"http://localhost:{web.port}/redirect?http://127.0.0.1:{web.port}/metadata", allowed=["localhost"])
    assert web.hits[before:] == ["/redirect?http://127.0.0.1:" + str(web.port) + "/metadata"]
    # without a list: here 127.0.0.1 stands in for a public host, whose redirects to private ranges are refused
    monkeypatch.setattr(fetch_module, "is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
    assert get(f"{web.url}/redirect?/ok") == BODY
    with caplog.at_level(logging.INFO, logger="qwen35.multimodal.fetch"):
        for target in ("http://169.254.169.254/latest/meta-data/", f"http://[::1]:{web.port}/metadata",
                       "http://10.0.0.1/metadata", f"http://2130706434:{web.port}/metadata"):
            caplog.clear()
            refusal(f"{web.url}/redirect?{target}")
            assert "not a public address" in caplog.text, (target, caplog.text)
    assert all("/metadata" not in hit.partition("?")[0] for hit in web.hits)
    # and redirects are bounded
    chain = f"{web.url}/ok"
    for _ in range(fetch_module.MAX_REDIRECTS + 1):
        chain = f"{web.url}/redirect?{chain}"
    refusal(chain)


def test_every_failure_reads_the_same_and_ends_at_the_deadline(web):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    garbage = socket.socket()  # answers anything with bytes that are not HTTP
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()

    def serve_garbage():
        conn, _ = garbage.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    threading.Thread(target=serve_garbage, daemon=True).start()
    listed = {"allowed": ["127.0.0.1"]}
    urls = [f"http://127.0.0.1:{closed_port}/x", f"http://127.0.0.1:{garbage.getsockname()[1]}/x",
            f"{web.url}/missing", f"http://127.0.0.1:{web.port}/ok"]
    try:
        messages = {refusal(urls[0], **listed).replace(urls[0], ""), refusal(urls[1], **listed).replace(urls[1], ""),
                    refusal(urls[2], **listed).replace(urls[2], ""),
                    refusal(urls[3], max_bytes=len(BODY) - 1, **listed).replace(urls[3], ""),
                    refusal(urls[3]).replace(urls[3], "")}  # not listed, and loopback
    finally:
        garbage.close()
    assert len(messages) == 1, messages
    # a server that sends a byte at a time is cut off at the deadline, in the body or in the headers
    for path in ("/drip", "/drip-headers"):
        start = time.monotonic()
        refusal(f"{web.url}{path}", timeout=1.0, **listed)
        assert time.monotonic() - start < 1.0 + 0.8, path
    # the byte cap holds with and without a Content-Length
    refusal(f"{web.url}/close-delimited", max_bytes=len(BODY) - 1, **listed)
    assert get(f"{web.url}/close-delimited", max_bytes=len(BODY), **listed) == BODY


def test_fetch_sync_inside_a_running_loop(web):
    async def main():  # LLM.chat called from a notebook, whose thread runs an event loop
        return get(f"{web.url}/ok", allowed=["127.0.0.1"])

    assert asyncio.run(main()) == BODY


def test_concurrent_fetches_share_no_thread(web):
    # many slow fetches at once on one loop, each ended by its own deadline, all at about the same time
    async def main():
        start = time.monotonic()
        results = await asyncio.gather(*(fetch(f"{web.url}/drip", 1000, 1.0, frozenset(["127.0.0.1"]))
                                         for _ in range(40)), return_exceptions=True)
        return time.monotonic() - start, results

    elapsed, results = asyncio.run(main())
    assert all(isinstance(r, MediaError) for r in results)
    assert elapsed < 1.0 + 1.5


def test_symlink_loop_in_the_media_folder_is_a_media_error(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    policy = MediaPolicy.of(tmp_path)
    for name in ("a.png", "self.png"):
        with pytest.raises(MediaError, match="cannot resolve this path"):
            resolve(URLSource(str(tmp_path / name)), policy, 100, "image")
        with pytest.raises(MediaError, match="cannot resolve this path"):
            resolve(URLSource((tmp_path / name).as_uri()), policy, 100, "image")


def test_remote_media_is_off_by_default():
    with pytest.raises(MediaError, match="fetching http.s. media is disabled .*--allow-remote-media"):
        resolve(URLSource("https://example.com/cat.png"), MediaPolicy(), 100, "image")


def test_policy_arguments_are_checked():
    for bad in (0, -1, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="media_fetch_timeout"):
            MediaPolicy.of(remote_timeout=bad)
    assert MediaPolicy.of(allowed_media_domains="Example.COM").allowed_media_domains == {"example.com"}
    assert MediaPolicy.of(allowed_media_domains=["[::1]"]).allowed_media_domains == {"::1"}


def test_serve_media_flags():
    parser = argparse.ArgumentParser()
    add_media_arguments(parser)
    kw = media_kwargs(parser.parse_args(["--allow-remote-media", "--allowed-media-domains", "a.example", "[::1]",
                                         "--media-fetch-timeout", "2.5"]))
    policy = MediaPolicy.of(kw["allowed_local_media_path"], kw["allow_remote_media"], kw["allowed_media_domains"],
                            kw["media_fetch_timeout"])
    assert policy == MediaPolicy(None, True, 2.5, frozenset({"a.example", "::1"}))
