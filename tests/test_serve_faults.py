"""`cairn serve` under faults, on a uvicorn server on a free loopback port: clients that drop the
connection, a client that reads slowly, and a short soak of many clients. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from conftest import TrainedRun  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from cairn.checkpoint.load import Loaded, load  # noqa: E402
from cairn.serve.app import ServeSettings, create_app  # noqa: E402
from cairn.serve.engine import Engine  # noqa: E402
from helpers import serving  # noqa: E402

LONG = 10**6  # tokens: the tiny model takes minutes to write them
WAIT_S = 20.0  # the most any condition is waited for; a fault that is not handled fails the test, never hangs it
SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "serve_soak.py"


@pytest.fixture(scope="module")
def loaded(trained_run: TrainedRun) -> Loaded:
    return load(trained_run.run, "cpu")


def make_app(loaded, **kw: object) -> FastAPI:
    settings = ServeSettings(**{"model_name": "tiny-run", "max_concurrency": 4, "max_tokens": LONG, **kw})
    return create_app(loaded.model, loaded.tokenizer, settings)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=WAIT_S).json()


def wait_until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.02)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def post(port: int, path: str, body: dict, rcvbuf: int = 0) -> socket.socket:
    """A request sent on a raw socket, so that the test decides when and how the connection ends.
    `rcvbuf`: a small receive buffer, so that a client that does not read soon holds the server back."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(WAIT_S)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def events(s: socket.socket) -> Iterator[str]:
    """The `data:` payloads of a streamed answer, as they arrive (chunked encoding is left in the
    bytes; only whole `data: ...` lines are taken)."""
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].decode().strip()


def drop(s: socket.socket, how: str) -> None:
    if how == "reset":  # SO_LINGER 0: the close sends RST, as a killed client's kernel may
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


STREAM = {"prompt": "Once", "max_tokens": LONG, "stream": True, "ignore_eos": True, "seed": 1}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG, "ignore_eos": True, "seed": 1}


@contextlib.contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """The errors the server logs while in the block. Enter it once the server runs: uvicorn's
    logging setup replaces the handlers of its loggers (which do not propagate to the root's)."""
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record)

    handler = Collect(logging.ERROR)
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "cairn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield errors
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("when", ["streaming", "waiting for a row", "not streaming", "chat, not streaming",
                                  "sending its body"])
def test_a_client_that_drops_the_connection_frees_its_slot_and_its_sequence_stops(
        loaded: Loaded, how: str, when: str) -> None:
    """The slot is free again (/health's in_flight), the engine decodes nothing more for the
    sequence (it neither runs on to max_tokens nor keeps a row of the batch), and the server logs
    no error: a client that goes away is no fault of the server's."""
    app = make_app(loaded, max_batch=1)
    engine = app.state.engine
    with serving(app) as url, server_errors() as errors:
        port = port_of(url)
        held = None
        if when == "waiting for a row":  # the one row of the batch is taken: the next sequence waits its turn
            held = post(port, "/v1/completions", STREAM)
            next(events(held))
        wanted = 2 if held else 1
        if when == "sending its body":  # half of it sent: no slot is taken yet
            s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": \"Once")
            wanted = 0
        elif when.startswith("chat"):
            s = post(port, "/v1/chat/completions", CHAT)
        else:
            s = post(port, "/v1/completions", {**STREAM, "stream": when != "not streaming"})
        wait_until("the request is in flight", lambda: health(url)["in_flight"] == wanted)
        if when == "streaming":
            assert next(events(s)).startswith("{")  # it is being written to the client
        elif wanted:  # it is being decoded (or waits for a row), and nothing has been sent yet
            rows = engine.rows_decoded
            wait_until("the sequence is decoded", lambda: engine.rows_decoded > rows)
        drop(s, how)
        wait_until("the dropped request's slot is freed", lambda: health(url)["in_flight"] == max(wanted - 1, 0))
        if held is not None:
            drop(held, "close")
            wait_until("every slot is freed", lambda: health(url)["in_flight"] == 0)
        # nothing is decoded any more: the engine dropped the sequences, not only their slots
        wait_until("the engine holds no sequence", lambda: not (engine._rows or engine._sliding or engine._waiting))
        rows = engine.rows_decoded
        time.sleep(0.2)
        assert engine.rows_decoded == rows
        assert health(url)["status"] == "ok"
        assert [r.getMessage() for r in errors] == []


def unsent(engine: Engine) -> int:
    """The pieces decoded for the sequences being decoded that their streams have not yet sent."""
    return sum(seq.emit.__self__._events.qsize() for seq in engine._rows + engine._sliding)  # Generation._emit


@pytest.mark.slow
def test_a_slow_reader_does_not_hold_back_the_others(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streaming client that reads one chunk a second, with socket buffers small enough that the
    server cannot write its answer ahead (as over a slow network): while it is still open, other
    clients' requests, streamed and not, are answered in full. Then it drops, and its slot is freed."""
    import cairn.serve

    real_bind = cairn.serve.bind

    def small_send_buffers(host: str, port: int) -> socket.socket:
        sock = real_bind(host, port)
        # the connections it accepts inherit it; a set size also stops Linux growing it up to megabytes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        return sock

    monkeypatch.setattr(cairn.serve, "bind", small_send_buffers)
    app = make_app(loaded)
    with serving(app) as url:
        slow = post(port_of(url), "/v1/completions", STREAM, rcvbuf=4096)
        order: list[str] = []
        slow_read: list[str] = []
        stop = threading.Event()

        def read_slowly() -> None:
            for data in events(slow):
                slow_read.append(data)
                if stop.wait(1.0):
                    return
            order.append("slow ended")  # only if the server ended the stream: it must not

        reader = threading.Thread(target=read_slowly, daemon=True)
        reader.start()
        wait_until("the slow stream started", lambda: len(slow_read) > 0)
        # the sockets' buffers are full: the server's pieces for the slow client wait in its memory
        wait_until("the slow client holds the server back", lambda: unsent(app.state.engine) >= 100)
        for stream in (False, True):
            body = {"prompt": "Tom had a red ball", "max_tokens": 48, "ignore_eos": True, "seed": 5,
                    "stream": stream}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT_S)
            assert r.status_code == 200
            if stream:
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["usage"]["completion_tokens"] == 48
            order.append(f"fast {'streamed' if stream else 'whole'} answered")
        assert order == ["fast whole answered", "fast streamed answered"]  # the slow stream is still open
        assert health(url)["in_flight"] == 1 and reader.is_alive()
        assert unsent(app.state.engine) >= 100  # ... and still holding the server back
        assert 0 < len(slow_read) < 60  # it really was read slowly, a chunk a second
        stop.set()
        reader.join(timeout=WAIT_S)
        drop(slow, "close")
        wait_until("the slow reader's slot is freed", lambda: health(url)["in_flight"] == 0)


def soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_short_soak_of_16_clients_ends_with_no_error_and_nothing_in_flight(loaded: Loaded) -> None:
    """benchmarks/scripts/serve_soak.py's clients, 200 requests: whole, streamed, chat, prompts past
    the context, and streams dropped after their first chunk."""
    soak = soak_module()
    app = make_app(loaded, max_concurrency=16, max_tokens=512)
    with serving(app) as url:
        result = asyncio.run(soak.soak(url, requests=200, clients=16, max_tokens=8))
        assert result["errors"] == [], result["errors"][:5]
        assert result["answered"] + result["dropped"] == 200 and result["dropped"] > 0
        for kind in soak.KINDS:
            assert result["by_kind"][kind] > 0
        wait_until("every slot is freed", lambda: health(url)["in_flight"] == 0)
        assert not (app.state.engine._rows or app.state.engine._sliding or app.state.engine._waiting)
