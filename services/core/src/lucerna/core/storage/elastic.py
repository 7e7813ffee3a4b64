"""The search index on Elasticsearch 8 (elasticsearch-py's async client), with core features only.

The integration build of Elasticsearch carries no analysis-common, phonetic or painless modules,
so the mapping uses the standard analyzer and keyword fields, and fuzzy names are term-level
``fuzzy`` and ``prefix`` queries on the name's words kept as keywords. A name matches when every
query word is close to one of its words, in any order, as in the SQLite index: a word starting
with the query word or within ``fuzziness: AUTO`` (an adjacent swap counts as one edit).

Indexing does not wait for a refresh (the indexer is asynchronous and search is eventually
consistent); ``refresh()`` makes everything indexed so far searchable, for tests and tools.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError, TransportError

from lucerna.core.storage import _search
from lucerna.core.storage.ports import DicomJson

_MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
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
_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0}
_TEXT_FIELDS = ("name_text", "ids", "descriptions")


class ElasticSearchIndex:
    """Study documents (keyed by Study Instance UID) in one Elasticsearch index."""

    def __init__(self, url: str, index: str) -> None:
        self._url = url
        self._index = index
        self._client: AsyncElasticsearch | None = None

    @property
    def client(self) -> Any:
        """The connected client."""
        if self._client is None:
            raise RuntimeError("the Elasticsearch index is not started")
        return self._client

    async def start(self) -> None:
        """Connect and create the index with its mapping if absent."""
        self._client = AsyncElasticsearch(self._url, request_timeout=30)
        if not await self.client.indices.exists(index=self._index):
            await self._create()

    async def _create(self) -> None:
        try:
            await self.client.indices.create(index=self._index, mappings=_MAPPINGS, settings=_SETTINGS)
        except BadRequestError as error:
            if error.error != "resource_already_exists_exception":  # created meanwhile by another process
                raise

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the cluster answers (``GET /`` is absent from minimal builds, so ask its health)."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(3):
                await self._client.cluster.health(timeout="2s")
        except (ApiError, TransportError, TimeoutError):
            return False
        return True

    async def index_studies(self, studies: Sequence[DicomJson]) -> None:
        """Add or replace study documents in one bulk request."""
        operations: list[dict[str, Any]] = []
        for study in studies:
            document = _search.study_document(study)
            operations += [{"index": {"_index": self._index, "_id": document.study_uid}}, _source(document)]
        if not operations:
            return
        response = await self.client.bulk(operations=operations)
        if response["errors"]:
            failures = [item["index"]["error"] for item in response["items"] if "error" in item["index"]]
            raise RuntimeError(f"Elasticsearch refused {len(failures)} study documents: {failures[0]}")

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

    async def reset(self) -> None:
        """Drop and recreate the index."""
        await self.client.indices.delete(index=self._index, ignore_unavailable=True)
        await self._create()


def _source(document: _search.StudyDocument) -> dict[str, Any]:
    words = _search.name_tokens(document.patient_name)
    return {
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
