"""The SMTP transport: pooled connections, each reply classified by the stage it answers
(the transaction itself: :mod:`backjobs.mail.smtp_exchange`).

Whose fault a failure is decides what the job does:

- the server's or the configuration's fault, :class:`ServerUnavailable`: the connection
  cannot be opened (refused, timeout, DNS), EHLO, STARTTLS or the TLS handshake fails
  (e.g. ``CERTIFICATE_VERIFY_FAILED``), AUTH fails, MAIL FROM is refused (the sender
  setting), any 421 (closing), 530 (authentication required) or 535 (bad credentials),
  and a connection lost, or the time spent, before the message's data was sent. No
  message is at fault: the job stops, hands the rows back without using an attempt and
  fails the run with the server's reply. After one, the transport fails fast for the
  rest of its life;
- the message's fault: recipients refused (:class:`RecipientsRefused` when all of them
  are, permanent when every refusal is 5xx), the end of DATA refused (5xx permanent,
  4xx transient), or the connection lost (or the time spent) once the data was on its
  way (transient: the server may or may not have it, a resend keeps the Message-ID).

**One timeout per message.** ``timeout`` (``BACKJOBS_SMTP_TIMEOUT_SECONDS``) bounds a
message's whole exchange — opening a connection when one is needed (connect, EHLO,
STARTTLS, AUTH), MAIL, RCPT, DATA up to the server's final reply — not each reply:
every socket operation waits only for the time left (:mod:`backjobs.mail.deadline`).
When it is spent the connection is dropped and the failure classified by its stage as
above. :meth:`SmtpTransport.close` says QUIT to the idle connections within
``QUIT_SECONDS`` in all, then just closes them.

:class:`SmtpTransport` is thread-safe: each ``send`` borrows a connection from a pool of at
most ``max_connections`` (reused across messages), so N threads keep N connections busy.
After ``REFUSALS_BEFORE_RECONNECT`` refusals in a row on one connection it is closed and
a fresh one opened (Postfix slows down, then drops, a connection after many errors).
The SMTP password is never logged nor put into an error message.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr

from backjobs.mail.deadline import deadline, time_left, time_tls, timed_socket
from backjobs.mail.render import OutgoingEmail
from backjobs.mail.smtp_exchange import Connection, DataStarted, reason_of, timed_out, transact
from backjobs.mail.transport import (
    Refusal,
    SendError,
    ServerUnavailable,
    TransientSendError,
)
from backjobs.settings import SmtpSecurity

logger = logging.getLogger(__name__)

REFUSALS_BEFORE_RECONNECT = 5
QUIT_SECONDS = 1.0  # for all the QUITs of close(): a courtesy, not worth a long wait


class SmtpTransport:
    """SMTP with a pool of reused connections; ``close()`` quits them."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: SmtpSecurity = SmtpSecurity.NONE,
        username: str | None = None,
        password: SecretStr | None = None,
        timeout: float = 30.0,
        sender: str,
        max_connections: int = 4,
        ca_file: Path | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self._host, self._port, self._security = host, port, security
        self._username, self._password, self._timeout = username, password, timeout
        self._ca_file, self._server_name = ca_file, tls_server_name or host
        self._envelope_from = parseaddr(sender)[1] or sender
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._unavailable: str | None = None

    def send(self, email: OutgoingEmail) -> list[Refusal]:
        if self._unavailable is not None:
            # Once the server failed us, fail fast instead of waiting out a timeout per
            # message; a new transport (the next run) tries again.
            raise ServerUnavailable(self._unavailable, attempted=False)
        try:
            with self._slots, deadline(self._timeout):
                return self._send(email)
        except ServerUnavailable as exc:
            self._unavailable = str(exc)
            raise

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        with deadline(min(self._timeout, QUIT_SECONDS)):
            for connection in idle:
                _quietly_quit(connection.smtp)

    def _send(self, email: OutgoingEmail) -> list[Refusal]:
        connection, reused = self._acquire()
        while True:
            try:
                return self._send_on(connection, email)
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                _quietly_quit(connection.smtp)
                if timed_out(exc):
                    raise ServerUnavailable(
                        f"SMTP server {self._where}: {self._timed_out}; connection dropped"
                    ) from None
                if not reused:
                    raise ServerUnavailable(
                        f"SMTP server {self._where} dropped the connection: {reason_of(exc)}"
                    ) from None
            # An idle pooled connection the server dropped meanwhile: one fresh try.
            connection, reused = self._open(), False

    @property
    def _where(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def _timed_out(self) -> str:
        return (
            f"timed out (BACKJOBS_SMTP_TIMEOUT_SECONDS: {self._timeout:g} s "
            "for a message's whole exchange)"
        )

    def _send_on(self, connection: Connection, email: OutgoingEmail) -> list[Refusal]:
        try:
            refused = transact(connection, self._envelope_from, email, where=self._where)
        except ServerUnavailable:
            _quietly_quit(connection.smtp)
            raise
        except DataStarted as exc:
            _quietly_quit(connection.smtp)
            reason = self._timed_out if exc.timed_out else str(exc)
            raise TransientSendError(f"SMTP connection lost during DATA: {reason}") from None
        except SendError:
            self._release(connection)
            raise
        self._release(connection)
        return refused

    def _acquire(self) -> tuple[Connection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def _release(self, connection: Connection) -> None:
        if connection.refusals >= REFUSALS_BEFORE_RECONNECT:
            _quietly_quit(connection.smtp)  # the next send opens a fresh one
            return
        if connection.smtp.sock is not None:  # idle: no message's deadline any more
            connection.smtp.sock.settimeout(self._timeout)
        with self._lock:
            self._idle.append(connection)

    def _open(self) -> Connection:
        try:
            connection = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            raise ServerUnavailable(
                f"cannot open SMTP session with {self._where}: "
                f"{self._timed_out if timed_out(exc) else reason_of(exc)}"
            ) from None
        logger.debug("opened SMTP connection to %s (%s)", self._where, self._security.value)
        return Connection(connection)

    def _connect(self) -> smtplib.SMTP:
        connection: smtplib.SMTP
        if self._security is SmtpSecurity.TLS:
            connection = _SMTPNamedSSL(
                self._host,
                self._port,
                timeout=self._timeout,
                context=_tls_context(self._ca_file),
                server_name=self._server_name,
            )
        else:
            connection = _TimedSMTP(self._host, self._port, timeout=self._timeout)
        try:
            connection.ehlo()
            if self._security is SmtpSecurity.STARTTLS:
                # smtplib checks the certificate against ``_host``: the configured name.
                connection._host = self._server_name  # type: ignore[attr-defined]
                connection.starttls(context=_tls_context(self._ca_file))
                connection.ehlo()
            if self._username:
                secret = self._password.get_secret_value() if self._password else ""
                connection.login(self._username, secret)
        except BaseException:
            _quietly_quit(connection)
            raise
        return connection


class _TimedSMTP(smtplib.SMTP):
    """SMTP on a :class:`~backjobs.mail.deadline.TimedSocket`: connecting too waits only
    for the time left of the message's deadline."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        plain = super()._get_socket(host, port, time_left(timeout))  # type: ignore[misc]
        return timed_socket(plain)


class _SMTPNamedSSL(smtplib.SMTP_SSL, _TimedSMTP):
    """Implicit TLS whose certificate is checked against ``server_name``, not the host."""

    def __init__(
        self, host: str, port: int, *, timeout: float, context: ssl.SSLContext, server_name: str
    ) -> None:
        self._server_name = server_name
        super().__init__(host, port, timeout=timeout, context=context)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self._host = self._server_name
        return super()._get_socket(host, port, timeout)


@lru_cache(maxsize=4)
def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    # Loading the CA store costs ~0.15 s: once per process, and only when TLS is used.
    # Its TLS sockets wait only for the time left of the message's deadline.
    if ca_file is not None:
        return time_tls(ssl.create_default_context(cafile=str(ca_file)))
    return time_tls(ssl.create_default_context())


def _quietly_quit(connection: smtplib.SMTP) -> None:
    try:
        connection.quit()
    except (OSError, smtplib.SMTPException):
        connection.close()
