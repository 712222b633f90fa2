"""One deadline for a whole SMTP exchange, enforced on every socket operation.

A socket timeout bounds each read or write on its own: a server that answers every step
(connect, EHLO, MAIL, RCPT, DATA, or each line of a reply) just before the timeout holds
one message for several timeouts. :func:`deadline` sets, for the calling thread, a moment
by which the exchange must end; the sockets made here — :func:`timed_socket` for plain
TCP, and the TLS sockets of a context passed to :func:`time_tls` — give every read, write,
connect and TLS handshake only the time left before it (the socket's own timeout when no
deadline is set), and raise :class:`TimeoutError` once it has passed. So the exchange
ends by the deadline, give or take the scheduling of one system call. Name resolution
(``getaddrinfo``) is not a socket operation and is not bounded.

The deadline lives in a thread-local: each thread sends one message at a time, and the
TLS socket that STARTTLS makes in the middle of an exchange finds it there.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer


class _Deadline(threading.local):
    at: float | None = None  # time.monotonic() by which the exchange must end
    seconds: float = 0.0  # how long the exchange was given


_current = _Deadline()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound everything this thread does on timed sockets within the block to ``seconds``."""
    _current.at, _current.seconds = time.monotonic() + seconds, seconds
    try:
        yield
    finally:
        _current.at = None


def passed() -> bool:
    """Whether this thread's deadline has passed (a failure now is the deadline's doing)."""
    return _current.at is not None and time.monotonic() >= _current.at


def time_left(default: float) -> float:
    """The timeout for the next socket operation: the time left, else ``default``.

    Raises :class:`TimeoutError` when the deadline has passed.
    """
    if _current.at is None:
        return default
    left = _current.at - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out (the exchange's {_current.seconds:g} s are spent)")
    return left


def _arm(sock: socket.socket) -> None:
    if _current.at is not None:
        sock.settimeout(time_left(0.0))


class TimedSocket(socket.socket):
    """A TCP socket whose every operation waits only for the time left (see module doc)."""

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        _arm(self)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _arm(self)
        return super().recv(bufsize, flags)

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        _arm(self)
        return super().send(data, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        _arm(self)  # CPython bounds a whole sendall by one timeout
        super().sendall(data, flags)


class TimedSSLSocket(ssl.SSLSocket):
    """A TLS socket whose every operation, the handshake too, waits only for the time left."""

    def do_handshake(self, block: bool = False) -> None:
        _arm(self)
        super().do_handshake(block)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        _arm(self)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        _arm(self)
        return super().recv(buflen, flags)

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        _arm(self)
        return super().send(data, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        _arm(self)  # SSLSocket.sendall loops over send: each send is armed again
        super().sendall(data, flags)


def timed_socket(sock: socket.socket) -> TimedSocket:
    """``sock`` (connected) as a :class:`TimedSocket`, keeping its timeout."""
    timeout = sock.gettimeout()
    timed = TimedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    timed.settimeout(timeout)
    return timed


def time_tls(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context``, making :class:`TimedSSLSocket` sockets from now on."""
    context.sslsocket_class = TimedSSLSocket
    return context
