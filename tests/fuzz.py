"""A seeded fuzzer for the DICOM upper layer and DIMSE, speaking raw bytes over TCP.

Each :class:`Case` is a list of byte chunks sent on one connection. Cases start from valid
PDUs (built here after PS3.8 9.3) and mutate one thing: A-ASSOCIATE-RQ fields and items
(lengths, UIDs, AE titles with control characters, absurd maximum PDU sizes), or, after a valid
association, P-DATA with wrong context IDs, fragments out of order, truncated and oversized
PDVs, command sets with wrong types, data sets that lie about their lengths, and aborts (or a
closed socket) in the middle of an instance. Some cases store a valid instance first, so there
is something acknowledged to check. ``generate(seed, n)`` always yields the same cases;
:meth:`Case.hex` prints one so that it can become a regression test.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = b"1.2.840.10008.1.2"
EXPLICIT = b"1.2.840.10008.1.2.1"
CT_CONTEXT = 3  # CT Image Storage, Explicit VR Little Endian (see associate_rq)


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def presentation_context(context_id: int, abstract: bytes, syntaxes: list[bytes]) -> bytes:
    return _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, abstract)
                 + b"".join(_item(0x40, ts) for ts in syntaxes))


def user_information(max_pdu: int = 65536, impl_uid: bytes = b"1.2.826.0.1.3680043.10.1452.99",
                     extra: bytes = b"") -> bytes:
    return _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, impl_uid)
                 + _item(0x55, b"FUZZ") + extra)


def associate_rq(called: bytes = b"MSVLM", calling: bytes = b"FUZZER", items: bytes | None = None,
                 version: int = 1) -> bytes:
    if items is None:
        items = (_item(0x10, APPLICATION_CONTEXT)
                 + presentation_context(1, VERIFICATION, [IMPLICIT])
                 + presentation_context(CT_CONTEXT, CT_IMAGE_STORAGE, [EXPLICIT])
                 + user_information())
    body = (struct.pack(">HH", version, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16]
            + bytes(32) + items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)
ABORT = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)


def _encode_command(ds: Dataset) -> bytes:
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    body = fp.getvalue()
    return struct.pack("<HHIL", 0x0000, 0x0000, 4, len(body)) + body


def store_command(sop_uid: str, message_id: int = 1, **extra: object) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = CT_IMAGE_STORAGE.decode()
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 2
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_uid
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return _encode_command(ds)


def echo_command(message_id: int = 1) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = VERIFICATION.decode()
    ds.CommandField = 0x0030
    ds.MessageID = message_id
    ds.CommandDataSetType = 0x0101
    return _encode_command(ds)


def encode_dataset(ds: Dataset) -> bytes:
    """A data set as Explicit VR Little Endian bytes (what a C-STORE carries)."""
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@dataclass
class Case:
    """One connection's worth of bytes; ``stores`` maps SOP Instance UIDs of complete, valid
    C-STOREs in it to their data set bytes (they must be stored exactly if acknowledged)."""

    number: int
    kind: str
    chunks: list[bytes]
    stores: dict[str, bytes] = field(default_factory=dict)
    handshake: bool = True  # wait for the A-ASSOCIATE-AC after the first chunk
    sent: dict[str, bytes] = field(default_factory=dict)
    """Every data set put on the wire complete, mutated or not, by SOP Instance UID: if the
    node acknowledges one, it must have stored exactly these bytes."""
    maybe: set[str] = field(default_factory=set)
    """Instances sent whole but with random bytes changed: may be stored, must be readable."""

    def hex(self) -> str:
        return f"case {self.number} ({self.kind}):\n" + "\n".join(
            f"  chunk {n}: {chunk.hex()}" for n, chunk in enumerate(self.chunks))


class Fuzzer:
    """Cases built around one template CT data set (a small image)."""

    def __init__(self, template: Dataset, seed: int) -> None:
        self.template = template
        self.rng = random.Random(seed)
        self.seed = seed

    # -- pieces -------------------------------------------------------------------------------
    def instance(self) -> tuple[str, bytes]:
        ds = self.template.copy()
        uid = generate_uid(prefix="1.2.826.0.1.3680043.10.1452.",
                           entropy_srcs=[str(self.seed), str(self.rng.random())])
        ds.SOPInstanceUID = uid
        return uid, encode_dataset(ds)

    def store(self, message_id: int = 1) -> tuple[bytes, str, bytes]:
        """A complete, valid C-STORE in one P-DATA per fragment."""
        uid, data = self.instance()
        out = p_data(pdv(CT_CONTEXT, 0x03, store_command(uid, message_id)))
        for start in range(0, len(data), 16000):
            last = start + 16000 >= len(data)
            out += p_data(pdv(CT_CONTEXT, 0x02 if last else 0x00, data[start:start + 16000]))
        return out, uid, data

    def garbage(self, size: int | None = None) -> bytes:
        return self.rng.randbytes(size if size is not None else self.rng.randint(0, 64))

    def flip(self, data: bytes, count: int = 3) -> bytes:
        out = bytearray(data)
        for _ in range(count):
            if out:
                out[self.rng.randrange(len(out))] = self.rng.randrange(256)
        return bytes(out)

    def odd_uid(self) -> bytes:
        return self.rng.choice([
            b"", b"1.2.3.", b"1..2", b"abc.def", b"1.2.3\x00", b"9" * 70, b"1.2.3" + b"\x00" * 40,
            b"1.2.840.10008.1.2.1\x00\x00", self.garbage(20), b"1." + b"2." * 200 + b"3",
            b"1.2.840.10008.5.1.4.1.1.2" * 3])

    def odd_ae(self) -> bytes:
        return self.rng.choice([
            b"", b" " * 16, b"MS\x00VLM", b"\x01\x02\x03\x1b[2J", b"MSVLM\r\n", b"\\\\",
            "MSVLM\u00e9".encode("latin-1"), self.garbage(16), b"MSVLM" * 4])

    # -- association request mutations --------------------------------------------------------
    def associate_case(self, n: int) -> Case:
        r = self.rng
        kind = r.choice(["pdu-length", "version", "called", "calling", "app-context",
                         "context-uids", "context-id", "many-contexts", "no-contexts",
                         "max-pdu", "user-info", "item-length", "truncated", "flips",
                         "extra-bytes", "unknown-pdu"])
        good = associate_rq()
        if kind == "pdu-length":
            length = r.choice([0, 1, 67, len(good) - 7, len(good) + 500, 0xFFFFFFFF, 2**31])
            data = good[:2] + struct.pack(">I", length) + good[6:]
        elif kind == "version":
            data = associate_rq(version=r.choice([0, 2, 0xFFFF]))
        elif kind == "called":
            data = associate_rq(called=self.odd_ae())
        elif kind == "calling":
            data = associate_rq(calling=self.odd_ae())
        elif kind == "app-context":
            data = associate_rq(items=_item(0x10, self.odd_uid())
                                + presentation_context(1, VERIFICATION, [IMPLICIT])
                                + user_information())
        elif kind == "context-uids":
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT) + presentation_context(
                1, self.odd_uid(), [self.odd_uid() for _ in range(r.randint(0, 3))])
                + user_information())
        elif kind == "context-id":
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT) + presentation_context(
                r.choice([0, 2, 4, 255]), VERIFICATION, [IMPLICIT]) + user_information())
        elif kind == "many-contexts":
            contexts = b"".join(presentation_context((2 * k + 1) % 256, CT_IMAGE_STORAGE,
                                                     [EXPLICIT, IMPLICIT])
                                for k in range(r.choice([127, 128, 200, 400])))
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT) + contexts
                                + user_information())
        elif kind == "no-contexts":
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT) + user_information())
        elif kind == "max-pdu":
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT)
                                + presentation_context(1, VERIFICATION, [IMPLICIT])
                                + user_information(max_pdu=r.choice([0, 1, 7, 0xFFFFFFFF])))
        elif kind == "user-info":
            extra = r.choice([_item(0x53, b"\x00"), _item(0x54, b"\x00\x05abc"),
                              _item(0x58, self.garbage()), _item(0x59, b""),
                              _item(0x51, b"\x00"), self.garbage(10)])
            data = associate_rq(items=_item(0x10, APPLICATION_CONTEXT)
                                + presentation_context(1, VERIFICATION, [IMPLICIT])
                                + user_information(impl_uid=r.choice([self.odd_uid(),
                                                                      b"1.2.3"]), extra=extra))
        elif kind == "item-length":  # one item's length field lies
            items = bytearray(good[74:])
            offset = r.choice([0, 2 + len(APPLICATION_CONTEXT) + 2])
            struct.pack_into(">H", items, offset + 2, r.choice([0, 1, 0xFFFF, len(items)]))
            data = good[:74] + bytes(items)
        elif kind == "truncated":
            data = good[:r.randrange(1, len(good))]
        elif kind == "flips":
            data = good[:6] + self.flip(good[6:], r.randint(1, 8))
        elif kind == "extra-bytes":
            data = good + self.garbage(r.randint(1, 200))
        else:
            data = bytes([r.choice([0x00, 0x02, 0x03, 0x08, 0x09, 0xFF]), 0]) \
                + struct.pack(">I", 4) + bytes(4)
        return Case(n, f"associate/{kind}", [data], handshake=False)

    # -- after a valid association ------------------------------------------------------------
    def data_case(self, n: int) -> Case:
        r = self.rng
        kind = r.choice(["wrong-context", "dataset-first", "last-flag-early", "truncated-pdv",
                         "oversized-pdv", "zero-pdv", "command-types", "unknown-command",
                         "no-dataset-sent", "lying-dataset", "abort-mid-instance",
                         "close-mid-instance", "flipped-pdata", "release-then-data",
                         "ac-from-client", "huge-pdu", "echo-then-garbage"])
        chunks = [associate_rq()]
        stores: dict[str, bytes] = {}
        if r.random() < 0.3:  # a valid instance first: acknowledged, it must be kept exactly
            valid, uid, data = self.store(message_id=1)
            chunks.append(valid)
            stores[uid] = data
        uid, data = self.instance()
        half = data[:r.randrange(1, len(data))]
        cmd = store_command(uid, 2)
        sent = dict(stores)
        if kind in ("wrong-context", "dataset-first", "command-types", "unknown-command",
                    "release-then-data"):
            sent[uid] = data
        elif kind == "last-flag-early":  # the data set ends after ``half``: maybe still valid
            sent[uid] = half
        if kind == "wrong-context":
            chunks.append(p_data(pdv(r.choice([0, 2, 5, 7, 255]), 0x03, cmd),
                                 pdv(CT_CONTEXT, 0x02, data)))
        elif kind == "dataset-first":
            chunks.append(p_data(pdv(CT_CONTEXT, 0x02, data), pdv(CT_CONTEXT, 0x03, cmd)))
        elif kind == "last-flag-early":
            chunks.append(p_data(pdv(CT_CONTEXT, 0x01, cmd[:10]), pdv(CT_CONTEXT, 0x03, cmd[10:]),
                                 pdv(CT_CONTEXT, 0x02, half), pdv(CT_CONTEXT, 0x00, data)))
        elif kind == "truncated-pdv":  # the PDV says more than the PDU holds
            body = struct.pack(">IBB", len(cmd) + 500, CT_CONTEXT, 0x03) + cmd
            chunks.append(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        elif kind == "oversized-pdv":  # the PDU says more than is ever sent
            body = pdv(CT_CONTEXT, 0x03, cmd)
            chunks.append(struct.pack(">BBI", 0x04, 0, len(body) + r.choice([1, 1000, 2**30]))
                          + body)
        elif kind == "zero-pdv":
            chunks.append(struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">IBB", 0, CT_CONTEXT, 3))
        elif kind == "command-types":
            bad = r.choice([{"MessageID": None}, {"Priority": 9}, {"CommandDataSetType": 0x0101},
                            {"AffectedSOPClassUID": "1.2.3.x"}, {"AffectedSOPInstanceUID": ""},
                            {"MoveOriginatorMessageID": 5}])
            if "MessageID" in bad:
                cmd = self.flip(cmd, 4)
            else:
                cmd = store_command(uid, 2, **bad)
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x02, data)))
        elif kind == "unknown-command":
            ds_cmd = store_command(uid, 2, CommandField=r.choice([0x0020, 0x0021, 0x7777, 0x8001]))
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, ds_cmd), pdv(CT_CONTEXT, 0x02, data)))
        elif kind == "no-dataset-sent":
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd)))
            chunks.append(RELEASE_RQ)
        elif kind == "lying-dataset":
            lie = bytearray(data)
            # two bytes somewhere (often a length field) made huge or odd, maybe a tail
            offset = r.randrange(0, max(1, len(lie) - 8))
            struct.pack_into("<H", lie, offset, r.choice([0xFFFF, 0x7FFF, 1, 3]))
            if r.random() < 0.5:
                lie += self.garbage(r.randint(1, 32))
            sent[uid] = bytes(lie)
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x02, bytes(lie))))
        elif kind == "abort-mid-instance":
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x00, half)))
            chunks.append(ABORT)
        elif kind == "close-mid-instance":
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x00, half)))
        elif kind == "flipped-pdata":
            good = p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x02, data))
            chunks.append(good[:6] + self.flip(good[6:], r.randint(1, 6)))
        elif kind == "release-then-data":
            chunks.append(RELEASE_RQ)
            chunks.append(p_data(pdv(CT_CONTEXT, 0x03, cmd), pdv(CT_CONTEXT, 0x02, data)))
        elif kind == "ac-from-client":
            chunks.append(b"\x02" + associate_rq()[1:])
        elif kind == "huge-pdu":
            body = pdv(CT_CONTEXT, 0x03, cmd) + pdv(CT_CONTEXT, 0x00, self.garbage(200_000))
            chunks.append(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        else:
            chunks.append(p_data(pdv(1, 0x03, echo_command(3))))
            chunks.append(self.garbage(r.randint(1, 300)))
        return Case(n, f"data/{kind}", chunks, stores, sent=sent,
                    maybe={uid} if kind == "flipped-pdata" else set())

    def cases(self, count: int, start: int = 0) -> list[Case]:
        """The next ``count`` cases, numbered from ``start``."""
        return [self.associate_case(n) if self.rng.random() < 0.4 else self.data_case(n)
                for n in range(start, start + count)]


# -- the client side ---------------------------------------------------------------------------
def _read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    head = _read_exact(sock, 6)
    if head is None:
        return None
    kind, _, length = struct.unpack(">BBI", head)
    body = _read_exact(sock, length)
    return None if body is None else (kind, body)


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    out = b""
    while len(out) < size:
        try:
            chunk = sock.recv(size - len(out))
        except (socket.timeout, OSError):
            return None
        if not chunk:
            return None
        out += chunk
    return out


def _store_statuses(body: bytes) -> list[tuple[str, int]]:
    """(Affected SOP Instance UID, Status) of the C-STORE-RSPs in one P-DATA-TF body."""
    out = []
    offset = 0
    while offset + 6 <= len(body):
        length, _, control = struct.unpack(">IBB", body[offset:offset + 6])
        data = body[offset + 6:offset + 4 + length]
        offset += 4 + length
        if control & 0x01:  # a command fragment (responses fit in one)
            try:
                ds = pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(data), True,
                                                     True)
                if int(ds.CommandField) == 0x8001:
                    out.append((str(ds.AffectedSOPInstanceUID), int(ds.Status)))
            except Exception:  # noqa: BLE001 - a response we cannot read proves nothing
                continue
    return out


def run_case(port: int, case: Case, idle_s: float = 0.1) -> dict[str, int]:
    """Send one case; return the C-STORE statuses the node answered (by SOP Instance UID).
    The connection is closed at the end whatever state it is in (the node must cope)."""
    statuses: dict[str, int] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(case.chunks[0])
            sock.settimeout(2.0 if case.handshake else 3 * idle_s)
            reply = _read_pdu(sock)  # A-ASSOCIATE-AC/RJ, an A-ABORT, or nothing
            if not case.handshake or reply is None or reply[0] != 0x02:
                return statuses
            for chunk in case.chunks[1:]:
                sock.sendall(chunk)
                if case.stores and not statuses:  # wait for the valid store's answer
                    sock.settimeout(2.0)
                    while not statuses:
                        reply = _read_pdu(sock)
                        if reply is None:
                            return statuses
                        if reply[0] == 0x04:
                            statuses.update(_store_statuses(reply[1]))
            sock.settimeout(idle_s)
            while True:
                reply = _read_pdu(sock)
                if reply is None:
                    break
                if reply[0] == 0x04:
                    statuses.update(_store_statuses(reply[1]))
        except OSError:  # reset by the node: an answer too
            pass
    return statuses
