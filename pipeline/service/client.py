"""A small stdlib client of the service, and the service as a child process (tests, ``benchmarks/bench_serve.py``).

    from pipeline.service.client import Client
    client = Client("127.0.0.1", 8000, token=None)
    status, body = client.predict([("part.png", open("part.png", "rb").read())], overlay=True)
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def multipart(files: Sequence[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart/form-data request holding ``files`` under ``field``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts += [f"--{boundary}\r\n".encode(),
                  f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'.encode(),
                  b"Content-Type: application/octet-stream\r\n\r\n", data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive HTTP/1.1 connection to the service (not thread-safe: one per thread)."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 60.0) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)``; reconnects once when a kept-alive connection was closed."""
        headers = dict(headers or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        for attempt in (0, 1):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                response, data = self._exchange(method, path, body, headers)
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, body: Any, headers: dict[str, str]
                  ) -> tuple[http.client.HTTPResponse, bytes]:
        """Send the request and read the answer, also one the server sent before it read the whole body.

        A server may answer early (413 for a body over its limit) and close the connection while the body
        is still being sent: the send then fails with a broken pipe, and the answer waits in the socket.
        """
        assert self._connection is not None
        try:
            self._connection.request(method, path, body=body, headers=headers)
        except BrokenPipeError:
            pass  # the answer, if the server sent one, is read below; if not, getresponse raises
        response = self._connection.getresponse()
        return response, response.read()

    def json(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        """A JSON request (``document`` as the body, when given) and its decoded JSON answer."""
        body = None if document is None else json.dumps(document).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return status, json.loads(data) if data else None

    def predict(self, files: Sequence[tuple[str, bytes]], mask: bool = False, overlay: bool = False
                ) -> tuple[int, Any]:
        """``POST /predict`` with ``files`` (``(name, bytes)``); ``(status, decoded JSON)``."""
        body, content_type = multipart(files)
        query = "&".join(name for name, wanted in (("mask=1", mask), ("overlay=1", overlay)) if wanted)
        status, _, data = self.request("POST", "/predict" + (f"?{query}" if query else ""), body,
                                       {"Content-Type": content_type})
        return status, json.loads(data) if data else None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """``python serve.py ARGS`` as a child process on a free loopback port, ready when ``/health`` answers.

    Used as a context manager: SIGTERM on exit (then SIGKILL after ``stop_timeout``).

    Args:
        args: serve.py's flags (no ``--host``/``--port``: chosen here).
        log: File that gets the process's stdout and stderr.
        python: The interpreter (a venv's, for the torch-free tests).
        env: Extra environment variables.
        serve_py: The script (default: the repository's ``serve.py``).
        wait: Return once ``/health`` answers; ``False``: at once (call :meth:`wait_ready`), so that several
            services start side by side.
    """

    def __init__(self, args: Sequence[str], log: str | os.PathLike, python: str = sys.executable,
                 env: dict[str, str] | None = None, serve_py: str | os.PathLike | None = None,
                 start_timeout: float = 120.0, stop_timeout: float = 60.0, wait: bool = True) -> None:
        self.port = free_port()
        root = Path(__file__).resolve().parents[2]
        script = serve_py or root / "serve.py"
        self.log = Path(log)
        self.stop_timeout = stop_timeout
        environment = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([python, str(script), *args, "--host", "127.0.0.1", "--port",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=environment,
                                            cwd=root)
        if wait:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 120.0) -> ServiceProcess:
        """Block until ``/health`` answers 200 (raises with the log's tail when the process exits or times out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}: {self.output()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                status, _, _ = Client("127.0.0.1", self.port, timeout=5).request("GET", "/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve.py did not answer /health within {timeout} s: {self.output()[-3000:]}")

    def client(self, token: str | None = None, timeout: float = 60.0) -> Client:
        return Client("127.0.0.1", self.port, token, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after ``stop_timeout``); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
