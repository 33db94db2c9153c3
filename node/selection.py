"""Which series of a study the model reads.

Never localizers, derived or secondary-capture-like images, SR, PDF or other non-image objects;
only the modalities and body parts the checkpoint's model card declares (unless configured
otherwise); several planes and phases go into one model call, the largest series first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from node.config import SelectionConfig

NON_IMAGE_MODALITIES = {"SR", "DOC", "PR", "KO", "SEG", "RTSTRUCT", "REG", "OT"}


@dataclass(frozen=True)
class SeriesInfo:
    """What selection needs to know of a series (from the index or from headers)."""

    series_instance_uid: str
    modality: str
    body_part: str | None
    plane: str
    phase: str
    images: int
    is_localizer: bool
    image_type: Sequence[str]
    has_pixels: bool
    series_number: int | None = None
    description: str = ""


@dataclass(frozen=True)
class SelectionRules:
    """``[selection]``: filters applied in this order; ``"*"`` accepts any value."""

    modalities: Sequence[str] = ("*",)
    body_parts: Sequence[str] = ("*",)
    planes: Sequence[str] = ("axial", "coronal", "sagittal")
    phases: Sequence[str] = ("*",)
    min_slices: int = 16
    max_series: int = 4
    exclude_image_types: Sequence[str] = ("DERIVED", "SECONDARY", "LOCALIZER", "SCOUT")


@dataclass
class Selection:
    """The chosen series, and why every other one was left out."""

    chosen: list[SeriesInfo] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """Why nothing was chosen (empty when something was)."""
        if self.chosen:
            return ""
        if not self.skipped:
            return "no series in the study"
        reasons = sorted(set(self.skipped.values()))
        return "no eligible series: " + "; ".join(reasons)


def _accepts(allowed: Sequence[str], value: str | None) -> bool:
    return "*" in allowed or (value or "").upper() in {a.upper() for a in allowed}


def select_series(series: Sequence[SeriesInfo], rules: SelectionRules) -> Selection:
    """Apply ``rules``; the chosen series are ordered largest first, then by series number."""
    out = Selection()
    for s in series:
        types = {t.upper() for t in s.image_type}
        if not s.has_pixels or s.modality.upper() in NON_IMAGE_MODALITIES:
            out.skipped[s.series_instance_uid] = f"{s.modality or 'unknown'} is not an image"
        elif s.is_localizer:
            out.skipped[s.series_instance_uid] = "localizer"
        elif types & {t.upper() for t in rules.exclude_image_types}:
            out.skipped[s.series_instance_uid] = f"image type {'/'.join(sorted(types))} excluded"
        elif not _accepts(rules.modalities, s.modality):
            out.skipped[s.series_instance_uid] = f"modality {s.modality} not supported by this " \
                                                 "checkpoint"
        elif not _accepts(rules.body_parts, s.body_part):
            out.skipped[s.series_instance_uid] = f"body part {s.body_part or 'unknown'} not " \
                                                 "supported by this checkpoint"
        elif not _accepts(rules.planes, s.plane):
            out.skipped[s.series_instance_uid] = f"plane {s.plane} not selected"
        elif not _accepts(rules.phases, s.phase):
            out.skipped[s.series_instance_uid] = f"phase {s.phase} not selected"
        elif s.images < rules.min_slices:
            out.skipped[s.series_instance_uid] = f"{s.images} images (< min_slices " \
                                                 f"{rules.min_slices})"
        else:
            out.chosen.append(s)
    out.chosen.sort(key=lambda s: (-s.images, s.series_number or 0))
    for s in out.chosen[rules.max_series:]:
        out.skipped[s.series_instance_uid] = f"more than max_series {rules.max_series}"
    out.chosen = sorted(out.chosen[: rules.max_series],
                        key=lambda s: (s.series_number or 0, s.series_instance_uid))
    return out


def rules_for(config: SelectionConfig, card: Mapping[str, Any]) -> SelectionRules:
    """The rules in effect: ``[selection]``, with modalities and body parts left unset taken
    from the checkpoint's model card (its declared scope)."""
    return SelectionRules(
        modalities=config.modalities or tuple(card.get("modalities") or ("*",)),
        body_parts=config.body_parts or tuple(card.get("body_parts") or ("*",)),
        planes=config.planes, phases=config.phases, min_slices=config.min_slices,
        max_series=config.max_series, exclude_image_types=config.exclude_image_types)
