"""Training machinery on tiny configs: every stage learns, resume is exact, the embedding cache
is reused and invalidated, DDP keeps ranks identical, the baseline trains through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.data import phantom_dataset
from models.train import STAGES, RunConfig, Trainer
from tests.conftest import MSVLM_NODE

MODEL = {"image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1,
         "vision_heads": 2, "vision_mlp": 64, "z_hidden": 32, "z_layers": 1, "z_heads": 2,
         "z_mlp": 64, "num_queries": 8, "max_new_tokens": 24,
         "lm_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2,
                       "max_position_embeddings": 512}}


def run_config(out: Path, steps: int = 30, **model: Any) -> RunConfig:
    raw = {"run": {"out": str(out), "seed": 3, "device": "cpu", "eval_studies": 3},
           "model": {**MODEL, **model}, "tokenizer": {"vocab_size": 400},
           **{s: {"steps": steps, "lr": 5e-3, "batch": 8 if s == "pretrain" else 4,
                  "eval_every": 10, "warmup": 2} for s in STAGES}}
    return RunConfig.from_toml(raw, out / "run.toml", "test")


@pytest.fixture(scope="module")
def data() -> Any:
    return phantom_dataset(8, 3, seed=5, matrix=40, slices=16)


def test_every_stage_lowers_its_loss_and_the_run_is_recorded(tmp_path: Path, data: Any) -> None:
    trainer = Trainer(run_config(tmp_path / "run"), data)
    metrics = trainer.train()
    assert trainer.run.stages == ["pretrain", "mem", "align", "finetune"]  # no labels: no head
    for stage in trainer.run.stages:
        losses = trainer.curves[stage]["loss"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), (stage, losses[:5], losses[-5:])
        assert (tmp_path / "run" / f"loss_{stage}.png").stat().st_size > 1000
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["training"]["run_file"] == "test" and card["training"]["data"]["source"] == (
        "phantoms")
    assert "ce_f1_macro" in metrics and "ce_f1_macro" in card["metrics"]
    from models.generator import ReportGenerator
    generator = ReportGenerator.from_pretrained(tmp_path / "run", device="cpu")
    assert generator.card["modalities"] == ["CT"]


def test_stages_keep_their_order(tmp_path: Path) -> None:
    raw = {"run": {"out": str(tmp_path), "stages": ["finetune", "findings"]},
           "model": {**MODEL, "labels": ["Cardiomegaly"]}}
    with pytest.raises(ValueError, match="must keep the order"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw = {"run": {"out": str(tmp_path), "stages": ["findings"]}, "findings": {"select": "f1"},
           "model": {**MODEL, "labels": ["Cardiomegaly"]}}
    with pytest.raises(ValueError, match=r"\[findings\] select: 'f1'"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {"cue_loss": -1}
    with pytest.raises(ValueError, match=r"run.toml: \[findings\] cue_loss"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {"cue_freeze": True}  # nothing fitted to keep
    with pytest.raises(ValueError, match=r"run.toml: \[findings\] cue_freeze: needs cue_fit"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {"cue_fit": True, "cue_labels": ["Lung nodule"]}  # not a label of the run
    with pytest.raises(ValueError, match=r"run.toml: \[findings\] cue_labels: 'Lung nodule'"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {"cue_fit": True, "cue_l1": [0.01, -0.1]}
    with pytest.raises(ValueError, match=r"run.toml: \[findings\] cue_l1: must be a number"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {"cue_labels": ["Cardiomegaly"]}  # nothing fitted to restrict
    with pytest.raises(ValueError, match=r"run.toml: \[findings\] cue_labels: needs cue_fit"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["findings"] = {}
    raw["run"]["precision"] = "fp16"
    with pytest.raises(ValueError, match=r"run.toml: \[run\] precision: 'fp16' is not one"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["run"]["precision"] = "bf16"
    raw["finetune"] = {"precision": "half"}
    with pytest.raises(ValueError, match=r"run.toml: \[finetune\] precision: 'half'"):
        RunConfig.from_toml(raw, tmp_path / "run.toml")
    raw["finetune"] = {"precision": "fp32"}  # a stage's own precision over the run's
    run = RunConfig.from_toml(raw, tmp_path / "run.toml")
    assert run.stage["finetune"]["precision"] == "fp32"
    assert run.stage["findings"]["precision"] == "bf16"


def test_bf16_training_steps_learn_and_the_card_says_how_the_run_was_trained(
        tmp_path: Path, data: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import models.train

    curves = {}
    for precision in ("fp32", "bf16"):
        run = run_config(tmp_path / precision, steps=20)
        run.stages = ["finetune"]
        run.stage["finetune"]["precision"] = precision
        trainer = Trainer(run, data)
        trainer.train()
        card = json.loads((tmp_path / precision / "model_card.json").read_text())
        native = models.train.bf16_native(torch.device("cpu"))
        assert card["training"]["precision"] == {
            "finetune": "bf16" if precision == "bf16" and native else "fp32"}
        assert card["training"]["machine_reference"]["matmul_fp32_gflops"] > 0
        curves[precision] = losses = trainer.curves["finetune"]["loss"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), (precision, losses)
    if models.train.bf16_native(torch.device("cpu")):  # autocast ran: same start, other sums
        assert curves["bf16"] != curves["fp32"]
        np.testing.assert_allclose(curves["bf16"][0], curves["fp32"][0], rtol=0.02)
    # a CPU without bf16 units would run bf16 emulated, slower than fp32: it warns and says so
    monkeypatch.setattr(models.train, "bf16_native", lambda device: False)
    run = run_config(tmp_path / "emulated", steps=2)
    run.stages = ["finetune"]
    run.stage["finetune"]["precision"] = "bf16"
    with caplog.at_level("WARNING", logger="models.train"):
        Trainer(run, data).train()
    assert "no native bf16 matrix units" in caplog.text
    card = json.loads((tmp_path / "emulated" / "model_card.json").read_text())
    assert card["training"]["precision"] == {"finetune": "fp32"}


def test_resume_follows_the_same_curve(tmp_path: Path, data: Any) -> None:
    full = Trainer(run_config(tmp_path / "a", steps=20), data)
    full.run_stage("pretrain")
    full.run_stage("finetune")
    interrupted = Trainer(run_config(tmp_path / "b", steps=20), data)
    interrupted.run_stage("pretrain")
    interrupted.run_stage("finetune", stop_after=10)  # state saved at step 10
    resumed = Trainer(run_config(tmp_path / "b", steps=20), data)  # a new process, same files
    resumed.run_stage("pretrain")  # done: skipped, weights loaded
    resumed.run_stage("finetune")
    np.testing.assert_allclose(resumed.curves["finetune"]["loss"],
                               full.curves["finetune"]["loss"], rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(sorted(full.model.state_dict().items()),
                                 sorted(resumed.model.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_embedding_cache_reused_and_invalidated(tmp_path: Path, data: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(run_config(tmp_path / "c", steps=2), data)
    study = data.train[0]
    first = trainer.encoded(study)
    calls = []
    original = trainer.model.encode_slices
    monkeypatch.setattr(trainer.model, "encode_slices",
                        lambda view, **kw: calls.append(1) or original(view, **kw))
    trainer.reset_cache()
    again = trainer.encoded(study)  # from disk, not recomputed
    assert calls == [] and torch.equal(first[0].embeddings, again[0].embeddings)
    with torch.no_grad():
        next(trainer.model.vision_tower.parameters()).add_(0.5)  # the encoder changes
    trainer.reset_cache()
    changed = trainer.encoded(study)
    assert len(calls) == len(first) and not torch.equal(first[0].embeddings,
                                                         changed[0].embeddings)
    assert len(list((tmp_path / "c" / "cache").iterdir())) == 2


def _write_run(path: Path, out: str, encoder: str = "slice", steps: int = 4) -> Path:
    model = {**MODEL, "encoder": encoder, "patch3d_depth": 16, "patch3d_patch_depth": 4}
    lines = [f'[run]\nout = "{out}"\nseed = 1\ndevice = "cpu"\neval_studies = 2',
             '[data]\nsource = "phantoms"\ncount = 6\nvalid_count = 2\nmatrix = 40\nslices = 16',
             "[tokenizer]\nvocab_size = 300", "[model]"]
    for key, value in model.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {v}" for k, v in value.items())
            lines.append(f"{key} = {{{inner}}}")
        else:
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    for stage in STAGES:
        lines.append(f"[{stage}]\nsteps = {steps}\nbatch = 4\neval_every = 2\nlr = 5e-3")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_baseline_trains_through_the_cli(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "baseline.toml", "baseline", encoder="patch3d", steps=12)
    result = subprocess.run([MSVLM_NODE, "train", str(run)], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((tmp_path / "baseline" / "model_card.json").read_text())
    assert card["name"] == "3D-patch baseline"
    curve = json.loads((tmp_path / "baseline" / "stages" / "pretrain" / "done.json").read_text())
    losses = curve["curves"]["loss"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    config = json.loads((tmp_path / "baseline" / "config.json").read_text())
    assert config["model"]["encoder"] == "patch3d"


def test_two_process_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "ddp.toml", "ddp", steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         MSVLM_NODE, "train", str(run)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "model_card.json").read_text())
    hashes = card["training"]["rank_weight_hashes"]
    assert card["training"]["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    shutil.rmtree(tmp_path / "ddp" / "cache", ignore_errors=True)


def test_language_stages_retrained_on_a_finished_findings_stage(tmp_path: Path) -> None:
    """``[findings] init_from``: a run takes the vision tower, Z-former, finding head and
    thresholds of a finished checkpoint and trains only the language stages, here on more
    studies (``[data] extra``: a low-prevalence group); the model card says where the findings
    stage was trained, through any number of such runs; a checkpoint that does not fit the
    run's model is refused by name."""
    from models.generator import load_checkpoint
    from node.research import load_dataset

    def config(out: str, init_from: str = "", findings: dict[str, Any] | None = None,
               **model: Any) -> RunConfig:
        raw = {"run": {"out": out, "seed": 3, "device": "cpu", "eval_studies": 2,
                       "stages": ["findings", "align"]},
               "model": {**MODEL, "labels": ["Cardiomegaly", "Pleural effusion"],
                         "head_heads": 2, "condition_on_findings": True, **model},
               "tokenizer": {"vocab_size": 300},
               "findings": {"steps": 6, "batch": 4, "eval_every": 3, "lr": 5e-3,
                            "probe_studies": 6, "init_from": init_from, **(findings or {})},
               "align": {"steps": 4, "batch": 4, "eval_every": 2, "lr": 5e-3}}
        return RunConfig.from_toml(raw, tmp_path / "run.toml", "test")

    base = {"source": "phantoms", "count": 6, "valid_count": 3, "seed": 5, "matrix": 40,
            "slices": 16}
    first = Trainer(config("first"), load_dataset(base, tmp_path))
    first.train()
    more = load_dataset({**base, "extra": [{"count": 4, "prevalence": 0.0}]}, tmp_path)
    assert len(more.train) == 10 and [s.study_id for s in more.train[:6]] == [
        s.study_id for s in first.data.train]  # the main studies stay as they were
    assert all(not first.targets(s).any() for s in more.train[6:])  # prevalence 0: normal
    assert more.fingerprint != first.data.fingerprint  # its own embedding cache
    second = Trainer(config("second", "first"), more)  # relative to the run file
    second.train()
    _, _, card = load_checkpoint(tmp_path / "first")[:3]
    model, _, card2, _ = load_checkpoint(tmp_path / "second")
    trained = load_checkpoint(tmp_path / "first")[0].state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(Trainer.FINDINGS_PARTS):
            torch.testing.assert_close(value, trained[key], msg=key)
    assert model.config.finding_thresholds == first.config.finding_thresholds
    assert second.curves["align"]["loss"]  # the language stage trained
    # the card times the stages this run trained (the taken-over findings stage is not one)
    assert set(card["training"]["stage_seconds"]) == {"findings", "align",
                                                      "validation drafts"}
    assert set(card2["training"]["stage_seconds"]) == {"align", "validation drafts"}
    assert all(v > 0 for v in card["training"]["stage_seconds"].values())
    origin = card2["training"]["findings_from"]
    assert origin["checkpoint"] == str(tmp_path / "first") and origin["run_file"] == "test"
    assert card2["probe"] == card["probe"] and "taken over from checkpoint" in card2["frozen"][0]
    assert card2["training"]["data"]["extra"] == [{"count": 4, "prevalence": "0.0"}]
    third = Trainer(config("third", "second"), more)  # still names where it was trained
    third.train()
    _, _, card3, _ = load_checkpoint(tmp_path / "third")
    assert card3["training"]["findings_from"]["checkpoint"] == str(tmp_path / "first")
    with pytest.raises(ValueError, match=r"second does not match this run's \[model\] at "
                                         r"z_former\."):
        Trainer(config("fourth", "second", z_hidden=48), more).train()
    with pytest.raises(ValueError, match=r"\[data\] extra\[0\] key 'prevalance'"):
        load_dataset({**base, "extra": [{"count": 4, "prevalance": 0.1}]}, tmp_path)
    with pytest.raises(ValueError, match=r"\[data\] nodule_order 'random' - 'size'"):
        load_dataset({**base, "nodule_order": "random"}, tmp_path)
    # [findings] extra = false: the head learns from the 6 main studies, the text from all 10
    own = Trainer(config("own", findings={"extra": False, "probe_studies": 20}), more)
    own.train()
    _, _, card5, _ = load_checkpoint(tmp_path / "own")
    assert card5["probe"]["train_studies"] == 6 and len(own.data.train) == 10
    assert "on the 6 main training studies without [data] extra" in card5["frozen"][0]
    assert {s.study_id for s in more.train} <= set(own._cache)  # the align stage read them
    with pytest.raises(ValueError, match=r"\[findings\] extra: must be true or false"):
        config("sixth", findings={"extra": "no"})


def test_language_stages_read_the_frozen_z_former_once_per_study(tmp_path: Path, data: Any,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """While the Z-former and the finding head are frozen (the language stages of a model with
    a head), each study's Z-former tokens and head output are computed once, for the study alone
    as at inference, and the loss on them is the loss the whole model gives."""
    raw = {"run": {"out": str(tmp_path / "f"), "seed": 3, "device": "cpu", "eval_studies": 2,
                   "stages": ["findings", "align"]},
           "model": {**MODEL, "labels": ["Cardiomegaly", "Pleural effusion"], "head_heads": 2,
                     "condition_on_findings": True, "finding_evidence": True},
           "tokenizer": {"vocab_size": 300},
           "findings": {"steps": 4, "batch": 4, "eval_every": 2, "lr": 5e-3, "probe_studies": 4},
           "align": {"steps": 2, "batch": 4, "eval_every": 2, "lr": 5e-3}}
    trainer = Trainer(RunConfig.from_toml(raw, tmp_path / "run.toml", "test"), data)
    trainer.run_stage("findings")
    trainer._stage = "findings"
    trainer._setup_stage("findings")  # the Z-former trains: nothing may be kept
    assert trainer._batch_report(data.train[:2], np.random.default_rng(0), 2)[-1] is None
    trainer._stage = "align"
    trainer._setup_stage("align")
    calls = []
    original = trainer.model.z_former.forward
    monkeypatch.setattr(trainer.model.z_former, "forward",
                        lambda *a: calls.append(a[0].shape[0]) or original(*a))
    studies = data.train[:4]
    views, ids, mask, states, weights, frozen = trainer._batch_report(
        studies, np.random.default_rng(0), 4)
    assert calls == [1, 1, 1, 1] and len(frozen) == 4  # one study at a time
    again = trainer._batch_report(studies, np.random.default_rng(1), 4)[-1]
    assert calls == [1, 1, 1, 1] and {id(f) for f in again} == {id(f) for f in frozen}
    trainer.model.eval()
    with torch.no_grad():
        kept = trainer.model(views, ids, mask, states, weights, frozen)
        whole = trainer.model(views, ids, mask, states, weights)  # the batch through all of it
    assert calls[-1] == 4
    torch.testing.assert_close(kept, whole, rtol=1e-5, atol=1e-5)
    trainer.reset_cache()  # a new stage reads them again
    assert not trainer._reads
