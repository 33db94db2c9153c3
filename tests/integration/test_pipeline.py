"""The whole product on loopback: dcmtk pushes a study, the node reports it with the demo
checkpoint, and the draft SR arrives at Orthanc and at dcmtk's storescp."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest

from node.config import Config
from node.jobs import JobQueue
from node.sr import sr_text
from storage.files import FileStore
from storage.index import Index
from storage.schema import DeliveryState, JobState
from tests.conftest import MSVLM_NODE, run_cli, write_phantom_study
from tests.samples import Samples
from tests.integration.test_report_offline import dciodvfy_errors
from tests.peers import Orthanc, StoreSCP, storescu, wait_for

pytestmark = pytest.mark.integration


def queue(config: Config) -> JobQueue:
    return JobQueue(Index(config.storage.effective_database_url,
                          FileStore(config.storage.root)), config)


def jobs_of(config: Config, study_uid: str) -> list[Any]:
    return [job for job, uid in queue(config).jobs() if uid == study_uid]


def finished(config: Config, study_uid: str, count: int = 1) -> list[Any]:
    """The study's jobs once ``count`` of them are done or failed."""
    jobs = jobs_of(config, study_uid)
    ended = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]
    return jobs if len(ended) >= count else []


def sent_count(config: Config) -> int:
    return sum(d.state == DeliveryState.SENT for d in queue(config).deliveries())


def pipeline_config(make_config: Callable[..., Config], *peers: Any, **sections: Any) -> Config:
    tables = {f"peers__{p.ae_title.lower()}": {"ae_title": p.ae_title, "host": "127.0.0.1",
                                                "port": p.port} for p in peers}
    base: dict[str, Any] = {
        "completion": {"stable_age_s": 1.5},
        "worker": {"processes": 1},
        "model": {"checkpoint": "demo", "device": "cpu", "threads": 1},
        "report": {"send_to": [p.ae_title.lower() for p in peers]},
        "delivery": {"retry_delay_s": 0.5, "max_retry_delay_s": 2},
    }
    for name, table in sections.items():
        base.setdefault(name, {}).update(table)
    return make_config(**tables, **base)  # type: ignore[no-any-return]


def test_study_becomes_a_draft_sr_at_orthanc_and_storescp(tmp_path: Path, make_config: Any,
                                                          serve: Any) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    scp = StoreSCP(tmp_path).start()
    try:
        config = pipeline_config(make_config, orthanc, scp, report={"pdf": True})
        node = serve(config)
        study = tmp_path / "study"
        files = write_phantom_study(study, 31, localizer=True)
        storescu(config.node.port, study)
        [job] = wait_for(lambda: finished(config, "1.2.826.0.1.3680043.10.1452.31"),
                         what="the report job")
        assert job.state == JobState.DONE, job.error
        assert job.series_read.startswith("1 axial non_contrast (24)")
        assert "99" not in job.series_read.split(";")[0]  # the localizer was not read

        # Orthanc holds the SR and the PDF, checked through its REST API
        [sr_id] = wait_for(lambda: orthanc.instances_of_modality("SR"), what="SR at Orthanc")
        [pdf_id] = wait_for(lambda: orthanc.instances_of_modality("DOC"), what="PDF at Orthanc")
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        assert tags["SOPInstanceUID"] == job.sr_sop_instance_uid
        assert tags["StudyInstanceUID"] == "1.2.826.0.1.3680043.10.1452.31"
        assert orthanc.get(f"/instances/{pdf_id}/simplified-tags")["MIMETypeOfEncapsulatedDocument"] \
            == "application/pdf"
        (tmp_path / "from-orthanc.dcm").write_bytes(orthanc.get(f"/instances/{sr_id}/file"))
        sr = pydicom.dcmread(tmp_path / "from-orthanc.dcm")
        (tmp_path / "pdf.dcm").write_bytes(orthanc.get(f"/instances/{pdf_id}/file"))
        pdf = pydicom.dcmread(tmp_path / "pdf.dcm")
        assert pdf.EncapsulatedDocument.startswith(b"%PDF-")
        findings, impression = sr_text(sr)  # the PDF carries the same report
        for text in (findings, impression):
            # the PDF's fonts are Latin-1: anything else is replaced there (the SR keeps it)
            assert " ".join(text.split()[:3]).encode("latin-1", "replace") in \
                pdf.EncapsulatedDocument
        assert dciodvfy_errors(tmp_path / "pdf.dcm") == []

        # storescp got both objects, exactly once
        wait_for(lambda: len(scp.files()) == 2, what="2 files at storescp")
        received = {pydicom.dcmread(f).SOPInstanceUID for f in scp.files()}
        assert job.sr_sop_instance_uid in received
        assert dciodvfy_errors(tmp_path / "from-orthanc.dcm") == []
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
        referenced = {i.ReferencedSOPInstanceUID
                      for st in sr.CurrentRequestedProcedureEvidenceSequence
                      for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        axial = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
                 if f.parent.name == "s1"}
        assert referenced == axial  # every axial instance, no localizer
        wait_for(lambda: sent_count(config) >= 4,
                 what="4 deliveries recorded as sent")  # peers store before the node records
        deliveries = queue(config).deliveries()
        assert sorted((d.peer, d.state) for d in deliveries) == sorted(
            [("orthanc", DeliveryState.SENT)] * 2 + [("storescp", DeliveryState.SENT)] * 2)

        # the offline mode writes the same report from the same files
        offline = run_cli("report", str(study), "--out", str(tmp_path / "offline"), "-c",
                          str(config.path))
        assert offline.returncode == 0, offline.stderr
        assert f"Findings: {findings}\nImpression: {impression}" in offline.stdout

        listing = run_cli("jobs", "-c", str(config.path))
        assert f"SR {job.sr_sop_instance_uid}" in listing.stdout
        assert "PH31" not in node.output()  # no PHI in the log
    finally:
        orthanc.stop()
        scp.stop()


def test_sr_only_and_mr_studies_start_no_report(tmp_path: Path, make_config: Any,
                                                serve: Any, built_samples: Samples) -> None:
    # the node receives; the model runs in a worker started on its own (as on a GPU machine)
    config = pipeline_config(make_config, worker={"processes": 0})
    serve(config)
    worker = subprocess.Popen([MSVLM_NODE, "worker", "-c", str(config.path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        check_sr_only_and_mr(tmp_path, config, built_samples.mr_files[0])
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0  # SIGTERM: a clean stop


def check_sr_only_and_mr(tmp_path: Path, config: Config, mr_file: Path) -> None:
    # SR objects only (for instance our own drafts echoed back by a PACS): no job
    header = pydicom.dcmread(write_phantom_study(tmp_path / "ct", 32)[0],
                             stop_before_pixels=True)
    from node.sr import SeriesRead, build_report_sr

    srs = tmp_path / "srs"
    srs.mkdir()
    for n in range(3):
        sr = build_report_sr("A.", "B.", "demo", "0" * 16, "1.2.3.4", [header],
                             [SeriesRead(header.SeriesInstanceUID, 1, "", "axial", "unknown", 1)])
        sr.save_as(srs / f"sr{n}.dcm", enforce_file_format=True)
    storescu(config.node.port, srs)
    # an MR study under the demo checkpoint (chest CT only): refused with a stored reason
    storescu(config.node.port, mr_file)
    mr_study = str(pydicom.dcmread(mr_file, stop_before_pixels=True).StudyInstanceUID)
    [job] = wait_for(lambda: finished(config, mr_study), what="the MR job")
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.error.startswith("not reported: no eligible series")
    assert "modality MR not supported by this checkpoint" in job.error
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    assert index.instance_count() >= 3 + 1
    assert jobs_of(config, str(header.StudyInstanceUID)) == []
    listing = run_cli("jobs", "-c", str(config.path))
    assert "modality MR not supported by this checkpoint" in listing.stdout


def test_killed_before_stable_reports_exactly_once(tmp_path: Path, make_config: Any,
                                                   serve: Any) -> None:
    scp = StoreSCP(tmp_path).start()
    try:
        config = pipeline_config(make_config, scp, completion={"stable_age_s": 4})
        node = serve(config)
        write_phantom_study(tmp_path / "study", 33)
        storescu(config.node.port, tmp_path / "study")
        node.kill()  # acknowledged, maybe not yet indexed, certainly not yet stable
        assert jobs_of(config, "1.2.826.0.1.3680043.10.1452.33") == []
        serve(config)
        [job] = wait_for(lambda: finished(config, "1.2.826.0.1.3680043.10.1452.33"),
                         what="the report job after the restart")
        assert job.state == JobState.DONE
        wait_for(lambda: len(scp.files()) == 1, what="the SR at storescp")
        time.sleep(3)  # several more completion scans: still one job, one SR
        assert len(jobs_of(config, "1.2.826.0.1.3680043.10.1452.33")) == 1
        assert len(scp.files()) == 1
    finally:
        scp.stop()


def test_destination_down_then_up_and_a_new_series(tmp_path: Path, make_config: Any,
                                                   serve: Any) -> None:
    # the draft goes back to the peer that sent the study (a dcmtk storescp, down for now)
    scp = StoreSCP(tmp_path)
    config = pipeline_config(make_config, scp,
                             report={"send_to": [], "send_back_to_sender": True})
    serve(config)
    uid = "1.2.826.0.1.3680043.10.1452.34"
    write_phantom_study(tmp_path / "study", 34)
    storescu(config.node.port, tmp_path / "study", calling=scp.ae_title)
    wait_for(lambda: finished(config, uid), what="the report job")
    [failing] = wait_for(lambda: [d for d in queue(config).deliveries() if d.attempts >= 2],
                         what="two failed delivery attempts")
    assert failing.state == DeliveryState.PENDING and "association" in failing.last_error
    scp.start()
    try:
        wait_for(lambda: [d for d in queue(config).deliveries() if d.state == DeliveryState.SENT],
                 what="the delivery after the destination came up")
        assert len(scp.files()) == 1
        first = pydicom.dcmread(scp.files()[0])
        # a new image series of the reported study: a second report that supersedes the first
        write_phantom_study(tmp_path / "more", 35, study_uid=uid, first_series=2)
        storescu(config.node.port, tmp_path / "more", calling=scp.ae_title)
        jobs = wait_for(lambda: finished(config, uid, 2), what="the second report job")
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        wait_for(lambda: len(scp.files()) == 2, what="the second SR")
        [second] = [pydicom.dcmread(f) for f in scp.files()
                    if pydicom.dcmread(f).SOPInstanceUID != first.SOPInstanceUID]
        predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            first.SOPInstanceUID
        assert len(second.CurrentRequestedProcedureEvidenceSequence[0]
                   .ReferencedSeriesSequence) == 2  # both series read
    finally:
        scp.stop()
