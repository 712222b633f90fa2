"""Email templates and rendering: a context model per template, jinja2 files, one MIME message.

Each template ``<name>`` is three files in ``backjobs/templates/``: ``<name>.subject.txt``,
``<name>.txt`` (the plain-text part) and ``<name>.html`` (autoescaped). Its context is
checked by a pydantic model (unknown keys refused), and rendering uses ``StrictUndefined``,
so a context that does not fit fails loudly instead of sending a half-empty email.

Rendering (:func:`render_email`) is separate from sending (:mod:`backjobs.mail.transport`);
:func:`build_message` turns a rendered email into the MIME bytes a transport sends.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from typing import Any, ClassVar

from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateError, select_autoescape
from markupsafe import Markup, escape
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A pragmatic address check (no display names, ASCII domains): enough to refuse typos and
# header injection; the SMTP server has the last word.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"{_LOCAL}@{_LABEL}(?:\.{_LABEL})*")
MAX_ADDRESS_LENGTH = 320
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Context(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Context fields that grant access (a confirmation link carries a token): cleared from
    # the stored payload once the row ends (sent, or failed for good).
    SENSITIVE: ClassVar[frozenset[str]] = frozenset()


class PendingUser(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    display_name: str | None = None
    email: str
    confirmed_at: datetime
    days_waiting: int | None = Field(default=None, ge=0)


# One reminder lists at most this many users; the rest are counted in ``more_waiting``.
MAX_LISTED_USERS = 100


class PendingUsersReminder(_Context):
    users: list[PendingUser] = Field(min_length=1, max_length=MAX_LISTED_USERS)
    more_waiting: int = Field(default=0, ge=0)
    review_url: str | None = None


class RegistrationExpiryWarning(_Context):
    SENSITIVE: ClassVar[frozenset[str]] = frozenset({"confirmation_link"})

    display_name: str | None = None
    confirmation_link: str
    expires_at: datetime
    # The token the link carries (its id, not a secret): when this row fails for good,
    # ExpireUnconfirmedRegistrationsJob re-issues the link if that token is still the newest.
    token_id: int | None = None


class RegistrationExpired(_Context):
    display_name: str | None = None
    expired_at: datetime
    register_url: str | None = None


class Generic(_Context):
    subject: str = Field(min_length=1, max_length=900)
    body: str

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return check_header(value, what="subject")


class JobAlert(_Context):
    """A job's failure, silence or recovery (backjobs.orchestration.alerts), for the admins."""

    job: str = Field(min_length=1, max_length=200)
    kind: str = Field(min_length=1, max_length=40)  # failed, still failing, recovered, silent
    at: datetime
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    state: str | None = None
    message: str = ""
    failed_parts: list[str] = Field(default_factory=list, max_length=100)
    first_failure_at: datetime | None = None
    failures: int = Field(default=0, ge=0)
    new_failures: int = Field(default=0, ge=0)
    url: str | None = None

    @field_validator("job", "kind")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return check_header(value, what="job alert subject")


TEMPLATES: dict[str, type[_Context]] = {
    "generic": Generic,
    "job-alert": JobAlert,
    "pending_users_reminder": PendingUsersReminder,
    "registration_expiry_warning": RegistrationExpiryWarning,
    "registration_expired": RegistrationExpired,
}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def check_header(value: str, *, what: str) -> str:
    """Refuse a header value with a line break (header injection) or another control char."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} must be one line without control characters")
    return value


def check_address(address: str) -> str:
    """A bare address (``user@example.com``), else ``ValueError`` naming it."""
    if not isinstance(address, str):
        raise ValueError(f"an email address must be text, not {type(address).__name__}")
    check_header(address, what=f"email address {address!r}")
    if len(address) > MAX_ADDRESS_LENGTH or not _ADDRESS.fullmatch(address):
        raise ValueError(f"invalid email address {address!r}")
    return address


def check_recipients(to: str | Iterable[str]) -> list[str]:
    """One address or several, validated; at least one."""
    addresses = [to] if isinstance(to, str) else list(to)
    if not addresses:
        raise ValueError("an email needs at least one recipient")
    return [check_address(address) for address in addresses]


def validate_context(template: str, context: Mapping[str, Any]) -> dict[str, Any]:
    """The context as JSON-ready data after its template's model accepted it."""
    return _parse(template, context).model_dump(mode="json")


def sensitive_fields(template: str) -> frozenset[str]:
    model = TEMPLATES.get(template)
    return model.SENSITIVE if model is not None else frozenset()


def render_email(template: str, context: Mapping[str, Any]) -> RenderedEmail:
    """Subject, text and HTML of ``template`` for ``context``; ``ValueError`` if they don't fit."""
    model = _parse(template, context)
    values = {name: getattr(model, name) for name in type(model).model_fields}
    env = _environment()
    try:
        subject = env.get_template(f"{template}.subject.txt").render(values).strip()
        text = env.get_template(f"{template}.txt").render(values)
        html = env.get_template(f"{template}.html").render(values)
    except TemplateError as exc:
        raise ValueError(f"template {template!r} does not render: {exc}") from exc
    return RenderedEmail(subject=check_header(subject, what="subject"), text=text, html=html)


@dataclass(frozen=True)
class OutgoingEmail:
    """A ready message: its Message-ID, envelope recipients and RFC 5322 bytes (CRLF)."""

    message_id: str
    to: tuple[str, ...]
    data: bytes


def build_message(
    rendered: RenderedEmail,
    *,
    task_id: int,
    to: Sequence[str],
    sender: str,
    date: datetime,
    message_id: str | None = None,
    envelope_to: Sequence[str] | None = None,
) -> OutgoingEmail:
    """The MIME message (text + HTML alternatives).

    ``message_id`` is the one stored with the task at enqueue (the same for every resend);
    rows queued before it was stored get ``<app-task-ID@domain>``. ``to`` is the ``To:``
    header; ``envelope_to`` (default ``to``) the recipients this send goes to — a retry
    for some recipients only is the same message to fewer envelope recipients.
    ``date`` is the real time of sending. The bytes are ASCII unless the sender's local
    part is not (then UTF-8, sent with SMTPUTF8).

    Written directly rather than through ``email.message.EmailMessage``, which costs ~2 ms a
    message, more than sending it; the tests parse the result with the stdlib parser.
    """
    identifier = message_id or legacy_message_id(task_id=task_id, sender=sender)
    # Both parts are base64, whose alphabet has no "_": the boundary can never occur in
    # them, so it can be fixed, and a resend is byte-for-byte the same message.
    boundary = f"=_backjobs_alternative_{task_id}"
    headers = [
        ("From", _from_header(sender)),
        ("To", ",\r\n ".join(check_address(a) for a in to)),
        ("Subject", _encoded(rendered.subject)),
        ("Date", format_datetime(date)),
        ("Message-ID", check_header(identifier, what="Message-ID")),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
    ]
    lines = [f"{key}: {value}" for key, value in headers]
    lines.append("")
    for subtype, body in (("plain", rendered.text), ("html", rendered.html)):
        encoded = base64.encodebytes(body.encode()).decode("ascii").replace("\n", "\r\n")
        lines += [
            f"--{boundary}",
            f'Content-Type: text/{subtype}; charset="utf-8"',
            "Content-Transfer-Encoding: base64",
            "",
            encoded,
        ]
    lines.append(f"--{boundary}--\r\n")
    recipients = tuple(envelope_to if envelope_to is not None else to)
    return OutgoingEmail(identifier, recipients, "\r\n".join(lines).encode("utf-8"))


def _encoded(subject: str) -> str:
    check_header(subject, what="subject")
    if subject.isascii() and len(subject) < 900:
        return subject
    return Header(subject, "utf-8").encode(linesep="\r\n")


def new_message_id(*, sender: str) -> str:
    """A Message-ID made once, at enqueue: random, so unique across databases and resets."""
    return f"<{secrets.token_hex(16)}@{_sender_domain(sender)}>"


def legacy_message_id(*, task_id: int, sender: str) -> str:
    """``<app-task-{id}@{sender's domain}>``: rows queued before the id was stored."""
    return f"<app-task-{task_id}@{_sender_domain(sender)}>"


@lru_cache(maxsize=8)
def _from_header(sender: str) -> str:
    name, address = parseaddr(sender)
    if address.isascii():
        return check_header(formataddr((name, address), charset="utf-8"), what="sender")
    # A non-ASCII local part (sent with SMTPUTF8, RFC 6532): the address as UTF-8.
    encoded = formataddr((name, "x@x"), charset="utf-8").rpartition("<")[0] if name else ""
    return check_header(f"{encoded}<{address}>", what="sender")


@lru_cache(maxsize=8)
def _sender_domain(sender: str) -> str:
    _, at, domain = parseaddr(sender)[1].rpartition("@")
    return domain if at and domain else "localhost"


def _parse(template: str, context: Mapping[str, Any]) -> _Context:
    model = TEMPLATES.get(template)
    if model is None:
        raise ValueError(f"unknown email template {template!r}; known: {', '.join(TEMPLATES)}")
    try:
        return model.model_validate(dict(context))
    except ValidationError as exc:
        raise ValueError(f"context does not fit template {template!r}: {_brief(exc)}") from None


def _brief(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, error['loc'])) or 'context'}: {error['msg']}" for error in exc.errors()
    )


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("backjobs.mail", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        auto_reload=False,  # templates ship with the package; skip a stat() per render
    )
    env.filters["when"] = _when
    env.filters["paragraphs"] = _paragraphs
    return env


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M %Z").strip()


def _paragraphs(text: str) -> Markup:
    # Plain text to HTML: escaped, blank lines make paragraphs, single breaks <br>. Plain
    # string work on the escaped text: Markup.format per line costs more than the send.
    blocks = re.split(r"\n\s*\n", str(escape(text.strip())))
    html = (block.replace("\n", "<br>\n") for block in blocks if block)
    return Markup("\n".join(f"<p>{block}</p>" for block in html))
