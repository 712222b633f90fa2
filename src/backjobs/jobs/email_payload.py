"""The stored payload of an ``email_send`` row: reading it, and what a send records in it.

Pure functions (no IO). The payload enqueue writes::

    {"template": ..., "to": [...], "context": {...}, "message_id": "<…@domain>"}

and, once a recipient was refused, ``delivered_to`` (who has the message) and ``refused``
(recipients dropped after a 5xx). When the row ends, the template's secret fields are
cleared (:func:`scrubbed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backjobs.jobs.email_queue import MalformedPayload
from backjobs.mail.render import check_recipients, sensitive_fields
from backjobs.mail.transport import Refusal


def read_payload(payload: Any) -> tuple[list[str], str, dict[str, Any]]:
    """(recipients, template, context) from a stored payload; ``ValueError`` if malformed."""
    if isinstance(payload, MalformedPayload):
        raise ValueError(str(payload))
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload is {type(payload).__name__}, not an object")
    template, context = payload.get("template"), payload.get("context")
    if not isinstance(template, str) or not isinstance(context, Mapping):
        raise ValueError("payload needs a 'template' string and a 'context' object")
    to = payload.get("to")
    if not isinstance(to, str | list) or not all(isinstance(a, str) for a in to):
        raise ValueError("payload 'to' must be an address or a list of addresses")
    return check_recipients(to), template, dict(context)


def still_owed(payload: Mapping[str, Any], to: list[str]) -> list[str]:
    """Recipients who neither have the message nor were dropped (payload bookkeeping)."""
    done = {a.lower() for a in (*payload.get("delivered_to", ()), *payload.get("refused", ()))}
    return [address for address in to if address.lower() not in done]


def stored_message_id(payload: Any) -> str | None:
    """The Message-ID made at enqueue; None for rows queued before it was stored."""
    value = payload.get("message_id")
    return value if isinstance(value, str) and value else None


def bookkept(payload: Any, *, accepted: Sequence[str], refusals: Sequence[Refusal]) -> Any:
    """The payload with who has the message now, and who was dropped for good (the same
    object when nobody was refused, now or before: nothing to record)."""
    if not isinstance(payload, Mapping) or not (refusals or "delivered_to" in payload):
        return payload
    delivered = [*payload.get("delivered_to", ()), *accepted]
    dropped = [*payload.get("refused", ()), *(r.address for r in refusals if r.permanent)]
    updated = {**payload, "delivered_to": delivered}
    if dropped:
        updated["refused"] = dropped
    return updated


def dropped_note(payload: Any, detail: str | None) -> str | None:
    """``last_error`` of a sent row: this send's refusals, else who was dropped before."""
    if detail:
        return detail
    dropped = payload.get("refused") if isinstance(payload, Mapping) else None
    return f"not delivered to: {', '.join(dropped)}" if dropped else None


def secret_fields_in(payload: Any) -> frozenset[str]:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("context"), Mapping):
        return frozenset()
    template = payload.get("template")
    if not isinstance(template, str):
        return frozenset()
    return sensitive_fields(template) & set(payload["context"])


def scrubbed(payload: Any) -> Any:
    """``payload`` without its template's secret fields (the row has ended)."""
    secrets = secret_fields_in(payload)
    if not secrets:
        return payload
    context = {key: None if key in secrets else value for key, value in payload["context"].items()}
    return {**payload, "context": context}


def scrubbed_or_none(payload: Any) -> Any:
    # None: keep the stored payload as it is (nothing secret in it).
    return scrubbed(payload) if secret_fields_in(payload) else None
