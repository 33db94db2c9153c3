"""The index schema (SQLAlchemy 2.x typed ORM). Changes go through Alembic migrations."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Integer, LargeBinary, String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class StudyState(str, enum.Enum):
    """Where a study is in the node's life cycle."""

    RECEIVING = "receiving"
    """Instances arrived recently; the study may not be complete."""
    STABLE = "stable"
    """No instance for ``stable_age_s``; ready for reporting."""
    REPORTED = "reported"
    """A draft report was produced for the instances received so far."""


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        default=StudyState.RECEIVING)
    last_image_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    """Receipt of the newest instance that may start a report (an image not made by us)."""
    queued_through: Mapped[datetime | None] = mapped_column(DateTime)
    """``last_image_at`` covered by the newest report job; a later image queues a new job."""
    released_at: Mapped[datetime | None] = mapped_column(DateTime)
    """When the last association holding the study was released with no other one open (the
    association completion cue)."""

    series: Mapped[list[Series]] = relationship(back_populates="study",
                                                cascade="all, delete-orphan")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(128))
    image_type: Mapped[str | None] = mapped_column(String(128))
    plane: Mapped[str] = mapped_column(String(16), default="unknown")
    phase: Mapped[str] = mapped_column(String(16), default="unknown")
    is_localizer: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_images: Mapped[int | None] = mapped_column(Integer)
    """Images the headers announce (Images in Acquisition): the expected-count cue."""
    last_received_at: Mapped[datetime] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series",
                                                     cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    position_mm: Mapped[float | None] = mapped_column(Float)
    image_type: Mapped[str | None] = mapped_column(String(128))

    series: Mapped[Series] = relationship(back_populates="instances")


class SliceEmbedding(Base):
    """One slice's embedding by one model's vision tower, computed while its study arrives
    (streaming) and read when the study is drafted. Keyed by the instance and the model key
    (model version + preprocessing), so model versions never mix; dropped with the instance
    (database cascade) and whenever the instance row is re-indexed."""

    __tablename__ = "slice_embedding"

    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"),
                                             primary_key=True)
    model_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    """float32, little endian, the tower's output width."""
    created_at: Mapped[datetime] = mapped_column(DateTime)


class JobState(str, enum.Enum):
    """A report job's life cycle."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """Permanently failed; ``error`` says why (no eligible series, unreadable volume, ...)."""


class DeliveryState(str, enum.Enum):
    """One object on its way to one destination peer."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    """Gave up after ``[delivery] max_retries``; ``msvlm-node resend`` queues it again."""


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, values_callable=lambda e: [m.value for m in e], native_enum=False, length=16)


class Job(Base):
    """One report of one study, over the image instances received up to ``covers_through``."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    covers_through: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(String(1024))
    model_version: Mapped[str | None] = mapped_column(String(64))
    series_read: Mapped[str | None] = mapped_column(String(1024))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(String(1024))
    pdf_path: Mapped[str | None] = mapped_column(String(1024))
    timings: Mapped[str | None] = mapped_column(String(512))

    study: Mapped[Study] = relationship()
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job",
                                                      cascade="all, delete-orphan")


class Delivery(Base):
    """One stored object (SR or PDF) to send to one configured peer: the outbox."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    peer: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState),
                                                 default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(String(1024))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class NodeIdentity(Base):
    """Values created once per index and kept: the device observer UID of the reports."""

    __tablename__ = "node_identity"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
