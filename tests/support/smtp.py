"""A real SMTP server (aiosmtpd) in a thread of the test process, scriptable per recipient.

``server.answer("a@example.com", 451, 451)`` makes the server refuse that recipient with
451 twice, then accept it; ``server.answer("b@example.com", 550, times=None)`` refuses it
for good. Every accepted message is kept, parsed, in ``server.messages``.

Fixtures (loaded by ``tests/conftest.py``): ``smtp_server`` and ``smtp_env`` (``app_env``
plus SMTP settings pointing at the server).

Server-wide faults: ``mail_answers`` (answers to MAIL FROM, then 250),
``SmtpServer(auth_required=True)`` (530 until AUTH), ``SmtpServer(tls=cert)`` (STARTTLS
with a self-signed certificate from :func:`self_signed_cert`), ``smtputf8=False``.
``sessions`` counts the SMTP connections that got as far as MAIL FROM.

Slow servers: ``ehlo_delay``, ``mail_delay``, ``rcpt_delay`` and ``data_delay`` (before the
final reply to DATA) hold each answer that many seconds; :meth:`SmtpServer.slow_steps`
sets them all.
"""

from __future__ import annotations

import asyncio
import email
import ssl
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.prefect_api import free_port

REASONS = {
    421: "4.3.2 service shutting down",
    530: "5.7.0 Authentication required",
    451: "4.3.0 try again later",
    452: "4.2.2 mailbox full",
    550: "5.1.1 no such user",
    554: "5.6.0 message content rejected",
}


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


class ScriptedHandler:
    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.data_delay = 0.0
        self.ehlo_delay = 0.0
        self.mail_delay = 0.0
        self.data_answers: deque[int] = deque()  # answers to the end of DATA, then 250
        self.mail_answers: deque[int] = deque()  # answers to MAIL FROM, then 250
        self.mail_forever: int | None = None  # the answer to every MAIL FROM
        self.rcpt_delay = 0.0
        self.sessions: set[int] = set()
        self._scripts: dict[str, deque[int]] = {}
        self._forever: dict[str, int] = {}
        self._lock = threading.Lock()

    def answer(self, address: str, *codes: int, times: int | None = 1) -> None:
        with self._lock:
            if times is None:
                self._forever[address.lower()] = codes[0]
            else:
                self._scripts.setdefault(address.lower(), deque()).extend(codes * times)

    def _code_for(self, address: str) -> int:
        with self._lock:
            if address.lower() in self._forever:
                return self._forever[address.lower()]
            script = self._scripts.get(address.lower())
            return script.popleft() if script else 250

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself without this hook
        if self.ehlo_delay:
            await asyncio.sleep(self.ehlo_delay)
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any
    ) -> str:
        if self.mail_delay:
            await asyncio.sleep(self.mail_delay)
        with self._lock:
            self.sessions.add(id(session))
            code = self.mail_answers.popleft() if self.mail_answers else 250
            code = self.mail_forever or code
        if code != 250:
            return f"{code} {REASONS.get(code, 'refused')}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        code = self._code_for(address)
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        if code != 250:
            return f"{code} {REASONS.get(code, 'refused')}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self._lock:
            code = self.data_answers.popleft() if self.data_answers else 250
        if code != 250:
            return f"{code} {REASONS.get(code, 'refused')}"
        parsed = email.message_from_bytes(envelope.original_content, policy=default)
        assert isinstance(parsed, EmailMessage)
        with self._lock:
            self.messages.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


class SmtpServer:
    """The running server: ``host``, ``port``, ``messages``, ``answer()``."""

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        auth_required: bool = False,
        tls: tuple[Path, Path] | None = None,
        smtputf8: bool = True,
    ) -> None:
        self.handler = ScriptedHandler()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.logins: list[str] = []
        options: dict[str, Any] = {"enable_SMTPUTF8": smtputf8}
        if credentials:
            # AUTH offered without TLS (test only); not *required*, which aiosmtpd warns about.
            options |= {"authenticator": self._authenticator(credentials)}
            options |= {"auth_require_tls": False}
        if auth_required:  # what Postfix answers when AUTH is required and not given
            self.handler.mail_forever = 530
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            options |= {"tls_context": context}
        self._controller = Controller(self.handler, hostname=self.host, port=self.port, **options)

    def _authenticator(self, credentials: tuple[str, str] | None) -> Any:
        def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = (data.login.decode(), data.password.decode()) == credentials
            if ok:
                self.logins.append(data.login.decode())
            return AuthResult(success=ok, handled=False)  # the server answers 235 or 535

        return check

    @property
    def messages(self) -> list[Received]:
        with self.handler._lock:
            return list(self.handler.messages)

    def answer(self, address: str, *codes: int, times: int | None = 1) -> None:
        self.handler.answer(address, *codes, times=times)

    def slow_steps(self, seconds: float) -> None:
        """Answer EHLO, MAIL, every RCPT and the end of DATA each ``seconds`` late."""
        handler = self.handler
        handler.ehlo_delay = handler.mail_delay = handler.rcpt_delay = seconds
        handler.data_delay = seconds

    def message_ids(self) -> list[str]:
        return [received.message_id for received in self.messages]

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def self_signed_cert(folder: Path, *, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` only (not for 127.0.0.1): (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    alt = x509.SubjectAlternativeName([x509.DNSName(name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(name="smtp_server")
def smtp_server_fixture() -> Iterator[SmtpServer]:
    """A running scriptable SMTP server."""
    with SmtpServer() as server:
        yield server


SENDER = "jobs@backjobs.test"


@pytest.fixture(name="smtp_env")
def smtp_env_fixture(
    app_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> Database:
    """Settings (from the environment, as a worker reads them) sending to ``smtp_server``.

    The backoff is long (60 s base), so a retried row waits for a later ``now``; tests
    that want quick retries set their own.
    """
    env = {
        "BACKJOBS_EMAIL_TRANSPORT": "smtp",
        "BACKJOBS_SMTP_HOST": smtp_server.host,
        "BACKJOBS_SMTP_PORT": str(smtp_server.port),
        "BACKJOBS_SMTP_TIMEOUT_SECONDS": "10",
        "BACKJOBS_EMAIL_FROM": SENDER,
        "BACKJOBS_EMAIL_BACKOFF_BASE_SECONDS": "60",
        "BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS": "3600",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return app_env
