"""A view: one series as the model sees it, and the shared vocabulary.

``View(pixels, z_mm, pixel_spacing_mm, modality, plane, phase, series_instance_uid)``:
``pixels`` is float32 ``(S, H, W)`` (Hounsfield units for CT), slices ordered by increasing
position along the slice normal, rows and columns as stored (LPS patient axes, see
``../shared/ARCHITECTURE.md``); ``z_mm`` holds each slice's position along the normal in mm.

The vocabulary is the one the index uses (``storage.classify``); a contract test keeps the two
identical, since ``models`` never imports ``storage``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITIES = ("CT", "MR")
PLANES = ("axial", "coronal", "sagittal", "oblique", "unknown")
CT_PHASES = ("non_contrast", "arterial", "portal_venous", "delayed", "unknown")
MR_PHASES = ("t1", "t2", "flair", "dwi", "adc", "other", "unknown")
PHASES = tuple(dict.fromkeys(CT_PHASES + MR_PHASES))
"""Every phase value (CT and MR); ``unknown`` appears once and is a valid input."""


@dataclass(frozen=True, eq=False)
class View:
    """One series ready for the model; the constructor validates everything.

    Raises
    ------
    ValueError
        Empty or non-3D pixels, NaN/inf, ``z_mm`` not matching the slice count or not
        increasing, bad spacing, or a modality, plane or phase outside the vocabulary.
    """

    pixels: np.ndarray
    z_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    modality: str
    plane: str = "unknown"
    phase: str = "unknown"
    series_instance_uid: str = ""

    def __post_init__(self) -> None:
        pixels = np.asarray(self.pixels)
        if pixels.ndim != 3:
            raise ValueError(f"Invalid 'pixels' shape {pixels.shape} - must be (S, H, W)")
        if 0 in pixels.shape:
            raise ValueError(f"Invalid 'pixels' shape {pixels.shape} - the view is empty")
        if not np.issubdtype(pixels.dtype, np.number):
            raise ValueError(f"Invalid 'pixels' dtype {pixels.dtype} - must be numeric")
        pixels = pixels.astype(np.float32, copy=False)
        for start in range(0, pixels.shape[0], 32):  # chunked: no volume-sized temporary
            if not np.isfinite(pixels[start:start + 32]).all():
                raise ValueError("Invalid 'pixels' - holds NaN or infinite values")
        z = np.asarray(self.z_mm, dtype=np.float64).reshape(-1)
        if z.shape[0] != pixels.shape[0]:
            raise ValueError(f"Invalid 'z_mm' length {z.shape[0]} - the view has "
                             f"{pixels.shape[0]} slices")
        if not np.isfinite(z).all():
            raise ValueError("Invalid 'z_mm' - holds NaN or infinite values")
        if z.shape[0] > 1 and not (np.diff(z) > 0).all():
            raise ValueError("Invalid 'z_mm' - positions must increase strictly with the slice "
                             "index (order slices along the normal)")
        spacing = tuple(float(v) for v in self.pixel_spacing_mm)
        if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"Invalid 'pixel_spacing_mm' {self.pixel_spacing_mm!r} - two "
                             "positive numbers (row, column) in mm")
        if self.modality not in MODALITIES:
            raise ValueError(f"Invalid 'modality' {self.modality!r} - one of {MODALITIES}")
        if self.plane not in PLANES:
            raise ValueError(f"Invalid 'plane' {self.plane!r} - one of {PLANES}")
        allowed = CT_PHASES if self.modality == "CT" else MR_PHASES
        if self.phase not in allowed:
            raise ValueError(f"Invalid 'phase' {self.phase!r} for {self.modality} - one of "
                             f"{allowed}")
        object.__setattr__(self, "pixels", pixels)
        object.__setattr__(self, "z_mm", z)
        object.__setattr__(self, "pixel_spacing_mm", spacing)

    @property
    def num_slices(self) -> int:
        return int(self.pixels.shape[0])
