"""What a service's small stores share: a connection to one MongoDB database, or one SQLite file,
opened on ``start``, closed on ``close`` and checked by ``ping``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from lucerna.core.storage.mongo import answers
from lucerna.core.storage.sqlite import SqliteDatabase

Document = dict[str, Any]


class MongoBacked:
    """A store in collections of one MongoDB database (prefixed with its service's name by its users)."""

    def __init__(self, url: str, database: str) -> None:
        self._url = url
        self._database = database
        self._client: AsyncMongoClient[Document] | None = None

    def collection(self, name: str) -> AsyncCollection[Document]:
        """A collection of the database; ``RuntimeError`` before ``start``."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._client[self._database][name]

    async def start(self) -> None:
        """Connect (datetimes come back time-zone aware); again: nothing."""
        if self._client is None:
            self._client = AsyncMongoClient(self._url, tz_aware=True)

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the server answers within three seconds."""
        return await answers(self._client)


class SqliteBacked:
    """A store in one SQLite file with its schema (``SqliteDatabase``: WAL, a writer thread)."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._db = SqliteDatabase(path, schema)

    async def start(self) -> None:
        """Open the file and create the schema; again: nothing."""
        await self._db.start()

    async def close(self) -> None:
        """Stop the threads and close the connections."""
        await self._db.close()

    async def ping(self) -> bool:
        """True when the file answers a query."""
        return await self._db.ping()
