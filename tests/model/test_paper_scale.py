"""The paper's configuration (runs/ctrate-paper.toml) built on the meta device: the parameter
counts and the per-GPU memory the README quotes for one H100."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models.budget import finetune_memory, meta_model, parameter_counts
from models.msvlm import MSVLMConfig
from models.train import RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RUN = Path(__file__).resolve().parents[2] / "runs" / "ctrate-paper.toml"


@pytest.fixture(scope="module")
def config() -> MSVLMConfig:
    raw = tomllib.loads(RUN.read_text())
    run = RunConfig.from_toml(raw, RUN)
    assert run.stages == ["pretrain", "mem", "align", "finetune"]  # the paper's order
    return MSVLMConfig.from_dict(run.model)


def test_paper_model_has_the_papers_sizes(config: MSVLMConfig) -> None:
    model = meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = parameter_counts(model)
    assert 86e6 < counts["vision_tower"] < 88e6  # ViT-B/16 (+ 480-px position embeddings)
    assert 84e6 < counts["z_former"] < 88e6  # 12 layers, d=768
    assert 6.5e9 < counts["language_model"] < 6.8e9  # Vicuna-7B's shape (tied embeddings)
    lora = counts["trainable_in_finetune"] - counts["z_former"] - counts["resampler"] - \
        counts["projector"]
    assert lora == 32 * 2 * 8 * (4096 + 4096)  # r=8 on q and v of 32 layers


def test_memory_estimate_matches_the_readme(config: MSVLMConfig) -> None:
    """README: finetune batch 8 per H100 ~18 GiB with activation checkpointing, ~45 GiB
    without; batch 16 without checkpointing ~78 GiB, at the edge of an 80 GB H100."""
    with_ckpt = finetune_memory(config, batch=8, checkpointing=True)
    without = finetune_memory(config, batch=8, checkpointing=False)
    assert 12.0 < with_ckpt["weights_gib"] < 13.0
    assert 15 < with_ckpt["total_gib"] < 21
    assert 40 < without["total_gib"] < 50
    assert 74 < finetune_memory(config, batch=16, checkpointing=False)["total_gib"] < 80


@pytest.mark.parametrize("name", sorted(p.name for p in RUN.parent.glob("*.toml")))
def test_every_shipped_run_file_is_valid(name: str) -> None:
    """Each run file in runs/ parses, validates and builds its model (on the meta device): a
    broken file would only show when someone starts an hour of training with it."""
    path = RUN.parent / name
    run = RunConfig.from_toml(tomllib.loads(path.read_text()), path)
    assert run.stages
    model = meta_model(MSVLMConfig.from_dict(run.model))
    assert sum(p.numel() for p in model.parameters()) > 0
