"""Staged training of MS-VLM (and of the 3D-patch baseline) from one run file.

Stages, each resumable from its own state and skipped once done:

1. ``pretrain``  self-supervised vision tower: MAE (transformers ``ViTMAEForPreTraining``, then
   the weights serve the encoding ``ViTModel``) for the slice ViT; masked 3D-patch modelling for
   the baseline encoder.
2. ``mem``       Z-former masked embedding modelling (mask 0.3, L1) on cached slice embeddings.
3. ``findings``  the finding head, trained end to end with the slice encoder and the Z-former
   (class-balanced BCE on study labels). A two-part encoder (``pyramid``) caches its fixed lower
   part once and every slice trains the rest; any other encoder encodes every slice without
   gradients, then a sampled subset per view (half the slices the head attends to most, half at
   random) again with gradients, so the encoder learns from the slices that matter within a CPU
   budget. Decision thresholds are then tuned on the validation split and stored in the config,
   and a linear probe (``models.probe``) of every stage's features is written to the
   run log, ``stages/findings/done.json`` and the model card. Afterwards encoder, Z-former and head stay frozen.
4. ``align``     resampler + projector (+ label tokens) on report generation, the rest frozen.
5. ``finetune``  report generation: resampler, projector, label tokens and the LM (full for small
   LMs, LoRA when the model config sets ``lora``); the Z-former too when there is no head.
   A findings-conditioned model reads the true labels here (flipped with ``label_noise``) and
   its own decisions at inference, so its sentences follow its structured findings.

After stage 1 (or 3) the vision tower is frozen, so slice embeddings are computed once and cached on disk
under ``cache/<data fingerprint>-<encoder hash>/``: a changed encoder never reuses stale ones.
Data order depends only on (seed, stage, step), so a resumed run follows the same loss curve.
Under ``torchrun`` the same command trains with DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.data import Dataset, StudyItem
from models.msvlm import (MSVLM, EncodedView, FrozenRead, MSVLMConfig, preprocess,
                          site_words)
from models.report import (encode_targets, finding_weights, format_report, special_ids,
                           train_tokenizer)

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "mem", "findings", "align", "finetune")
STAGE_SEEDS = {"pretrain": 0, "findings": 1, "mem": 2, "align": 3, "finetune": 4}
"""Each stage's part of the data-order seed (fixed, so reordering stages changes no run)."""
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"steps": 200, "lr": 1e-3, "batch": 32, "mask_ratio": 0.75},
    "findings": {"steps": 300, "lr": 1e-3, "batch": 8, "grad_slices": 32,
                 "probe_studies": 300, "min_auroc": 0.0, "select": "loss", "cue_loss": 0.0,
                 "cue_fit": False, "cue_freeze": False, "cue_choice": False, "cue_labels": [],
                 "cue_l1": 0.01,
                 "init_from": "", "extra": True},
    "mem": {"steps": 200, "lr": 1e-3, "batch": 8},
    "align": {"steps": 200, "lr": 1e-3, "batch": 8, "label_noise": 0.0, "length_groups": 1},
    "finetune": {"steps": 400, "lr": 5e-4, "batch": 8, "label_noise": 0.0,
                 "finding_weight": 1.0, "finding_weight_labels": [], "length_groups": 1},
}
COMMON = {"eval_every": 50, "patience": 0, "weight_decay": 0.01, "warmup": 20,
          "precision": ""}
PRECISIONS = ("fp32", "bf16")
"""``[run] precision`` (a stage's own ``precision`` overrides it): ``bf16`` runs each training
step's forward pass under bfloat16 autocast (weights, optimizer and gradients stay float32;
validation, thresholds and inference stay float32). Only where the device has native bf16
matrix units (CUDA with bf16; a CPU with AVX512-BF16 or AMX): elsewhere bf16 is emulated and
slower, so the run warns and trains in float32."""


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (else autocast would be slower
    than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's own CPU probes are private: a torch without one reads as "no" (fp32, warned)
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def machine_reference(seconds: float = 0.5) -> dict[str, Any]:
    """A fixed CPU workload timed at the start of a run, so a run's wall time can be read at a
    stated machine speed (this project's CPU machines vary by 1.3x within a day): float32
    matrix products of 512 x 512 on the run's threads for about ``seconds``, as GFLOP/s."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    torch.mm(a, b)
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            torch.mm(a, b)
        n += 10
    took = time.perf_counter() - began
    return {"matmul_fp32_gflops": round(2 * 512 ** 3 * n / took / 1e9, 1),
            "threads": torch.get_num_threads(), "workload": "float32 512x512 matrix products"}


def supervision(config: Any) -> str:
    """What the model card says the model learned from (beyond the code's design)."""
    text = ("study-level report text and the labels the rule labeler reads from it; no "
            "lesion positions or other signal beyond what real data sets have")
    if (config.encoder == "pyramid" and config.pyramid_nodules
            and config.pyramid_nodule_detector == 3):
        text += (", except the nodule detector's candidate classifier (models/cnn.py "
                 "NODULE_SCORER, 17 numbers), fitted on the nodule positions of 200 phantoms "
                 "of seed 73 (bench/fit_nodule_scorer.py), which real data sets do not have")
    elif (config.encoder == "pyramid" and config.pyramid_nodules
            and config.pyramid_nodule_detector == 4):
        text += (", except the nodule detector's candidate classifier (models/cnn.py "
                 "NODULE_MLP_FILE, an MLP of 577 weights kept in the checkpoint), fitted on the "
                 "nodule positions of 500 phantoms of seed 73 with one or two nodules each "
                 "(bench/fit_nodule_scorer.py --mlp), which real data sets do not have")
    return text


@dataclass
class RunConfig:
    """A run file (TOML) validated: ``[run]``, ``[model]``, ``[tokenizer]`` and one table per
    stage (``steps``, ``lr``, ``batch``, ``eval_every``, ``patience``, ...)."""

    out: Path
    seed: int
    device: str
    stages: list[str]
    model: dict[str, Any]
    vocab_size: int
    stage: dict[str, dict[str, Any]]
    eval_studies: int
    text: str
    workers: int = 0
    """``[run] workers``: processes that compute the fixed lower features (0: one per CPU on a
    CPU run, 1: none besides the run itself)."""

    @classmethod
    def from_toml(cls, raw: dict[str, Any], path: Path, text: str = "") -> RunConfig:
        known = {"run", "data", "model", "tokenizer", *STAGES}
        for key in raw:
            if key not in known:
                raise ValueError(f"{path}: [{key}]: unknown section (known: {sorted(known)})")
        run = dict(raw.get("run", {}))
        if "out" not in run:
            raise ValueError(f"{path}: [run] out: is required (the checkpoint folder)")
        stages = list(run.get("stages", [s for s in STAGES if s != "findings"]))
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"{path}: [run] stages: {s!r} is not one of {STAGES}")
        if stages != sorted(stages, key=STAGES.index):
            raise ValueError(f"{path}: [run] stages: {stages} must keep the order {STAGES} "
                             "(a stage never retrains what a later one builds on)")
        stage = {}
        for s in STAGES:
            values = {**STAGE_DEFAULTS[s], **COMMON, **raw.get(s, {})}
            unknown = set(values) - set(STAGE_DEFAULTS[s]) - set(COMMON)
            if unknown:
                raise ValueError(f"{path}: [{s}] {sorted(unknown)[0]}: unknown key")
            stage[s] = values
        precision = run.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"{path}: [run] precision: {precision!r} is not one of "
                             f"{PRECISIONS}")
        for s in STAGES:
            own = stage[s]["precision"] or precision
            if own not in PRECISIONS:
                raise ValueError(f"{path}: [{s}] precision: {own!r} is not one of "
                                 f"{PRECISIONS}")
            stage[s]["precision"] = own
        if float(stage["findings"]["cue_loss"]) < 0:
            raise ValueError(f"{path}: [findings] cue_loss: must be >= 0")
        for key in ("cue_fit", "cue_freeze", "cue_choice"):
            if not isinstance(stage["findings"][key], bool):
                raise ValueError(f"{path}: [findings] {key}: must be true or false")
        if stage["findings"]["cue_freeze"] and not stage["findings"]["cue_fit"]:
            raise ValueError(f"{path}: [findings] cue_freeze: needs cue_fit = true (it keeps "
                             "the fitted cue path)")
        l1 = stage["findings"]["cue_l1"]
        grid = l1 if isinstance(l1, list) else [l1]
        if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                           for v in grid):
            raise ValueError(f"{path}: [findings] cue_l1: must be a number >= 0 or a list of them")
        cue_labels = stage["findings"]["cue_labels"]
        labels = list(dict(raw.get("model", {})).get("labels", []))
        if not isinstance(cue_labels, list) or any(not isinstance(x, str) for x in cue_labels):
            raise ValueError(f"{path}: [findings] cue_labels: must be a list of label names")
        for label in cue_labels:
            if label not in labels:
                raise ValueError(f"{path}: [findings] cue_labels: {label!r} is not one of "
                                 "[model] labels")
        if cue_labels and not stage["findings"]["cue_fit"]:
            raise ValueError(f"{path}: [findings] cue_labels: needs cue_fit = true (it names "
                             "the labels the fit may read from the cues)")
        if not isinstance(stage["findings"]["extra"], bool):
            raise ValueError(f"{path}: [findings] extra: must be true or false (whether the "
                             "stage also trains on [data] extra)")
        init_from = stage["findings"]["init_from"]
        if not isinstance(init_from, str):
            raise ValueError(f"{path}: [findings] init_from: must be a checkpoint folder (text)")
        if init_from and not Path(init_from).is_absolute():
            stage["findings"]["init_from"] = str((path.parent / init_from).resolve())
        if stage["findings"]["select"] not in ("loss", "auroc"):
            raise ValueError(f"{path}: [findings] select: {stage['findings']['select']!r} is "
                             "not 'loss' or 'auroc'")
        try:
            MSVLMConfig.from_dict(dict(raw.get("model", {})))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: [model]: {exc}") from None
        out = Path(run["out"])
        workers = run.get("workers", 0)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"{path}: [run] workers: must be a whole number >= 0 (0: one per "
                             "CPU)")
        return cls(out if out.is_absolute() else (path.parent / out).resolve(),
                   int(run.get("seed", 0)), str(run.get("device", "auto")), stages,
                   dict(raw.get("model", {})), int(raw.get("tokenizer", {}).get("vocab_size",
                                                                                 1000)),
                   stage, int(run.get("eval_studies", 50)), text, workers)


# -- distributed ---------------------------------------------------------------------------------

def head_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: list[float],
                labels: list[str]) -> dict[str, Any]:
    """Macro F1 / AUROC of the head's decisions over the labels present in ``targets``."""
    from models.probe import auroc

    pred = probs >= torch.as_tensor(thresholds)
    per = {}
    for j, label in enumerate(labels):
        y = targets[:, j].bool()
        if not y.any():
            continue
        tp = int((pred[:, j] & y).sum())
        per[label] = {"f1": 2 * tp / max(1, int(pred[:, j].sum()) + int(y.sum())),
                      "auroc": auroc(probs[:, j].numpy(), y.long().numpy())}
    return {"macro_f1": float(np.mean([v["f1"] for v in per.values()])) if per else 0.0,
            "auroc": float(np.nanmean([v["auroc"] for v in per.values()])) if per else 0.0,
            "per_label": per}


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


# -- worker processes -----------------------------------------------------------------------------
_FORKED: dict[str, Any] = {}
"""What forked workers read (:meth:`Trainer.in_workers`), set just before the fork: nothing is
pickled on the way in, only each result on the way back."""


def _one_thread() -> None:
    torch.set_num_threads(1)  # the processes are the parallelism


def _forked_call(index: int) -> tuple[int, Any]:
    return index, _FORKED["fn"](_FORKED["items"][index])


def _lower_rows(tower: Any, study: StudyItem, sited: bool
                ) -> list[tuple[torch.Tensor, EncodedView]]:
    """A two-part tower's fixed lower features of every view of a study (float16, as the
    findings stage trains on them) with the view's placement (and sites)."""
    rows = []
    for v in study.load():
        feats = tower.lower_view(v.pixels, v.modality, v.z_mm, v.pixel_spacing_mm,
                                 phase=v.phase, plane=v.plane if sited else None)
        feats, sites = feats if sited else (feats, None)
        rows.append((feats.half(), EncodedView(torch.empty(0), torch.as_tensor(
            v.z_mm, dtype=torch.float32), v.modality, v.plane, v.phase, sites=sites)))
    return rows


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- stage losses (one module each, so DDP sees one forward) -------------------------------------

class _Loss(nn.Module):
    def __init__(self, model: MSVLM, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *batch: Any) -> torch.Tensor:
        return self.fn(self.model, *batch)


def _mae_model(model: MSVLM, mask_ratio: float) -> nn.Module:
    """A ViTMAEForPreTraining whose encoder shares the vision tower's weights."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    vit: Any = model.vision_tower.vit
    c = vit.config
    mae = ViTMAEForPreTraining(ViTMAEConfig(
        image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
        hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        decoder_hidden_size=max(32, c.hidden_size // 2), decoder_num_hidden_layers=1,
        decoder_num_attention_heads=max(1, c.num_attention_heads // 2),
        decoder_intermediate_size=max(64, c.intermediate_size // 2),
        mask_ratio=mask_ratio, norm_pix_loss=True))
    missing, _ = mae.vit.load_state_dict(vit.state_dict(), strict=False)
    if [k for k in missing if "position_embeddings" not in k]:
        raise RuntimeError(f"MAE and ViT weights do not line up: {missing[:5]}")
    return mae


def _copy_mae_to_vit(mae: Any, model: MSVLM) -> None:
    """The encoding ViTModel takes the MAE encoder's weights (and its fixed positions)."""
    missing, _ = model.vision_tower.vit.load_state_dict(mae.vit.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"ViT weights missing after MAE: {missing[:5]}")


def upper_views(model: MSVLM, lower: list[tuple[torch.Tensor, EncodedView]]
                ) -> list[EncodedView]:
    """A two-part tower's upper part on one study's cached lower features (``Trainer.lower``)."""
    return [EncodedView(model.vision_tower(f.float()), e.z_mm.to(f.device), e.modality, e.plane,
                        e.phase, sites=e.sites) for f, e in lower]


def encode_sampled(model: MSVLM, studies: list[list[Any]], grad_slices: int,
                   seed: int) -> list[list[EncodedView]]:
    """Slice embeddings of ``studies`` (lists of views) where only a sample of each view's slices
    carries gradients: all slices are encoded without them, the head's attention picks half of
    the ``grad_slices`` (the slices it attends to most, for any label), the other half is drawn
    at random, and those are encoded again with gradients. The 3D-patch baseline, which sees
    the whole volume at once, encodes every view with gradients."""
    if getattr(model.vision_tower, "volumetric", False):  # one pass over the whole volume
        return [[model.encode_slices(v, grad=True) for v in views] for views in studies]
    rng = np.random.default_rng(seed)
    base = [[model.encode_slices(v) for v in views] for views in studies]
    with torch.no_grad():
        importance = model.findings(base).attention.amax(dim=1)  # (B, L)
    out = []
    for b, (views, encoded) in enumerate(zip(studies, base)):
        offset, row = 0, []
        for view, enc in zip(views, encoded):
            n = view.num_slices
            weights = importance[b, offset:offset + n]
            offset += n
            if n <= grad_slices:
                idx = np.arange(n)
            else:
                top = torch.topk(weights, grad_slices // 2).indices.cpu().numpy()
                rest = np.setdiff1d(np.arange(n), top)
                idx = np.sort(np.concatenate([top, rng.choice(rest, grad_slices - len(top),
                                                              replace=False)]))
            x = preprocess(view.pixels[idx], view.modality, model.config, model.device)
            emb = enc.embeddings.index_put(
                (torch.as_tensor(idx, device=model.device),), model.vision_tower(x))
            row.append(EncodedView(emb, enc.z_mm, enc.modality, enc.plane, enc.phase,
                                   sites=enc.sites))
        out.append(row)
    return out


class Trainer:
    """Runs the stages of a :class:`RunConfig` on a :class:`~models.data.Dataset`."""

    def __init__(self, run: RunConfig, data: Dataset) -> None:
        self.run, self.data = run, data
        self.rank, self.world = _dist()
        self.main = self.rank == 0
        from models.generator import resolve_device

        self.device = resolve_device(run.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.out = run.out
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(run.seed)
        self.config = MSVLMConfig.from_dict(run.model)
        self.tokenizer = self._tokenizer()
        if self.config.finding_sites and not self.config.finding_site_words:
            self.config.finding_site_words = site_words(self.tokenizer)
        self.model = MSVLM(self.config, len(self.tokenizer), special_ids(self.tokenizer))
        self.model.to(self.device)
        self.curves: dict[str, dict[str, list[float]]] = {}
        self._cache: dict[str, list[EncodedView]] = {}
        self._encoder_hash: str | None = None
        self._pools: dict[str, torch.Tensor] = {}
        self._targets: dict[str, torch.Tensor] = {}
        self._lower: dict[str, list[tuple[torch.Tensor, EncodedView]]] = {}
        self._fresh: dict[str, list[EncodedView]] = {}  # encoded in workers, not yet cached
        # wall seconds of each stage trained by this call (the findings stage's lower features
        # also on their own; a stage done before is not timed again)
        self.seconds: dict[str, float] = {}
        self._reads: dict[str, FrozenRead] = {}  # per study while Z-former and head are frozen
        self.probe: dict[str, Any] = {}
        self.head_valid: dict[str, Any] = {}  # the finding head on validation (model card)
        self.findings_origin: dict[str, Any] = {}  # [findings] init_from: where it was trained
        self.precision: dict[str, str] = {}  # each stage trained by this call: fp32 or bf16
        self.reference = machine_reference() if self.main else {}
        if self.reference:
            logger.info("Machine reference: %.1f GFLOP/s (%s, %d threads)",
                        self.reference["matmul_fp32_gflops"], self.reference["workload"],
                        self.reference["threads"])
        if "findings" in run.stages and not self.config.labels:
            raise ValueError("Invalid run file - [model] labels: the findings stage needs the "
                             "label list")

    # -- study labels -----------------------------------------------------------------------------
    @functools.cached_property
    def labeler(self) -> Any:
        """The rule labeler: study targets and the report loss's sentence weights."""
        from models.labeler import RuleLabeler

        return RuleLabeler()

    def targets(self, study: StudyItem) -> torch.Tensor:
        """The study's 0/1 labels ``(N,)`` in the config's label order, read from its report
        by the rule labeler (exact on phantom reports; uncertain counts as positive)."""
        if study.study_id not in self._targets:
            from models.labeler import binary

            found = binary(self.labeler.label(f"{study.findings}\n{study.impression}"))
            self._targets[study.study_id] = torch.tensor(
                [float(found.get(label, 0)) for label in self.config.labels])
        return self._targets[study.study_id]

    # -- setup ------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        from models.report import load_tokenizer

        folder = self.out / "tokenizer"
        if self.config.lm_path:
            return load_tokenizer(self.config.lm_path)
        if not (folder / "tokenizer.json").exists():
            if self.main:
                texts = [format_report(s.findings, s.impression) for s in self.data.train]
                train_tokenizer(texts, self.run.vocab_size).save_pretrained(str(folder))
            if self.world > 1:
                torch.distributed.barrier()
        return load_tokenizer(folder)

    def _rng(self, stage: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.run.seed, STAGE_SEEDS[stage], step])

    # -- embeddings cache ---------------------------------------------------------------------------
    def _cache_dir(self) -> Path:
        if self._encoder_hash is None:
            self._encoder_hash = _state_hash(self.model.vision_tower)
        # a cache written without sites (finding_sites) must not serve a run that needs them
        sites = f"-sites{self.config.finding_sites}" if self.config.finding_sites else ""
        return self.out / "cache" / f"{self.data.fingerprint}-{self._encoder_hash}{sites}"

    def reset_cache(self) -> None:
        """Forget in-memory embeddings, Z-former reads and the encoder hash (after the encoder
        changed)."""
        self._cache.clear()
        self._reads.clear()
        self._encoder_hash = None

    def encoded(self, study: StudyItem) -> list[EncodedView]:
        """Slice embeddings of a study from the frozen vision tower, cached on disk (a two-part
        tower's upper part on the lower features the findings stage kept in memory, in
        float16 as it trained on them, so no study is generated or read again; written to
        disk as well, so a restarted run reads them rather than encoding every study again)."""
        if study.study_id in self._cache:
            return self._cache[study.study_id]
        folder = self._cache_dir()
        path = self._cache_path(study)
        if study.study_id in self._fresh:  # encoded in a worker (_prefill)
            rows = [(e.embeddings, e.z_mm, e.modality, e.plane, e.phase, e.sites)
                    for e in self._fresh.pop(study.study_id)]
        elif path.exists():
            rows = [(*r, None) if len(r) == 5 else r  # written before sites existed
                    for r in torch.load(path, map_location=self.device, weights_only=False)]
        elif study.study_id in self._lower:  # the findings stage's lower features: no reload
            self.model.eval()
            with torch.no_grad():
                rows = [(self.model.vision_tower(f.float()), e.z_mm, e.modality, e.plane,
                         e.phase, e.sites) for f, e in self.lower(study)]
        else:
            self.model.eval()
            rows = [(e.embeddings, e.z_mm, e.modality, e.plane, e.phase, e.sites)
                    for e in (self.model.encode_slices(v) for v in study.load())]
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{self.rank}.tmp")
            torch.save([(a.cpu(), b.cpu(), c, d, e, f) for a, b, c, d, e, f in rows], tmp)
            os.replace(tmp, path)
        views = [EncodedView(a.to(self.device), b.to(self.device), c, d, e, sites=f)
                 for a, b, c, d, e, f in rows]
        self._cache[study.study_id] = views
        return views

    def _cache_path(self, study: StudyItem) -> Path:
        name = hashlib.sha256(study.study_id.encode()).hexdigest()[:24]
        return self._cache_dir() / f"{name}.pt"

    def _prefill(self) -> None:
        """Encode every study once (each rank its share) so training steps only read the cache;
        for those neither cached nor with lower features in memory (the ``extra`` studies the
        findings stage did not read) a two-part tower's lower part runs in :attr:`workers`
        processes first."""
        studies = self.data.train + self.data.valid
        mine = studies[self.rank::self.world]
        fresh = [s for s in mine if s.study_id not in self._cache
                 and s.study_id not in self._lower and not self._cache_path(s).exists()]
        if self.workers > 1 and len(fresh) > 1 and self._two_part():
            # the fixed lower part in workers (the same values with one thread as with more);
            # the trained upper part here, whose matrix products' last bits depend on the
            # thread count (measured: 45 of 400 studies differed when workers ran it)
            model = self.model.eval()

            def lowered(s: StudyItem) -> list[tuple[Any, ...]]:
                return [(*model.lower_slices(v), v.z_mm, v.modality, v.plane, v.phase,
                         v.series_instance_uid) for v in s.load()]

            for study, views in zip(fresh, self.in_workers(lowered, fresh, "lower features")):
                encoded = []
                for feats, sites, z_mm, *placement in views:
                    with torch.inference_mode():
                        emb = model.upper_slices(feats.to(self.device))
                    encoded.append(EncodedView(emb.clone(), torch.as_tensor(
                        z_mm, dtype=torch.float32, device=self.device), *placement, sites))
                self._fresh[study.study_id] = encoded
        for study in tqdm(mine, desc="slice embeddings", unit="study", disable=not self.main):
            self.encoded(study)
        if self.world > 1:
            torch.distributed.barrier()

    # -- batches ------------------------------------------------------------------------------------
    def _indices(self, stage: str, step: int, n: int, batch: int) -> list[int]:
        picks = self._rng(stage, step).choice(n, size=min(batch, n), replace=False)
        return [int(i) for i in picks[self.rank::self.world]] or [int(picks[0])]

    def _slice_pool(self, studies: list[StudyItem]) -> torch.Tensor:
        """Preprocessed slices drawn once from up to 200 studies (10 each) for pretraining, so a
        step costs a forward pass, not loading volumes: ``(N, C, H, W)``."""
        key = "valid" if studies is self.data.valid else "train"
        if key not in self._pools:
            rng = np.random.default_rng([self.run.seed, 7, len(studies)])
            picks = rng.choice(len(studies), size=min(200, len(studies)), replace=False)
            chunks = []
            for i in tqdm(picks, desc=f"slice pool ({key})", disable=not self.main):
                for view in studies[int(i)].load():
                    rows = rng.choice(view.num_slices, size=min(10, view.num_slices),
                                      replace=False)
                    chunks.append(preprocess(view.pixels[np.sort(rows)], view.modality,
                                             self.config, "cpu"))
            self._pools[key] = torch.cat(chunks)
        return self._pools[key]

    def _slices(self, studies: list[StudyItem], rng: np.random.Generator, count: int) -> Any:
        """Random preprocessed slices (pretrain), this rank's share: ``(N, C, H, W)``."""
        pool = self._slice_pool(self.data.valid if studies is self.data.valid
                                else self.data.train)
        picks = rng.choice(len(pool), size=min(count * self.world, len(pool)), replace=False)
        return pool[torch.as_tensor(picks[self.rank::self.world])].to(self.device)

    def _volumes(self, studies: list[StudyItem], rng: np.random.Generator, count: int) -> Any:
        views = []
        for i in rng.choice(len(studies), size=min(count, len(studies)), replace=False):
            view = studies[int(i)].load()[0]
            views.append(preprocess(view.pixels, view.modality, self.config, self.device))
        return views

    # -- one stage ------------------------------------------------------------------------------------
    def _setup_stage(self, stage: str) -> tuple[list[nn.Parameter], Callable[..., Any]]:
        m = self.model
        m.requires_grad_(False)
        if stage == "pretrain":
            if getattr(m.vision_tower, "volumetric", False):
                m.vision_tower.requires_grad_(True)
                return list(m.vision_tower.parameters()), self._batch_pretrain3d
            self._mae = _mae_model(m, self.run.stage["pretrain"]["mask_ratio"]).to(self.device)
            return list(self._mae.parameters()), self._batch_mae
        if stage == "findings":
            assert m.finding_head is not None
            for part in (m.vision_tower, m.z_former, m.finding_head):
                part.requires_grad_(True)
            train = torch.stack([self.targets(s) for s in self.data.train])
            pos = train.sum(0).clamp_min(1.0)
            # class-balanced BCE: a label's positives weigh as much as its negatives
            self._pos_weight = ((len(train) - pos) / pos).clamp(1.0, 20.0).to(self.device)
            return [p for p in m.parameters() if p.requires_grad], self._batch_findings
        if stage == "mem":
            m.z_former.requires_grad_(True)
            return [p for p in m.z_former.parameters()], self._batch_mem
        m.resampler.requires_grad_(True)
        m.multi_modal_projector.requires_grad_(True)
        if m.label_tokens is not None:
            m.label_tokens.requires_grad_(True)
        if m.evidence is not None:
            m.evidence.requires_grad_(True)
        if m.site_tokens is not None:
            m.site_tokens.requires_grad_(True)
        if m.site_bias is not None:
            m.site_bias.requires_grad_(True)
        if stage == "finetune":
            if m.finding_head is None:  # with a head the Z-former stays as the head learned it
                m.z_former.requires_grad_(True)
            if self.config.lora:
                for name, p in m.language_model.named_parameters():
                    p.requires_grad_("lora_" in name)
            else:
                m.language_model.requires_grad_(True)
        return [p for p in m.parameters() if p.requires_grad], self._batch_report

    def _batch_mae(self, studies: list[StudyItem], rng: np.random.Generator,
                   batch: int) -> tuple[Any, ...]:
        return (self._slices(studies, rng, batch), int(rng.integers(2**31)))

    def _batch_pretrain3d(self, studies: list[StudyItem], rng: np.random.Generator,
                          batch: int) -> tuple[Any, ...]:
        return (self._volumes(studies, rng, max(1, batch // 16)), int(rng.integers(2**31)))

    def _batch_mem(self, studies: list[StudyItem], rng: np.random.Generator,
                   batch: int) -> tuple[Any, ...]:
        picks = rng.choice(len(studies), size=min(batch, len(studies)), replace=False)
        return ([self.encoded(studies[int(i)]) for i in picks], int(rng.integers(2**31)))

    def _batch_findings(self, studies: list[StudyItem], rng: np.random.Generator,
                        batch: int) -> tuple[Any, ...]:
        picks = rng.choice(len(studies), size=min(batch, len(studies)), replace=False)
        chosen = [studies[int(i)] for i in picks]
        views = [self.lower(s) if self._two_part() else s.load() for s in chosen]
        return (views, torch.stack([self.targets(s) for s in chosen]).to(self.device),
                int(rng.integers(2**31)))

    def _two_part(self) -> bool:
        """Whether the tower has a fixed lower part whose output is cached (so every slice
        of every view trains the upper part, with gradients)."""
        return bool(getattr(self.model.vision_tower, "raw_input", False))

    def lower(self, study: StudyItem) -> list[tuple[torch.Tensor, EncodedView]]:
        """The fixed lower part's features of every view of a study, kept in memory (float16)
        with the view's placement: ``[(features (S, F), placement), ...]``."""
        if study.study_id not in self._lower:
            self._lower[study.study_id] = _lower_rows(
                self.model.vision_tower, study, bool(self.config.finding_sites))
        return [(f.to(self.device), e) for f, e in self._lower[study.study_id]]

    def lower_all(self, studies: list[StudyItem]) -> None:
        """:meth:`lower` of every study not yet in memory, in :attr:`workers` processes."""
        todo = [s for s in studies if s.study_id not in self._lower]
        tower, sited = self.model.vision_tower, bool(self.config.finding_sites)
        rows = self.in_workers(lambda s: _lower_rows(tower, s, sited), todo, "lower features")
        for study, row in zip(todo, rows):
            self._lower[study.study_id] = row

    @functools.cached_property
    def workers(self) -> int:
        """Processes for per-study work on the CPU (generating or reading a study, the fixed
        lower features: numpy, scipy and small torch operations that gain little from a
        second thread): ``[run] workers``, with 0 one per CPU this rank may use. A run on a
        GPU keeps one (a CUDA context does not survive a fork)."""
        if self.device.type != "cpu":
            return 1
        cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
        return self.run.workers or max(1, cpus // self.world)

    def in_workers(self, fn: Callable[[Any], Any], items: list[Any], desc: str) -> list[Any]:
        """``[fn(item) for item in items]`` in :attr:`workers` forked processes of one torch
        thread each (each result pickled back), with a progress bar. Give them only work whose
        values do not depend on the thread count (the fixed lower features: a test)."""
        bar = tqdm(total=len(items), desc=desc, unit="study", disable=not self.main)
        out: list[Any] = [None] * len(items)
        try:
            if self.workers < 2 or len(items) < 2:
                for i, item in enumerate(items):
                    out[i] = fn(item)
                    bar.update()
                return out
            import multiprocessing

            _FORKED.update(fn=fn, items=items)
            try:
                with multiprocessing.get_context("fork").Pool(
                        min(self.workers, len(items)), initializer=_one_thread) as pool:
                    for i, result in pool.imap_unordered(_forked_call, range(len(items))):
                        out[i] = result
                        bar.update()
            finally:
                _FORKED.clear()
            return out
        finally:
            bar.close()

    def _fit_cues(self) -> None:
        """Start the head's cue path from the sparse (L1) logistic regression of the training
        labels on each study's cue maxima (``[findings] cue_fit``; the cues are fixed, so they
        are known before any step)."""
        head: Any = self.model.finding_head
        n = self.model.cue_dim
        self.model.eval()
        with torch.no_grad():
            peaks = torch.stack([torch.cat([self.model.vision_tower(f.float())[:, -n:]
                                            for f, _ in self.lower(s)]).amax(0)
                                 for s in self.data.train])
        targets = torch.stack([self.targets(s) for s in self.data.train]).to(peaks.device)
        only = self.run.stage["findings"]["cue_labels"]
        chosen = head.fit_cues(
            peaks, targets, self._pos_weight, l1=self.run.stage["findings"]["cue_l1"],
            labels=[self.config.labels.index(x) for x in only] if only else None)
        if isinstance(self.run.stage["findings"]["cue_l1"], list):
            logger.info("Cue fit L1 per label, by 5-fold cross-validation on the training "
                        "studies: %s", {label: chosen[self.config.labels.index(label)]
                                        for label in (only or self.config.labels)})
        from models.probe import auroc

        logits = (head.cue_inputs(peaks) @ head.cue.weight.T + head.cue.bias).detach().cpu().numpy()
        scores = [auroc(logits[:, j], targets[:, j].cpu().numpy())
                  for j in range(targets.shape[1]) if 0 < float(targets[:, j].sum()) < len(targets)]
        logger.info("Cue path fitted on %d training studies: training macro AUROC %.3f",
                    len(peaks), sum(scores) / max(1, len(scores)))

    def _batch_report(self, studies: list[StudyItem], rng: np.random.Generator,
                      batch: int) -> tuple[Any, ...]:
        picks = rng.choice(len(studies), size=min(batch, len(studies)), replace=False)
        chosen = [studies[int(i)] for i in picks]
        texts = []
        for s in chosen:  # training draws a fresh true wording where the data has variants
            findings, impression = s.findings, s.impression
            if s.variant is not None and studies is not self.data.valid:
                findings, impression = s.variant(int(rng.integers(2**31)))
            texts.append(format_report(findings, impression))
        ids, mask = encode_targets(self.tokenizer, texts, self.device)
        states = None
        if self.model.label_tokens is not None:  # the true labels, some flipped (label noise)
            states = torch.stack([self.targets(s) for s in chosen]).long()
            noise = float(self.run.stage[self._stage].get("label_noise", 0.0))
            if studies is not self.data.valid and noise > 0:
                flip = torch.as_tensor(rng.random(tuple(states.shape)) < noise)
                states = torch.where(flip, 1 - states, states)
            states = states.to(self.device)
        weight = float(self.run.stage[self._stage].get("finding_weight", 1.0))
        weights = None
        if weight != 1.0:
            labels = list(self.run.stage[self._stage].get("finding_weight_labels", []))
            weights = finding_weights(self.tokenizer, texts, self.labeler, weight, labels,
                                      self.device)
        return ([self.encoded(s) for s in chosen], ids, mask, states, weights,
                self._frozen_reads(chosen))

    def _frozen_reads(self, studies: list[StudyItem]) -> list[FrozenRead] | None:
        """Each study's :meth:`MSVLM.frozen_read`, computed once per stage, while the Z-former
        and the finding head do not train (the language stages of a model with a head): a
        step then runs only the resampler, projector and language model (measured on the
        demo's finetune step, the Z-former and head were 17% of it). None while they train."""
        m = self.model
        if m.finding_head is None or any(
                p.requires_grad for part in (m.z_former, m.finding_head)
                for p in part.parameters()):
            return None
        reads = []
        for s in studies:
            if s.study_id not in self._reads:
                training = m.training
                self._reads[s.study_id] = m.eval().frozen_read(self.encoded(s))
                m.train(training)
            reads.append(self._reads[s.study_id])
        return reads

    def _loss(self, stage: str) -> Callable[..., torch.Tensor]:
        if stage == "pretrain" and not getattr(self.model.vision_tower, "volumetric", False):
            mae = self._mae

            def mae_loss(model: MSVLM, pixels: torch.Tensor, seed: int) -> torch.Tensor:
                torch.manual_seed(seed)
                return mae(pixel_values=pixels).loss
            return mae_loss
        if stage == "pretrain":
            def patch_loss(model: MSVLM, volumes: list[torch.Tensor], seed: int) -> torch.Tensor:
                g = torch.Generator(device=volumes[0].device).manual_seed(seed)
                return torch.stack([model.vision_tower.masked_loss(v, g) for v in volumes]).mean()
            return patch_loss
        if stage == "findings":
            grad_slices = int(self.run.stage["findings"]["grad_slices"])
            pos_weight = self._pos_weight
            cue_loss = float(self.run.stage["findings"]["cue_loss"])
            two_part = self._two_part()

            def findings_loss(model: MSVLM, studies: list[list[Any]], targets: torch.Tensor,
                              seed: int) -> torch.Tensor:
                if two_part:  # cached lower features: every slice trains the upper part
                    encoded = [upper_views(model, views) for views in studies]
                else:
                    encoded = encode_sampled(model, studies, grad_slices, seed)
                out = model.findings(encoded)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    out.logits, targets, pos_weight=pos_weight)
                if cue_loss and out.cue_logits is not None:  # the cue path on its own too
                    loss = loss + cue_loss * nn.functional.binary_cross_entropy_with_logits(
                        out.cue_logits, targets, pos_weight=pos_weight)
                return loss
            return findings_loss
        if stage == "mem":
            def mem_loss(model: MSVLM, studies: list[list[EncodedView]], seed: int) -> Any:
                emb, meta, z, valid = model.collate(studies)
                g = torch.Generator(device=emb.device).manual_seed(seed)
                return model.z_former.mem_loss(emb, meta, z, valid, g)
            return mem_loss

        groups = int(self.run.stage[stage].get("length_groups", 1))

        def report_loss(model: MSVLM, studies: list[list[EncodedView]], ids: torch.Tensor,
                        mask: torch.Tensor, states: torch.Tensor | None,
                        weights: torch.Tensor | None = None,
                        frozen: list[FrozenRead] | None = None) -> torch.Tensor:
            return model(studies, ids, mask, states, weights, frozen, length_groups=groups)
        return report_loss

    def run_stage(self, stage: str, stop_after: int | None = None) -> None:
        """Train one stage (or resume it); ``stop_after`` ends this call after that many steps
        in total, leaving the stage resumable (for time-boxed sessions)."""
        cfg = self.run.stage[stage]
        folder = self.out / "stages" / stage
        if (folder / "done.json").exists():
            done = json.loads((folder / "done.json").read_text())
            self.curves[stage] = done["curves"]
            self._load_weights(folder / "weights.pt")
            if "precision" in done:
                self.precision[stage] = done["precision"]
            if "thresholds" in done:
                self.config.finding_thresholds = done["thresholds"]
                self.config.finding_sources = done.get("sources", [])
                self.probe = done.get("probe", {})
                self.head_valid = done.get("head_valid", {})
                if "origin" in done:
                    self.findings_origin = done["origin"]
            logger.info("Stage %s already done; skipped", stage)
            return
        if stage == "findings" and cfg["init_from"]:
            self._findings_from(Path(cfg["init_from"]), folder)
            return
        if stage == "findings" and not cfg["extra"] and self.data.main_only() is not self.data:
            # the finding head learns from the main studies alone; the language stages read
            # them all (the extra groups teach the text studies with few findings)
            full, self.data = self.data, self.data.main_only()
            logger.info("Stage findings trains on the %d main studies ([findings] extra = "
                        "false; %d extra left to the later stages)", len(self.data.train),
                        len(full.train) - len(self.data.train))
            try:
                return self.run_stage(stage, stop_after)
            finally:
                self.data = full
        began = time.perf_counter()
        self.reset_cache()
        self._stage = stage
        if stage not in ("pretrain", "findings"):
            self._prefill()
        if stage == "findings" and self._two_part():
            self.lower_all(self.data.train + self.data.valid)
            self.seconds["lower features"] = time.perf_counter() - began
            tower: Any = self.model.vision_tower
            if getattr(tower, "detail", False):  # every 4th slice of the training split
                sample = torch.cat([f[::4].float() for s in self.data.train
                                    for f, _ in self._lower[s.study_id]])
                tower.fit_standardisation(sample.to(self.device))
                logger.info("Lower features standardised on %d training slices", len(sample))
        params, make_batch = self._setup_stage(stage)
        if stage == "findings" and cfg["cue_fit"] and self._two_part() and self.model.cue_dim:
            self._fit_cues()
            if cfg["cue_freeze"]:  # the stage trains the rest of the head around the fit
                head: Any = self.model.finding_head
                head.cue.requires_grad_(False)
                params = [p for p in params if p.requires_grad]
                logger.info("Cue path kept as fitted (cue_freeze)")
        module: nn.Module = _Loss(self.model, self._loss(stage))
        if stage == "pretrain" and hasattr(self, "_mae"):
            module.add_module("mae", self._mae)
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        steps = int(cfg["steps"])

        def lr_at(step: int) -> float:
            warm = min(1.0, (step + 1) / max(1, cfg["warmup"]))
            return cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))

        state_path = folder / "state.pt"
        start = 0
        curve: dict[str, list[float]] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        best, best_state, bad = math.inf, None, 0
        if state_path.exists():
            state = torch.load(state_path, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            if "mae" in state:
                self._mae.load_state_dict(state["mae"])
            optimizer.load_state_dict(state["optimizer"])
            start, curve, best, bad = state["step"], state["curve"], state["best"], state["bad"]
            best_state = state.get("best_state")
            logger.info("Stage %s resumes at step %d", stage, start)
        studies = self.data.train
        precision = cfg["precision"]
        if precision == "bf16" and not bf16_native(self.device):
            logger.warning("Stage %s: precision bf16 asked for, but %s has no native "
                           "bf16 matrix units (emulated bf16 is slower): training in fp32",
                           stage, self.device)
            precision = "fp32"
        self.precision[stage] = precision
        bar = tqdm(range(start, steps), desc=stage, unit="step", disable=not self.main)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            rng = self._rng(stage, step)
            local = [studies[i] for i in self._indices(stage, step, len(studies), cfg["batch"])]
            self.model.train()
            batch = make_batch(local, rng, cfg["batch"])
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=precision == "bf16"):
                loss = module(*batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curve["step"].append(step)
            curve["loss"].append(float(loss.detach()))
            bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}")
            last = step == steps - 1
            if (step + 1) % cfg["eval_every"] == 0 or last:
                val = self._validate(stage)
                curve["val_step"].append(step)
                curve["val_loss"].append(val)
                score = val
                if stage == "findings" and cfg["select"] == "auroc":
                    auc = self._valid_auroc()
                    curve.setdefault("val_auroc", []).append(auc)
                    score = 1.0 - auc
                    logger.info("findings step %d: validation BCE %.3f, macro AUROC %.3f",
                                step + 1, val, auc)
                if score < best:
                    best, bad = score, 0
                    best_state = {k: v.detach().clone() for k, v in
                                  self.model.state_dict().items()}
                else:
                    bad += 1
                if self.main:
                    state = {"model": self.model.state_dict(), "optimizer":
                             optimizer.state_dict(), "step": step + 1, "curve": curve,
                             "best": best, "bad": bad, "best_state": best_state}
                    if hasattr(self, "_mae") and stage == "pretrain":
                        state["mae"] = self._mae.state_dict()
                    folder.mkdir(parents=True, exist_ok=True)
                    torch.save(state, state_path.with_suffix(".tmp"))
                    os.replace(state_path.with_suffix(".tmp"), state_path)
                if cfg["patience"] and bad >= cfg["patience"]:
                    logger.info("Stage %s stops early at step %d", stage, step + 1)
                    break
            if stop_after is not None and step + 1 >= stop_after:
                return
        if best_state is not None:
            self.model.load_state_dict(best_state)  # checkpoint selection by validation loss
        if stage == "pretrain" and hasattr(self, "_mae"):
            _copy_mae_to_vit(self._mae, self.model)
        self.curves[stage] = curve
        done = {"curves": curve, "best_val": best, "precision": precision}
        if stage == "findings":
            done.update(self._after_findings())
        # wall time of this call (a resumed stage: since it resumed), with what it encoded
        self.seconds[stage] = done["seconds"] = time.perf_counter() - began
        if "lower features" in self.seconds and stage == "findings":
            done["lower_seconds"] = self.seconds["lower features"]
        logger.info("Stage %s took %.1f min", stage, self.seconds[stage] / 60)
        if self.main:
            torch.save(self.model.state_dict(), folder / "weights.pt")
            (folder / "done.json").write_text(json.dumps(done))
            self._plot(stage, curve)
        if self.world > 1:
            torch.distributed.barrier()

    FINDINGS_PARTS = ("vision_tower.", "z_former.", "finding_head.")

    def _findings_from(self, source: Path, folder: Path) -> None:
        """The findings stage taken from a finished checkpoint (``[findings] init_from``): its
        vision tower, Z-former and finding head, thresholds, label sources, probe and head
        validation, so the language stages can be trained again on them (minutes, not the
        findings stage's hour). Every one of those tensors must match this run's model."""
        from safetensors.torch import load_file

        from models.generator import CARD, CONFIG, WEIGHTS

        for name in (WEIGHTS, CONFIG, CARD):
            if not (source / name).exists():
                raise FileNotFoundError(f"[findings] init_from: checkpoint {source} has no "
                                        f"{name}")
        meta = json.loads((source / CONFIG).read_text())["model"]
        card = json.loads((source / CARD).read_text())
        if meta.get("labels") != self.config.labels:
            raise ValueError(f"[findings] init_from: {source} was trained for other labels "
                             f"({meta.get('labels')})")
        tensors = load_file(str(source / WEIGHTS))
        state = self.model.state_dict()
        for key, value in state.items():
            if key.startswith(self.FINDINGS_PARTS):
                if key not in tensors or tensors[key].shape != value.shape:
                    raise ValueError(f"[findings] init_from: {source} does not match this "
                                     f"run's [model] at {key}")
                state[key] = tensors[key].to(value.dtype)
        self.model.load_state_dict(state)
        self.config.finding_thresholds = list(meta["finding_thresholds"])
        self.config.finding_sources = list(meta.get("finding_sources", []))
        self.probe = dict(card.get("probe", {}))
        self.head_valid = dict(card.get("head_validation", {}))
        # where the stage was trained: the source's own origin when it was taken over in turn
        self.findings_origin = card["training"].get("findings_from") or {
            "checkpoint": str(source), "git_commit": card["training"].get("git_commit", ""),
            "data": card["training"].get("data", {}),
            "run_file": card["training"].get("run_file", ""),
            **({"note": card["training"]["run_file_note"]}
               if "run_file_note" in card["training"] else {})}
        empty: dict[str, list[float]] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        self.curves["findings"] = empty
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            plot = source / "loss_findings.png"
            if plot.exists() and source.resolve() != self.out.resolve():
                (self.out / plot.name).write_bytes(plot.read_bytes())
            torch.save(self.model.state_dict(), folder / "weights.pt")
            (folder / "done.json").write_text(json.dumps({
                "curves": empty, "best_val": 0.0, "thresholds": self.config.finding_thresholds,
                "sources": self.config.finding_sources, "probe": self.probe,
                "head_valid": self.head_valid, "origin": self.findings_origin}))
        logger.info("Stage findings taken from %s (vision tower, Z-former, finding head, "
                    "thresholds)", source)
        if self.world > 1:
            torch.distributed.barrier()

    def _load_weights(self, path: Path) -> None:
        """A finished stage's weights; label tokens, their evidence and site tokens may differ (a
        report-only ablation reuses the findings stage of a findings-conditioned run),
        nothing else may."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        other = [k for k in [*missing, *unexpected]
                 if not k.startswith(("label_tokens.", "evidence.", "site_tokens.",
                                      "site_bias."))]
        if other:
            raise RuntimeError(f"{path}: weights do not match the model: {other[:5]}")

    @torch.no_grad()
    def _validate(self, stage: str) -> float:
        studies = self.data.valid or self.data.train
        rng = np.random.default_rng([self.run.seed, 99, STAGE_SEEDS[stage]])
        module = _Loss(self.model, self._loss(stage))
        self.model.eval()
        if stage == "pretrain" and hasattr(self, "_mae"):
            self._mae.eval()
        make_batch: Callable[..., tuple[Any, ...]]
        if stage == "pretrain":
            make_batch = self._batch_mae if hasattr(self, "_mae") else self._batch_pretrain3d
        elif stage == "mem":
            make_batch = self._batch_mem
        elif stage == "findings":
            make_batch = self._batch_findings
        else:
            make_batch = self._batch_report
        losses = [float(module(*make_batch(studies, rng, self.run.stage[stage]["batch"])))
                  for _ in range(2)]
        return float(np.mean(losses))

    @torch.no_grad()
    def _valid_auroc(self) -> float:
        """The head's macro AUROC over the whole validation split (``[findings] select =
        "auroc"``): a label learned late counts as much as one learned early, which the BCE of
        a few validation batches does not see (the lesion-cue run of 2026-12-02 stopped at
        step 1,000 with fibrotic sequela at AUROC 0.59 and macro AUROC 0.910; its last state, step
        1,750, had 0.81 and 0.939)."""
        studies = self.data.valid or self.data.train
        self.model.eval()
        probs = []
        for s in studies:
            if self._two_part():
                views = upper_views(self.model, self.lower(s))
            else:
                views = [self.model.encode_slices(v) for v in s.load()]
            probs.append(self.model.findings([views]).logits[0].sigmoid().cpu())
        targets = torch.stack([self.targets(s) for s in studies])
        return head_scores(torch.stack(probs), targets, [0.5] * targets.shape[1],
                           self.config.labels)["auroc"]

    # -- after the findings stage: thresholds, head metrics, probes ----------------------------------
    @torch.no_grad()
    def _head_outputs(self, studies: list[StudyItem], cues: bool = False) -> Any:
        """``(probabilities, targets)`` of the head on ``studies``; with ``cues`` also the
        cue path's probabilities (``None`` without one)."""
        self.model.eval()
        probs, cue_probs = [], []
        for s in tqdm(studies, desc="head on validation", disable=not self.main):
            out = self.model.findings([self.encoded(s)])
            probs.append(out.logits[0].sigmoid().cpu())
            if out.cue_logits is not None:
                cue_probs.append(out.cue_logits[0].sigmoid().cpu())
        targets = torch.stack([self.targets(s) for s in studies])
        if not cues:
            return torch.stack(probs), targets
        return torch.stack(probs), targets, (torch.stack(cue_probs) if cue_probs else None)

    def _after_findings(self) -> dict[str, Any]:
        """Tune the thresholds on the validation split, score the head there, probe."""
        from models.findings import tune_thresholds

        self.reset_cache()  # the encoder changed: embeddings are computed anew
        studies = self.data.valid or self.data.train
        self.config.finding_sources = []  # the whole head while choosing
        probs, targets, cue_probs = self._head_outputs(studies, cues=True)
        if self.run.stage["findings"]["cue_choice"] and cue_probs is not None:
            from models.findings import choose_sources

            sources = choose_sources(probs, cue_probs, targets)
            self.config.finding_sources = sources
            use = torch.tensor([s == "cues" for s in sources])
            probs = torch.where(use, cue_probs, probs)
            logger.info("Labels read from the cue path alone (better on validation): %s",
                        [l for l, s in zip(self.config.labels, sources) if s == "cues"] or "none")
        self.config.finding_thresholds = tune_thresholds(
            probs, targets, float(self.run.stage["findings"]["min_auroc"]))
        head = head_scores(probs, targets, self.config.finding_thresholds, self.config.labels)
        logger.info("Finding head on the validation split (thresholds tuned there): macro F1 "
                    "%.3f, AUROC %.3f", head["macro_f1"], head["auroc"])
        self.probe = self.run_probe()
        self.head_valid = head
        return {"thresholds": self.config.finding_thresholds, "head_valid": head,
                "probe": self.probe, "sources": self.config.finding_sources}

    @torch.no_grad()
    def run_probe(self) -> dict[str, Any]:
        """The same linear probe on every stage's features and on two controls (random-init
        encoder, HU histogram); a trained encoder that does not beat both is reported as failed
        (a warning in the run log, ``verdict`` in the model card)."""
        from models.probe import hu_histogram, linear_probe

        m = self.model.eval()
        n = int(self.run.stage["findings"]["probe_studies"])
        splits = {"train": self.data.train[:n], "valid": self.data.valid}
        if not splits["valid"]:
            return {}
        torch.manual_seed(self.run.seed + 17)
        random_model = MSVLM(self.config, len(self.tokenizer), special_ids(self.tokenizer))
        random_model.to(self.device).eval()
        G = self.config.z_global_tokens
        feats: dict[str, dict[str, list[np.ndarray]]] = {}
        for split, studies in splits.items():
            for s in tqdm(studies, desc=f"probe features ({split})", disable=not self.main):
                enc = self.encoded(s)
                emb, meta, z, valid = m.collate([enc])
                seq = m.z_former(emb, meta, z, valid)
                key_valid = torch.cat([valid.new_ones(1, G), valid], dim=1)
                res = m.resampler(seq, key_valid)
                projected = m.multi_modal_projector(res)[0]
                views = s.load()
                if self._two_part():  # the lower part is fixed: the same features, random upper
                    rand = torch.cat([random_model.vision_tower(f.float())
                                      for f, _ in self.lower(s)])
                else:
                    rand = torch.cat([random_model.encode_slices(v).embeddings for v in views])
                e, tokens = emb[0], seq[0, G:]
                row = {"HU histogram (control)": hu_histogram([v.pixels for v in views]),
                       "random-init encoder, mean+max (control)": torch.cat(
                           [rand.mean(0), rand.amax(0)]).cpu().numpy(),
                       "encoder, mean+max": torch.cat([e.mean(0), e.amax(0)]).cpu().numpy(),
                       "Z-former tokens, mean+max": torch.cat(
                           [tokens.mean(0), tokens.amax(0)]).cpu().numpy(),
                       "resampler queries, mean+max": torch.cat(
                           [res[0].mean(0), res[0].amax(0)]).cpu().numpy(),
                       "projector output, mean+max": torch.cat(
                           [projected.mean(0), projected.amax(0)]).cpu().numpy()}
                for key, value in row.items():
                    feats.setdefault(key, {}).setdefault(split, []).append(value)
        y = {split: torch.stack([self.targets(s) for s in studies]).numpy()
             for split, studies in splits.items()}
        table = {key: linear_probe(np.stack(v["train"]), y["train"], np.stack(v["valid"]),
                                   y["valid"], self.config.labels) for key, v in feats.items()}
        enc = table["encoder, mean+max"]["macro_f1"]
        controls = max(table["HU histogram (control)"]["macro_f1"],
                       table["random-init encoder, mean+max (control)"]["macro_f1"])
        verdict = "learned" if enc > controls else "FAILED"
        for key, value in table.items():
            logger.info("probe %-42s macro F1 %.3f  AUROC %.3f", key, value["macro_f1"],
                        value["auroc"])
        if verdict == "FAILED":
            logger.warning("PROBE FAILED: the trained slice encoder (macro F1 %.3f) does not "
                           "beat the controls (%.3f); do not build on it", enc, controls)
        return {"verdict": verdict, "train_studies": len(splits["train"]),
                "valid_studies": len(splits["valid"]),
                "table": {k: {"macro_f1": v["macro_f1"], "auroc": v["auroc"]}
                          for k, v in table.items()},
                "per_label": {k: v["per_label"] for k, v in table.items()}}

    def _plot(self, stage: str, curve: dict[str, list[float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(curve["step"], curve["loss"], label="train", alpha=0.7)
        if curve["val_step"]:
            ax.plot(curve["val_step"], curve["val_loss"], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{stage} ({self.config.encoder} encoder)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / f"loss_{stage}.png", dpi=80)
        plt.close(fig)

    # -- the whole run --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run every stage, then save the checkpoint (rank 0) and return its final metrics."""
        start = time.perf_counter()
        for stage in self.run.stages:  # after pretraining the vision tower stays frozen
            self.run_stage(stage)
        hashes = [_state_hash(self.model)]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, hashes[0])
            hashes = gathered
        metrics: dict[str, Any] = {}
        if self.main:
            drafts = time.perf_counter()
            metrics = self._final_metrics()
            self.seconds["validation drafts"] = time.perf_counter() - drafts
            metrics["train_seconds"] = time.perf_counter() - start
            self._save(metrics, hashes)
        if self.world > 1:
            torch.distributed.barrier()
        return metrics

    def _final_metrics(self) -> dict[str, Any]:
        from models.evaluate import ReportPair, evaluate_reports
        from models.generator import ReportGenerator

        studies = (self.data.valid or self.data.train)[: self.run.eval_studies]
        gen = ReportGenerator(self.model, self.tokenizer, {"name": "MS-VLM"}, "training")
        pairs, reports = [], []
        for s in tqdm(studies, desc="validation reports", disable=not self.main):
            report = gen.report(self.encoded(s))
            reports.append(report)
            pairs.append(ReportPair(s.study_id, s.findings, s.impression, report.findings,
                                    report.impression))
        metrics = evaluate_reports(pairs, meteor=False)
        if self.model.finding_head is not None:
            from models.evaluate import agreement

            metrics.update(agreement(reports))
        return metrics

    def _frozen_story(self) -> list[str]:
        """What each stage trained and what it left frozen (for the model card)."""
        cfg = self.run.stage["findings"]
        kept = (", except the head's cue path: fitted before the stage (sparse logistic "
                "regression on the training studies' cue maxima) and kept as fitted"
                if cfg["cue_fit"] and cfg["cue_freeze"] and self.model.cue_dim else "")
        parts = ["resampler", "projector"] + (
            ["label tokens"] if self.model.label_tokens is not None else []) + (
            ["evidence projection"] if self.model.evidence is not None else [])
        if not cfg["extra"] and self.data.main_only() is not self.data and not cfg["init_from"]:
            kept += (f", on the {len(self.data.main_only().train)} main training studies "
                     "without [data] extra")
        if self.findings_origin:
            commit = self.findings_origin.get("git_commit", "")[:12]
            kept = (f"{kept}; taken over from checkpoint {self.findings_origin['checkpoint']} "
                    f"(trained at commit {commit}, run file and data in the model card's "
                    "training.findings_from)")
        story = {
            "pretrain": "pretrain: vision tower alone (self-supervised); frozen afterwards",
            "findings": "findings: vision tower, Z-former and finding head end to end (BCE)"
                        + kept + "; all three frozen afterwards",
            "mem": "mem: Z-former alone (masked embedding modelling)",
            "align": "align: " + ", ".join(parts[:-1]) + " and " + parts[-1]
                     + "; everything else frozen",
            "finetune": "finetune: " + ", ".join(parts) + ", " + (
                "language model" if self.model.finding_head is not None
                else "Z-former and language model") + ("" if not self.config.lora
                                                        else " (LoRA adapters)"),
        }
        return [story[s] for s in self.run.stages]

    def _save(self, metrics: dict[str, Any], hashes: list[str]) -> None:
        from models.generator import save_checkpoint

        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = ""
        card = {
            "name": "3D-patch baseline" if self.config.encoder == "patch3d" else "MS-VLM",
            "modalities": ["CT"], "body_parts": ["CHEST"],
            "intended_use": "Research and unverified draft reports only; not for clinical use.",
            "training": {"run_file": self.run.text, "git_commit": commit,
                         "data": self.data.description, "stages": self.run.stages,
                         "world_size": self.world, "rank_weight_hashes": hashes,
                         "stage_seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                         "precision": self.precision,
                         "machine_reference": self.reference},
            "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
            "per_label_f1": metrics.get("per_label_f1", {}),
            "frozen": self._frozen_story(),
        }
        if self.findings_origin:
            card["training"]["findings_from"] = self.findings_origin
        if self.config.labels:
            card["labels"] = self.config.labels
            card["finding_thresholds"] = dict(zip(self.config.labels,
                                                  self.config.finding_thresholds))
            card["training"]["supervision"] = supervision(self.config)
            # never stated by the drafts (validation AUROC below min_auroc), and said so
            card["not_assessed"] = [label for label, t in zip(
                self.config.labels, self.config.finding_thresholds) if t > 1.0]
            if "cues" in self.config.finding_sources:  # chosen on validation (cue_choice)
                card["read_from_cue_path"] = [label for label, s in zip(
                    self.config.labels, self.config.finding_sources) if s == "cues"]
        if self.head_valid:
            card["head_validation"] = self.head_valid
        if self.probe:
            card["probe"] = {k: v for k, v in self.probe.items() if k != "per_label"}
        save_checkpoint(self.model.eval(), self.tokenizer, self.out, card)
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
