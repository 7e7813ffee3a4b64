"""The search index on Elasticsearch 8 (elasticsearch-py's async client), with core features only.

The integration build of Elasticsearch carries no analysis-common, phonetic or painless modules,
so the mapping uses the standard analyzer and keyword fields, and fuzzy names are term-level
``fuzzy`` and ``prefix`` queries on the name's words kept as keywords. A name matches when every
query word is close to one of its words, in any order, as in the SQLite index: a word starting
with the query word or within ``fuzziness: AUTO`` (an adjacent swap counts as one edit).

Each document also carries the study's study-level QIDO-RS JSON (``study``, stored, not indexed)
and keyword copies of its matching attributes (``match.<keyword>``, normalised as the metadata
stores keep them), so that ``query_studies`` answers study-level attribute queries as the store
would (ADR 0004). The index refreshes every 250 ms and a bulk write returns once a refresh made it
searchable, so a study is searchable when the indexer marks it indexed; ``refresh()`` makes
everything indexed so far searchable at once, for tests and tools.

The index's name is an alias over a concrete generation, and ``rebuild`` fills the next one while
this one answers, then swaps them (``elastic_alias``, ADR 0020). While a rebuild runs, the indexer
writes to both; the copy only creates documents, so a study the indexer wrote meanwhile is
never overwritten by the copy's older read, and a study removed meanwhile becomes an empty
document there (a tombstone the copy cannot recreate it over) that no query matches and that is
deleted after the swap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from lucerna.core.dicom.attributes import STUDY_ATTRIBUTES, TAGS, derive
from lucerna.core.storage import _qido, _search
from lucerna.core.storage._qido import Condition
from lucerna.core.storage.elastic_alias import AliasedIndex, Operation
from lucerna.core.storage.ports import DicomJson, Query

log = logging.getLogger(__name__)


async def answers(client: AsyncElasticsearch | None, within: float = 3.0) -> bool:
    """True when the cluster behind ``client`` answers within ``within`` seconds (``GET /`` is absent
    from minimal builds, so ask its health)."""
    if client is None:
        return False
    try:
        async with asyncio.timeout(within):
            await client.cluster.health(timeout="2s")
    except (ApiError, TransportError, TimeoutError):
        return False
    return True

# The study attributes a document keeps for matching: those the study-level JSON carries.
_MATCHED = tuple(kw for kw in STUDY_ATTRIBUTES if _qido.NATURAL_LEVEL.get(kw) == "study")
# Bumped when documents gain what queries rely on: an older index is only searched for names and
# text until ``lucerna reindex`` rebuilds it.
_SCHEMA = 2
_MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "_meta": {"schema": _SCHEMA},
    "properties": {
        "study": {"type": "object", "enabled": False},  # study-level QIDO-RS JSON, returned as is
        "match": {"properties": {
            kw: {"type": "long" if _qido.is_number(kw) else "keyword"} for kw in _MATCHED
        }},
        "study_uid": {"type": "keyword"},
        "patient_name": {"type": "keyword"},  # normalised DICOM form, "DOE^JOHN"
        "name_words": {"type": "keyword"},  # ["DOE", "JOHN"]: fuzzy and prefix per word
        "name_text": {"type": "text"},  # "DOE JOHN" for free text
        "patient_id": {"type": "keyword"},
        "accession_number": {"type": "keyword"},
        "study_id": {"type": "keyword"},
        "ids": {"type": "text"},
        "study_date": {"type": "keyword"},
        "modalities": {"type": "keyword"},
        "descriptions": {"type": "text"},
    },
}
_REFRESH = "250ms"  # bounds the search lag together with the indexer's poll interval
_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": _REFRESH}
_MAX_RESULT_WINDOW = 10_000  # Elasticsearch's default index.max_result_window
_MAX_TERMS = 65_536  # its default index.max_terms_count
_QUERY_TIMEOUT_SECONDS = 2.0  # a slow index must not hold up QIDO-RS: the store answers instead
_STUDY_ORDER = [
    {"match.StudyDate": {"order": "desc", "missing": "_last"}},
    {"match.StudyInstanceUID": {"order": "asc"}},
]
_TEXT_FIELDS = ("name_text", "ids", "descriptions")
_REBUILD_BATCH = 500
_CONFLICT = 409  # ``create`` of a document a writer put there first
_STUDY_DOCUMENT = {"exists": {"field": "study_uid"}}  # not a tombstone left by a rebuild


class ElasticSearchIndex:
    """Study documents (keyed by Study Instance UID) in one Elasticsearch index."""

    def __init__(self, url: str, index: str) -> None:
        self._url = url
        self._index = index
        self._client: AsyncElasticsearch | None = None
        self._answers_queries = False  # the index's documents carry what query_studies needs
        self._aliased = AliasedIndex(index, _MAPPINGS, _SETTINGS, lambda: self.client)

    @property
    def client(self) -> Any:
        """The connected client."""
        if self._client is None:
            raise RuntimeError("the Elasticsearch index is not started")
        return self._client

    async def start(self) -> None:
        """Connect, create the first generation and its alias if absent, and check the schema."""
        self._client = AsyncElasticsearch(self._url, request_timeout=30)
        await self._aliased.ensure()
        await self._check_schema()

    async def _check_schema(self) -> None:
        """Answer queries from an index of the current schema; upgrade an older one's mapping so that
        indexing goes on, and leave its queries to the store until it is rebuilt."""
        found = await self.client.indices.get_mapping(index=self._index)
        mappings = next(iter(found.values()))["mappings"]
        self._answers_queries = mappings.get("_meta", {}).get("schema") == _SCHEMA
        if not self._answers_queries:
            await self.client.indices.put_mapping(index=self._index, properties=_MAPPINGS["properties"])
            await self.client.indices.put_settings(index=self._index, settings={"refresh_interval": _REFRESH})
            log.warning(
                "search index %s predates schema %d: attribute queries go to the metadata store until"
                " `lucerna reindex` rebuilds it", self._index, _SCHEMA,
            )

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the cluster answers within three seconds."""
        return await answers(self._client)

    async def index_studies(self, studies: Sequence[DicomJson]) -> None:
        """Add, replace or drop (tombstones) study documents in one bulk request, which returns once
        they are searchable."""
        operations: list[Operation] = []
        removed: list[str] = []
        for study in studies:
            document = _search.study_document(study)
            if _search.is_tombstone(study):
                removed.append(document.study_uid)
            else:
                operations.append(Operation("index", document.study_uid, _source(document, study)))

        def actions(rebuilding: bool) -> list[Operation]:
            # In the index being rebuilt a removal leaves an empty document: the copy cannot bring
            # back the study it read before the removal over it.
            if rebuilding:
                return [*operations, *(Operation("index", uid, {}) for uid in removed)]
            return [*operations, *(Operation("delete", uid) for uid in removed)]

        failures = await self._aliased.write(actions)
        if failures:
            raise RuntimeError(
                f"Elasticsearch refused {len(failures)} study documents: {failures[0]['error']}"
            )

    async def query_studies(self, query: Query) -> list[DicomJson] | None:
        """Study-level queries on the study attributes, answered from the documents' copy of the
        study-level JSON in the store's order; None (ask the store) for anything else, for an index
        awaiting its rebuild, and when Elasticsearch fails."""
        if not self._answers_queries or query.offset + query.limit > _MAX_RESULT_WINDOW:
            return None
        translated = _study_query(query)
        if translated is None:
            return None
        try:
            response = await self.client.options(request_timeout=_QUERY_TIMEOUT_SECONDS).search(
                index=self._index, query={"bool": {"filter": [_STUDY_DOCUMENT, translated]}},
                size=query.limit, from_=query.offset,
                sort=_STUDY_ORDER, source=["study"], track_total_hits=False,
            )
        except (ApiError, TransportError) as error:
            log.warning("search index query failed, asking the metadata store: %r", error)
            return None
        return [hit["_source"]["study"] for hit in response["hits"]["hits"]]

    async def refresh(self) -> None:
        """Make every document indexed so far searchable now."""
        await self.client.indices.refresh(index=self._index)

    async def fuzzy_patient_names(self, name: str, limit: int = 1000) -> list[str]:
        """Studies whose patient name is close to ``name`` (see the module docstring), closest first."""
        words = _search.name_tokens(name)
        if not words:
            return []
        clauses = [
            {"bool": {"should": [
                {"term": {"name_words": {"value": word, "boost": 3}}},
                {"prefix": {"name_words": {"value": word, "boost": 2}}},
                {"fuzzy": {"name_words": {"value": word, "fuzziness": "AUTO", "transpositions": True}}},
            ], "minimum_should_match": 1}}
            for word in words
        ]
        return await self._uids({"bool": {"must": clauses}}, limit, 0)

    async def search(self, text: str, limit: int = 50, offset: int = 0) -> list[str]:
        """Studies matching every word of ``text`` (whole word or word prefix), best score first."""
        words = [word.lower() for word in _search.name_tokens(text)]
        if not words:
            return []
        clauses = [
            {"bool": {"should": [
                {"multi_match": {"query": word, "fields": list(_TEXT_FIELDS)}},
                *({"prefix": {field: {"value": word}}} for field in _TEXT_FIELDS),
            ], "minimum_should_match": 1}}
            for word in words
        ]
        return await self._uids({"bool": {"must": clauses}}, limit, offset)

    async def _uids(self, query: dict[str, Any], limit: int, offset: int) -> list[str]:
        response = await self.client.search(
            index=self._index, query=query, size=limit, from_=offset,
            sort=[{"_score": "desc"}, {"study_uid": "asc"}], source=False, track_total_hits=False,
        )
        return [str(hit["_id"]) for hit in response["hits"]["hits"]]

    async def rebuild(self, studies: AsyncIterable[DicomJson]) -> int:
        """Fill a new generation with ``studies`` while this one answers, then swap them; the
        number of studies. ``ReindexRunningError`` when another rebuild runs."""

        async def fill(target: str) -> int:
            count = 0
            chunk: list[DicomJson] = []
            async for study in studies:
                chunk.append(study)
                if len(chunk) >= _REBUILD_BATCH:
                    count += await self._copy(target, chunk)
                    chunk = []
            if chunk:
                count += await self._copy(target, chunk)
            return count

        count = await self._aliased.rebuild(fill)
        self._answers_queries = True  # the new generation has the current schema
        await self._drop_tombstones()
        return count

    async def _copy(self, target: str, studies: Sequence[DicomJson]) -> int:
        """``create`` the studies' documents in the new generation: what the indexer wrote there
        meanwhile (newer than this read of the store) stays."""
        operations: list[dict[str, Any]] = []
        for study in studies:
            if _search.is_tombstone(study):
                continue
            document = _search.study_document(study)
            action = {"create": {"_index": target, "_id": document.study_uid}}
            operations += [action, _source(document, study)]
        if not operations:
            return 0
        response = await self.client.bulk(operations=operations)
        if response["errors"]:
            failures = [
                result["error"] for item in response["items"] for result in item.values()
                if "error" in result and result.get("status") != _CONFLICT
            ]
            if failures:
                raise RuntimeError(f"Elasticsearch refused {len(failures)} study documents: {failures[0]}")
        return len(operations) // 2

    async def _drop_tombstones(self) -> None:
        """Delete the empty documents that removals during the rebuild left, each only if unchanged
        since read (``if_seq_no``): a study indexed again meanwhile stays."""
        for _ in range(100):
            response = await self.client.search(
                index=self._index, query={"bool": {"must_not": [_STUDY_DOCUMENT]}},
                size=1000, seq_no_primary_term=True, source=False,
            )
            hits = response["hits"]["hits"]
            if not hits:
                return
            await self.client.bulk(refresh="wait_for", operations=[
                {"delete": {"_index": hit["_index"], "_id": hit["_id"], "if_seq_no": hit["_seq_no"],
                            "if_primary_term": hit["_primary_term"]}}
                for hit in hits
            ])

    async def reset(self) -> None:
        """Replace the index by an empty generation (for tests and tools; searches never see a
        missing index)."""

        async def nothing() -> AsyncIterator[DicomJson]:
            return
            yield

        await self.rebuild(nothing())


def _study_query(query: Query) -> dict[str, Any] | None:
    """The query as an Elasticsearch filter on ``match.*``, or None when it needs the store."""
    if query.level != "study":
        return None
    try:
        plan = _qido.plan(query)
    except ValueError:
        return None  # the store refuses it with its own message
    if plan.impossible:
        return {"match_none": {}}  # e.g. InstanceAvailability other than ONLINE
    filters: list[dict[str, Any]] = []
    for level, conditions in plan.conditions.items():
        for condition in conditions:
            clause = _clause(condition) if level == "study" and condition.attribute in _MATCHED else None
            if clause is None:
                return None
            filters.append(clause)
    return {"bool": {"filter": filters}}


def _clause(condition: Condition) -> dict[str, Any] | None:
    name = f"match.{condition.attribute}"
    if condition.op == "in":
        values = list(condition.value)
        return {"terms": {name: values}} if len(values) <= _MAX_TERMS else None
    if condition.op == "eq":
        return {"term": {name: condition.value}}
    if condition.op == "wildcard":
        # DICOM's * and ? are Elasticsearch's; a backslash would escape, so it is escaped itself.
        return {"wildcard": {name: {"value": condition.value.replace("\\", "\\\\")}}}
    low, high = condition.value
    bounds = {op: bound for op, bound in (("gte", low), ("lte", high)) if bound is not None}
    return {"range": {name: bounds}}


def _match_values(study: DicomJson) -> dict[str, Any]:
    """The study's matching attributes as the stores keep them (``derive``; aggregates as listed)."""
    derived = derive(study)
    values: dict[str, Any] = {kw: derived[kw] for kw in _MATCHED if kw in derived}
    for keyword in _qido.AGGREGATES_OF["study"]:
        listed = study.get(TAGS[keyword][0], {}).get("Value")
        if listed:
            values[keyword] = listed
    return values


def _source(document: _search.StudyDocument, study: DicomJson) -> dict[str, Any]:
    words = _search.name_tokens(document.patient_name)
    return {
        "study": study,
        "match": _match_values(study),
        "study_uid": document.study_uid,
        "patient_name": document.patient_name,
        "name_words": words,
        "name_text": " ".join(words),
        "patient_id": document.patient_id,
        "accession_number": document.accession_number,
        "study_id": document.study_id,
        "ids": document.ids,
        "study_date": document.study_date,
        "modalities": list(document.modalities),
        "descriptions": document.descriptions,
    }
