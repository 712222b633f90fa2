"""Listening sockets: the one place that binds a port and says, in one line, why it cannot.

The dashboard (which runs alone in production) and the local stack's port checks both use
it, so neither imports the other for it.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(RuntimeError):
    """The host or port cannot be listened on; the message names the option to change."""


def bind_port(host: str, port: int, *, host_option: str, port_option: str) -> socket.socket:
    """A socket bound to ``host:port``; :class:`PortInUse` (one line naming the option to
    change) when it cannot be: the host does not resolve, the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PortInUse(f"cannot resolve {host_option} {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use: stop what holds it or choose "
                f"another ({port_option})"
            ) from None
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
