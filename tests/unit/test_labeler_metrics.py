"""Labeler on hand-written sentences; metrics on pairs whose scores are known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from models.evaluate import ReportPair, evaluate_reports, nlg_scores, nodules
from models.labeler import NEGATIVE, POSITIVE, UNCERTAIN, ClassifierLabeler, RuleLabeler
from models.phantom import ALL_LABELS
from tests.conftest import run_cli


@pytest.mark.parametrize("text, label, expected", [
    ("There is a small right pleural effusion.", "Pleural effusion", POSITIVE),
    ("No pleural effusion.", "Pleural effusion", NEGATIVE),
    ("Pleural effusion cannot be excluded.", "Pleural effusion", UNCERTAIN),
    ("Possible consolidation in the left lower lobe.", "Consolidation", UNCERTAIN),
    ("The lungs are free of consolidation.", "Consolidation", NEGATIVE),
    ("No effusion, but there is a 5 mm nodule in the left lower lobe.", "Lung nodule", POSITIVE),
    ("No pulmonary nodules.", "Lung nodule", NEGATIVE),
    ("Enlarged subcarinal lymph nodes.", "Lymphadenopathy", POSITIVE),
    ("Heart size is normal.", "Cardiomegaly", NEGATIVE),
    ("The heart is enlarged.", "Cardiomegaly", POSITIVE),
    ("Filling defects in the right lower lobe arteries, consistent with pulmonary embolism.",
     "Pulmonary embolism", POSITIVE),
    ("The pulmonary arteries are patent without embolus.", "Pulmonary embolism", NEGATIVE),
    ("Atherosclerotic calcification of the aorta.", "Arterial wall calcification", POSITIVE),
    ("Scattered ground-glass opacities.", "Lung opacity", POSITIVE),
    ("Emphysema is not seen.", "Emphysema", NEGATIVE),
    ("A hiatal hernia was not identified.", "Hiatal hernia", NEGATIVE),
])
def test_rule_labeler_sentences(text: str, label: str, expected: int) -> None:
    assert RuleLabeler().label(text)[label] == expected


def test_unmentioned_labels_are_negative() -> None:
    assert set(RuleLabeler().label("Normal chest CT.").values()) == {NEGATIVE}


def test_identical_texts_score_one() -> None:
    texts = ["the lungs are clear without nodules", "a small left pleural effusion is seen"]
    scores = nlg_scores(texts, texts)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6), key


def test_known_bleu_and_rouge_values() -> None:
    # Papineni et al. 2002: "the the the the the the the" against "the cat is on the mat":
    # modified unigram precision 2/7, candidate longer than the reference (no brevity penalty)
    scores = nlg_scores(["the cat is on the mat"], ["the the the the the the the"], meteor=False)
    assert scores["bleu1"] == pytest.approx(2 / 7, abs=1e-6)
    # LCS of "a b c d" and "a c d e" is 3: P = R = 3/4, so ROUGE-L (beta 1.2) = 0.75
    scores = nlg_scores(["a b c d"], ["a c d e"], meteor=False)
    assert scores["rouge_l"] == pytest.approx(0.75, abs=1e-6)


def test_clinical_efficacy_on_known_labels() -> None:
    pairs = [
        ReportPair("1", "Cardiomegaly. A 5 mm nodule in the right upper lobe.", "",
                   "Cardiomegaly. A 5 mm nodule in the right upper lobe.", ""),
        ReportPair("2", "Cardiomegaly.", "", "No cardiomegaly.", ""),
        ReportPair("3", "Normal.", "", "Cardiomegaly. A 12 mm nodule in the left lower lobe.", ""),
        ReportPair("4", "A 14 mm nodule in the left upper lobe.", "",
                   "A 9 mm nodule in the right lower lobe.", ""),
    ]
    m = evaluate_reports(pairs, meteor=False)
    # cardiomegaly: tp 1, fp 1, fn 1 -> P = R = F1 = 0.5; nodule: tp 2 (1, 4), fp 1 (3), fn 0
    assert m["per_label_f1"]["Cardiomegaly"] == pytest.approx(0.5)
    assert m["per_label_f1"]["Lung nodule"] == pytest.approx(0.8)
    assert set(m["per_label_f1"]) == {"Cardiomegaly", "Lung nodule"}
    assert len(m["labels_absent_from_split"]) == 16
    assert m["ce_f1_macro"] == pytest.approx(0.65)
    assert m["ce_precision_micro"] == pytest.approx(3 / 5)
    assert m["ce_recall_micro"] == pytest.approx(3 / 4)
    assert m["small_nodule_f1"] == pytest.approx(1.0)  # only study 1 has a <= 6 mm nodule
    assert m["nodule_location_accuracy"] == pytest.approx(0.5)  # 1 right, 4 wrong
    assert m["distinct_report_share"] == 1.0
    assert m["pe_f1"] == 0.0


def test_nodule_parsing() -> None:
    assert nodules("There is a 7 mm pulmonary nodule in the left upper lobe.") == [
        (7.0, "left", "upper")]
    assert nodules("A 4 mm nodule.") == [(4.0, None, None)]


def test_classifier_labeler_from_a_local_folder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "effusion", "nodule", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "clf")
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=len(ALL_LABELS), problem_type="multi_label_classification",
        id2label=dict(enumerate(ALL_LABELS)), label2id={k: i for i, k in enumerate(ALL_LABELS)}))
    model.save_pretrained(tmp_path / "clf")
    labels = ClassifierLabeler(tmp_path / "clf").label("no effusion .")
    assert set(labels) == set(ALL_LABELS) and set(labels.values()) <= {0, 1}


def test_evaluate_command_with_predictions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run_cli("phantoms", "--out", str(data), "--count", "4", "--seed", "3",
                     "--split", "valid")
    assert result.returncode == 0, result.stderr
    with open(data / "valid_reports.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    predictions = tmp_path / "pred.csv"
    with open(predictions, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["VolumeName", "Findings_EN", "Impressions_EN"])
        writer.writeheader()
        for row in rows:  # a "model" that repeats the reference
            writer.writerow({k: row[k] for k in ("VolumeName", "Findings_EN", "Impressions_EN")})
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--predictions", str(predictions), "--data", str(data),
                     "--out", str(out), "--per-study", str(tmp_path / "studies.jsonl"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "studies.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["draft"] == line["reference"] for line in lines)
    metrics = json.loads(out.read_text())
    for key in ("n_studies", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
                "impression_bleu4", "impression_rouge_l", "ce_precision_macro",
                "ce_recall_macro", "ce_f1_macro", "ce_precision_micro", "ce_recall_micro",
                "ce_f1_micro", "per_label_f1", "pe_f1", "small_nodule_f1",
                "nodule_location_accuracy", "distinct_report_share"):
        assert key in metrics, key
    assert metrics["n_studies"] == 4
    assert metrics["bleu4"] == pytest.approx(1.0) and metrics["ce_f1_micro"] == 1.0
    assert out.with_suffix(".md").read_text().startswith("## Evaluation")
    by_model = run_cli("evaluate", "--checkpoint", "demo", "--data", str(data), "--out",
                       str(tmp_path / "demo.json"), "--views", "first", "--device", "cpu",
                       "--no-meteor")
    assert by_model.returncode == 0, by_model.stderr[-2000:]
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["n_studies"] == 4 and demo["views"] == "first" and demo["source"] == "demo"
    missing = run_cli("evaluate", "--checkpoint", str(tmp_path / "absent"), "--data", str(data),
                      "--out", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_evaluate_on_phantoms_writes_each_study(tmp_path: Path) -> None:
    """``evaluate --phantoms --per-study``: one line per study and mode with the reference, the
    draft, the head's positive labels and the true nodules; "swapped" reads the next study's
    images, so its draft is the one that study got."""
    out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--checkpoint", "demo", "--phantoms", "2", "--phantom-seed",
                     "77", "--modes", "all,swapped", "--no-meteor", "--device", "cpu", "--out",
                     str(out), "--per-study", str(tmp_path / "studies.jsonl"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(json.loads(out.read_text())) == {"all", "swapped"}
    lines = [json.loads(line) for line in (tmp_path / "studies.jsonl").read_text().splitlines()]
    assert [line["mode"] for line in lines] == ["all"] * 2 + ["swapped"] * 2
    drafts = {line["study_id"]: line["draft"] for line in lines if line["mode"] == "all"}
    ids = list(drafts)
    assert len(ids) == 2 and drafts[ids[0]] != drafts[ids[1]]
    for i, line in enumerate(lines[2:]):
        assert line["study_id"] == ids[i] and line["draft"] == drafts[ids[1 - i]]
    for line in lines:
        assert line["draft"].strip() and isinstance(line["head_positive"], list)
        assert isinstance(line["nodules"], list) and isinstance(line["sites"], list)
