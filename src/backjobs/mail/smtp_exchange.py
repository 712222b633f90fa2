"""One SMTP transaction on an open connection, each reply classified by the stage it
answers (MAIL, RCPT, DATA): the rules are in :mod:`backjobs.mail.smtp`'s docstring.

``smtplib.SMTP.sendmail`` minus its re-parsing of every address (a tenth of a millisecond
a message: ours are validated bare addresses), and with a verdict per stage:
:class:`ServerUnavailable` for the server's fault, :class:`SendError` for the message's,
:class:`DataStarted` for a connection lost once the data was on its way.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from dataclasses import dataclass

from backjobs.mail.deadline import passed
from backjobs.mail.render import OutgoingEmail
from backjobs.mail.transport import (
    PermanentSendError,
    RecipientsRefused,
    Refusal,
    ServerUnavailable,
    TransientSendError,
)

SERVER_FAULT_CODES = frozenset({421, 530, 535})


@dataclass
class Connection:
    """A pooled SMTP session and how many refusals it got in a row."""

    smtp: smtplib.SMTP
    refusals: int = 0  # in a row


class DataStarted(Exception):
    """The connection failed once the message's data was on its way."""

    def __init__(self, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


def transact(
    connection: Connection, sender: str, email: OutgoingEmail, *, where: str
) -> list[Refusal]:
    """Send ``email`` on ``connection``; return the recipients refused (others got it)."""
    smtp = connection.smtp
    _mail_from(smtp, sender, email, where=where)
    refused = _rcpt_to(connection, email.to, where=where)
    if len(refused) == len(email.to):
        _reset(smtp, 0)
        raise RecipientsRefused(refused)
    try:
        code, reply = smtp.data(email.data)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        raise DataStarted(reason_of(exc), timed_out=timed_out(exc)) from None
    if code in SERVER_FAULT_CODES:
        _reset(smtp, code)
        raise ServerUnavailable(f"SMTP server {where} answered DATA: {code} {_text(reply)}")
    if code != 250:
        _reset(smtp, code)
        connection.refusals += 1
        kind = PermanentSendError if 500 <= code < 600 else TransientSendError
        raise kind(f"SMTP {code} {_text(reply)}")
    return refused


def _mail_from(smtp: smtplib.SMTP, sender: str, email: OutgoingEmail, *, where: str) -> None:
    smtp.ehlo_or_helo_if_needed()
    options = ""
    if not sender.isascii() or not email.data.isascii():
        if not smtp.has_extn("smtputf8"):
            raise ServerUnavailable(
                f"BACKJOBS_EMAIL_FROM {sender!r} is not ASCII and the SMTP server {where} "
                "does not offer SMTPUTF8"
            )
        options = " SMTPUTF8 BODY=8BITMIME"
        smtp.command_encoding = "utf-8"  # as sendmail does for SMTPUTF8
    code, reply = smtp.docmd("mail", f"FROM:<{sender}>{options}")
    if code != 250:
        _reset(smtp, code)
        raise ServerUnavailable(
            f"SMTP server {where} refused the sender {sender!r} (MAIL FROM): {code} {_text(reply)}"
        )


def _rcpt_to(connection: Connection, to: Sequence[str], *, where: str) -> list[Refusal]:
    refused: list[Refusal] = []
    for address in to:
        code, reply = connection.smtp.docmd("rcpt", f"TO:<{address}>")
        if code in SERVER_FAULT_CODES:
            _reset(connection.smtp, code)
            raise ServerUnavailable(f"SMTP server {where} answered RCPT: {code} {_text(reply)}")
        if code in (250, 251):
            connection.refusals = 0
        else:
            connection.refusals += 1
            refused.append(Refusal(address, code, _text(reply)))
    return refused


def _reset(connection: smtplib.SMTP, code: int) -> None:
    # As sendmail does: a 421 means the server is closing; otherwise abort the transaction.
    if code == 421:
        connection.close()
        return
    try:
        connection.rset()
    except (smtplib.SMTPServerDisconnected, OSError):
        pass


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def reason_of(exc: BaseException) -> str:
    """An error as one line: the server's reply, else the exception's type and text."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {_text(exc.smtp_error)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def timed_out(exc: BaseException) -> bool:
    """Whether the message's deadline ended the exchange (smtplib wraps the timeout)."""
    return passed() or isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)
