"""An Elasticsearch index that the services reach through an alias, rebuilt by swapping (ADR 0020).

The name the services use (``<name>``) is an alias over one concrete index ``<name>-<generation>``
(``lucerna-000001``, ``lucerna-000002``...). A rebuild creates the next generation with a second
alias, ``<name>-rebuilding``, fills it from the store of truth while searches keep answering from
the live one, then moves ``<name>`` onto it and drops ``<name>-rebuilding`` in one ``_aliases``
request, and deletes the old index once in-flight searches had time to finish.

Writes are never lost to a rebuild: every writer sends its bulk to the live alias and, while one
exists, to ``<name>-rebuilding`` too (dual write). A writer looks the aliases up at most
``TARGETS_TTL_SECONDS`` before it writes, and a rebuild waits ``SETTLE_SECONDS`` (longer) after
creating its index before it reads the store: so a writer that did not see the new index wrote
data it had read from the store before the rebuild's own read began, which the copy then holds or
supersedes. A bulk whose ``<name>-rebuilding`` half fails because the swap removed that alias meanwhile
is sent again to the (new) live index. Writes to an alias carry ``require_alias``, so a write can
never create a stray concrete index. The copy must not overwrite what writers put in the new index
meanwhile: the adapters make it so (external versions for FHIR resources, ``create`` for studies).

The rebuilding index is the lock: a second rebuild finding ``<name>-rebuilding`` is refused with
``ReindexRunningError``. A rebuild that fails deletes its index; one that was killed leaves it behind,
and the error says to delete it.

An index created before aliases (a concrete index named ``<name>``) keeps serving as it is; the
next rebuild replaces it by the alias in the same ``_aliases`` request (``remove_index``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from elasticsearch import BadRequestError

from lucerna.core.storage.ports import ReindexRunningError

log = logging.getLogger(__name__)

GENERATION_DIGITS = 6
TARGETS_TTL_SECONDS = 1.0  # how old a writer's view of the aliases may be when it writes
SETTLE_SECONDS = 2 * TARGETS_TTL_SECONDS  # a rebuild waits this long before it reads the store
DRAIN_SECONDS = 1.0  # searches that started on the old index finish before it is deleted
_RETRIES = 3  # bulks sent again after a swap removed the rebuilding alias under them
_MISSING = "index_not_found_exception"

__all__ = ["AliasedIndex", "Operation", "ReindexRunningError", "Targets"]


@dataclass(frozen=True)
class Operation:
    """One bulk action without its index: ``index``, ``create`` or ``delete`` of the document ``id``."""

    action: str
    id: str
    source: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # e.g. version, version_type


@dataclass(frozen=True)
class Targets:
    """Where writes go now: the live name (an alias, or an older concrete index) and the index being
    rebuilt, if any."""

    live_is_alias: bool
    rebuilding: bool


class AliasedIndex:
    """The alias ``name`` over its concrete generations; ``client`` gives the connected client."""

    def __init__(
        self, name: str, mappings: dict[str, Any], settings: dict[str, Any], client: Callable[[], Any]
    ) -> None:
        self.name = name
        self.rebuilding_alias = f"{name}-rebuilding"
        self._mappings = mappings
        self._settings = settings
        self._client = client
        self._targets: tuple[float, Targets] | None = None

    async def ensure(self) -> None:
        """On first start, create generation 1 with the alias (one request: two processes starting
        at once create it once). An older concrete index of the alias's name is left serving."""
        client = self._client()
        if await client.indices.exists_alias(name=self.name):
            return
        if await client.indices.exists(index=self.name):
            log.warning(
                "search index %s is a concrete index: the next `lucerna reindex` replaces it by an alias",
                self.name,
            )
            return
        first = self.generation_name(1)
        try:
            await client.indices.create(
                index=first, mappings=self._mappings, settings=self._settings, aliases={self.name: {}}
            )
        except BadRequestError as error:
            if error.error != "resource_already_exists_exception":
                raise
        if not await client.indices.exists_alias(name=self.name):
            raise RuntimeError(
                f"Elasticsearch index {first} exists without the alias {self.name}: point the alias at"
                f" the index to serve (POST /_aliases) or delete {first}"
            )

    def generation_name(self, generation: int) -> str:
        """The concrete index of a generation."""
        return f"{self.name}-{generation:0{GENERATION_DIGITS}d}"

    async def concrete(self, alias: str) -> list[str]:
        """The concrete indexes behind an alias (none when it does not exist)."""
        found = await self._client().options(ignore_status=404).indices.get_alias(name=alias)
        return sorted(_aliases_by_index(found.body))

    async def targets(self) -> Targets:
        """The aliases as seen at most ``TARGETS_TTL_SECONDS`` ago."""
        now = time.monotonic()
        if self._targets is not None and now - self._targets[0] < TARGETS_TTL_SECONDS:
            return self._targets[1]
        names = f"{self.name},{self.rebuilding_alias}"
        found = await self._client().options(ignore_status=404).indices.get_alias(name=names)
        aliases = {alias for held in _aliases_by_index(found.body).values() for alias in held}
        targets = Targets(live_is_alias=self.name in aliases, rebuilding=self.rebuilding_alias in aliases)
        self._targets = (now, targets)
        return targets

    async def write(
        self, operations: Callable[[bool], Sequence[Operation]], *, refresh: str = "wait_for"
    ) -> list[dict[str, Any]]:
        """Send ``operations(rebuilding)`` to the live index and, while a rebuild runs, to the new
        one too, in one bulk; the results of the actions that failed (the caller judges them)."""
        failures: list[dict[str, Any]] = []
        for _ in range(_RETRIES):
            targets = await self.targets()
            lines = _lines(operations(False), self.name, require_alias=targets.live_is_alias)
            if targets.rebuilding:
                lines += _lines(operations(True), self.rebuilding_alias, require_alias=True)
            if not lines:
                return []
            response = await self._client().bulk(operations=lines, refresh=refresh)
            failures = (
                [result for item in response["items"] for result in item.values() if "error" in result]
                if response["errors"]
                else []
            )
            if not any(failure["error"].get("type") == _MISSING for failure in failures):
                return failures
            self._targets = None  # the swap moved the aliases: send everything again where they are now
        return failures

    async def rebuild(self, fill: Callable[[str], Awaitable[int]]) -> int:
        """Build the next generation with ``fill(index)`` (what it wrote), then swap it in; refused
        with ``ReindexRunningError`` while another rebuild runs."""
        client = self._client()
        if await client.indices.exists_alias(name=self.rebuilding_alias):
            raise ReindexRunningError(await self._running())
        live = await self.concrete(self.name)
        legacy = not live and await client.indices.exists(index=self.name)
        target = self.generation_name(max((_generation(self.name, index) for index in live), default=0) + 1)
        try:
            await client.indices.create(
                index=target,
                mappings=self._mappings,
                settings=self._settings,
                aliases={self.rebuilding_alias: {}},
            )
        except BadRequestError as error:
            if error.error == "resource_already_exists_exception":
                raise ReindexRunningError(await self._running()) from None
            raise
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            count = await fill(target)
            await client.indices.refresh(index=target)
            actions: list[dict[str, Any]] = [{"add": {"index": target, "alias": self.name}}]
            if legacy:
                actions.append({"remove_index": {"index": self.name}})
            actions += [{"remove": {"index": old, "alias": self.name, "must_exist": True}} for old in live]
            actions.append({"remove": {"index": target, "alias": self.rebuilding_alias, "must_exist": True}})
            await client.indices.update_aliases(actions=actions)
        except BaseException:
            if target not in await self.concrete(self.name):  # not swapped in: the live index is untouched
                await client.indices.delete(index=target, ignore_unavailable=True)
            raise
        self._targets = None
        log.info("search index %s now on %s", self.name, target, extra={"replaced": live or [self.name]})
        if live:
            await asyncio.sleep(DRAIN_SECONDS)
            await client.indices.delete(index=",".join(live), ignore_unavailable=True)
        return count

    async def _running(self) -> str:
        building = await self.concrete(self.rebuilding_alias)
        if not building:
            return f"a rebuild of {self.name} is already running"
        index = building[0]
        settings = await self._client().indices.get_settings(index=index, name="index.creation_date")
        created = int(settings[index]["settings"]["index"]["creation_date"])
        started = datetime.fromtimestamp(created / 1000, tz=UTC).isoformat(timespec="seconds")
        return (
            f"a reindex of {self.name} is already running: it started at {started} and is filling"
            f" {index}; if no `lucerna reindex` runs any more (it was killed), delete that index"
            f" (DELETE /{index}) and run it again"
        )


def _aliases_by_index(body: dict[str, Any]) -> dict[str, set[str]]:
    """``GET _alias/...``'s answer; with some aliases missing it is a 404 whose body also holds
    ``error`` and ``status`` beside the indexes found."""
    return {
        index: set(value["aliases"])
        for index, value in body.items()
        if isinstance(value, dict) and "aliases" in value
    }


def _generation(name: str, index: str) -> int:
    found = re.fullmatch(rf"{re.escape(name)}-(\d+)", index)
    return int(found.group(1)) if found else 0


def _lines(operations: Sequence[Operation], index: str, *, require_alias: bool) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for operation in operations:
        meta = {"_index": index, "_id": operation.id, **operation.params}
        if require_alias:
            meta["require_alias"] = True
        lines.append({operation.action: meta})
        if operation.source is not None:
            lines.append(operation.source)
    return lines
