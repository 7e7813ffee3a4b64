"""Cleaning up after tests on the real Elasticsearch, where a service's index name is an alias over
concrete generations (ADR 0020): deleting by the alias's name deletes nothing."""

from __future__ import annotations

from elasticsearch import AsyncElasticsearch


async def concrete(client: AsyncElasticsearch, alias: str) -> list[str]:
    """The concrete indexes behind ``alias`` (none if it does not exist)."""
    found = await client.options(ignore_status=404).indices.get_alias(name=alias)
    return sorted(key for key, value in found.body.items() if isinstance(value, dict) and "aliases" in value)


async def drop(client: AsyncElasticsearch, name: str) -> None:
    """Delete the index ``name``: the generations behind it (a rebuild's too), or itself if concrete."""
    for index in [*await concrete(client, name), *await concrete(client, f"{name}-rebuilding")]:
        await client.indices.delete(index=index, ignore_unavailable=True)
    await client.indices.delete(index=name, ignore_unavailable=True)
