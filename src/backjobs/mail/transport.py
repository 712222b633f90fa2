"""Email transports behind one small Protocol: SMTP (pooled connections) and a pickup folder.

A transport sends one ready MIME message to its envelope recipients and either returns the
recipients it could not reach (:class:`Refusal`: a partial refusal, the others got it) or
raises :class:`SendError` (the message's fault: ``permanent`` or not) or
:class:`ServerUnavailable` (the server's or the configuration's fault: no message is
at fault, the job stops and hands its rows back without using an attempt). How SMTP
replies fall into these is in :mod:`backjobs.mail.smtp`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from backjobs.mail.render import OutgoingEmail

logger = logging.getLogger(__name__)


class Refusal(NamedTuple):
    """One recipient the server refused, with its reply."""

    address: str
    code: int
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.address}: {self.code} {self.text}"


class SendError(Exception):
    """Sending this message failed; ``permanent`` says a retry would fail the same way."""

    permanent = False


class TransientSendError(SendError):
    permanent = False


class PermanentSendError(SendError):
    permanent = True


class RecipientsRefused(SendError):
    """Every envelope recipient was refused; the message was not sent."""

    def __init__(self, refusals: Sequence[Refusal]) -> None:
        self.refusals = list(refusals)
        self.permanent = all(r.permanent for r in refusals)
        kind = "all recipients refused" if self.permanent else "recipients refused"
        super().__init__(f"{kind}: {'; '.join(map(str, refusals))}")


class ServerUnavailable(Exception):
    """The server (or our configuration of it) is at fault, not the message: nothing
    about this message was decided. ``attempted`` is False when the transport did not
    even try, because an earlier failure of this transport said the server is down."""

    def __init__(self, message: str, *, attempted: bool = True) -> None:
        super().__init__(message)
        self.attempted = attempted


class Transport(Protocol):
    def send(self, email: OutgoingEmail) -> list[Refusal]:
        """Deliver ``email`` to its recipients; return those refused, raise SendError or
        ServerUnavailable."""
        ...

    def close(self) -> None: ...


class PickupTransport:
    """Writes each message as ``<message-id>.eml`` into a folder, atomically.

    A temporary dot-file is written, synced and renamed into place, so a reader of the
    folder never sees half a message; a resend of the same task replaces its file.

    A folder that cannot be created or written (a file in its place, permissions, a full
    disk, a read-only mount) is the configuration's fault, never the message's: it raises
    :class:`ServerUnavailable` naming ``BACKJOBS_EMAIL_PICKUP_DIR``, so the job hands its
    rows back without using an attempt, as for an SMTP outage; later sends through this
    transport are not tried (``attempted=False``).
    """

    def __init__(self, *, directory: Path) -> None:
        self._directory = directory
        self._broken: str | None = None

    def send(self, email: OutgoingEmail) -> list[Refusal]:
        if self._broken is not None:
            raise ServerUnavailable(self._broken, attempted=False)
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
            reason = exc.strerror or str(exc)
            if isinstance(exc, FileExistsError):  # from mkdir: something else is there
                reason = "it exists and is not a folder"
            self._broken = (
                f"cannot write to the pickup folder {self._directory} "
                f"(BACKJOBS_EMAIL_PICKUP_DIR): {reason}; fix the folder or the setting"
            )
            raise ServerUnavailable(self._broken) from None
        return []

    def close(self) -> None:
        return None


def _file_name(message_id: str) -> str:
    identifier = message_id.strip("<> ")
    return re.sub(r"[^A-Za-z0-9._@-]", "_", identifier) or "message"
