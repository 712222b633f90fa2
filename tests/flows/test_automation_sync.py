"""``backjobs deploy``'s automation sync against a Prefect server when the server holds more
automations than one page of its API (200): ops' own automations, named to sort before
``backjobs-``, must not hide backjobs' from the sync (it would create them again).

The sync owns every ``backjobs-*`` automation on its server, so this module has a server of
its own: on the run's shared server it deleted the automations that the redelivery tests
make there meanwhile (``test_alert_incident_writes.py`` then waited in vain for its call).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.settings import PREFECT_API_URL, temporary_settings

from backjobs.orchestration.automations import sync_automations
from tests.support.prefect_server import PrefectServer


@pytest.fixture(autouse=True)
def own_server(prefect_server: PrefectServer) -> Iterator[None]:
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield


OPS_AUTOMATIONS = 201  # one page of the API, and one more


def never_firing(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"{name}: a test automation",
        "trigger": {
            "type": "event",
            "expect": ["backjobs.test.never-emitted"],
            "posture": "Reactive",
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "do-nothing"}],
    }


def test_a_second_sync_behind_a_full_page_of_ops_automations_changes_nothing() -> None:
    wanted = [never_firing("backjobs-sync-probe-alert"), never_firing("backjobs-sync-probe-zombie")]

    async def go() -> tuple[Any, Any, list[str]]:
        async with get_client() as client:
            ops = [
                await client.create_automation(
                    AutomationCore.model_validate(never_firing(f"alert-ops-{n:03}"))
                )
                for n in range(OPS_AUTOMATIONS)
            ]
            try:
                first = await sync_automations(client, wanted)
                second = await sync_automations(client, wanted)
                names = [
                    a.name
                    for a in await client.read_automations_by_name("backjobs-sync-probe-alert")
                ]
                await sync_automations(client, [])  # leaves no backjobs automation behind
            finally:
                for automation_id in ops:
                    await client.delete_automation(automation_id)
        return first, second, names

    first, second, names = asyncio.run(go())

    assert first.created == ("backjobs-sync-probe-alert", "backjobs-sync-probe-zombie")
    assert (second.created, second.replaced, second.unchanged) == ((), (), 2)
    assert names == ["backjobs-sync-probe-alert"]


async def probes(client: Any, prefix: str) -> list[str]:
    """The names of the server's automations starting with ``prefix``, a name per copy."""
    found: list[Any] = []
    while page := await client.read_automations(offset=len(found)):
        found += page
    return sorted(a.name for a in found if a.name.startswith(prefix))


class Lockstep:
    """A client whose sync waits, once it has read the server's automations, until the
    other sync has read them too: two deploys at once, both looking before either writes."""

    def __init__(self, client: Any, both_read: asyncio.Barrier) -> None:
        self._client, self._both_read, self._waited = client, both_read, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def read_automations(self, **kwargs: Any) -> Any:
        page = await self._client.read_automations(**kwargs)
        if not page and not self._waited:  # the end of the first reading
            self._waited = True
            await self._both_read.wait()
        return page


def test_two_syncs_at_once_leave_one_automation_of_each_name_and_a_later_copy_is_deleted() -> None:
    """Prefect does not keep automation names unique: two deploys at once both found the
    names missing and both created them, and the sync, reading one automation per name,
    never saw the copy again (it went on firing, and stayed when its job was removed)."""
    prefix = "backjobs-race-probe"
    wanted = [never_firing(f"{prefix}-alert"), never_firing(f"{prefix}-zombie")]

    async def go() -> tuple[list[Any], list[str], Any, list[str], Any, list[str]]:
        async with get_client() as one, get_client() as other:
            both_read = asyncio.Barrier(2)
            race = await asyncio.gather(
                sync_automations(Lockstep(one, both_read), wanted),
                sync_automations(Lockstep(other, both_read), wanted),
            )
            after_race = await probes(one, prefix)
            # A copy made by hand, or by a deploy whose sync predates the rule.
            await one.create_automation(AutomationCore.model_validate(wanted[0]))
            await one.create_automation(AutomationCore.model_validate(wanted[1]))
            await one.create_automation(AutomationCore.model_validate(wanted[1]))
            with_copies = await sync_automations(one, wanted)
            after_copies = await probes(one, prefix)
            await one.create_automation(AutomationCore.model_validate(wanted[0]))
            removed = await sync_automations(one, [])  # a job gone: every copy goes
            left = await probes(one, prefix)
            return race, after_race, with_copies, after_copies, removed, left

    race, after_race, with_copies, after_copies, removed, left = asyncio.run(go())

    assert after_race == [f"{prefix}-alert", f"{prefix}-zombie"]
    # The two reports add up: every copy made is one left or one deleted, by either deploy.
    made = Counter(name for changes in race for name in changes.created)
    assert made == Counter(after_race + after_race)  # both found every name missing
    made.subtract(name for changes in race for name in changes.copies)
    assert sorted(made.elements()) == after_race
    assert (with_copies.created, with_copies.replaced, with_copies.unchanged) == ((), (), 2)
    assert with_copies.copies == (f"{prefix}-alert", f"{prefix}-zombie", f"{prefix}-zombie")
    assert after_copies == [f"{prefix}-alert", f"{prefix}-zombie"]
    assert removed.deleted == (f"{prefix}-alert", f"{prefix}-zombie")
    assert removed.copies == (f"{prefix}-alert",)
    assert left == []


class ShiftingPages:
    """A client under whose reading another automation is created, named to sort first,
    after each first page: the next page starts with the last automation of the one before,
    as when a deploy beside this one creates automations while this one reads them."""

    def __init__(self, client: Any) -> None:
        self._client, self.made = client, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def read_automations(self, **kwargs: Any) -> Any:
        page = await self._client.read_automations(**kwargs)
        if page and kwargs.get("offset", 0) == 0:
            shift = never_firing(f"aaa-ops-{len(self.made)}")
            self.made.append(
                await self._client.create_automation(AutomationCore.model_validate(shift))
            )
        return page


def test_an_automation_read_on_two_pages_is_not_taken_for_a_copy_of_itself() -> None:
    prefix = "backjobs-page-probe"
    wanted = [never_firing(f"{prefix}-alert"), never_firing(f"{prefix}-zombie")]

    async def go() -> tuple[Any, list[str]]:
        async with get_client() as client:
            await sync_automations(client, wanted)
            shifting = ShiftingPages(client)
            try:
                again = await sync_automations(shifting, wanted)
                names = await probes(client, prefix)
                await sync_automations(client, [])
            finally:
                for automation_id in shifting.made:
                    await client.delete_automation(automation_id)
        return again, names

    again, names = asyncio.run(go())

    assert (again.created, again.replaced, again.copies, again.unchanged) == ((), (), (), 2)
    assert names == [f"{prefix}-alert", f"{prefix}-zombie"]
