"""Report text -> the 18 CT-RATE labels plus pulmonary embolism, with negation and uncertainty.

:class:`RuleLabeler` is exact on phantom reports and reasonable on real ones (sentence-level
patterns, NegEx-style negation and uncertainty cues). :class:`ClassifierLabeler` loads a local
multi-label text classifier folder (RadBERT-style, one output per label) for real reports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Protocol

from models.phantom import ALL_LABELS

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

PATTERNS: dict[str, list[str]] = {
    "Medical material": [r"catheter", r"central (venous )?line", r"\bport\b", r"pacemaker",
                         r"\bstent", r"endotracheal tube", r"medical (device|material)",
                         r"\bclips?\b", r"\bwires?\b", r"\bsvc\b.*\btip\b"],
    "Arterial wall calcification": [r"(aort\w*|arterial) (wall )?calcif", r"calcif\w* (plaques? )"
                                    r"(are |is )?(present )?in the aort", r"aortic atheroscl",
                                    r"atherosclero", r"calcific plaque"],
    "Cardiomegaly": [r"cardiomegaly", r"heart (is |appears )?enlarged", r"enlarged heart"],
    "Pericardial effusion": [r"pericardial effusion", r"pericardial fluid"],
    "Coronary artery wall calcification": [r"coronary (artery )?(wall )?calcif",
                                           r"calcification of the coronary",
                                           r"coronary artery disease"],
    "Hiatal hernia": [r"hiatal hernia", r"hiatus hernia"],
    "Lymphadenopathy": [r"lymphadenopath", r"enlarged (\w+ )?lymph nodes?",
                        r"lymph node enlargement"],
    "Emphysema": [r"emphysema"],
    "Atelectasis": [r"atelecta"],
    "Lung nodule": [r"\bnodules?\b", r"\bnodular lesion"],
    "Lung opacity": [r"ground[- ]glass", r"\bopacit(y|ies)\b"],
    "Pulmonary fibrotic sequela": [r"fibrotic", r"fibrosis", r"fibrous (band|sequela)"],
    "Pleural effusion": [r"pleural effusion", r"pleural fluid"],
    "Mosaic attenuation pattern": [r"mosaic"],
    "Peribronchial thickening": [r"peribronchial thickening",
                                 r"bronchial walls? (are |is )?thickened",
                                 r"bronchial wall thickening"],
    "Consolidation": [r"consolidat"],
    "Bronchiectasis": [r"bronchiectasis", r"dilated bronch"],
    "Interlobular septal thickening": [r"(interlobular )?septal thickening",
                                       r"thickened (interlobular )?septa"],
    "Pulmonary embolism": [r"pulmonary embol", r"\bembol(us|ism)\b", r"filling defect"],
}
NEGATION = [r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b",
            r"\babsent\b", r"\bnone\b", r"\bnormal\b", r"\bpatent\b", r"\bruled out\b",
            r"\bresolved\b"]
UNCERTAINTY = [r"\bpossib", r"\bprobab", r"\bmay\b", r"\bmight\b", r"\bcannot be excluded\b",
               r"\bcan ?not be ruled out\b", r"\bquestionable\b", r"\bsuspicious\b",
               r"\bsuggestive\b", r"\bequivocal\b", r"\bnot excluded\b", r"\b(likely|unlikely)\b"]
POST_NEGATION = re.compile(r"^[^,;]*?\b((is|are|was|were) (not|absent)|not (seen|identified|"
                           r"present|demonstrated)|absent|excluded|ruled out)\b", re.I)
_SENTENCE = re.compile(r"(?<=[.;!?])\s+|\n+")


class Labeler(Protocol):
    def label(self, text: str) -> dict[str, int]:
        """Label -> 1 positive, 0 negative or not mentioned, -1 uncertain."""
        ...


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences the rule labeler reads one by one."""
    spans, start = [], 0
    for match in _SENTENCE.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    return spans + [(start, len(text))]


class RuleLabeler:
    """Sentence-level patterns with negation and uncertainty cues before the mention."""

    def __init__(self) -> None:
        self._patterns = {k: [re.compile(p, re.I) for p in v] for k, v in PATTERNS.items()}
        self._neg = [re.compile(p, re.I) for p in NEGATION]
        self._unc = [re.compile(p, re.I) for p in UNCERTAINTY]

    def mentions(self, text: str) -> set[str]:
        """The labels ``text`` speaks of at all: stated, negated or uncertain."""
        return {label for label, patterns in self._patterns.items()
                if any(p.search(text) for p in patterns)}

    def label(self, text: str) -> dict[str, int]:
        out = {label: NEGATIVE for label in ALL_LABELS}
        for sentence in _SENTENCE.split(text):
            for label, patterns in self._patterns.items():
                for pattern in patterns:
                    match = pattern.search(sentence)
                    if match is None:
                        continue
                    # negation reaches back to the start of the clause only
                    before = re.split(r",|;|\bbut\b|\bhowever\b|\balthough\b|\bwhile\b",
                                      sentence[: match.start()], flags=re.I)[-1]
                    if label == "Lung opacity" and re.search(r"no (\w+ )?ground", before, re.I):
                        break
                    after = sentence[match.end():]
                    uncertain = any(p.search(sentence) for p in self._unc)
                    negated = any(p.search(before) for p in self._neg) or bool(
                        POST_NEGATION.search(after))
                    if negated and not uncertain:
                        break  # negated mention: leaves the label as it is
                    state = UNCERTAIN if uncertain else POSITIVE
                    if out[label] != POSITIVE:
                        out[label] = state
                    break
        return out


class ClassifierLabeler:
    """A local multi-label sequence classifier (``AutoModelForSequenceClassification``) whose
    ``id2label`` names the labels; scores above ``threshold`` are positive."""

    def __init__(self, path: str | Path, threshold: float = 0.5) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True).eval()
        self.threshold = threshold
        names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        unknown = [n for n in names if n not in ALL_LABELS]
        if unknown:
            raise ValueError(f"Invalid classifier {path} - labels {unknown} are not CT-RATE's")
        self.names = names

    def label(self, text: str) -> dict[str, int]:
        import torch

        batch = self.tokenizer(text, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            scores = torch.sigmoid(self.model(**batch).logits[0])
        out = {label: NEGATIVE for label in ALL_LABELS}
        for name, score in zip(self.names, scores.tolist()):
            out[name] = POSITIVE if score >= self.threshold else NEGATIVE
        return out


def make_labeler(path: str | Path | None = None) -> Labeler:
    """The rule labeler, or a classifier from a local folder."""
    return ClassifierLabeler(path) if path else RuleLabeler()


def binary(labels: dict[str, int], uncertain_as: int = POSITIVE) -> dict[str, int]:
    """0/1 labels, uncertain mapped to ``uncertain_as``."""
    return {k: (uncertain_as if v == UNCERTAIN else int(v == POSITIVE)) for k, v in labels.items()}


def disagreements(labeler: Labeler, text: str,
                  decisions: Iterable[tuple[str, bool]]) -> list[str]:
    """The labels of ``(label, present)`` decisions whose state in ``text`` (the labeler's
    reading, uncertain as positive) differs: the report/head agreement metric and the
    generator's ``agree_beams`` check."""
    read = binary(labeler.label(text))
    return [label for label, present in decisions if read.get(label, 0) != int(present)]


def stated_side(text: str, label: str) -> str | None:
    """``"right"`` or ``"left"`` when the first non-negated sentence that mentions ``label``
    names exactly one side (the laterality the draft states), else None."""
    patterns = [re.compile(p, re.I) for p in PATTERNS.get(label, [])]
    for sentence in _SENTENCE.split(text):
        if not any(p.search(sentence) for p in patterns):
            continue
        if RuleLabeler().label(sentence).get(label) != POSITIVE:
            continue
        sides = set(re.findall(r"\b(right|left)\b", sentence, re.I))
        if len(sides) == 1:
            return sides.pop().lower()
    return None
