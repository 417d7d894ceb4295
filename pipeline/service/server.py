"""``serve.py``: load the model, bind the address, serve with uvicorn; SIGTERM drains and exits 0.

SIGTERM (or Ctrl-C) stops taking connections at once, lets the requests in flight finish within
``--grace_s`` (uvicorn's graceful shutdown), lets the model worker score what is queued, and exits
with status 0: the orchestrator asked for the stop, nothing failed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator, Sequence

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.service.config import ServeConfig, parse_args, security_warnings

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (listened on by uvicorn); one line when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of such a
    # socket; with it on, a response's body waited behind its headers for the client's delayed ACK (~40 ms each).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise AnomalyCLIPError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port or "
                               "--host, or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, sock: socket.socket) -> None:
    """Load the model and serve on ``sock`` until SIGTERM/SIGINT (uvicorn imported here, after the flags)."""
    import uvicorn

    from pipeline.service.app import create_app
    from pipeline.service.batcher import Batcher
    from pipeline.service.metrics import Metrics
    from pipeline.service.model import ServiceModel

    class GracefulServer(uvicorn.Server):
        """uvicorn, except that a SIGTERM it shut down for is not raised again afterwards (exit 0, not 143)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    model = ServiceModel.load(config)
    metrics = Metrics()
    batcher = Batcher(model.scorer, config.max_batch, config.max_wait_ms / 1000, config.max_queue, metrics.batch)
    app = create_app(model, batcher, metrics, config)
    server = GracefulServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           limit_concurrency=config.max_connections,
                                           timeout_graceful_shutdown=config.grace_s))
    logger.info("serving model %s on http://%s:%d (web page /, API docs /docs)", model.model_id, config.host,
                config.port)
    server.run(sockets=[sock])
    logger.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    for line in security_warnings(config):
        logger.warning(line)
    sock = bind(config.host, config.port)
    try:
        serve(config, sock)
    finally:
        sock.close()
    return 0
