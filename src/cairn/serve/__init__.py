"""`cairn serve RUN`: an OpenAI-compatible completion server with a playground page.

Needs the `serve` extra (FastAPI and uvicorn): pip install 'cairn-lm[serve]'. The routes are in
`app`, the batching model worker in `engine`, the requests (pydantic models) in `protocol`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cairn.util.errors import CairnError

if TYPE_CHECKING:
    from cairn.model.transformer import Transformer

log = logging.getLogger("cairn.serve")


def _check_cache_fits(model: Transformer, rows: int) -> None:
    """The engine's KV cache holds every sequence decoded together, allocated when the app is built:
    one that cannot fit is refused here (--max-concurrency 2^40 asked for 36 PB, and torch's
    allocation failure was a traceback)."""
    from cairn.runtime.device import available_memory

    p = next(model.parameters())
    cfg = model.cfg
    need = 2 * cfg.n_layers * rows * cfg.context_len * cfg.d_model * p.element_size()
    free = available_memory(p.device)
    if free is not None and need > free:
        raise CairnError(f"decoding {rows:,} sequences together needs a {need / 1e9:,.1f} GB KV cache, more than "
                         f"the {free / 1e9:.1f} GB free: lower --max-batch (or --max-concurrency)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why it cannot be had (checked before the model loads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CairnError(f"--host {host!r} is not an address of this computer ({e.strerror}): "
                         "use 127.0.0.1, or 0.0.0.0 for every interface") from None
    except UnicodeError:  # a name the IDNA codec cannot turn into a host name ("\x80", an empty label)
        raise CairnError(f"--host {host!r} is not a host name or an address: "
                         "use 127.0.0.1, or 0.0.0.0 for every interface") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "choose another --port" if e.errno == 98 else "check --host and --port"
        raise CairnError(f"cannot listen on {host}:{port} ({e.strerror}): {hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          max_concurrency: int = 16, max_batch: Optional[int] = None, max_body: int = 1_000_000,
          max_tokens: int = 2048, device: str = "auto", model_name: Optional[str] = None) -> None:
    """Load the run (or checkpoint) at `path` and serve it until interrupted."""
    try:
        import uvicorn

        from cairn.tokenizer.chat_template import ChatTemplate
        from cairn.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise CairnError(f"cairn serve needs FastAPI and uvicorn ({e.name} is missing): "
                         "pip install 'cairn-lm[serve]'") from None
    from cairn.checkpoint.load import load

    if max_concurrency < 1:
        raise CairnError(f"--max-concurrency must be 1 or more, got {max_concurrency}")
    if max_batch is not None and max_batch < 1:
        raise CairnError(f"--max-batch must be 1 or more, got {max_batch}")
    if max_body < 1024:
        raise CairnError(f"--max-body must be at least 1024 bytes, got {max_body}")
    if max_tokens < 1:
        raise CairnError(f"--max-tokens must be 1 or more, got {max_tokens}")
    if not 0 <= port <= 65535:
        raise CairnError(f"--port must be from 0 to 65535, got {port}")
    api_key = api_key if api_key is not None else os.environ.get("CAIRN_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise CairnError("--api-key is empty: give a key, or leave it out to serve without one")
    sock = bind(host, port)
    try:
        loaded = load(path, device, merge=True)  # a LoRA run's adapters merged in: served without peft
        _check_cache_fits(loaded.model, min(max_batch or max_concurrency, max_concurrency))
        name = model_name or Path(path).resolve().name
        settings = ServeSettings(model_name=name, api_key=api_key, max_concurrency=max_concurrency,
                                 max_batch=max_batch, max_body=max_body, max_tokens=max_tokens,
                                 created=int((loaded.path / "state.json").stat().st_mtime),
                                 template=ChatTemplate.from_config(loaded.config.chat))
        app = create_app(loaded.model, loaded.tokenizer, settings)
    except BaseException:
        sock.close()
        raise
    if not is_loopback(host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                    "set --api-key (or CAIRN_API_KEY)", host)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s (%s, %s parameters) on http://%s:%d/ (playground at /, API at /v1)", name, loaded.path,
             f"{loaded.model.num_params():,}", shown, sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
