"""The upstream client (gateway/upstream.py) against real sockets: raw asyncio servers on
127.0.0.1 that answer as backends do, and as they fail."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.upstream import Broken, ConnectFailed, Pool, Upstreams
from tests.integration.conftest import until

Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """Reads each request (head and a Content-Length body) and lets ``answer`` write what it
    likes; ``answer`` returns False to end the connection after it."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a connection ended by the client
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed.set()
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(request, reader, writer):
                    return
        except ConnectionError:
            self.closed.set()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[tuple[RawServer, str]]:
    server = RawServer(answer)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


async def _ok(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(_OK)
    await writer.drain()
    return True


async def _exchange(pool: Pool, body: bytes = b"{}") -> tuple[int, bytes]:
    connection = await pool.send("POST", "/v1/x", CIMultiDict({"A": "b"}), body, 1.0)
    try:
        return connection.status, await connection.read()
    finally:
        pool.release(connection)


async def test_keep_alive_reuses_one_connection_and_writes_a_plain_head() -> None:
    async with serving(_ok) as (server, url):
        pool = Pool(url + "/base/")
        for _ in range(3):
            assert await _exchange(pool, b'{"k": 1}') == (200, b"{}")
        assert server.connections == 1
        port = url.rsplit(":", 1)[1]
        assert server.requests[0] == (
            b"POST /base/v1/x HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n"
            b"Accept-Encoding: identity\r\nA: b\r\nContent-Length: 8\r\n\r\n"
            b'{"k": 1}'
        )
        pool.close()


async def test_a_connection_idle_past_the_keep_alive_is_not_used_again() -> None:
    async with serving(_ok) as (server, url):
        pool = Pool(url, keepalive_s=0.0)
        await _exchange(pool)
        await _exchange(pool)
        assert server.connections == 2
        pool.close()


async def test_a_sweep_closes_what_no_request_came_back_for() -> None:
    async with serving(_ok) as (server, url):
        upstreams = Upstreams(keepalive_s=0.05)
        await _exchange(upstreams.pool(url))
        sweeping = asyncio.ensure_future(upstreams.sweep())
        await asyncio.wait_for(server.closed.wait(), 5)
        sweeping.cancel()
        assert not upstreams.pool(url)._idle
        upstreams.close()


async def test_a_pooled_connection_found_closing_is_replaced_and_the_request_sent_once() -> None:
    async with serving(_ok) as (server, url):
        pool = Pool(url)
        await _exchange(pool)
        (idle,) = pool._idle
        assert idle._transport is not None
        idle._transport.close()  # closing, and not yet told lost: the keep-alive race
        assert await _exchange(pool) == (200, b"{}")
        assert server.connections == 2
        assert len(server.requests) == 2
        pool.close()


async def test_a_request_the_backend_may_have_read_is_never_sent_again() -> None:
    async def hang_up(request: bytes, *_: object) -> bool:
        return False  # read it whole, then closed without a word

    async with serving(hang_up) as (server, url):
        with pytest.raises(Broken, match="closed the connection"):
            await _exchange(Pool(url))
        assert len(server.requests) == 1


async def test_nothing_listening_is_a_connect_failure() -> None:
    async with serving(_ok) as (_, url):
        pass  # closed again: its port refuses connections now
    with pytest.raises(ConnectFailed):
        await _exchange(Pool(url))


async def test_a_stream_comes_in_the_pieces_that_arrive_and_ends_with_empty_bytes() -> None:
    go = asyncio.Event()

    async def chunked(request: bytes, reader: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        await writer.drain()
        await go.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with serving(chunked) as (server, url):
        pool = Pool(url)
        connection = await pool.send("POST", "/s", CIMultiDict(), b"{}", 1.0)
        assert connection.content_type == "text/event-stream"
        assert connection.content_length is None
        assert await connection.chunk() == b"first"  # before the rest was even written
        go.set()
        assert await connection.chunk() == b"second"
        assert await connection.chunk() == b""
        pool.release(connection)
        assert await _exchange(pool) == (200, b"firstsecond")  # the same connection, reused
        assert server.connections == 1
        pool.close()


@pytest.mark.parametrize(
    ("sent", "hang_up", "answer"),
    [
        # a body without a length ends with the connection
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it",
            True,
            (200, b"all of it"),
        ),
        # 100 Continue is skipped; the answer says the server closes
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            False,
            (201, b"ok"),
        ),
        # a second answer to one request, in the same write: the first is kept whole
        (_OK + b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", False, (200, b"{}")),
    ],
    ids=["until close", "interim then close", "second answer"],
)
async def test_an_answer_that_ends_its_connection_is_read_and_the_connection_not_reused(
    sent: bytes, hang_up: bool, answer: tuple[int, bytes]
) -> None:
    async def answering(request: bytes, reader: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(sent)
        await writer.drain()
        return not hang_up

    async with serving(answering) as (server, url):
        pool = Pool(url)
        assert await _exchange(pool) == answer
        assert not pool._idle
        await _exchange(pool)
        assert server.connections == 2


_FILLER = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 100) for i in range(10_000))


@pytest.mark.parametrize(
    ("sent", "hang_up", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True, "mid-answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, "not valid HTTP"),
        (b"HTTP/1.1 200 OK\r\n" + _FILLER, False, "bytes of headers"),
    ],
    ids=["cut short", "not http", "endless headers"],
)
async def test_an_answer_that_is_not_whole_http_is_broken(
    sent: bytes, hang_up: bool, match: str
) -> None:
    async def answer(request: bytes, reader: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(sent)
        await writer.drain()
        return not hang_up

    async with serving(answer) as (_, url):
        with pytest.raises(Broken, match=match):
            await _exchange(Pool(url))


async def test_a_client_that_leaves_while_the_backend_thinks_closes_the_connection() -> None:
    async def silent(request: bytes, reader: asyncio.StreamReader, writer: object) -> bool:
        if not await reader.read(1):  # the end of the stream: the gateway hung up
            server.closed.set()
        return False

    async with serving(silent) as (server, url):
        server.closed.clear()
        waiting = asyncio.ensure_future(_exchange(Pool(url)))
        await until(lambda: server.requests)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(server.closed.wait(), 5)  # the backend learns at once


async def test_a_slow_reader_pauses_the_backend_and_still_gets_every_byte() -> None:
    piece = bytes(range(256)) * 256  # 64 KiB

    async def flood(request: bytes, reader: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):  # 4 MiB, far past the high-water mark
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with serving(flood) as (_, url):
        pool = Pool(url)
        connection = await pool.send("GET", "/big", CIMultiDict(), b"", 1.0)
        got = bytearray()
        while data := await connection.chunk():
            assert connection._buffered <= 512 * 1024
            got += data
            await asyncio.sleep(0.001)
        assert got == piece * 64
        pool.release(connection)
        pool.close()


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with serving(_ok) as (server, url):
        pool = Pool(url)
        with pytest.raises(ValueError, match="line break"):
            await pool.send("GET", "/", CIMultiDict({"X": "a\r\nInjected: 1"}), b"", 1.0)
        assert server.connections == 0


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(
    headers=st.lists(st.tuples(_TOKEN, _VALUE), max_size=8),
    body=st.binary(max_size=64),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
)
def test_the_head_written_parses_back_to_what_was_asked(
    headers: list[tuple[str, str]], body: bytes, method: str
) -> None:
    pool = Pool("http://backend:8000/api")
    headers = [(n, v) for n, v in headers if n.lower() not in ("host", "content-length")]
    wire = pool._head(method, "/v1/x?a=1", CIMultiDict(headers), body) + body
    seen: list[tuple[bytes, bytes]] = []
    parsed: dict[str, object] = {}

    class Sink:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

        def on_url(self, url: bytes) -> None:
            parsed["url"] = url

        def on_body(self, data: bytes) -> None:
            parsed["body"] = parsed.get("body", b"") + data  # type: ignore[operator]

        def on_message_complete(self) -> None:
            parsed["complete"] = True

    parser = httptools.HttpRequestParser(Sink())
    parser.feed_data(wire)
    assert parsed["complete"] is True
    assert parser.get_method().decode() == method
    assert parsed["url"] == b"/api/v1/x?a=1"
    assert parsed.get("body", b"") == body
    names = [(n.decode(), v.decode()) for n, v in seen]
    assert names[:2] == [("Host", "backend:8000"), ("Accept-Encoding", "identity")]
    sent = names[2 : 2 + len(headers)]
    assert sent == headers


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's certificate)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        [*command, *subject, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_an_https_backend_is_verified_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = RawServer(_ok)
    listening = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectFailed):  # an unknown issuer is refused
            await _exchange(Pool(f"https://localhost:{port}"))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now trusted
        pool = Pool(f"https://localhost:{port}")
        assert await _exchange(pool) == (200, b"{}")
        assert await _exchange(pool) == (200, b"{}")
        assert server.connections == 1  # kept alive (the refused one never got this far)
        assert server.requests[-1].startswith(b"POST /v1/x HTTP/1.1\r\nHost: localhost:")
        pool.close()
    finally:
        listening.close()
