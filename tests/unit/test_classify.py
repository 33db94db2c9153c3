"""Plane, phase and localizer classification on real headers where present, else built ones
(and variants of them)."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataset import Dataset

from storage import classify
from tests.samples import Samples, shared_samples


def header(path: object) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(scope="module")
def ct(built_samples: Samples) -> Dataset:
    """The base of the variants: the real CT's first header where present, else the built one."""
    return header((shared_samples() or built_samples).ct_files[0])


@pytest.fixture(scope="module")
def mr(built_samples: Samples) -> Dataset:
    return header((shared_samples() or built_samples).mr_files[0])


def variant(ds: Dataset, **values: object) -> Dataset:
    out = copy.deepcopy(ds)
    for key, value in values.items():
        if value is None:
            if key in out:
                delattr(out, key)
        else:
            setattr(out, key, value)
    return out


def test_real_ct_is_axial_unknown_phase_not_localizer(real_samples: Samples) -> None:
    ct = header(real_samples.ct_files[0])
    assert classify.plane(ct) is classify.Plane.AXIAL
    # no contrast/bolus module and a description without phase words: not guessed
    assert classify.phase(ct) == "unknown"
    assert not classify.is_localizer(ct)
    assert classify.position_along_normal(ct) == pytest.approx(484.91)


def test_real_mr_tilted_axial_epi_is_other(real_samples: Samples) -> None:
    mr = header(real_samples.mr_files[0])
    # orientation tilted ~6 degrees from axial; EPI with TR 3000 / TE 30: no T1/T2/FLAIR/DWI
    assert classify.plane(mr) is classify.Plane.AXIAL
    assert classify.phase(mr) == "other"


def test_built_ct_is_axial_non_contrast_and_mr_tilted_epi_is_other(
        built_samples: Samples) -> None:
    ct, mr = header(built_samples.ct_files[0]), header(built_samples.mr_files[0])
    assert classify.plane(ct) is classify.Plane.AXIAL and classify.phase(ct) == "non_contrast"
    assert not classify.is_localizer(ct)
    assert classify.plane(mr) is classify.Plane.AXIAL and classify.phase(mr) == "other"


@pytest.mark.parametrize("iop, plane", [
    ([1, 0, 0, 0, 0, -1], "coronal"),
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([1, 0, 0, 0, 0.7071, -0.7071], "oblique"),
    ([1, 0, 0, 0, 1, 0], "axial"),
])
def test_planes_from_orientation(ct: Dataset, iop: list[float], plane: str) -> None:
    assert classify.plane(variant(ct, ImageOrientationPatient=iop)).value == plane


def test_plane_unknown_without_orientation(ct: Dataset) -> None:
    assert classify.plane(variant(ct, ImageOrientationPatient=None)) is classify.Plane.UNKNOWN


def test_plane_from_enhanced_functional_groups(ct: Dataset) -> None:
    ds = variant(ct, ImageOrientationPatient=None)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    assert classify.plane(ds) is classify.Plane.SAGITTAL


def test_localizer(ct: Dataset) -> None:
    assert classify.is_localizer(variant(ct, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert classify.is_localizer(variant(ct, SeriesDescription="Topogram 0.6 T20s"))
    assert not classify.is_localizer(variant(ct, SeriesDescription="Thorax 1.0 Br40"))


@pytest.mark.parametrize("values, phase", [
    ({"SeriesDescription": "CHEST ARTERIAL 1mm"}, "arterial"),
    ({"SeriesDescription": "Abd Portal Venous"}, "portal_venous"),
    ({"SeriesDescription": "DELAYED 5 min"}, "delayed"),
    ({"SeriesDescription": "Thorax nativ 1.0"}, "non_contrast"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": "NONE"}, "non_contrast"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": ""}, "non_contrast"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": "Omnipaque 350",
      "ContrastBolusStartTime": "101000", "AcquisitionTime": "101030"}, "arterial"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": "Omnipaque 350",
      "ContrastBolusStartTime": "101000", "AcquisitionTime": "101110.5"}, "portal_venous"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": "Omnipaque 350",
      "ContrastBolusStartTime": "10:10:00", "AcquisitionTime": "10:15:00"}, "delayed"),
    ({"SeriesDescription": "Thorax 1.0", "ContrastBolusAgent": "Omnipaque 350"}, "unknown"),
])
def test_ct_phase(ct: Dataset, values: dict[str, object], phase: str) -> None:
    assert classify.phase(variant(ct, **values)) == phase


@pytest.mark.parametrize("values, phase", [
    ({"SeriesDescription": "ep2d_diff_b1000"}, "dwi"),
    ({"DiffusionBValue": 1000, "SeriesDescription": "ax"}, "dwi"),
    ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], "SeriesDescription": "ax"}, "adc"),
    ({"SeriesDescription": "t2_tirm_tra_dark-fluid"}, "flair"),
    ({"SeriesDescription": "ax", "ProtocolName": "ax", "RepetitionTime": 9000, "EchoTime": 90,
      "InversionTime": 2500}, "flair"),
    ({"SeriesDescription": "T2 TSE AX"}, "t2"),
    ({"SeriesDescription": "ax", "ProtocolName": "ax", "RepetitionTime": 4000, "EchoTime": 100},
     "t2"),
    ({"SeriesDescription": "ax", "ProtocolName": "ax", "RepetitionTime": 500, "EchoTime": 12},
     "t1"),
    ({"SeriesDescription": "t1_mprage_sag"}, "t1"),
    ({"SeriesDescription": "ax", "ProtocolName": "ax", "RepetitionTime": None, "EchoTime": None},
     "unknown"),
])
def test_mr_phase(mr: Dataset, values: dict[str, object], phase: str) -> None:
    assert classify.phase(variant(mr, **values)) == phase
