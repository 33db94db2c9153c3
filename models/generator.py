"""Checkpoints (config, safetensors weights, tokenizer, model card) and the report generator."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.findings import key_slices
from models.msvlm import MSVLM, EncodedView, MSVLMConfig, site_words
from models.report import Finding, Report, load_tokenizer, parse_report, special_ids
from models.view import View

# generate() on inputs_embeds applies the repetition penalty to the new tokens only, which is
# what a report from visual tokens wants; transformers says so on every call
warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "model_card.json"
TOKENIZER = "tokenizer"


def model_version(directory: str | Path) -> str:
    """First 16 hex characters of the SHA-256 of the weights file (fits a DICOM LO)."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stored_keys(model: MSVLM) -> list[str]:
    """Weights saved in the checkpoint: all, except a base LM loaded from ``lm_path`` (only its
    LoRA adapters are saved then)."""
    keys = list(model.state_dict())
    if model.config.lm_path:
        keys = [k for k in keys if not k.startswith("language_model.") or "lora_" in k]
    return keys


def save_checkpoint(model: MSVLM, tokenizer: Any, directory: str | Path,
                    card: dict[str, Any]) -> str:
    """Write a checkpoint folder and return its model version."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {k: state[k].detach().to("cpu").contiguous().clone() for k in _stored_keys(model)}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS, 0o644)  # readable by a service user, like the other files
    (out / CONFIG).write_text(json.dumps({
        "model": model.config.to_dict(), "vocab_size": len(tokenizer),
        "special_ids": model.special_ids}, indent=2))
    tokenizer.save_pretrained(str(out / TOKENIZER))
    (out / CARD).write_text(json.dumps(card, indent=2))
    return model_version(out)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"Invalid 'device' {device!r} - auto, cpu or cuda")
    return torch.device(device)


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[MSVLM, Any,
                                                                        dict[str, Any], str]:
    """(model in eval mode, tokenizer, model card, model version) from a checkpoint folder.

    Raises
    ------
    FileNotFoundError
        A file of the checkpoint is missing.
    ValueError
        The weights do not match the config.
    """
    path = Path(directory)
    for name in (WEIGHTS, CONFIG, CARD, TOKENIZER):
        if not (path / name).exists():
            raise FileNotFoundError(f"checkpoint {path} has no {name}")
    meta = json.loads((path / CONFIG).read_text())
    config = MSVLMConfig.from_dict(meta["model"])
    tokenizer = load_tokenizer(path / TOKENIZER)
    model = MSVLM(config, int(meta["vocab_size"]), meta["special_ids"])
    tensors = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected = set(_stored_keys(model))
    missing_stored = sorted(set(missing) & expected)
    if missing_stored or unexpected:
        raise ValueError(f"checkpoint {path}: weights do not match its config (missing "
                         f"{missing_stored[:5]}, unexpected {list(unexpected)[:5]})")
    model.to(resolve_device(device)).eval()
    return model, tokenizer, json.loads((path / CARD).read_text()), model_version(path)


class ReportGenerator:
    """Views in, draft report out: ``encode_slices`` (cacheable) then ``report``.

    Parameters
    ----------
    model, tokenizer : the trained parts
    card : dict
        The model card (name, modalities, body parts, ...).
    version : str
        The model version (hash of the weights).
    """

    def __init__(self, model: MSVLM, tokenizer: Any, card: dict[str, Any], version: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.card = card
        self.version = version
        self.name = str(card.get("name", "MS-VLM"))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto") -> ReportGenerator:
        model, tokenizer, card, version = load_checkpoint(path, device)
        return cls(model, tokenizer, card, version)

    def supports(self, modality: str, body_part: str | None) -> bool:
        """Whether the model card declares this modality and body part (``"*"`` = any)."""
        modalities = [str(m).upper() for m in self.card.get("modalities", ["*"])]
        parts = [str(p).upper() for p in self.card.get("body_parts", ["*"])]
        return (("*" in modalities or modality.upper() in modalities)
                and ("*" in parts or (body_part or "").upper() in parts))

    def encode_slices(self, view: View) -> EncodedView:
        """Per-slice embeddings of one view (cache them by series UID and ``version``)."""
        return self.model.encode_slices(view)

    @property
    def streamable(self) -> bool:
        """Whether each slice's embedding depends on that slice alone (every encoder but the
        3D-patch baseline), so slices can be encoded one by one as they arrive."""
        return not bool(getattr(self.model.vision_tower, "volumetric", False))

    @property
    def stream_key(self) -> str:
        """Key of cached slice embeddings: the model version and a hash of the configuration
        (preprocessing included), so embeddings of other weights or settings never mix."""
        config = json.dumps(self.model.config.to_dict(), sort_keys=True, default=str)
        return f"{self.version}:{hashlib.sha256(config.encode()).hexdigest()[:12]}"

    def encode_images(self, pixels: np.ndarray, modality: str) -> np.ndarray:
        """Embeddings ``(S, Dv)`` float32 of slices ``(S, H, W)`` (HU for CT), each on its own
        (needs :attr:`streamable`): what :meth:`encode_slices` computes for them in a view,
        except the cues that need the whole view (:attr:`volume_cues`)."""
        tower: Any = self.model.vision_tower
        if self.volume_cues:  # a view of stacked slices would find 3D structure across them
            with torch.inference_mode():
                feats = torch.cat([tower.lower(torch.as_tensor(pixels[i:i + 64]), modality)
                                   for i in range(0, len(pixels), 64)])
                return tower(feats.to(self.model.device)).float().cpu().numpy()
        view = View(pixels, np.arange(len(pixels), dtype=np.float64), (1.0, 1.0), modality)
        return self.model.encode_slices(view).embeddings.float().cpu().numpy()

    @property
    def volume_cues(self) -> bool:
        """Whether part of each slice's embedding comes from the whole view (the pyramid
        encoder's 3D nodule cues): streaming then keeps per-slice codes with the embedding
        (:meth:`stream_records`) and :meth:`streamed_view` fills the cues in."""
        return bool(getattr(self.model.vision_tower, "nodules", False))

    def stream_records(self, pixels: np.ndarray, modality: str) -> list[bytes]:
        """What streaming keeps per slice of ``(S, H, W)``: the embedding (float32 bytes), and
        with :attr:`volume_cues` the slice's codes after it."""
        embeddings = self.encode_images(pixels, modality).astype("<f4")
        if not self.volume_cues:
            return [e.tobytes() for e in embeddings]
        from models.cnn import pack_codes

        codes = self.model.vision_tower.codes(torch.as_tensor(pixels), modality)
        return [e.tobytes() + pack_codes(c) for e, c in zip(embeddings, codes)]

    def streamed_view(self, records: Sequence[bytes], z_mm: np.ndarray,
                      pixel_mm: tuple[float, float], shape: tuple[int, int],
                      phase: str = "unknown", plane: str = "axial"
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(S, Dv)`` embeddings of a view of ``phase`` and ``plane`` from its slices'
        :meth:`stream_records` (in slice order), the whole-view cues filled in, and its nodule
        sites (``[model] finding_sites``; None when the model reads none): what
        :meth:`encode_slices` gives. The view's codes are unpacked and its solid components
        found once, for both."""
        dim = self.model.config.vision_hidden
        emb = torch.from_numpy(np.stack([np.frombuffer(r[:4 * dim], dtype="<f4")
                                         for r in records]).astype(np.float32))
        if not self.volume_cues:
            return emb, None
        from models.cnn import unpack_codes

        tower: Any = self.model.vision_tower
        codes = np.stack([unpack_codes(r[4 * dim:]) for r in records])
        spacing = tower.grid_spacing(shape, pixel_mm, z_mm)
        found = tower.find_nodules(codes, spacing)
        cues = tower.view_cues(codes, spacing, phase, found)
        with torch.inference_mode():
            emb[:, -tower.view_cue_dim:] = tower.volume_embedding(torch.from_numpy(cues)).cpu()
        if not self.model.config.finding_sites:
            return emb, None
        return emb, torch.from_numpy(tower.view_sites(codes, z_mm, spacing, plane, found))

    def report(self, encoded: Sequence[EncodedView], max_new_tokens: int | None = None,
               timings: dict[str, float] | None = None) -> Report:
        """Write the report for one study from its encoded views."""
        start = time.perf_counter()
        ids = self.model.generate_ids([list(encoded)], max_new_tokens)[0]
        findings, impression = parse_report(self.tokenizer.decode(ids, skip_special_tokens=True))
        states = self.model.last_states
        beams = self.model.config.agree_beams
        # the report-only ablation's text must not be chosen by the head it does not read
        if beams > 1 and states is not None and self.model.label_tokens is not None and \
                self._disagreements(findings, impression, states[0]):
            redecode = time.perf_counter()
            findings, impression = self._agreeing(encoded, (findings, impression), states,
                                                  max_new_tokens)
            timings = {**(timings or {}), "redecode_s": time.perf_counter() - redecode}
        relevance = self.model.slice_relevance()
        per_view: list[list[float]] = []
        if relevance is not None:
            offset = 0
            for view in encoded:
                n = view.embeddings.shape[0]
                per_view.append(relevance[0, offset:offset + n].tolist())
                offset += n
        structured: list[Finding] = []
        found, states = self.model.last_findings, self.model.last_states
        if found is not None and states is not None:
            lengths = [view.embeddings.shape[0] for view in encoded]
            probs = found.logits[0].sigmoid()
            for i, label in enumerate(self.model.config.labels):
                present = bool(states[0, i])
                keys = key_slices(found.key_weights[0, i], lengths,
                                  self.model.config.key_slices) if present else []
                structured.append(Finding(label, float(probs[i]), present,
                                          [(v, s) for v, s, _ in keys]))
        times = dict(timings or {})
        times["generate_s"] = time.perf_counter() - start
        return Report(findings, impression, self.name, self.version, times, per_view,
                      structured, self.not_assessed)

    def _disagreements(self, findings: str, impression: str, states: torch.Tensor) -> int:
        """Labels whose state in the text (the rule labeler's reading, the one the training
        targets and the agreement metric use) differs from the head's decision."""
        from models.labeler import disagreements

        return len(disagreements(self._labeler, f"{findings}\n{impression}",
                                 zip(self.model.config.labels, map(bool, states.tolist()))))

    @functools.cached_property
    def _labeler(self) -> Any:
        from models.labeler import RuleLabeler

        return RuleLabeler()

    def _agreeing(self, encoded: Sequence[EncodedView], greedy: tuple[str, str],
                  states: torch.Tensor, max_new_tokens: int | None) -> tuple[str, str]:
        """The greedy draft or, where one disagrees less with the head, the best beam of a
        beam search (``agree_beams``) that does: every candidate is the language model's own
        text, none is edited."""
        ids = self.model.generate_ids([list(encoded)], max_new_tokens, states,
                                      num_beams=self.model.config.agree_beams)
        candidates = [greedy] + [parse_report(self.tokenizer.decode(i, skip_special_tokens=True))
                                 for i in ids]
        return min(candidates, key=lambda c: self._disagreements(*c, states[0]))  # first best

    @property
    def not_assessed(self) -> list[str]:
        """Labels whose stored threshold no probability reaches (validation AUROC below the
        run's ``min_auroc``): the drafts never state them, and say so."""
        config = self.model.config
        return [label for label, t in zip(config.labels, config.finding_thresholds) if t > 1.0]

    def generate(self, views: Sequence[View], max_new_tokens: int | None = None) -> Report:
        """Encode every view and write the report."""
        if not views:
            raise ValueError("Invalid 'views' - a study needs at least one view")
        start = time.perf_counter()
        encoded = [self.encode_slices(v) for v in views]
        return self.report(encoded, max_new_tokens, {"encode_s": time.perf_counter() - start})


def build_tiny(tokenizer: Any, **overrides: Any) -> MSVLM:
    """A small model for tests and quick experiments."""
    config = MSVLMConfig(**overrides)
    if config.finding_sites and not config.finding_site_words:
        config.finding_site_words = site_words(tokenizer)
    return MSVLM(config, len(tokenizer), special_ids(tokenizer))
