"""A real SMTP server (aiosmtpd) in a thread of the test process, scriptable per recipient.

``server.answer("a@example.com", 451, 451)`` makes the server refuse that recipient with
451 twice, then accept it; ``server.answer("b@example.com", 550, times=None)`` refuses it
for good. Every accepted message is kept, parsed, in ``server.messages``.

Fixtures (loaded by ``tests/conftest.py``): ``smtp_server`` and ``smtp_env`` (``app_env``
plus SMTP settings pointing at the server).
"""

from __future__ import annotations

import asyncio
import email
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from backjobs.settings import get_settings
from tests.support.databases import Database

REASONS = {
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
        self.data_answers: deque[int] = deque()  # answers to the end of DATA, then 250
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

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        code = self._code_for(address)
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

    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        self.handler = ScriptedHandler()
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.logins: list[str] = []
        # AUTH offered without TLS (test only); not *required*, which aiosmtpd warns about.
        auth = {"authenticator": self._authenticator(credentials), "auth_require_tls": False}
        self._controller = Controller(
            self.handler, hostname=self.host, port=self.port, **(auth if credentials else {})
        )

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

    def message_ids(self) -> list[str]:
        return [received.message_id for received in self.messages]

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
