"""Completion cues beside the quiet period: the association release (over two receiving
processes) and the image counts the headers announce. The quiet period here is 10 minutes, so
every job below comes from a cue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.config import Config
from tests.conftest import ServeProcess, write_phantom_study
from tests.integration.test_pipeline import jobs_of
from tests.peers import storescu, wait_for

pytestmark = pytest.mark.integration

QUIET_S = 600


def cue_config(make_config: Callable[..., Config], **completion: Any) -> Config:
    return make_config(node={"receive_processes": 2},
                       completion={"stable_age_s": QUIET_S, "settle_s": 1, **completion})


def open_association(port: int, calling: str = "HOLDER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSVLM")
    assert assoc.is_established
    return assoc


def store_all(assoc: Any, files: list[Path]) -> None:
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000


def no_job_for(config: Config, uid: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert jobs_of(config, uid) == [], "a job was queued before the study was complete"
        time.sleep(0.2)


def test_released_association_completes_the_study(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    config = cue_config(make_config)
    serve(config)
    write_phantom_study(tmp_path / "study", 51, slices=20, matrix=32)
    start = time.monotonic()
    storescu(config.node.port, tmp_path / "study")  # one association, released at the end
    [job] = wait_for(lambda: jobs_of(config, "1.2.826.0.1.3680043.10.1452.51"), timeout_s=30,
                     what="the job from the association cue")
    assert time.monotonic() - start < 15 < QUIET_S
    assert job.state.value == "queued"


def test_another_open_association_holds_the_study_back(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    config = cue_config(make_config)
    serve(config)  # two receiving processes: the two associations may land in either
    uid = "1.2.826.0.1.3680043.10.1452.52"
    files = write_phantom_study(tmp_path / "study", 52, phases=("non_contrast", "arterial"),
                                slices=20, matrix=32)
    first = [f for f in files if f.parent.name == "s1"]
    second = [f for f in files if f.parent.name == "s2"]
    holder = open_association(config.node.port)
    store_all(holder, first)  # series 1 arrives; the association stays open
    storescu(config.node.port, *second)  # series 2 on another association, released
    no_job_for(config, uid, 4)  # released, but the first association still holds the study
    holder.release()
    wait_for(lambda: jobs_of(config, uid), timeout_s=30, what="the job after the last release")


def test_aborted_association_is_no_cue(tmp_path: Path, make_config: Callable[..., Config],
                                       serve: Callable[[Config], ServeProcess]) -> None:
    config = cue_config(make_config)
    serve(config)
    files = write_phantom_study(tmp_path / "study", 53, slices=20, matrix=32)
    assoc = open_association(config.node.port)
    store_all(assoc, files[:10])
    assoc.abort()  # the sender broke off: more may come when it retries
    no_job_for(config, "1.2.826.0.1.3680043.10.1452.53", 4)


def test_announced_image_count_completes_the_study_while_the_association_stays_open(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    config = cue_config(make_config, association_cue=False)
    serve(config)
    uid = "1.2.826.0.1.3680043.10.1452.54"
    files = write_phantom_study(tmp_path / "study", 54, slices=20, matrix=32)
    for f in files:  # the headers announce the series' 20 images
        ds = pydicom.dcmread(f)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(f)
    assoc = open_association(config.node.port)
    try:
        store_all(assoc, files[:-1])
        no_job_for(config, uid, 3)  # 19 of 20: not complete
        store_all(assoc, files[-1:])
        wait_for(lambda: jobs_of(config, uid), timeout_s=30,
                 what="the job from the expected-count cue")
    finally:
        assoc.release()
    assert len(jobs_of(config, uid)) == 1
