"""The DICOM DIMSE listener (pynetdicom): C-ECHO, and C-STORE of every standard storage SOP class.

pynetdicom runs each association in its own thread. The C-STORE handler hands the instance's
bytes, as received (no decode, no re-encode), to the one ingestion function on the service's
asyncio loop and answers with the outcome's status. When an association ends (released, aborted
or its connection lost) the studies it stored get their burst boundary.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import socketserver
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from lucerna.ingestion import metrics
from lucerna.ingestion.assembly import end_of_burst
from lucerna.ingestion.ingest import Ports, ingest
from lucerna.ingestion.outcomes import Disposition, FailureReason
from lucerna.ingestion.settings import IngestionSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Accepted as received and stored as received: no transcoding, so any of these is fine.
TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
MAX_PDU_BYTES = 256 * 1024  # fewer, larger P-DATA PDUs from peers that accept it
BOUNDARY_TIMEOUT_SECONDS = 30.0
SUCCESS = 0x0000
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)


class DimseListener:
    """A C-ECHO / C-STORE SCP feeding the ingestion function; start() binds and returns at once."""

    def __init__(
        self,
        settings: IngestionSettings,
        ports: Ports,
        loop: asyncio.AbstractEventLoop,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._settings = settings
        self._ports = ports
        self._loop = loop
        self._reuse_port = reuse_port  # several worker processes share the port (docs/adr/0005)
        self._ae = _application_entity(settings)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._studies: dict[int, set[str]] = {}  # association id -> studies it stored
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port the OS chose when configured with 0)."""
        if self._address is None:
            raise RuntimeError("the DIMSE listener is not started")
        return self._address

    def start(self) -> None:
        """Bind and serve in pynetdicom's threads; raises OSError when the port is taken."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
        ]
        address = (self._settings.dimse_host, self._settings.dimse_port)
        if self._reuse_port:
            server = self._ae.make_server(address, evt_handlers=handlers, server_class=_ReusePortServer)
            threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
            self._server = server
        else:
            started = self._ae.start_server(address, block=False, evt_handlers=handlers)
            assert started is not None  # non-blocking start returns the running server
            server = started
        host, port = server.server_address[:2]
        self._address = (str(host), int(port))
        log.info(
            "DIMSE listener on %s:%d as %s",
            host,
            port,
            self._settings.ae_title,
            extra={"allowed_calling_ae_titles": self._settings.allowed_calling_ae_titles or "any"},
        )

    def stop(self) -> None:
        """Stop listening and abort the associations still open (blocks; call from a thread)."""
        if self._server is not None:  # a server the AE did not start, so its shutdown would miss it
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()

    def _on_established(self, event: Any) -> None:
        with self._lock:
            self._studies[id(event.assoc)] = set()
        metrics.ASSOCIATIONS.inc()

    def _on_store(self, event: Any) -> Dataset | int:
        requestor = event.assoc.requestor
        source = f"dimse:{str(requestor.ae_title).strip()}@{requestor.address}"
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("C-STORE from %s: could not read the data set", source)
            return _status(FailureReason.CANNOT_UNDERSTAND, "the data set could not be read")
        try:
            outcome = self._call(ingest(self._ports, [data], source), self._settings.store_timeout_seconds)[0]
        except TimeoutError:
            log.warning(
                "C-STORE from %s: ingestion took longer than %ss",
                source,
                self._settings.store_timeout_seconds,
            )
            return _status(FailureReason.OUT_OF_RESOURCES, "storage is too slow right now; try again")
        except Exception:
            log.exception("C-STORE from %s: ingestion failed", source)
            return _status(FailureReason.PROCESSING_FAILURE, "internal error while storing")
        if outcome.disposition is Disposition.STORED and outcome.study_uid:
            with self._lock:
                self._studies.setdefault(id(event.assoc), set()).add(outcome.study_uid)
        if outcome.succeeded:
            return SUCCESS
        assert outcome.failure_reason is not None  # a failed outcome always has its reason
        return _status(outcome.failure_reason, outcome.message)

    def _on_end(self, event: Any) -> None:
        with self._lock:
            studies = self._studies.pop(id(event.assoc), None)
        if studies is None:  # already handled (release, then connection close) or never established
            return
        metrics.ASSOCIATIONS.dec()
        if not studies:
            return
        try:
            self._call(end_of_burst(self._ports.metadata, studies), BOUNDARY_TIMEOUT_SECONDS)
        except Exception:
            log.exception("could not mark the end of the burst of studies %s", sorted(studies))

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine on the service's loop from a pynetdicom thread and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with ``SO_REUSEPORT``: the kernel spreads associations over the
    worker processes listening on the port (pynetdicom's ``server_bind`` sets only ``SO_REUSEADDR``)."""

    def server_bind(self) -> None:
        """Set ``SO_REUSEPORT``, then bind as pynetdicom does."""
        cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        """Stop serving and close the socket (not registered with the AE, so not removed from it)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _application_entity(settings: IngestionSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.dimse_timeout_seconds
    ae.acse_timeout = min(30.0, settings.dimse_timeout_seconds)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES[:3])
    return ae


def _status(reason: FailureReason, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment (LO: 64 characters of the default repertoire)."""
    status = Dataset()
    status.Status = int(reason)
    status.ErrorComment = "".join(c if 32 <= ord(c) < 127 and c != "\\" else "?" for c in comment)[:64]
    return status
