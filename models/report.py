"""Report text: the format the language model writes, its parsing, and the BPE tokenizer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

_SECTION = re.compile(r"(?is)^\s*findings\s*:\s*(?P<findings>.*?)\s*impression\s*:\s*"
                      r"(?P<impression>.*?)\s*$")
_RESTART = re.compile(r"(?i)findings\s*:")


@dataclass
class Finding:
    """One label of the finding head: its probability, the decision with the checkpoint's
    threshold, and for a present finding its key slices ``(view index, slice index)``."""

    label: str
    probability: float
    present: bool
    key_slices: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Report:
    """A generated draft report."""

    findings: str
    impression: str
    model_name: str = ""
    model_version: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    slice_relevance: list[list[float]] = field(default_factory=list)
    """Per view, the resampler's mean attention on each slice (key-slice evidence)."""
    structured: list[Finding] = field(default_factory=list)
    """The finding head's answer per label (empty for a checkpoint without a head)."""
    not_assessed: list[str] = field(default_factory=list)
    """Labels the checkpoint never states positive (its head cannot see them)."""

    @property
    def positive(self) -> list[Finding]:
        return [f for f in self.structured if f.present]

    @property
    def text(self) -> str:
        return format_report(self.findings, self.impression)


def format_report(findings: str, impression: str) -> str:
    """The one text layout used for training targets and parsed back from generation."""
    return f"Findings: {findings.strip()}\nImpression: {impression.strip()}"


def parse_report(text: str) -> tuple[str, str]:
    """Split generated text into (findings, impression); text without the sections is all
    findings, with an empty impression. A findings section the model started again (a second
    "Findings:" header, seen on the real abdominal CT: the first try broke off mid-sentence)
    keeps its last start only."""
    match = _SECTION.match(text)
    if match is None:
        return _RESTART.split(text)[-1].strip(), ""
    return _RESTART.split(match["findings"])[-1].strip(), match["impression"].strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE tokenizer on report texts (``tokenizers``) and wrap it for
    transformers; saved with the checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(
        SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"])


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer saved in a local folder (never a hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def special_ids(tokenizer: Any) -> dict[str, int]:
    return {"pad": int(tokenizer.pad_token_id), "bos": int(tokenizer.bos_token_id),
            "eos": int(tokenizer.eos_token_id)}


def finding_weights(tokenizer: Any, texts: list[str], labeler: Any, weight: float,
                    labels: Sequence[str] = (), device: Any = "cpu") -> Any:
    """``(B, T)`` loss weights aligned with :func:`encode_targets`: ``weight`` on the tokens of
    each sentence that speaks of one of ``labels`` at all (stated or negated, so the weight
    does not tip the text towards stating them; where a nodule's place, size and side are
    said), or with no ``labels`` each sentence that states any finding; 1 elsewhere. A
    byte-level BPE token never spans two sentences, so the character offsets place each token
    in its sentence."""
    import torch

    from models.labeler import sentence_spans

    rows = []
    for text in texts:
        spans = [(a, b) for a, b in sentence_spans(text)
                 if (labeler.mentions(text[a:b]) & set(labels) if labels else
                     any(v == 1 for v in labeler.label(text[a:b]).values()))]
        offsets = tokenizer(text, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        rows.append([1.0] + [weight if any(a < end <= b for a, b in spans) else 1.0
                             for _, end in offsets] + [1.0])
    T = max(len(r) for r in rows)
    out = torch.ones((len(rows), T))
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out.to(device)


def encode_targets(tokenizer: Any, texts: list[str], device: Any = "cpu") -> tuple[Any, Any]:
    """``<s> text </s>`` padded on the right: ``(input_ids, attention_mask)``, both ``(B, T)``."""
    import torch

    rows = [[tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False)
            + [tokenizer.eos_token_id] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)
