"""Offline mode and the SR: a phantom study in, a valid TID 2000 draft SR out."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.generator import build_tiny, save_checkpoint
from models.phantom import generate_case
from models.report import train_tokenizer
from models.labeler import stated_side
from node.sr import (CodedFinding, KeyImage, SeriesRead, build_key_images, build_report_sr,
                     sr_coded_findings, sr_text)
from storage.volumes import StudyInfo, write_ct_series
from tests.conftest import run_cli, write_config
from tests.samples import CHARSET_FILES, Samples

pytestmark = pytest.mark.integration


def tiny_checkpoint(out: Path, name: str, report: str, **overrides: Any) -> Path:
    """Save a tiny untrained model (a CT-chest model card) into ``out``."""
    tokenizer = train_tokenizer([report] * 3, 300)
    model = build_tiny(tokenizer, **{
        "image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1,
        "z_hidden": 32, "z_layers": 1, "num_queries": 4, "max_new_tokens": 12,
        "lm_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 2,
                      "max_position_embeddings": 256}, **overrides})
    save_checkpoint(model.eval(), tokenizer, out, {"name": name, "modalities": ["CT"],
                                                   "body_parts": ["CHEST"]})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny-test",
                           "Findings: Lungs are clear.\nImpression: Normal.")


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing (apt-get install dicom3tools)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def test_offline_report_writes_a_valid_draft_sr(tmp_path: Path, checkpoint: Path) -> None:
    case = generate_case(77, phases=("non_contrast", "arterial"), slices=24, matrix=48)
    study = StudyInfo("1.2.826.0.1.3680043.10.1452.77", "PH77")
    for n, view in enumerate(case.views, start=1):
        write_ct_series(tmp_path / "study" / f"s{n}", view.pixels, view.z_mm,
                        view.pixel_spacing_mm, view.plane, view.phase, study, n)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    config = write_config(tmp_path, {"storage": {"root": str(tmp_path / "store")},
                                     "model": {"checkpoint": str(checkpoint), "device": "cpu"}})
    result = run_cli("report", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "-c",
                     str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    [sr_path] = list((tmp_path / "out").glob("SR-*.dcm"))
    sr = pydicom.dcmread(sr_path)
    findings, impression = sr_text(sr)
    assert f"Findings: {findings}\nImpression: {impression}" in result.stdout
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert "UNVERIFIED" in sr.SeriesDescription and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study.study_instance_uid
    [algorithm] = [e for e in sr.ContributingEquipmentSequence
                   if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"]
    assert algorithm.Manufacturer == "msvlm-node" and algorithm.ManufacturerModelName == (
        "tiny-test")
    referenced = {item.ReferencedSOPInstanceUID
                  for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study_item.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    assert len(referenced) == 48  # every instance read, both phases
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    [statement] = [item.TextValue for section in sr.ContentSequence
                   if "ContentSequence" in section for item in section.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "121065"]
    assert "series 1" in statement and "series 2" in statement and "arterial" in statement
    assert dciodvfy_errors(sr_path) == []
    html = subprocess.run(["/usr/bin/dsr2html", str(sr_path)], capture_output=True, text=True,
                          timeout=60)
    assert html.returncode == 0 and "Diagnostic Imaging Report" in html.stdout


def test_mr_study_is_refused_with_a_reason(samples: Samples, tmp_path: Path,
                                           checkpoint: Path) -> None:
    folder = tmp_path / "mr"
    folder.mkdir()
    for f in samples.mr_files[:2]:
        shutil.copy(f, folder / f.name)
    config = write_config(tmp_path, {"storage": {"root": str(tmp_path / "store")},
                                     "model": {"checkpoint": str(checkpoint), "device": "cpu"}})
    result = run_cli("report", str(folder), "--out", str(tmp_path / "out"), "-c", str(config))
    assert result.returncode == 3
    assert "modality MR not supported by this checkpoint" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("findings, impression, label, outside", [
    ("No acute findings.", "Normal.", "Lung nodule", False),
    ("Nodule \u2192 4 mm, \ufffd.", "Impression: \u014b.", "N\u014bodule", True)],
    ids=["text-within-the-set", "text-outside-the-set"])
def test_sr_and_key_images_keep_the_patients_character_set(
        samples: Samples, tmp_path: Path, findings: str, impression: str, label: str,
        outside: bool) -> None:
    """The SR and the key-image document are written in the patient's character set where it
    can encode their text. A model can write what the set lacks (an untrained one writes U+FFFD,
    a label list may be in another script): then they go to UTF-8 and no character is replaced.
    Either way the patient's name reads back."""
    for name in CHARSET_FILES:
        header = pydicom.dcmread(samples.odd_dir / name, stop_before_pixels=True)
        sr = build_report_sr(findings, impression, "tiny", "0123456789abcdef",
                             "1.2.826.0.1.3680043.10.1452.5", [header],
                             [SeriesRead(header.SeriesInstanceUID, 1, "", "axial", "unknown", 1)])
        kos = build_key_images([CodedFinding(label, 0.9, None, (KeyImage(header),))],
                               "tiny", "0123456789abcdef", "1.2.826.0.1.3680043.10.1452.5")
        assert kos is not None
        expected = "ISO_IR 192" if outside else header.SpecificCharacterSet
        for kind, document in (("sr", sr), ("kos", kos)):
            assert document.SpecificCharacterSet == expected, (name, kind)
            path = tmp_path / f"{kind}-{name}"
            document.save_as(path, enforce_file_format=True)
            again = pydicom.dcmread(path)
            assert again.PatientName == header.PatientName, (name, kind)
            assert dciodvfy_errors(path) == [], (name, kind)
        assert sr_text(pydicom.dcmread(tmp_path / f"sr-{name}")) == (findings, impression)
        texts = [element.value for element in pydicom.dcmread(tmp_path / f"kos-{name}").iterall()
                 if element.keyword == "TextValue"]
        assert f"AI draft key images (unverified): {label}" in texts, name


def test_previous_report_is_referenced(built_samples: Samples) -> None:
    header = pydicom.dcmread(built_samples.odd_dir / "chrArab.dcm", stop_before_pixels=True)
    read = [SeriesRead(header.SeriesInstanceUID, 1, "", "axial", "unknown", 1)]
    first = build_report_sr("A.", "B.", "tiny", "0" * 16, "1.2.3.4", [header], read)
    second = build_report_sr("C.", "D.", "tiny", "0" * 16, "1.2.3.4", [header], read, [first])
    predecessor: Any = second.PredecessorDocumentsSequence[0]
    uid = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert uid.ReferencedSOPInstanceUID == first.SOPInstanceUID


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with a finding head: threshold 0 makes cardiomegaly positive, 1.1
    keeps the nodule negative (not assessed)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("head-ckpt"), "tiny-head",
                           "Findings: The heart is enlarged.\nImpression: Cardiomegaly.",
                           encoder="cnn", cnn_channels=[8, 16], labels=["Cardiomegaly",
                                                                        "Lung nodule"],
                           head_heads=2, finding_thresholds=[0.0, 1.1], key_slices=2)


def test_sr_codes_the_positive_findings_with_their_key_slices(tmp_path: Path,
                                                               head_checkpoint: Path) -> None:
    case = generate_case(78, phases=("non_contrast",), slices=20, matrix=48)
    study = StudyInfo("1.2.826.0.1.3680043.10.1452.78", "PH78")
    write_ct_series(tmp_path / "study" / "s1", case.views[0].pixels, case.views[0].z_mm,
                    case.views[0].pixel_spacing_mm, "axial", "non_contrast", study, 1)
    instances = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                 for p in (tmp_path / "study" / "s1").iterdir()}
    config = write_config(tmp_path, {"storage": {"root": str(tmp_path / "store")},
                                     "model": {"checkpoint": str(head_checkpoint),
                                               "device": "cpu"},
                                     "report": {"key_images": True}})
    result = run_cli("report", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "-c",
                     str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    # threshold 0 makes cardiomegaly positive, 1.1 keeps the nodule negative
    assert "Structured findings (probability; key slices):" in result.stdout
    assert "  Cardiomegaly: " in result.stdout and "Lung nodule:" not in result.stdout
    assert "series 1, instance" in result.stdout and " mm" in result.stdout
    [sr_path] = list((tmp_path / "out").glob("SR-*.dcm"))
    sr = pydicom.dcmread(sr_path)
    [coded] = sr_coded_findings(sr)
    assert (coded["code"], coded["finding"]) == ("287272002", "Cardiomegaly")
    assert 0.0 <= float(coded["probability"]) <= 1.0  # type: ignore[arg-type]
    images = list(coded["images"])  # type: ignore[call-overload]
    assert len(images) == 2 and set(images) <= instances
    assert dciodvfy_errors(sr_path) == []
    html = subprocess.run(["/usr/bin/dsr2html", str(sr_path)], capture_output=True, text=True,
                          timeout=60)
    assert html.returncode == 0 and "Cardiomegaly" in html.stdout
    # a label no probability can reach is named as not assessed, in the SR the reader opens
    assert "Not assessed by this model (never reported, whatever the images show): lung " \
        "nodule." in html.stdout.replace("\n", " ")
    # the Key Object Selection document references exactly the key slices
    [kos_path] = list((tmp_path / "out").glob("KO-*.dcm"))
    kos = pydicom.dcmread(kos_path)
    assert kos.Modality == "KO" and kos.StudyInstanceUID == study.study_instance_uid
    keyed = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
             for item in kos.ContentSequence if item.ValueType == "IMAGE"}
    assert keyed == set(images)
    assert dciodvfy_errors(kos_path) == []


def test_laterality_is_coded_where_the_text_states_it(tmp_path: Path) -> None:
    case = generate_case(79, phases=("non_contrast",), slices=4, matrix=32)
    study = StudyInfo("1.2.826.0.1.3680043.10.1452.79", "PH79")
    paths = write_ct_series(tmp_path / "s1", case.views[0].pixels, case.views[0].z_mm,
                            case.views[0].pixel_spacing_mm, "axial", "non_contrast", study, 1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    text = "A left pleural effusion is present. No pneumothorax."
    coded = [CodedFinding("Pleural effusion", 0.91, stated_side(text, "Pleural effusion"),
                          (KeyImage(headers[2]),))]
    sr = build_report_sr(text, "Left pleural effusion.", "tiny", "0" * 16, "1.2.3.4", headers,
                         [SeriesRead(study.study_instance_uid, 1, "", "axial", "unknown", 4)],
                         coded=coded)
    [row] = sr_coded_findings(sr)
    assert row["laterality"] == "Left" and row["probability"] == 0.91
    assert row["images"] == [headers[2].SOPInstanceUID]
    assert stated_side("No right pleural effusion. Cardiomegaly.", "Pleural effusion") is None
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_report_needs_no_config_file(tmp_path: Path) -> None:
    """A fresh user: no -c, no /etc file, no $MSVLM_NODE_CONFIG file; built-in defaults and the
    shipped demo checkpoint write the draft, its structured findings printed."""
    case = generate_case(80, phases=("non_contrast",), slices=40, prevalence=0.0,
                         force={"Cardiomegaly": True})
    study = StudyInfo("1.2.826.0.1.3680043.10.1452.80", "PH80")
    write_ct_series(tmp_path / "study" / "s1", case.views[0].pixels, case.views[0].z_mm,
                    case.views[0].pixel_spacing_mm, "axial", "non_contrast", study, 1)
    env = {"MSVLM_NODE_CONFIG": str(tmp_path / "absent.toml"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    result = run_cli("report", str(tmp_path / "study"), "--out", str(tmp_path / "out"),
                     env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Structured findings" in result.stdout and "Cardiomegaly" in result.stdout
    assert len(list((tmp_path / "out").glob("SR-*.dcm"))) == 1
    assert (tmp_path / "data" / "msvlm-node").is_dir()  # the device identity is kept there
