"""What the Fabric tests share: an origin of each test's own and a real audit log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lucerna.audit.log import SqliteAuditLog


@pytest.fixture
def origin() -> str:
    """An origin of its own, so that the test's anchors share nothing with another test's."""
    return f"lucerna.test/{uuid.uuid4().hex[:12]}/audit-log"


@pytest.fixture
async def audit_log(tmp_path: Path) -> AsyncIterator[SqliteAuditLog]:
    log = SqliteAuditLog(tmp_path / "audit.sqlite")
    await log.start()
    yield log
    await log.close()
