"""The FHIR search index on Elasticsearch 8 (elasticsearch-py's async client), with core features only.

One document per resource (``_id`` = ``<Type>/<id>``), versioned with ``version_type=external`` by
the resource's version, so an older version never replaces a newer one (Elasticsearch answers 409,
which is not an error here). A deletion replaces the document with a tombstone (``deleted: true``)
rather than removing it: a removed document's version is forgotten after ``index.gc_deletes``, and
an older version arriving late would then come back.

The mapping is plain (the integ-test build has no analysis-common or painless): ``terms`` and
``strings`` are keywords (exact terms; strings matched with ``prefix`` queries), and each date
parameter's [start, end) is a pair of longs, ``dates.<param>.start``/``.end``, in epoch
microseconds: FHIR instants may carry them, ``date`` fields keep milliseconds, and
``datetime.min``/``max`` stand for open periods. The body is kept as an unindexed keyword without
doc values (no length limit applies), so a search answers without asking the store.

The index's name is an alias over a concrete generation, and ``rebuild`` fills the next one while
this one answers, then swaps them (``lucerna.core.storage.elastic_alias``, ADR 0020). While a
rebuild runs every write goes to both; external versions keep the copy from replacing a newer
version that a write put in the new index meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from elasticsearch import AsyncElasticsearch

from lucerna.core.storage.elastic import answers
from lucerna.core.storage.elastic_alias import AliasedIndex, Operation
from lucerna.fhir.store import (
    Criterion,
    DateComparator,
    DateComparison,
    IndexEntries,
    PrefixCriterion,
    SearchPage,
    SearchQuery,
    StoredResource,
    TermCriterion,
)
from lucerna.fhir.versions import microseconds

_STORED_ONLY = {"type": "keyword", "index": False, "doc_values": False}
_MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "type": {"type": "keyword"},
        "id": {"type": "keyword"},
        "version": {"type": "long"},
        "deleted": {"type": "boolean"},
        "last_updated": {"type": "long", "index": False},  # epoch milliseconds of the version
        "sha256": _STORED_ONLY,
        "body": _STORED_ONLY,
        "terms": {"type": "keyword"},
        "strings": {"type": "keyword"},
        "dates": {"type": "object", "dynamic": True},  # dates.<param>.start/end: longs, by the template
    },
    "dynamic_templates": [
        {"dates": {"path_match": "dates.*", "match_mapping_type": "long", "mapping": {"type": "long"}}}
    ],
}
_REFRESH = "250ms"  # how long an index() call waits at most for its documents to be searchable
_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": _REFRESH}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CONFLICT = 409  # a newer version (or this one) is indexed already


class ElasticResourceIndex:
    """The ``ResourceIndex`` in one Elasticsearch index."""

    def __init__(self, url: str, index: str = "lucerna-fhir") -> None:
        self._url = url
        self._index = index
        self._client: AsyncElasticsearch | None = None
        self._aliased = AliasedIndex(index, _MAPPINGS, _SETTINGS, lambda: self.client)

    @property
    def client(self) -> Any:
        """The connected client."""
        if self._client is None:
            raise RuntimeError("the Elasticsearch resource index is not started")
        return self._client

    async def start(self) -> None:
        """Connect, and create the first generation and its alias if absent."""
        if self._client is None:
            self._client = AsyncElasticsearch(self._url, request_timeout=30)
        await self._aliased.ensure()

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the cluster answers within three seconds."""
        return await answers(self._client)

    async def index(self, items: Sequence[tuple[StoredResource, IndexEntries]]) -> None:
        """Index each version unless a newer one is (one bulk request, returning once searchable)."""
        operations = [_operation(stored, entries) for stored, entries in items]
        if operations:
            _refused(await self._aliased.write(lambda _: operations))

    async def search(self, query: SearchQuery) -> SearchPage:
        """The matching resources in the query's order, a page of them and (if asked) the total."""
        filters: list[dict[str, Any]] = [
            {"term": {"type": query.resource_type}},
            {"term": {"deleted": False}},
            *(_criterion(criterion) for criterion in query.criteria),
        ]
        response = await self.client.search(
            index=self._index,
            query={"bool": {"filter": filters}},
            sort=_sort(query),
            size=query.count,
            from_=query.offset,
            track_total_hits=query.with_total,
            source_excludes=["terms", "strings", "dates"],
        )
        hits = response["hits"]
        total = hits["total"]["value"] if query.with_total else None
        return SearchPage([_stored(hit["_source"]) for hit in hits["hits"]], total)

    async def rebuild(self, items: AsyncIterable[Sequence[tuple[StoredResource, IndexEntries]]]) -> int:
        """Fill a new generation with ``items`` while this one answers, then swap them; the number
        of resources. ``ReindexRunningError`` when another rebuild runs."""

        async def fill(target: str) -> int:
            count = 0
            async for batch in items:
                if batch:
                    lines: list[dict[str, Any]] = []
                    for stored, entries in batch:
                        params = {"version": stored.version_id, "version_type": "external"}
                        action = {"index": {"_index": target, "_id": stored.reference, **params}}
                        lines += [action, _source(stored, entries)]
                    response = await self.client.bulk(operations=lines)
                    _refused([result for item in response["items"] for result in item.values()])
                    count += len(batch)
            return count

        return await self._aliased.rebuild(fill)

    async def clear(self) -> None:
        """Replace the index by an empty generation (tests and tools)."""

        async def nothing() -> AsyncIterator[Sequence[tuple[StoredResource, IndexEntries]]]:
            return
            yield

        await self.rebuild(nothing())


def _operation(stored: StoredResource, entries: IndexEntries) -> Operation:
    """Index this version unless a newer one is (external versioning)."""
    params = {"version": stored.version_id, "version_type": "external"}
    return Operation("index", stored.reference, _source(stored, entries), params)


def _refused(results: Sequence[dict[str, Any]]) -> None:
    """Raise for the failed bulk actions other than a newer version kept (409)."""
    failures = [
        result["error"] for result in results if "error" in result and result.get("status") != _CONFLICT
    ]
    if failures:
        raise RuntimeError(f"Elasticsearch refused {len(failures)} resources: {failures[0]}")


def _source(stored: StoredResource, entries: IndexEntries) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": stored.resource_type,
        "id": stored.id,
        "version": stored.version_id,
        "deleted": stored.deleted,
        "last_updated": (stored.last_updated - _EPOCH) // timedelta(milliseconds=1),
        "sha256": stored.sha256,
    }
    if stored.body is not None:
        document |= {
            "body": stored.body.decode(),
            "terms": sorted(entries.terms),
            "strings": sorted(entries.strings),
            "dates": {
                param: {"start": microseconds(start), "end": microseconds(end)}
                for param, (start, end) in entries.dates.items()
            },
        }
    return document


def _stored(source: dict[str, Any]) -> StoredResource:
    body = source.get("body")
    return StoredResource(
        resource_type=source["type"],
        id=source["id"],
        version_id=source["version"],
        last_updated=_EPOCH + timedelta(milliseconds=source["last_updated"]),
        sha256=source["sha256"],
        body=None if body is None else body.encode(),
    )


def _criterion(criterion: Criterion) -> dict[str, Any]:
    """One criterion as a filter (``search.matches`` is the reference)."""
    if isinstance(criterion, TermCriterion):
        found = {"terms": {"terms": list(criterion.terms)}}
        return {"bool": {"must_not": [found]}} if criterion.negate else found
    if isinstance(criterion, PrefixCriterion):
        alternatives = [{"prefix": {"strings": {"value": prefix}}} for prefix in criterion.prefixes]
    else:
        field = f"dates.{criterion.param}"
        alternatives = [_comparison(field, comparison) for comparison in criterion.comparisons]
    return {"bool": {"should": alternatives, "minimum_should_match": 1}}


def _comparison(field: str, comparison: DateComparison) -> dict[str, Any]:
    """``search.date_matches`` on the range fields ``<field>.start`` and ``<field>.end``."""
    low, high = microseconds(comparison.start), microseconds(comparison.end)
    start, end = f"{field}.start", f"{field}.end"
    within: dict[str, Any] = {
        "bool": {"filter": [{"range": {start: {"gte": low}}}, {"range": {end: {"lte": high}}}]}
    }
    bounds: dict[DateComparator, dict[str, Any]] = {
        DateComparator.EQ: within,
        # A resource without the parameter never matches, ``ne`` included.
        DateComparator.NE: {"bool": {"filter": [{"exists": {"field": start}}], "must_not": [within]}},
        DateComparator.GT: {"range": {end: {"gt": high}}},
        DateComparator.LT: {"range": {start: {"lt": low}}},
        DateComparator.GE: {"range": {end: {"gt": low}}},
        DateComparator.LE: {"range": {start: {"lt": high}}},
        DateComparator.SA: {"range": {start: {"gte": high}}},
        DateComparator.EB: {"range": {end: {"lte": low}}},
    }
    return bounds[comparison.comparator]


def _sort(query: SearchQuery) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = []
    for key in query.sort:
        order = "desc" if key.descending else "asc"
        if key.param == "_id":
            keys.append({"id": {"order": order}})
        else:
            field = f"dates.{key.param}.start"
            keys.append({field: {"order": order, "missing": "_last", "unmapped_type": "long"}})
    keys.append({"id": {"order": "asc"}})
    return keys
