"""The DICOM SCP: association policy, C-ECHO and C-STORE.

The C-STORE handler never decodes pixels and never touches the database: it parses the header of
the received bytes, validates the UIDs, writes the file durably into the store's ``incoming/``
spool and answers. The indexer (:mod:`storage.indexer`) moves spooled files into the index within
a fraction of a second; after a crash, start-up reconciliation does. Several receiving processes
can share one listening socket (:class:`NodeServer`), which is how ingest uses more than one core.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import socket
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, cast

import pydicom.config
import pynetdicom._config
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node import metrics
from node.audit import AuditTrail
from node.config import Config, DuplicatePolicy
from storage.files import FileStore, dataset_offset, file_meta_bytes
from storage.header import scan_identifiers
from storage.uids import check_uid

logger = logging.getLogger(__name__)

STORE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
    JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
]
"""Transfer syntaxes accepted for every storage SOP class; files are stored as received."""

# C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
WRITE_FAILED = 0xA701
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
DUPLICATE_SOP_INSTANCE = 0x0111

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
ADDRESS_BUCKETS = 1024
"""Hash buckets of remote addresses for ``max_associations_per_address`` (per process)."""
STUDY_BUCKETS = 4096
"""Hash buckets of Study Instance UIDs for the open associations holding each (per process)."""


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every storage SOP class pynetdicom knows, each with all syntaxes."""
    contexts = [build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]  # type: ignore[arg-type]
    for uid in _STORAGE_CLASSES.values():
        contexts.append(build_context(uid, STORE_TRANSFER_SYNTAXES))  # type: ignore[arg-type]
    return contexts


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class AssociationStats:
    stored: int = 0
    failed: int = 0
    studies: set[str] = field(default_factory=set)
    """Studies this association stored instances of (each counted once in ``open_studies``)."""
    statuses: dict[str, int] = field(default_factory=dict)
    """C-STORE statuses answered (``"0x0000"``: count)."""
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class StoreHandler:
    """Handles EVT_C_STORE: durable write into the spool, then a status.

    Parameters
    ----------
    config : Config
        The node configuration (duplicate policy, free-space floor, our AE title).
    store : FileStore
        Where files are written.
    open_studies : SharedCounts, optional
        Associations holding each study, over all receiving processes (the association
        completion cue); a private counter by default.
    """

    def __init__(self, config: Config, store: FileStore,
                 open_studies: SharedCounts | None = None) -> None:
        import multiprocessing

        self.store = store
        self.open_studies = open_studies or SharedCounts(
            multiprocessing.Array("i", STUDY_BUCKETS), 0, STUDY_BUCKETS)
        self.policy = config.storage.duplicate_policy
        self.min_free_bytes = config.storage.min_free_bytes
        self.ae_title = config.node.ae_title
        self.known_ae_titles = frozenset(p.ae_title for p in config.peers.values())
        """Metric label values: a calling AE title outside ``[peers]`` counts as ``unknown``."""
        self.stats: dict[int, AssociationStats] = {}

    def __call__(self, event: evt.Event) -> int | Dataset:
        """Store one instance.

        Returns
        -------
        int or pydicom.dataset.Dataset
            The status (with an Error Comment on failure):

            - ``0x0000`` Success: the file is durable in the spool, or an identical copy is
              already stored, or (policy ``keep``) a different copy is kept.
            - ``0x0111`` Duplicate SOP Instance: policy ``reject`` and different bytes stored.
            - ``0xA700`` Out of resources: free space below ``min_free_bytes`` or disk full.
            - ``0xA701`` Out of resources: the write or fsync failed.
            - ``0xA900`` Data set does not match SOP class: SOP Class/Instance UID in the data
              set differ from the request's Affected SOP Class/Instance UID.
            - ``0xC210`` Cannot understand: the data set cannot be parsed or holds invalid UIDs.
        """
        assoc = event.assoc
        stats = self.stats.setdefault(id(assoc), AssociationStats())
        status, study_uid = self._store(event)
        code = status if isinstance(status, int) else int(status.Status)
        key = f"0x{code:04X}"
        stats.statuses[key] = stats.statuses.get(key, 0) + 1
        size = len(event.request.DataSet.getbuffer())
        stats.bytes += size
        calling = str(assoc.requestor.ae_title).strip()
        metrics.instance(calling if calling in self.known_ae_titles else "unknown", key, size)
        if code == SUCCESS:
            stats.stored += 1
            if study_uid is not None and study_uid not in stats.studies:
                stats.studies.add(study_uid)
                self.open_studies.add(study_uid, 1)
        else:
            stats.failed += 1
        return status

    def closed(self, assoc: Any) -> AssociationStats | None:
        """The association ended: its studies are no longer held by it. After a release (not
        an abort), the studies no other association holds are recorded as released."""
        stats = self.stats.pop(id(assoc), None)
        if stats is None:
            return None
        free = [uid for uid in sorted(stats.studies)
                if self.open_studies.add(uid, -1) and self.open_studies.total(uid) <= 0]
        if free and assoc.is_released:
            try:
                self.store.write_release(time.time_ns(), free)
            except OSError as exc:  # the quiet period still completes these studies
                logger.error("Association release not recorded: %s", exc.strerror)
        return stats

    def _store(self, event: evt.Event) -> tuple[int | Dataset, str | None]:
        """(status, Study Instance UID once known)."""
        request: Any = event.request
        raw = request.DataSet.getbuffer()
        ts = event.context.transfer_syntax
        try:
            ids = scan_identifiers(raw, ts)
            sop_class = check_uid(ids.get("SOPClassUID"), "SOPClassUID")
            sop_uid = check_uid(ids.get("SOPInstanceUID"), "SOPInstanceUID")
            study_uid = check_uid(ids.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = check_uid(ids.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except ValueError as exc:
            logger.warning("C-STORE refused from %s: %s", _peer(event), exc)
            return _status(CANNOT_UNDERSTAND, str(exc)), None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad bytes
            logger.warning("C-STORE refused from %s: cannot parse data set (%s)", _peer(event),
                           type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "data set cannot be parsed"), None
        if sop_class != request.AffectedSOPClassUID or sop_uid != request.AffectedSOPInstanceUID:
            logger.warning("C-STORE refused from %s: data set UIDs differ from the request "
                           "(study %s)", _peer(event), study_uid)
            return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                           "SOP Class/Instance UID differ from the request"), study_uid
        if self.min_free_bytes and self.store.free_bytes() - len(raw) < self.min_free_bytes:
            logger.error("C-STORE refused from %s: free space below min_free_bytes (study %s)",
                         _peer(event), study_uid)
            return _status(OUT_OF_RESOURCES, "storage below its free-space floor"), study_uid

        existing = self.store.existing(study_uid, series_uid, sop_uid)
        if existing is not None:
            try:
                identical = _same_dataset(existing, raw)
            except FileNotFoundError:  # moved by the indexer meanwhile: look again
                existing = self.store.existing(study_uid, series_uid, sop_uid)
                identical = existing is not None and _same_dataset(existing, raw)
            if identical:
                return SUCCESS, study_uid
            if existing is not None and self.policy is not DuplicatePolicy.OVERWRITE:
                logger.warning("Duplicate SOP Instance %s with different bytes from %s (study "
                               "%s): %s", sop_uid, _peer(event), study_uid,
                               "kept the stored one" if self.policy is DuplicatePolicy.KEEP
                               else "refused")
                if self.policy is DuplicatePolicy.KEEP:
                    return SUCCESS, study_uid
                return (_status(DUPLICATE_SOP_INSTANCE, "different instance with this UID stored"),
                        study_uid)
            logger.info("Duplicate SOP Instance %s from %s replaces the stored one (study %s)",
                        sop_uid, _peer(event), study_uid)

        requestor = event.assoc.requestor
        meta = file_meta_bytes(sop_class, sop_uid, ts, requestor.ae_title,
                               f"dicom://{requestor.address}:{requestor.port}", self.ae_title)
        try:
            self.store.write_incoming(sop_uid, (meta, raw))
        except OSError as exc:
            logger.error("C-STORE from %s could not be written (study %s): %s", _peer(event),
                         study_uid, exc.strerror)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                return _status(OUT_OF_RESOURCES, "storage full"), study_uid
            return _status(WRITE_FAILED, "storage write failed"), study_uid
        return SUCCESS, study_uid


def _same_dataset(path: Any, raw: memoryview) -> bool:
    with open(path, "rb") as f:
        data = f.read()
    return memoryview(data)[dataset_offset(data[:4096]):] == raw


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title!r}@{requestor.address}"


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success (0x0000)."""
    return SUCCESS


class NodeACSE(ACSE):
    """ACSE with the node's association policy, checked before context negotiation."""

    def _negotiate_as_acceptor(self) -> None:
        server: Any = self.assoc._server
        policy: AssociationPolicy = server.policy
        rq: Any = self.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        address = self.assoc.requestor.address
        reason = policy.check(calling, called, address, server.refresh_active())
        if reason is None:
            super()._negotiate_as_acceptor()
            return
        logger.warning("Association from %r@%s to %r rejected: %s", calling, address, called,
                       reason[0])
        server.audit.record("association", calling=calling, called=called, address=address,
                            accepted=False, reason=reason[0],
                            rejection=list(reason[1]))
        metrics.association(False, rejection=reason[1])
        self.send_reject(*reason[1])
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate: called AE, known calling AE + address, association limit."""

    config: Config

    def check(self, calling: str, called: str, address: str,
              active: int) -> tuple[str, tuple[int, int, int]] | None:
        node = self.config.node
        if node.require_called_ae_title and called != node.ae_title:
            return f"called AE title {called!r} is not {node.ae_title!r}", REJECT_CALLED_AE
        if not node.accept_unknown_peers and self.config.peer_for_store(calling, address) is None:
            return ("calling AE title and address match no [peers] entry with allow_store",
                    REJECT_CALLING_AE)
        if active > node.max_associations:
            return f"{active - 1} associations active (max_associations)", REJECT_LOCAL_LIMIT
        return None


def _ui(tag_element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _us(tag_element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, tag_element, 2, value)


def encode_store_success(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RSP with status Success (implicit VR little endian)."""
    body = b"".join([
        _ui(0x0002, sop_class_uid), _us(0x0100, 0x8001), _us(0x0120, message_id),
        _us(0x0800, 0x0101), _us(0x0900, SUCCESS), _ui(0x1000, sop_instance_uid),
    ])
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class NodeDIMSE(DIMSEServiceProvider):
    """Sends Success C-STORE responses from a prebuilt command set.

    pynetdicom encodes every response through a pydicom Dataset, twice (once to measure the group
    length): about a third of the CPU a received instance costs. A Success response has fixed
    content, so it is packed directly; every other message goes through pynetdicom.
    """

    def receive_primitive(self, primitive: Any) -> None:
        """pynetdicom's, except that a command set it cannot decode (an unknown Command Field,
        wrong value types) aborts this association instead of killing its DUL thread."""
        try:
            super().receive_primitive(primitive)
        except Exception as exc:  # noqa: BLE001 - anything a peer's bytes provoke
            requestor = self.assoc.requestor
            logger.warning("Undecodable DIMSE message from %r@%s (%s): aborting the association",
                           requestor.ae_title, requestor.address, type(exc).__name__)
            logger.debug("Undecodable DIMSE message", exc_info=True)
            self.message = None
            self.dul.event_queue.put("Evt19")

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status == SUCCESS and primitive.ErrorComment is None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID):
            command = encode_store_success(primitive.AffectedSOPClassUID,
                                           primitive.AffectedSOPInstanceUID,
                                           primitive.MessageIDBeingRespondedTo)
            if self.maximum_pdu_size == 0 or len(command) + 6 <= self.maximum_pdu_size:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class NodeAssociation(Association):
    """An acceptor association that waits on its message queue instead of polling it.

    pynetdicom's acceptor loop sleeps 1 ms before each look at the DIMSE queue, which adds up
    to a millisecond to every C-STORE on an association where the sender waits for each
    response. This loop is pynetdicom 3.0's ``_run_reactor`` with that sleep replaced by a
    wait of at most 1 ms on the queue, so a message is served the moment it is complete.
    """

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self.dimse = NodeDIMSE(self)
        self.client_address: Any = None

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._server.address_limit.release(self.client_address)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=0.001)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.warning("Network timeout: aborting the association from %r@%s",
                               self.requestor.ae_title, self.requestor.address)
                self.abort()
                self.kill()
                return


class NodeRequestHandler(RequestHandler):
    """Creates each acceptor association with the node's ACSE and shared (not copied) contexts.

    pynetdicom deep-copies the supported contexts for every association (about a second for
    every storage SOP class x 13 transfer syntaxes); negotiation only reads them, so one list
    is shared.
    """

    def _create_association(self) -> Association:
        assoc = NodeAssociation(self.ae, "acceptor")
        assoc._server = self.server
        assoc.client_address = self.client_address
        assoc.name = f"AcceptorThread@{self.client_address[0]}:{self.client_address[1]}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = self.server.contexts  # shared, read-only
        assoc.requestor.address_info = self.remote
        assoc.acse = NodeACSE(assoc)
        # The DUL reactor sleeps this long whenever the socket had nothing for it; the default
        # 1 ms is paid once per C-STORE on a one-at-a-time sender.
        assoc.dul._run_loop_delay = 0.0001
        server: Any = self.server
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


class SharedCounts:
    """Counters by key over all receiving processes of this node.

    ``counts`` is a shared array of ``processes x buckets``; each process writes its own row
    (zeroed when the process is restarted, so a crashed process's counts go with it) and keys
    are hashed into buckets: two keys in one bucket share a count (rare with a thousand
    buckets, and never more permissive).
    """

    def __init__(self, counts: Any, slot: int, buckets: int) -> None:
        self.counts = counts
        self.buckets = buckets
        self.row = slot * buckets

    def _bucket(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.buckets

    def total(self, key: str) -> int:
        bucket = self._bucket(key)
        with self.counts.get_lock():
            return int(sum(self.counts[bucket::self.buckets]))

    def add(self, key: str, delta: int, limit: int | None = None) -> bool:
        """Add ``delta`` to this process's count of ``key``; with ``limit``, only while the
        total over all processes stays at or below it (returns whether it was added)."""
        bucket = self._bucket(key)
        with self.counts.get_lock():
            if limit is not None and sum(self.counts[bucket::self.buckets]) + delta > limit:
                return False
            self.counts[self.row + bucket] += delta
            return True


class AddressLimit:
    """Open connections per remote address over all receiving processes, so that one address
    that opens connections and sends nothing (or opens many) cannot lock out a scanner."""

    def __init__(self, limit: int, counts: SharedCounts, audit: AuditTrail | None = None) -> None:
        self.limit = limit
        self.counts = counts
        self.audit = audit
        self._admitted: dict[Any, str] = {}
        self._refused: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, client_address: Any) -> bool:
        host = str(client_address[0])
        if not self.counts.add(host, 1, self.limit):
            self._log_refusal(host)
            metrics.association(False, reason="max_associations_per_address")
            return False
        with self._lock:
            self._admitted[client_address] = host
        return True

    def release(self, client_address: Any) -> None:
        with self._lock:
            host = self._admitted.pop(client_address, None)
        if host is not None:
            self.counts.add(host, -1)

    def _log_refusal(self, host: str) -> None:
        """One warning per address and minute (a greedy client opens many connections)."""
        now = time.monotonic()
        since, count = self._refused.get(host, (0.0, 0))
        if now - since >= 60:
            logger.warning("Connection from %s closed: %d connections open from that address "
                           "(max_associations_per_address)%s", host, self.limit,
                           f"; {count} more refused in the last minute" if count else "")
            if self.audit is not None:
                self.audit.record("connection_refused", address=host,
                                  reason="max_associations_per_address",
                                  refused_in_last_minute=count + 1)
            self._refused[host] = (now, 0)
        else:
            self._refused[host] = (since, count + 1)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a (possibly shared) listening socket.

    Parameters
    ----------
    listen_socket : socket.socket
        A bound, listening socket, possibly shared with sibling processes.
    active : sequence of int
        Shared counters of active associations, one slot per receiving process.
    slot : int
        This process's slot in ``active``.
    address_limit : AddressLimit
        Connections per remote address (checked before any PDU is read).
    """

    def __init__(self, ae: AE, listen_socket: socket.socket, ae_title: str,
                 contexts: list[PresentationContext], ssl_context: ssl.SSLContext | None,
                 evt_handlers: list[Any], policy: AssociationPolicy,
                 active: Any, slot: int, address_limit: AddressLimit) -> None:
        self._listen_socket = listen_socket
        self.policy = policy
        self.active = active
        self.slot = slot
        self.address_limit = address_limit
        self.audit = address_limit.audit or AuditTrail(None)
        super().__init__(ae, listen_socket.getsockname()[:2], ae_title, contexts, ssl_context,
                         evt_handlers, request_handler=NodeRequestHandler)
        self.daemon_threads = True

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the unbound socket TCPServer made; ours is already bound
        self.socket = self._listen_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening (the socket is created by the node)."""

    def server_close(self) -> None:
        self._listen_socket.close()  # never shutdown(): siblings share the listening socket

    def _handle_request_noblock(self) -> None:  # type: ignore[override]
        # Leave a new connection to a less busy sibling process, so concurrent senders spread
        # over the cores; the sibling's select() sees the same pending connection.
        mine = self.active[self.slot]
        if len(self.active) > 1 and mine > min(self.active[:]):
            threading.Event().wait(0.002)
            return
        super()._handle_request_noblock()  # type: ignore[misc]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self._listen_socket.accept()  # BlockingIOError: a sibling won
        client.setblocking(True)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, so a slow or silent
        # client cannot hold up the accept loop.
        if self.ssl_context is not None:
            try:
                request.settimeout(self.ae.acse_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                request.close()
                self.address_limit.release(client_address)
                return
        super().process_request_thread(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.address_limit.release(client_address)  # no association thread was started
        super().handle_error(request, client_address)

    def refresh_active(self) -> int:
        """Publish this process's count of live associations; return the total of all."""
        self.active[self.slot] = len(self.active_associations)
        return sum(self.active[:])

    def service_actions(self) -> None:
        super().service_actions()
        self.refresh_active()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.address_limit.admit(client_address):
            request.close()  # before any PDU: a greedy address gets no thread and no reply
            return
        with self.active.get_lock():
            self.active[self.slot] += 1  # provisional until the association thread runs
        super().process_request(request, client_address)


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context from ``[tls]``, or ``None`` when TLS is off."""
    tls = config.tls
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    return context


def listen_socket(config: Config) -> socket.socket:
    """Bind and listen on ``[node] bind_address`` and ``port``."""
    family = socket.AF_INET6 if ":" in config.node.bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.node.bind_address, config.node.port))
    sock.listen(128)
    return sock


def configure_receive_process() -> None:
    """Process-wide settings for a receiving process.

    pydicom's value validation runs for every file meta and response encoded; the values we
    encode are validated by us (UIDs) or by pynetdicom, so validation is switched off here.
    """
    pynetdicom._config.LOG_HANDLER_LEVEL = "none"  # no per-PDU/DIMSE debug formatting
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pynetdicom"):
            logging.getLogger(name).addFilter(_PEER_ERRORS)
    threading.excepthook = _thread_crash


class _PeerErrorFilter(logging.Filter):
    """pynetdicom logs a traceback (and often the bare exception text as the message) for every
    malformed PDU a peer sends; keep its one-line messages and leave the rest to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logger.isEnabledFor(logging.DEBUG):
            return True
        if isinstance(record.msg, BaseException):  # LOGGER.exception(exc): no sentence
            return False
        record.exc_info, record.exc_text = None, None
        return bool(record.getMessage().strip())


_PEER_ERRORS = _PeerErrorFilter()


def _thread_crash(args: threading.ExceptHookArgs) -> None:
    """An uncaught exception in a connection's thread ends that connection only: one log line,
    the traceback at DEBUG."""
    name = args.thread.name if args.thread is not None else "?"
    logger.error("Connection thread %s ended by an internal error (%s); the node goes on",
                 name, args.exc_type.__name__)
    logger.debug("Traceback of %s", name, exc_info=(args.exc_type, args.exc_value,
                                                    args.exc_traceback))


class Receiver:
    """One receiving AE on a listening socket, serving in background threads.

    Parameters
    ----------
    config : Config
        The node configuration.
    store : FileStore
        Where instances are written.
    sock : socket.socket
        A bound, listening socket (see :func:`listen_socket`); may be shared across processes.
    active : multiprocessing.Array, optional
        Shared association counters; a private one-slot array by default.
    slot : int
        This receiver's slot in ``active``.
    """

    def __init__(self, config: Config, store: FileStore, sock: socket.socket,
                 active: Any = None, slot: int = 0, per_address: Any = None,
                 open_studies: Any = None) -> None:
        import multiprocessing

        configure_receive_process()
        self.config = config
        if per_address is None:
            per_address = multiprocessing.Array("i", (slot + 1) * ADDRESS_BUCKETS)
        if open_studies is None:
            open_studies = multiprocessing.Array("i", (slot + 1) * STUDY_BUCKETS)
        self.store_handler = StoreHandler(config, store,
                                          SharedCounts(open_studies, slot, STUDY_BUCKETS))
        self.audit = AuditTrail.from_config(config)
        self.ae = AE(ae_title=config.node.ae_title)
        self.ae.maximum_associations = max(config.node.max_associations * 2, 10)
        self.ae.maximum_pdu_size = config.node.max_pdu_bytes
        self.ae.acse_timeout = config.node.acse_timeout_s
        self.ae.dimse_timeout = config.node.dimse_timeout_s
        self.ae.network_timeout = config.node.network_timeout_s
        self.ae.require_called_aet = False  # checked by AssociationPolicy
        active = active if active is not None else multiprocessing.Array("i", 1)
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.store_handler),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self.server = NodeServer(self.ae, sock, config.node.ae_title, supported_contexts(),
                                 make_ssl_context(config), handlers, AssociationPolicy(config),
                                 active, slot, AddressLimit(
                                     config.node.max_associations_per_address,
                                     SharedCounts(per_address, slot, ADDRESS_BUCKETS),
                                     self.audit))
        self.ae._servers.append(self.server)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def reload(self, config: Config) -> None:
        """Apply a reloaded configuration to the associations that start from now on (those in
        flight finish under the rules they were accepted with): peers and the association
        policy, duplicate policy, free-space floor, per-address limit, audit settings."""
        self.config = config
        self.server.policy = AssociationPolicy(config)
        handler = self.store_handler
        handler.policy = config.storage.duplicate_policy
        handler.min_free_bytes = config.storage.min_free_bytes
        handler.known_ae_titles = frozenset(p.ae_title for p in config.peers.values())
        self.server.address_limit.limit = config.node.max_associations_per_address
        audit = AuditTrail.from_config(config)
        self.audit.path, self.audit.journal = audit.path, audit.journal

    def _on_established(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        self.store_handler.stats.setdefault(id(event.assoc), AssociationStats())
        metrics.association(True)
        logger.info("Association from %r@%s:%s accepted", r.ae_title, r.address, r.port)

    def _on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        stats = self.store_handler.closed(assoc)
        if stats is not None:
            r = assoc.requestor
            logger.info("Association from %r@%s closed: %d stored, %d failed", r.ae_title,
                        r.address, stats.stored, stats.failed)
            self.audit.record(
                "association", calling=str(r.ae_title).strip(),
                called=str(assoc.acceptor.ae_title).strip(), address=r.address, port=r.port,
                accepted=True, ended="released" if assoc.is_released else "aborted",
                stored=stats.stored, failed=stats.failed, statuses=stats.statuses,
                studies=sorted(stats.studies), bytes=stats.bytes,
                duration_s=round(time.monotonic() - stats.started, 3))

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.2,),
                                        name="msvlm-accept", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.server.serve_forever(0.2)

    def stop(self) -> None:
        """Stop accepting, abort open associations and close the socket."""
        self.server.shutdown()
        for assoc in list(self.server.active_associations):
            assoc.abort()


def set_parent_death_signal(sig: int) -> None:
    """Linux: deliver ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)
    except OSError:  # pragma: no cover - not Linux
        pass
