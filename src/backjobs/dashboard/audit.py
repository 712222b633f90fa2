"""The audit trail: one log line per request through the gate that changes something.

    audit who=user:1 <admin@example.com> POST /api/deployments/<id>/create_flow_run 201
        deployment=<id> flow_run=<id of the run created>

Logged at INFO on the ``backjobs.dashboard.audit`` logger, which ``backjobs dashboard``
writes to its output with the other lines (see the README for shipping them). Requests
refused by the role check are audited too (status 403). Query strings are never written.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from typing import NamedTuple

logger = logging.getLogger("backjobs.dashboard.audit")

_IDS = re.compile(r"/(deployments|flow_runs)/([0-9a-fA-F-]{32,36})(?=/|$)")
_CREATES_RUN = re.compile(r"/api/deployments/[^/]+/create_flow_run|/api/flow_runs/?")
MAX_CAPTURED_BYTES = 64 * 1024


class Who(NamedTuple):
    user_id: str | None  # None: the machine credential
    email: str | None

    def __str__(self) -> str:
        if self.user_id is None:
            return "machine"
        return f"user:{self.user_id} <{self.email or '?'}>"


MACHINE = Who(None, None)


def creates_run(path: str) -> bool:
    """Whether the response names a run this request created (its id is audited)."""
    return bool(_CREATES_RUN.fullmatch(path))


def log_change(
    *, who: Who, method: str, path: str, status: int, response_body: bytes = b""
) -> None:
    ids = [
        f"{'deployment' if kind == 'deployments' else 'flow_run'}={value}"
        for kind, value in _IDS.findall(path)
    ]
    created = _created_id(response_body) if status in (200, 201) else None
    if created:
        ids.append(f"flow_run={created}")
    line = " ".join([f"audit who={who}", method, path, str(status), *ids])
    logger.info("%s", line)


def _created_id(body: bytes) -> str | None:
    if not body or len(body) > MAX_CAPTURED_BYTES:
        return None
    try:
        if body[:2] == b"\x1f\x8b":  # Prefect gzips answers for clients that accept it
            body = gzip.decompress(body)
        data = json.loads(body)
    except (ValueError, OSError, EOFError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return str(value) if value else None
