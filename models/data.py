"""Training data: studies with reports, loaded lazily, split by patient.

Sources: phantoms generated on the fly, a CT-RATE-layout folder, or any list of studies the caller
builds (the CLI builds one from a folder of DICOM studies through ``storage.volumes``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from models.view import View


@dataclass
class StudyItem:
    """One study: its report, and a loader for its views (volumes stay on disk until needed)."""

    study_id: str
    patient_id: str
    findings: str
    impression: str
    load: Callable[[], list[View]]
    variant: Callable[[int], tuple[str, str]] | None = None
    """Another true wording of the report (phantoms), or None when there is only one."""


@dataclass
class Dataset:
    """Train and validation studies (disjoint patients) plus a description for the records."""

    train: list[StudyItem]
    valid: list[StudyItem]
    description: dict[str, Any] = field(default_factory=dict)
    # how many of ``train`` are the main studies; the rest are ``extra`` groups (phantoms)
    main_count: int | None = None

    def main_only(self) -> Dataset:
        """The same split without the extra training studies (itself when it has none)."""
        if self.main_count is None or self.main_count >= len(self.train):
            return self
        return Dataset(self.train[: self.main_count], self.valid, self.description,
                       self.main_count)

    def __post_init__(self) -> None:
        overlap = {s.patient_id for s in self.train} & {s.patient_id for s in self.valid}
        if overlap:
            raise ValueError(f"Invalid split - {len(overlap)} patients in both train and valid, "
                             f"e.g. {sorted(overlap)[:3]}")
        if not self.train:
            raise ValueError("Invalid dataset - no training studies")

    @property
    def fingerprint(self) -> str:
        """Short hash of the description (keys the embedding cache together with the encoder)."""
        text = json.dumps(self.description, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def phantom_dataset(count: int, valid_count: int, seed: int = 0,
                    extra: list[dict[str, Any]] | None = None, **kwargs: Any) -> Dataset:
    """Phantoms generated when loaded; train seeds and valid seeds never overlap.

    ``extra``: more training studies, each group ``{"count": n, ...}`` generated with its own
    seeds and its own keyword arguments over ``kwargs`` (e.g. ``{"count": 400, "prevalence":
    0.1}``: studies with one or two findings, rare at the main prevalence). The main studies
    stay the same whatever ``extra`` holds.
    """
    from models.phantom import generate_case, iter_cases, report_variant

    def items(n: int, base: int, tag: str, options: dict[str, Any]) -> list[StudyItem]:
        out = []
        for i, case in enumerate(iter_cases(n, base, **{**options, "slices": 16})):
            case_seed = base * 100003 + i

            def load(case_seed: int = case_seed, sid: str = case.study_id) -> list[View]:
                return generate_case(case_seed, sid, **options).views

            def variant(k: int, case: Any = case) -> tuple[str, str]:
                return report_variant(case, k)

            out.append(StudyItem(case.study_id, f"{tag}-{case_seed}", case.findings,
                                 case.impression, load, variant))
        return out

    train = items(count, 2 * seed + 1, "p", kwargs)
    groups = []
    for k, group in enumerate(extra or []):
        group = dict(group)
        n = group.pop("count", None)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"Invalid extra[{k}] count {n!r} - a whole number of studies")
        # seeds far from every split the project uses (train 2s+1, valid 2s+2, evaluation)
        train += items(n, 1000 * (k + 1) + 2 * seed + 1, "p", {**kwargs, **group})
        groups.append({"count": n, **{key: str(v) for key, v in group.items()}})
    description: dict[str, Any] = {"source": "phantoms", "count": count,
                                   "valid_count": valid_count, "seed": seed,
                                   **{k: str(v) for k, v in kwargs.items()}}
    if groups:
        description["extra"] = groups
    return Dataset(train, items(valid_count, 2 * seed + 2, "p", kwargs), description, count)


def ctrate_dataset(root: str | Path, train_split: str = "train",
                   valid_split: str = "valid") -> Dataset:
    """A CT-RATE-layout folder; the views of each study load on demand."""
    from models.ctrate import read_ctrate, read_volume, volume_path

    base = Path(root)

    def items(split: str) -> list[StudyItem]:
        import csv

        with open(base / f"{split}_metadata.csv", newline="") as f:
            meta = {r["VolumeName"]: r for r in csv.DictReader(f)}
        out = []
        for record in read_ctrate(base, split, load_views=False):

            def load(names: list[str] = record.volume_names) -> list[View]:
                return [read_volume(volume_path(base, n), meta.get(n, {}).get("Plane") or "axial",
                                    "CT", meta.get(n, {}).get("Phase") or "unknown",
                                    float(meta.get(n, {}).get("RescaleSlope") or 1.0),
                                    float(meta.get(n, {}).get("RescaleIntercept") or 0.0), n)
                        for n in names]

            patient = "_".join(record.volume_names[0].split("_")[:2])
            out.append(StudyItem(record.study_id, patient, record.findings, record.impression,
                                 load))
        return out

    return Dataset(items(train_split), items(valid_split),
                   {"source": "ctrate", "root": str(base), "train_split": train_split,
                    "valid_split": valid_split})
