"""What the HTTP server lets a client do: how long a request may take to arrive, how large its headers
and body may be, and how a refused request's connection is closed, so that no client, slow or hostile,
holds a server thread for good or makes the server read without limit."""

from __future__ import annotations

import http.client
import io
import time
from http.server import ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 10
"""The request line's headers, all together (http.server alone takes 100 lines of 64 KiB each)."""
READ_TIMEOUT_S = 10.0
"""Seconds a connection may stay idle before a request, and seconds a request may take to arrive whole
(request line, headers and body, counted from its first byte): then it is answered or closed, so a
client that stops sending, or sends a byte now and then, never holds a server thread for good.
``ftkit serve --read-timeout``."""


LINGER_S = 2.0
"""After an error answered before the request was read whole (413, 431...), seconds spent reading and
dropping what the client still sends, so that closing does not reset the connection under the answer
before the client has read it (TCP discards unread data on a reset)."""
LINGER_BYTES = 4 * MAX_BODY_BYTES


class DeadlineReader(io.RawIOBase):
    """The connection's reads, each under the socket timeout and, once a request has begun, under what
    is left of that request's deadline (a per-read timeout alone lets a client send a byte every
    ``timeout - 1`` seconds for ever)."""

    def __init__(self, sock, timeout: float):
        self.sock, self.timeout, self.deadline = sock, timeout, None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the request did not arrive whole within the read timeout")
        self.sock.settimeout(wait)
        return self.sock.recv_into(buf)


class HeaderLines:
    """``rfile`` for http.client's header parser: refuses headers over :data:`MAX_HEADER_BYTES` in all."""

    def __init__(self, rfile, limit: int):
        self.rfile, self.left = rfile, limit

    def readline(self, size: int = -1) -> bytes:
        line = self.rfile.readline(size)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.HTTPException(f"request headers over {MAX_HEADER_BYTES} bytes")
        return line


class Server(ThreadingHTTPServer):
    """http.server's threading server, one daemon thread per connection."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients connecting at once is queued, not refused
