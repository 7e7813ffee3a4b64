"""The ``lucerna`` command: run the platform in one process, one service alone, or admin tasks."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

import uvicorn

from lucerna.core import logging as lucerna_logging
from lucerna.core.bootstrap import build_resources
from lucerna.core.http import create_app
from lucerna.core.service import Service, discover
from lucerna.core.settings import CoreSettings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lucerna`` console script."""
    parser = argparse.ArgumentParser(prog="lucerna", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run every installed service in one process (embedded defaults)")
    serve = commands.add_parser("serve", help="run one service alone (as in Kubernetes)")
    serve.add_argument("service")
    commands.add_parser("reindex", help="rebuild the search index from the metadata store")
    commands.add_parser("services", help="list the installed services")
    args = parser.parse_args(argv)

    settings = CoreSettings()
    installed = discover()
    if args.command == "services":
        print("\n".join(sorted(installed)))
        return 0
    if args.command == "reindex":
        lucerna_logging.configure("reindex", settings.log_level)
        indexing = importlib.import_module("lucerna.metadata.indexing")
        count = asyncio.run(indexing.reindex(build_resources(settings)))
        print(f"reindexed {count} studies")
        return 0
    if args.command == "serve":
        if args.service not in installed:
            parser.error(f"unknown service {args.service!r}; installed: {', '.join(sorted(installed))}")
        return _run(settings, [installed[args.service]], args.service)
    return _run(settings, [installed[name] for name in sorted(installed)], "lucerna")


def _run(settings: CoreSettings, services: list[Service], name: str) -> int:
    lucerna_logging.configure(name, settings.log_level)
    app = create_app(build_resources(settings), services)
    print(
        f"lucerna: {', '.join(s.name for s in services)} on http://{settings.http_host}:{settings.http_port}"
        f" (healthz /healthz, DICOMweb /dicom-web); data in {settings.data_dir.resolve()};"
        f" auth {'required' if settings.auth_enforced else 'off (local, loopback only)'}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
