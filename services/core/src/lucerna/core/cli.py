"""The ``lucerna`` command: run the platform in one process, one service alone, or admin tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from lucerna.core import logging as lucerna_logging
from lucerna.core import worker_metrics
from lucerna.core.bootstrap import build_resources
from lucerna.core.service import HasCompanion, HasReindex, Service, discover
from lucerna.core.settings import CoreSettings
from lucerna.core.storage.ports import ReindexRunningError
from lucerna.core.workers import claim_port, reuse_port_socket, supervise

COMPANION_STOP_SECONDS = 15.0

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lucerna`` console script."""
    parser = argparse.ArgumentParser(prog="lucerna", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run every installed service in one process (embedded defaults)")
    up.add_argument("--only", metavar="SERVICES", help="comma-separated services to run instead of all")
    serve = commands.add_parser("serve", help="run one service alone (as in Kubernetes)")
    serve.add_argument("service")
    reindex = commands.add_parser("reindex", help="rebuild the services' search indexes from their stores")
    reindex.add_argument("--only", metavar="SERVICES", help="comma-separated services (default: every one)")
    commands.add_parser("services", help="list the installed services")
    verify = commands.add_parser(
        "verify", help="check a DiagnosticReport's chain back to the signed audit log"
    )
    verify.add_argument("report", nargs="?", help="the DiagnosticReport id (online: read from --base-url)")
    verify.add_argument("--offline", type=Path, metavar="BUNDLE", help="check an exported bundle instead")
    verify.add_argument(
        "--keys", type=Path, help="the pinned public keys (JSON as /.well-known/lucerna-audit-keys)"
    )
    verify.add_argument("--base-url", default="http://127.0.0.1:8080")
    export = commands.add_parser(
        "export-proof", help="write a DiagnosticReport's self-contained proof bundle"
    )
    export.add_argument("report")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--base-url", default="http://127.0.0.1:8080")
    keys = commands.add_parser(
        "audit-keys", help="list or rotate the audit log's signing keys and PHI at-rest keys"
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    listing = keys_commands.add_parser("list", help="the keys (never private material), newest first")
    listing.add_argument("--json", action="store_true", help="as JSON")
    rotating = keys_commands.add_parser(
        "rotate", help="make a new signing key the active one (old ones keep verifying)"
    )
    rotating.add_argument(
        "--phi", action="store_true", help="rotate the PHI at-rest key instead (old ones keep opening)"
    )
    for keys_command in (listing, rotating):
        keys_command.add_argument(
            "--key-dir",
            type=Path,
            help="the key directory (default: LUCERNA_AUDIT_KEY_DIR, else <LUCERNA_DATA_DIR>/audit-keys)",
        )
    args = parser.parse_args(argv)

    settings = CoreSettings()
    if args.command in ("up", "serve") and settings.workers > 1:
        # Before the services' modules are imported: they create their metrics then (ADR 0021).
        with worker_metrics.shared_across_workers():
            return _command(parser, args, settings)
    return _command(parser, args, settings)


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: CoreSettings) -> int:
    installed = discover()
    if args.command in ("verify", "export-proof", "audit-keys"):
        return _audit_command(parser, args)
    if args.command == "services":
        print("\n".join(sorted(installed)))
        return 0
    if args.command == "reindex":
        lucerna_logging.configure("reindex", settings.log_level)
        indexed = {name: service for name, service in installed.items() if isinstance(service, HasReindex)}
        chosen = sorted(indexed) if not args.only else [name.strip() for name in args.only.split(",")]
        unknown = [name for name in chosen if name not in indexed]
        if unknown:
            parser.error(f"no index to rebuild in {', '.join(unknown)}; indexed: {', '.join(indexed)}")
        for name in chosen:
            try:
                print(f"{name}: {asyncio.run(indexed[name].reindex(build_resources(settings)))}")
            except ReindexRunningError as error:
                print(f"lucerna reindex: {name}: {error}", file=sys.stderr)
                return 1
        return 0
    if args.command == "serve":
        if args.service not in installed:
            parser.error(f"unknown service {args.service!r}; installed: {', '.join(sorted(installed))}")
        return _run(settings, [installed[args.service]], args.service)
    chosen = sorted(installed) if not args.only else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in chosen if name not in installed]
    if unknown:
        parser.error(f"unknown service(s) {', '.join(unknown)}; installed: {', '.join(sorted(installed))}")
    return _run(settings, [installed[name] for name in chosen], "lucerna")


def _audit_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The auditor's and the operator's commands, from the audit package (when installed)."""
    auditing = importlib.import_module("lucerna.audit.cli")
    if args.command == "audit-keys":
        if args.keys_command == "list":
            return int(auditing.list_keys(args.key_dir, as_json=args.json))
        return int(auditing.rotate_keys(args.key_dir, phi_key=args.phi))
    if args.command == "export-proof":
        return int(auditing.export_proof(args.report, args.out, args.base_url))
    if (args.report is None) == (args.offline is None):
        parser.error("verify needs a report id or --offline BUNDLE (one of them)")
    return int(auditing.verify(args.report, offline=args.offline, keys=args.keys, base_url=args.base_url))


def _run(settings: CoreSettings, services: list[Service], name: str) -> int:
    # Imported here, once the metrics directory of several workers is set: it creates the metrics.
    from lucerna.core.http import create_app  # noqa: PLC0415

    lucerna_logging.configure(name, settings.log_level)
    workers = settings.workers
    if workers > 1:
        # Checked once here, so that a taken port fails clearly instead of once per worker, and
        # so that port 0 means one port that every worker shares.
        try:
            settings = settings.model_copy(
                update={"http_port": claim_port(settings.http_host, settings.http_port)}
            )
        except OSError as error:
            where = f"{settings.http_host}:{settings.http_port}"
            print(f"lucerna: cannot listen on {where}: {error}", file=sys.stderr)
            return 1
    print(
        f"lucerna: {', '.join(s.name for s in services)} on http://{settings.http_host}:{settings.http_port}"
        f" (healthz /healthz, DICOMweb /dicom-web, FHIR /fhir); data in {settings.data_dir.resolve()};"
        f" auth {'required' if settings.auth_enforced else 'off (local, loopback only)'};"
        f" {workers} worker process{'es' if workers > 1 else ''}",
        file=sys.stderr,
        flush=True,
    )
    with _companions(settings, services):
        if workers == 1:
            uvicorn.run(create_app(build_resources(settings), services), **_uvicorn_options(settings))
            return 0
        log.info(
            "metrics of the worker processes summed from %s",
            os.environ[worker_metrics.DIRECTORY_VARIABLE],
        )
        worker_metrics.discard_own_files()
        return supervise(
            workers,
            functools.partial(_serve_worker, settings, services, name),
            on_exit=worker_metrics.worker_exited,
        )


@contextlib.contextmanager
def _companions(settings: CoreSettings, services: list[Service]) -> Iterator[None]:
    """Start the services' companion processes (once per host, not per worker); stop them after."""
    processes = []
    # uvicorn handles SIGTERM itself, then restores the handler it found and raises the signal
    # again; with the default handler the process would die there, before stopping companions.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for service in services:
            command = service.companion_command(settings) if isinstance(service, HasCompanion) else None
            if command:
                # Taken after companion_command, which may set what the companion and the workers
                # share (tokens); without the workers' metrics directory: a Python companion using
                # prometheus_client would write into the workers' sums and lose its files at the end.
                companion_env = dict(os.environ)
                companion_env.pop(worker_metrics.DIRECTORY_VARIABLE, None)
                settings.data_dir.mkdir(parents=True, exist_ok=True)
                log_path = settings.data_dir / f"{service.name}-companion.log"
                print(
                    f"lucerna: starting {service.name}'s companion (log: {log_path}): {' '.join(command)}",
                    file=sys.stderr,
                    flush=True,
                )
                with log_path.open("ab") as log_file:
                    # Its own session: a Ctrl-C in the terminal reaches the runner, which stops it in order.
                    processes.append(
                        subprocess.Popen(  # noqa: S603
                            command,
                            stdout=log_file,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env=companion_env,
                        )
                    )
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(COMPANION_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # a requested stop, as with the supervisor's workers


def _serve_worker(settings: CoreSettings, services: list[Service], name: str, index: int) -> None:
    """One worker process: every service of the command, on a socket shared with the others."""
    lucerna_logging.configure(name, settings.log_level, worker=index)
    from lucerna.core.http import create_app  # noqa: PLC0415 - imported by _run before forking

    sock = reuse_port_socket(settings.http_host, settings.http_port)
    app = create_app(build_resources(settings), services)
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(settings)))
    server.run(sockets=[sock])  # listens only once the lifespan startup is done
    if not server.started:
        sys.exit(3)  # uvicorn's status for a failed startup


def _uvicorn_options(settings: CoreSettings) -> dict[str, Any]:
    return {
        "host": settings.http_host,
        "port": settings.http_port,
        "loop": "uvloop",
        "http": "httptools",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }


if __name__ == "__main__":
    sys.exit(main())
