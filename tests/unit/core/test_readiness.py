"""/readyz: the shared adapters and each service's own checks; 503 while any fails."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx
from starlette.routing import BaseRoute

from lucerna.core.bootstrap import build_resources
from lucerna.core.http import create_app
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings


class _Service:
    name = "model-runner"

    def __init__(self) -> None:
        self.triton = False

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        return ()

    async def start(self, resources: Resources) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def readiness(self) -> dict[str, bool]:
        if self.triton is None:
            raise RuntimeError("the check itself broke")
        return {"triton": self.triton}


async def test_a_service_check_failing_makes_the_process_not_ready(tmp_path: Path) -> None:
    resources = build_resources(CoreSettings(data_dir=tmp_path))
    service = _Service()
    app = create_app(resources, [service])
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lucerna")
        async with client:
            down = await client.get("/readyz")
            assert down.status_code == 503
            assert down.json()["checks"] == {
                "metadata": True,
                "search": True,
                "bus": True,
                "model-runner.triton": False,
            }
            service.triton = True
            assert (await client.get("/readyz")).status_code == 200
            service.triton = None  # type: ignore[assignment]
            broken = await client.get("/readyz")
            assert broken.status_code == 503 and broken.json()["checks"]["model-runner.readiness"] is False
