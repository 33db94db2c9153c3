"""The SQLAlchemy index of studies, series and instances, and how files get into it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from alembic import command
from alembic.config import Config as AlembicConfig
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, delete, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import classify
from storage.files import FileStore
from storage.header import read_header_file
from storage.schema import (
    Instance, NodeIdentity, Series, SliceEmbedding, Study, StudyState,
)
from storage.uids import check_uid

logger = logging.getLogger(__name__)

_ALEMBIC_INI = Path(__file__).with_name("alembic.ini")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives a crash of the process; the files in incoming/ cover
    # the rest (they are the durable record until their rows are committed).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_index_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode, a busy timeout and foreign keys."""
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision.

    Processes starting together (a node and its workers, several nodes) take turns: an advisory
    lock on PostgreSQL, a file lock beside an SQLite database. The whole upgrade is one
    transaction on both, so a process killed during it leaves the schema as it found it.
    """
    cfg = AlembicConfig(str(_ALEMBIC_INI))
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    lock_fd = None
    if database and database != ":memory:":
        lock_fd = os.open(f"{database}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(7403201)"))
            elif engine.dialect.name == "sqlite":
                # Python's sqlite3 opens a transaction only before INSERT/UPDATE/DELETE, so each
                # CREATE would commit on its own and a process killed half-way would leave a
                # schema no later start can migrate. One explicit transaction: all or nothing.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def utcnow_naive() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).replace(tzinfo=None)


def _str(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


NON_REPORTABLE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents (PDF, CDA, STL, ...)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # registrations, segmentations, surfaces
)


def made_by(ds: Dataset, device_uid: str) -> bool:
    """Whether ``ds`` carries ``device_uid`` (our own SR or PDF coming back to us)."""
    if str(ds.get("DeviceUID", "")) == device_uid:
        return True
    return any(str(item.get("DeviceUID", "")) == device_uid
               for item in ds.get("ContributingEquipmentSequence", []))


def starts_report(sop_class_uid: str, ds: Dataset, device_uid: str) -> bool:
    """Whether receiving this instance may start a report job: an image we did not make.

    SR, PDF and other non-image objects never do, nor does anything carrying our device UID, so
    a PACS that echoes our drafts back cannot start a loop.
    """
    if sop_class_uid.startswith(NON_REPORTABLE_SOP_PREFIXES) or "Rows" not in ds:
        return False
    return not made_by(ds, device_uid)


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one stored file (parsed from its header)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    received_at: datetime
    calling_ae_title: str | None
    source_address: str | None
    header: Dataset

    @classmethod
    def from_file(cls, path: Path) -> InstanceRecord:
        """Parse a stored file's header; raise ``ValueError`` when it cannot be indexed."""
        try:
            ds = read_header_file(path)
            meta = ds.file_meta
        except Exception as exc:  # noqa: BLE001 - any parse error makes the file unindexable
            raise ValueError(f"cannot parse {path.name}: {exc}") from exc
        st = path.stat()
        address = meta.get("SourcePresentationAddress")
        return cls(
            study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=check_uid(ds.get("SOPClassUID"), "SOPClassUID"),
            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
            size_bytes=st.st_size,
            received_at=_utc(st.st_mtime_ns),
            calling_ae_title=_str(meta, "SourceApplicationEntityTitle", 16),
            source_address=str(address).removeprefix("dicom://").strip() if address else None,
            header=ds,
        )


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    modalities: list[str]
    series_count: int
    instance_count: int
    planes: list[str]
    phases: list[str]
    last_received_at: datetime
    state: str


class Index:
    """The index database.

    Parameters
    ----------
    url : str
        Any SQLAlchemy URL; SQLite by default.
    store : FileStore
        The file store whose files the index describes (paths are kept relative to its root).
    """

    def __init__(self, url: str, store: FileStore) -> None:
        self.url = url
        self.store = store
        self.engine = create_index_engine(url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.device_uid = self.identity("device_uid", generate_uid)

    def identity(self, key: str, create: Any) -> str:
        """A value created once for this index (``create()``) and kept, e.g. the device UID.
        Two processes opening a new index at once agree: the one whose insert loses reads the
        winner's value."""
        try:
            with self.sessions.begin() as session:
                row = session.get(NodeIdentity, key)
                if row is None:
                    row = NodeIdentity(key=key, value=str(create()))
                    session.add(row)
                    session.flush()
                value = row.value
        except IntegrityError:  # created by another process since our read
            with self.sessions.begin() as session:
                row = session.get(NodeIdentity, key)
                if row is None:
                    raise
                value = row.value
        return value

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ----------------------------------------------------------------------------------
    def add(self, records: Sequence[InstanceRecord]) -> dict[str, Path]:
        """Insert or update ``records`` in one transaction.

        Returns
        -------
        dict
            SOP Instance UID -> the final path of each record under ``data/`` (relative paths
            are stored in the index).
        """
        finals: dict[str, Path] = {}
        with self.sessions.begin() as session:
            studies = {s.study_instance_uid: s for s in session.scalars(select(Study).where(
                Study.study_instance_uid.in_({r.study_instance_uid for r in records})))}
            series_by_uid = {s.series_instance_uid: s for s in session.scalars(select(Series).where(
                Series.series_instance_uid.in_({r.series_instance_uid for r in records})))}
            instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance).where(
                Instance.sop_instance_uid.in_({r.sop_instance_uid for r in records})))}
            touched: set[int] = set()
            for rec in records:
                study = studies.get(rec.study_instance_uid)
                ds = rec.header
                if study is None:
                    study = Study(study_instance_uid=rec.study_instance_uid,
                                  patient_id=_str(ds, "PatientID", 64),
                                  accession_number=_str(ds, "AccessionNumber", 64),
                                  study_date=_str(ds, "StudyDate", 8),
                                  first_received_at=rec.received_at,
                                  last_received_at=rec.received_at)
                    session.add(study)
                    studies[rec.study_instance_uid] = study
                image_type = "\\".join(classify.image_type(ds))[:128] or None
                study.first_received_at = min(study.first_received_at, rec.received_at)
                study.last_received_at = max(study.last_received_at, rec.received_at)
                if starts_report(rec.sop_class_uid, ds, self.device_uid):
                    study.last_image_at = max(study.last_image_at or rec.received_at,
                                              rec.received_at)
                    if study.queued_through is None or rec.received_at > study.queued_through:
                        study.state = StudyState.RECEIVING  # (a reindex changes nothing)
                series = series_by_uid.get(rec.series_instance_uid)
                if series is None:
                    series = Series(study=study, series_instance_uid=rec.series_instance_uid,
                                    modality=_str(ds, "Modality", 16),
                                    body_part=_str(ds, "BodyPartExamined", 64),
                                    series_number=_int(ds, "SeriesNumber"),
                                    series_description=_str(ds, "SeriesDescription", 128),
                                    image_type=image_type,
                                    plane=classify.plane(ds).value,
                                    phase=classify.phase(ds),
                                    is_localizer=classify.is_localizer(ds),
                                    instance_count=0,
                                    last_received_at=rec.received_at)
                    session.add(series)
                    series_by_uid[rec.series_instance_uid] = series
                series.last_received_at = max(series.last_received_at, rec.received_at)
                expected = _int(ds, "ImagesInAcquisition")
                if expected and expected > 0:
                    series.expected_images = max(series.expected_images or 0, expected)
                final = self.store.final_path(rec.study_instance_uid, rec.series_instance_uid,
                                              rec.sop_instance_uid)
                finals[rec.sop_instance_uid] = final
                values = dict(
                    sop_class_uid=rec.sop_class_uid,
                    transfer_syntax_uid=rec.transfer_syntax_uid,
                    path=str(final.relative_to(self.store.root)),
                    size_bytes=rec.size_bytes,
                    calling_ae_title=rec.calling_ae_title,
                    source_address=rec.source_address,
                    received_at=rec.received_at,
                    instance_number=_int(ds, "InstanceNumber"),
                    rows=_int(ds, "Rows"),
                    columns=_int(ds, "Columns"),
                    number_of_frames=_int(ds, "NumberOfFrames"),
                    position_mm=classify.position_along_normal(ds),
                    image_type=image_type,
                )
                instance = instances.get(rec.sop_instance_uid)
                if instance is None:
                    instance = Instance(sop_instance_uid=rec.sop_instance_uid, **values)
                    instances[rec.sop_instance_uid] = instance
                    session.add(instance)
                else:
                    if instance.series_id is not None:
                        touched.add(instance.series_id)
                    for key, value in values.items():
                        setattr(instance, key, value)
                    # the file may hold other pixels now (overwrite, reindex): encode again
                    session.execute(delete(SliceEmbedding).where(
                        SliceEmbedding.instance_id == instance.id))
                instance.series = series
            session.flush()
            touched |= {s.id for s in series_by_uid.values()}
            self._recount(session, touched)
        return finals

    @staticmethod
    def _recount(session: Session, series_ids: Iterable[int]) -> None:
        ids = list(series_ids)
        if not ids:
            return
        counts = dict(session.execute(
            select(Instance.series_id, func.count()).where(Instance.series_id.in_(ids))
            .group_by(Instance.series_id)).all())
        for series in session.scalars(select(Series).where(Series.id.in_(ids))):
            series.instance_count = counts.get(series.id, 0)

    def apply_releases(self, paths: Sequence[Path]) -> int:
        """Apply association release records (:meth:`FileStore.write_release`): each study's
        ``released_at`` becomes the latest release time; the records are then removed.
        Returns how many studies were marked."""
        marked: dict[str, datetime] = {}
        for path in paths:
            try:
                record = json.loads(path.read_text())
                when = _utc(int(record["closed_at_ns"]))
                for uid in record["studies"]:
                    marked[uid] = max(marked.get(uid, when), when)
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("Release record %s cannot be read (%s); ignored", path.name, exc)
        if marked:
            with self.sessions.begin() as session:
                for study in session.scalars(select(Study).where(
                        Study.study_instance_uid.in_(marked))):
                    when = marked[study.study_instance_uid]
                    study.released_at = max(study.released_at or when, when)
        for path in paths:
            path.unlink(missing_ok=True)
        return len(marked)

    def drain(self, paths: Sequence[Path]) -> int:
        """Index spooled files from ``incoming/`` and move them under ``data/``.

        Rows are committed first, then the files are moved; a crash in between leaves the files
        in ``incoming/`` and the next drain indexes them again (an idempotent upsert).
        Unreadable files are moved to ``failed/`` and logged.

        Returns
        -------
        int
            How many files were indexed.
        """
        records: list[InstanceRecord] = []
        sources: dict[str, Path] = {}
        for path in paths:
            try:
                rec = InstanceRecord.from_file(path)
            except FileNotFoundError:
                continue
            except ValueError as exc:
                moved = self.store.quarantine(path)
                logger.error("Spooled file cannot be indexed (%s); moved to %s", exc, moved)
                continue
            records.append(rec)
            sources[rec.sop_instance_uid] = path
        if not records:
            return 0
        finals = self.add(records)
        folders = set()
        for sop_uid, final in finals.items():
            self.store.promote(sources[sop_uid], final)
            folders.add(final.parent)
        self.store.sync_data(folders)
        return len(records)

    def rebuild(self, batch: int = 500) -> tuple[int, int]:
        """Re-index every stored file and drop rows whose file is gone (``msvlm-node reindex``).

        Returns
        -------
        tuple of int
            (files indexed, rows removed)
        """
        indexed = self.drain(self.store.pending())
        seen: set[str] = set()
        chunk: list[InstanceRecord] = []
        for path in self.store.iter_files():
            if path.parent == self.store.incoming:
                continue
            try:
                rec = InstanceRecord.from_file(path)
            except ValueError as exc:
                logger.error("Stored file cannot be indexed (%s); left in place", exc)
                continue
            seen.add(rec.sop_instance_uid)
            chunk.append(rec)
            if len(chunk) >= batch:
                indexed += len(self.add(chunk))
                chunk = []
        if chunk:
            indexed += len(self.add(chunk))
        removed = 0
        with self.sessions.begin() as session:
            stale = [i for i in session.scalars(select(Instance))
                     if not (self.store.root / i.path).exists()]
            touched = {i.series_id for i in stale}
            for instance in stale:
                session.delete(instance)
            removed = len(stale)
            session.flush()
            self._recount(session, touched)
            for series in session.scalars(select(Series).where(Series.instance_count == 0)):
                session.delete(series)
            session.flush()
            for study in session.scalars(select(Study).where(~Study.series.any())):
                session.delete(study)
        return indexed, removed

    # -- reading ----------------------------------------------------------------------------------
    def studies(self) -> list[StudySummary]:
        """Every study, newest first."""
        with self.sessions() as session:
            result = []
            for study in session.scalars(select(Study).order_by(Study.last_received_at.desc())):
                series = study.series
                result.append(StudySummary(
                    study_instance_uid=study.study_instance_uid,
                    modalities=sorted({s.modality or "?" for s in series}),
                    series_count=len(series),
                    instance_count=sum(s.instance_count for s in series),
                    planes=sorted({s.plane for s in series}),
                    phases=sorted({s.phase for s in series}),
                    last_received_at=study.last_received_at,
                    state=study.state.value,
                ))
            return result

    def series(self, study_instance_uid: str) -> list[Series]:
        """The series of one study, by series number."""
        with self.sessions() as session:
            study = session.scalar(select(Study).where(
                Study.study_instance_uid == study_instance_uid))
            if study is None:
                return []
            return sorted(study.series, key=lambda s: (s.series_number or 0, s.series_instance_uid))

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(Instance)) or 0

    # -- retention -----------------------------------------------------------------------------
    def purgeable(self, older_than: datetime) -> list[str]:
        """Study UIDs whose newest instance arrived before ``older_than``, with no report job
        queued or running and no draft waiting to be delivered (pending)."""
        from storage.schema import Delivery, DeliveryState, Job, JobState

        open_job = select(Job.id).where(Job.study_id == Study.id,
                                        Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        waiting = select(Delivery.id).join(Job, Job.id == Delivery.job_id).where(
            Job.study_id == Study.id, Delivery.state == DeliveryState.PENDING)
        with self.sessions() as session:
            return list(session.scalars(select(Study.study_instance_uid).where(
                Study.last_received_at < older_than, ~open_job.exists(), ~waiting.exists())
                .order_by(Study.last_received_at)))

    def purge(self, study_instance_uid: str) -> int:
        """Remove one study: its files (images, drafts) first, then its rows (series,
        instances, jobs, deliveries, embeddings by cascade). Returns the bytes freed. A crash
        in between leaves rows whose files are gone: purging again (or ``reindex``) finishes."""
        folder = self.store.data / check_uid(study_instance_uid, "StudyInstanceUID")
        freed = 0
        with self.sessions() as session:
            paths = list(session.scalars(select(Instance.path).join(
                Series, Series.id == Instance.series_id).join(
                Study, Study.id == Series.study_id).where(
                Study.study_instance_uid == study_instance_uid)))
        for rel in paths:
            path = self.store.root / rel
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        if folder.is_dir():
            for dirpath, _dirs, files in os.walk(folder):
                freed += sum((Path(dirpath) / f).stat().st_size for f in files)
            shutil.rmtree(folder, ignore_errors=True)
        with self.sessions.begin() as session:
            study = session.scalars(select(Study).where(
                Study.study_instance_uid == study_instance_uid)).one_or_none()
            if study is not None:
                session.delete(study)
        return freed

    # -- slice embeddings (streaming) ---------------------------------------------------------
    def unencoded(self, model_key: str, limit: int) -> list[tuple[int, Path, Series]]:
        """Single-frame image instances of studies still arriving (state ``receiving``) that
        have no embedding under ``model_key``: (instance id, file, its series), oldest first."""
        encoded = select(SliceEmbedding.instance_id).where(
            SliceEmbedding.instance_id == Instance.id, SliceEmbedding.model_key == model_key)
        with self.sessions() as session:
            rows = session.execute(
                select(Instance.id, Instance.path, Series)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.state == StudyState.RECEIVING, Instance.rows.is_not(None),
                       func.coalesce(Instance.number_of_frames, 1) <= 1, ~encoded.exists())
                .order_by(Instance.received_at).limit(limit)).all()
            session.expunge_all()
        return [(int(i), self.store.root / p, series) for i, p, series in rows]

    def put_embeddings(self, model_key: str, embeddings: dict[int, bytes]) -> None:
        """Keep embeddings by instance id (an instance deleted meanwhile is skipped)."""
        now = utcnow_naive()
        with self.sessions.begin() as session:
            alive = set(session.scalars(select(Instance.id).where(
                Instance.id.in_(embeddings))))
            existing = set(session.scalars(select(SliceEmbedding.instance_id).where(
                SliceEmbedding.model_key == model_key,
                SliceEmbedding.instance_id.in_(embeddings))))
            for instance_id, data in embeddings.items():
                if instance_id in alive and instance_id not in existing:
                    session.add(SliceEmbedding(instance_id=instance_id, model_key=model_key,
                                               embedding=data, created_at=now))

    def embeddings_of_study(self, model_key: str, study_instance_uid: str) -> dict[Path, bytes]:
        """The study's embeddings under ``model_key``, by file."""
        with self.sessions() as session:
            rows = session.execute(
                select(Instance.path, SliceEmbedding.embedding)
                .join(SliceEmbedding, SliceEmbedding.instance_id == Instance.id)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_instance_uid,
                       SliceEmbedding.model_key == model_key)).all()
        return {self.store.root / p: bytes(e) for p, e in rows}

    def instances(self, series_instance_uid: str) -> list[Instance]:
        """The instances of one series, ordered by position along the normal."""
        with self.sessions() as session:
            rows = session.scalars(select(Instance).join(Series).where(
                Series.series_instance_uid == series_instance_uid)).all()
            return sorted(rows, key=lambda i: (i.position_mm is None, i.position_mm or 0.0,
                                               i.instance_number or 0))


def open_index(store_root: str | os.PathLike[str], url: str) -> Index:
    """Open the file store and its index (migrating the schema)."""
    return Index(url, FileStore(store_root))
