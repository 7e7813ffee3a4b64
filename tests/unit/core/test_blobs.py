import hashlib
import shutil
from pathlib import Path

import pytest

from lucerna.core.storage.blobs import FilesystemBlobStore


async def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    first = await store.put(b"dicom bytes")
    again = await store.put(b"dicom bytes")
    assert first.sha256 == hashlib.sha256(b"dicom bytes").hexdigest()
    assert (first.created, again.created) == (True, False)
    assert await store.get(first.sha256) == b"dicom bytes"
    assert not list(tmp_path.rglob(".incoming-*"))  # noqa: ASYNC240 - a test's own tmp folder


async def test_delete_and_missing(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    ref = await store.put(b"x")
    await store.delete(ref.sha256)
    assert not await store.exists(ref.sha256)
    with pytest.raises(KeyError):
        await store.get(ref.sha256)


async def test_rejects_paths_that_are_not_digests(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        await FilesystemBlobStore(tmp_path).get("../../etc/passwd")


async def test_a_folder_removed_behind_its_back_is_made_again(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    first = await store.put(b"first")
    shutil.rmtree(tmp_path / first.sha256[:2])
    again = await store.put(b"first")
    assert again.created and await store.get(first.sha256) == b"first"
