"""A small stdlib client of the service (used by the tests and ``benchmarks/bench_serve.py``; fine for scripts).

    from pipeline.service.client import Client
    client = Client("127.0.0.1", 8000, token=None)
    status, body = client.predict([("part.png", open("part.png", "rb").read())], overlay=True)
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Sequence
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
                self._connection.request(method, path, body=body, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

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
