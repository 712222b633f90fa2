"""The server's webhook calls (the automations' ``call-webhook`` actions), each on its own
connections, so calls that fire together do not cut each other off.

Applied by ``backjobs dashboard`` before it builds Prefect's server: the automations that
alert (``backjobs-<job>-alert``) and crash dead runs (``backjobs-<job>-zombie``) call the
dashboard's receiver through Prefect's ``Webhook`` block.

Why: Prefect 3.9's ``Webhook`` block makes each call through a new httpx client on one
transport shared by every webhook call of the process, and closes that client when the call
is done. Closing the client closes the shared transport, with every connection open on it:
the calls still in flight end in ``ReadError('')``. Prefect records each as a failed action
and does not call again. Measured with Prefect's own block, ten calls at once to a loopback
server: nine ended in ``ReadError``. A receiver that had not yet read the request body when
its connection was cut never saw the call, and an alert went missing when ten runs failed
within seconds. Here each call gets its own transport (of the class Prefect chooses: the
SSRF-protected one unless the block allows private addresses), so closing it closes only its
own connection.

The call's timeout goes from httpx's 5 s to :data:`CALL_TIMEOUT`: the receiver takes one
call at a time, so when ten come together the last ones wait their turn, and a call cut at
5 s is recorded by Prefect as failed although the receiver goes on to count it.

A Prefect server started another way (``prefect server start``) keeps Prefect's behaviour;
see the README's Alerts section.
"""

from __future__ import annotations

from typing import Any

CALL_TIMEOUT = 30.0  # seconds


def own_transport_per_call() -> None:
    """Make every ``Webhook`` block built from now on in this process call through its own
    transport, with :data:`CALL_TIMEOUT`. Idempotent."""
    from prefect.blocks.webhook import Webhook

    if getattr(Webhook.block_initialization, "own_transport", False):
        return
    Webhook.block_initialization = _block_initialization  # type: ignore[method-assign]


def _block_initialization(self: Any) -> None:
    import httpx
    from prefect.utilities.urls import SSRFProtectedAsyncHTTPTransport

    kind = httpx.AsyncHTTPTransport if self.allow_private_urls else SSRFProtectedAsyncHTTPTransport
    self._client = httpx.AsyncClient(transport=kind(verify=self.verify), timeout=CALL_TIMEOUT)


_block_initialization.own_transport = True  # type: ignore[attr-defined]
