"""Fetching http(s) media for `--allow-remote-media` without handing clients a way into the server's network.

Every hop (the URL and each redirect) is resolved once, each resolved address is checked (no loopback, private,
link-local, unspecified, multicast, reserved or cloud-metadata range, IPv4 embedded in IPv6 included), and the
connection goes to exactly the checked address, so a DNS answer cannot change between check and connect. Hosts on
`allowed_media_domains` are the operator's: only they are fetched and their addresses are not checked. A fetch has
one total deadline and a byte cap, and every failure reads the same (no open/closed port oracle; the real reason
goes to the log). The fetch is a coroutine on the caller's event loop, so a host that drips bytes holds no worker
thread that other requests' media wait for; only DNS lookups use threads, a small pool of their own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from qwen35.multimodal.items import MediaError

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
FAILED = ("cannot fetch it (remote media must come from an allowed public host, answer 200 within the time limit "
          "and fit the size limit; send a data: URL instead)")
# is_global misses these: IETF protocol assignments (Oracle Cloud's metadata service is 192.0.0.192) and the shared
# carrier-NAT space (Alibaba Cloud's metadata service is 100.100.100.200).
BLOCKED = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("100.64.0.0/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")

_dns_pool: ThreadPoolExecutor | None = None


class _Refused(Exception):
    """Why a fetch failed: logged for the operator, never shown to the client."""


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a server may connect to `ip` on a client's behalf."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            return is_public(embedded)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved) and not any(ip in net for net in BLOCKED)


async def fetch(url: str, max_bytes: int, timeout: float, allowed_hosts: frozenset[str] | None = None,
                name: str = "URL") -> bytes:
    """The body of a 200 answer to GET `url` (redirects followed), or MediaError "<name> <url>: <one message>"."""
    try:
        return await asyncio.wait_for(_fetch(url, max_bytes, allowed_hosts), timeout)
    except Exception as e:  # noqa: BLE001  (every failure is the client's and reads the same)
        reason = f"no answer within {timeout} s" if isinstance(e, asyncio.TimeoutError) else f"{e!r}"
        logger.info("remote media %s refused: %s", url[:200], reason)
        raise MediaError(f"{name} {url[:80]}: {FAILED}") from None


def fetch_sync(url: str, max_bytes: int, timeout: float, allowed_hosts: frozenset[str] | None = None,
               name: str = "URL") -> bytes:
    """`fetch` for synchronous callers (LLM.chat), also from a thread that runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetch(url, max_bytes, timeout, allowed_hosts, name))
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fetch(url, max_bytes, timeout, allowed_hosts, name)).result()


async def _fetch(url: str, max_bytes: int, allowed_hosts: frozenset[str] | None) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise _Refused(f"not an http(s) URL with a host: {url[:200]}")
        port = parts.port or (443 if scheme == "https" else 80)  # a bad port is a ValueError here
        addresses = await _resolve(host, port, allowed_hosts)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]  # the Host header never carries credentials
        status, location, body = await _get(addresses, host if scheme == "https" else None, netloc, target,
                                            max_bytes)
        if status not in REDIRECTS:
            return body
        if not location:
            raise _Refused(f"HTTP {status} without a Location")
        url = urllib.parse.urljoin(url, location)
    raise _Refused(f"more than {MAX_REDIRECTS} redirects")


async def _resolve(host: str, port: int, allowed_hosts: frozenset[str] | None) -> list[tuple]:
    """(family, sockaddr) for every address of `host`, all of them checked."""
    global _dns_pool
    listed = allowed_hosts is not None and host.lower() in allowed_hosts
    if allowed_hosts is not None and not listed:
        raise _Refused(f"host {host!r} is not in allowed_media_domains")
    if _dns_pool is None:
        _dns_pool = ThreadPoolExecutor(4, thread_name_prefix="qwen35-dns")
    infos = await asyncio.get_running_loop().run_in_executor(
        _dns_pool, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    out = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if not listed and not is_public(ipaddress.ip_address(sockaddr[0])):
            raise _Refused(f"host {host!r} resolves to {sockaddr[0]}, not a public address")
        out.append((family, sockaddr))
    if not out:
        raise _Refused(f"host {host!r} has no IP address")
    return out


async def _get(addresses: list[tuple], tls_host: str | None, netloc: str, target: str, max_bytes: int
               ) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET sent to the first of `addresses` that accepts a connection."""
    import h11  # uvicorn's HTTP/1.1 parser

    reader, writer = await _connect(addresses, tls_host)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", netloc), ("User-Agent", "qwen35"), ("Accept", "*/*"), ("Connection", "close")]
        writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status, fields = event.status_code, dict(event.headers)
                if status in REDIRECTS:
                    location = fields.get(b"location")
                    return status, location.decode("latin-1") if location else None, b""
                if status != 200:
                    raise _Refused(f"HTTP {status}")
                if int(fields.get(b"content-length", 0)) > max_bytes:
                    raise _Refused(f"Content-Length {fields[b'content-length']!r} is over {max_bytes} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise _Refused(f"more than {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status, None, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Refused("connection closed before the response ended")
    finally:
        writer.transport.abort()


async def _connect(addresses: list[tuple], tls_host: str | None):
    loop, error = asyncio.get_running_loop(), None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        ctx = ssl.create_default_context() if tls_host else None
        return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=tls_host)
    raise _Refused(f"cannot connect ({error})")
