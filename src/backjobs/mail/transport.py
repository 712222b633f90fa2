"""Email transports behind one small Protocol: SMTP (pooled connections) and a pickup folder.

A transport sends one ready MIME message to its envelope recipients and either returns the
recipients it could not reach (a partial refusal: the others got it) or raises
:class:`SendError`, whose ``permanent`` flag says whether retrying can help:

- transient: SMTP 4xx, timeouts, refused or dropped connections, and any failure to open or
  log in to the server (the message is not at fault, so it must not be failed for it).
  After such a failure the transport fails fast (:class:`ServerUnavailable` with
  ``attempted=False``) rather than wait out a connect timeout per message;
- permanent: SMTP 5xx on the message, every recipient refused with 5xx.

:class:`SmtpTransport` is thread-safe: each ``send`` borrows a connection from a pool of at
most ``max_connections`` (reused across messages), so N threads keep N connections busy.
The SMTP password is never logged nor put into an error message.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import tempfile
import threading
from collections.abc import Sequence
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from backjobs.mail.render import OutgoingEmail
from backjobs.settings import EmailTransportKind, Settings, SmtpSecurity

logger = logging.getLogger(__name__)


class SendError(Exception):
    """Sending failed; ``permanent`` says a retry would fail the same way."""

    permanent = False


class TransientSendError(SendError):
    permanent = False


class PermanentSendError(SendError):
    permanent = True


class ServerUnavailable(TransientSendError):
    """The server could not be reached; ``attempted`` is False when the transport did not
    even try, because an earlier connection attempt of this transport failed."""

    def __init__(self, message: str, *, attempted: bool = True) -> None:
        super().__init__(message)
        self.attempted = attempted


class Transport(Protocol):
    def send(self, email: OutgoingEmail) -> list[str]:
        """Deliver ``email`` to its recipients; return those refused, raise SendError."""
        ...

    def close(self) -> None: ...


def make_transport(settings: Settings) -> Transport:
    """The configured transport (``BACKJOBS_EMAIL_TRANSPORT``)."""
    if settings.email_transport is EmailTransportKind.SMTP:
        return SmtpTransport(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password,
            timeout=settings.smtp_timeout_seconds,
            sender=settings.email_from,
            max_connections=settings.email_connections,
        )
    return PickupTransport(directory=settings.email_pickup_dir)


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
    ) -> None:
        self._host, self._port, self._security = host, port, security
        self._username, self._password, self._timeout = username, password, timeout
        self._envelope_from = parseaddr(sender)[1] or sender
        self._idle: list[smtplib.SMTP] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._unavailable: str | None = None

    def send(self, email: OutgoingEmail) -> list[str]:
        data, to = email.data, email.to
        if self._unavailable is not None:
            # Once the server could not be reached, fail fast instead of waiting out a
            # connect timeout per message; a new transport (the next run) tries again.
            raise ServerUnavailable(self._unavailable, attempted=False)
        with self._slots:
            connection, reused = self._acquire()
            while True:
                try:
                    return self._send_on(connection, data, to)
                except smtplib.SMTPServerDisconnected:
                    if not reused:
                        raise TransientSendError("SMTP server closed the connection") from None
                # An idle pooled connection the server dropped meanwhile: one fresh try.
                connection, reused = self._open(), False

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            _quietly_quit(connection)

    def _send_on(self, connection: smtplib.SMTP, data: bytes, to: Sequence[str]) -> list[str]:
        try:
            refused = _transact(connection, self._envelope_from, to, data)
        except smtplib.SMTPServerDisconnected:
            _quietly_quit(connection)
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            self._release(connection)
            raise _refused_error(exc.recipients) from None
        except smtplib.SMTPResponseException as exc:
            # smtplib reset the session; a 421 means the server is closing it anyway.
            (_quietly_quit if exc.smtp_code == 421 else self._release)(connection)
            raise _response_error(exc.smtp_code, exc.smtp_error) from None
        except (OSError, smtplib.SMTPException) as exc:
            _quietly_quit(connection)
            raise TransientSendError(f"SMTP error: {type(exc).__name__}: {exc}") from None
        self._release(connection)
        return [_describe_refusal(addr, code, text) for addr, (code, text) in refused.items()]

    def _acquire(self) -> tuple[smtplib.SMTP, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def _release(self, connection: smtplib.SMTP) -> None:
        with self._lock:
            self._idle.append(connection)

    def _open(self) -> smtplib.SMTP:
        where = f"{self._host}:{self._port}"
        try:
            connection = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            # Not the message's fault: transient, whatever the code (even a 535 on login).
            self._unavailable = f"cannot open SMTP session with {where}: {exc}"
            raise ServerUnavailable(self._unavailable) from None
        logger.debug("opened SMTP connection to %s (%s)", where, self._security.value)
        return connection

    def _connect(self) -> smtplib.SMTP:
        connection: smtplib.SMTP
        if self._security is SmtpSecurity.TLS:
            connection = smtplib.SMTP_SSL(
                self._host, self._port, timeout=self._timeout, context=_tls_context()
            )
        else:
            connection = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        try:
            connection.ehlo()
            if self._security is SmtpSecurity.STARTTLS:
                connection.starttls(context=_tls_context())
                connection.ehlo()
            if self._username:
                secret = self._password.get_secret_value() if self._password else ""
                connection.login(self._username, secret)
        except BaseException:
            _quietly_quit(connection)
            raise
        return connection


class PickupTransport:
    """Writes each message as ``<message-id>.eml`` into a folder, atomically.

    A temporary dot-file is written, synced and renamed into place, so a reader of the
    folder never sees half a message; a resend of the same task replaces its file.
    """

    def __init__(self, *, directory: Path) -> None:
        self._directory = directory

    def send(self, email: OutgoingEmail) -> list[str]:
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            target = self._directory / f"{_file_name(email.message_id)}.eml"
            fd, temp = tempfile.mkstemp(dir=self._directory, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(email.data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, target)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TransientSendError(f"cannot write to pickup folder: {exc}") from None
        return []

    def close(self) -> None:
        return None


def _file_name(message_id: str) -> str:
    identifier = message_id.strip("<> ")
    return re.sub(r"[^A-Za-z0-9._@-]", "_", identifier) or "message"


def _transact(
    connection: smtplib.SMTP, sender: str, to: Sequence[str], data: bytes
) -> dict[str, tuple[int, bytes]]:
    """``smtplib.SMTP.sendmail`` minus its re-parsing of every address (a tenth of a
    millisecond a message): ours are validated bare addresses, and the data is 7-bit."""
    connection.ehlo_or_helo_if_needed()
    code, reply = connection.docmd("mail", f"FROM:<{sender}>")
    if code != 250:
        _reset(connection, code)
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    refused: dict[str, tuple[int, bytes]] = {}
    for address in to:
        code, reply = connection.docmd("rcpt", f"TO:<{address}>")
        if code not in (250, 251):
            refused[address] = (code, reply)
        if code == 421:
            connection.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(to):
        _reset(connection, 0)
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = connection.data(data)
    if code != 250:
        _reset(connection, code)
        raise smtplib.SMTPDataError(code, reply)
    return refused


def _reset(connection: smtplib.SMTP, code: int) -> None:
    # As sendmail does: a 421 means the server is closing; otherwise abort the transaction.
    if code == 421:
        connection.close()
        return
    try:
        connection.rset()
    except smtplib.SMTPServerDisconnected:
        pass


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Loading the CA store costs ~0.15 s: once per process, and only when TLS is used.
    return ssl.create_default_context()


def _refused_error(recipients: dict[str, tuple[int, bytes]]) -> SendError:
    reasons = "; ".join(
        _describe_refusal(addr, code, text) for addr, (code, text) in recipients.items()
    )
    if all(code >= 500 for code, _ in recipients.values()):
        return PermanentSendError(f"all recipients refused: {reasons}")
    return TransientSendError(f"recipients refused (temporarily): {reasons}")


def _response_error(code: int, text: bytes | str) -> SendError:
    detail = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    kind = PermanentSendError if 500 <= code < 600 else TransientSendError
    return kind(f"SMTP {code} {detail}")


def _describe_refusal(address: str, code: int, text: bytes | str) -> str:
    detail = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{address}: {code} {detail}"


def _quietly_quit(connection: smtplib.SMTP) -> None:
    try:
        connection.quit()
    except (OSError, smtplib.SMTPException):
        connection.close()
