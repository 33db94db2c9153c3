"""The finding head: attention over slices, thresholds, key slices, the LM reading its decisions,
and a short real training run in which the head learns to see two large findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.data import phantom_dataset
from models.findings import FindingHead, decisions, key_slices, tune_thresholds
from models.generator import ReportGenerator, build_tiny
from models.msvlm import EncodedView
from models.report import train_tokenizer
from models.train import RunConfig, Trainer, encode_sampled
from tests.model.test_msvlm import REPORTS, TINY, make_view

LABELS = ["Cardiomegaly", "Pleural effusion"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(REPORTS * 5, vocab_size=300)


def encoded(n: int, dim: int = 32, seed: int = 0) -> EncodedView:
    g = torch.Generator().manual_seed(seed)
    return EncodedView(torch.randn(n, dim, generator=g), torch.arange(n, dtype=torch.float32) *
                       2.0, "CT", "axial", "arterial")


def test_head_attends_over_valid_slices_only() -> None:
    head = FindingHead(3, 16, heads=2)
    tokens = torch.randn(2, 7, 16)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = head(tokens, valid)
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 3, 7)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 3))
    assert float(out.attention[1, :, 4:].abs().sum()) == 0.0
    # padding does not change a study's answer
    alone = head(tokens[1:, :4], valid[1:, :4])
    torch.testing.assert_close(alone.logits, out.logits[1:], atol=1e-5, rtol=1e-4)


def test_thresholds_maximise_f1_and_are_used() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.7, 0.3], [0.4, 0.35], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1]])
    t = tune_thresholds(probs, targets)
    assert decisions(probs, t).tolist() == targets.tolist()
    assert t[0] > 0.4 and t[1] > 0.35
    assert decisions(probs, []).tolist() == (probs >= 0.5).long().tolist()


def test_threshold_sits_mid_interval_in_logit_space() -> None:
    """A saturated positive (0.9996) and the highest negative (0.5): the threshold is their
    logit-space middle (~0.98), not 0.9996, so a positive study slightly less sure still counts."""
    probs = torch.tensor([[0.9996], [0.9999], [0.5], [0.1]])
    targets = torch.tensor([[1], [1], [0], [0]])
    t = tune_thresholds(probs, targets)[0]
    mid = torch.sigmoid(torch.logit(torch.tensor([0.5, 0.9996], dtype=torch.float64)).mean())
    assert t == pytest.approx(float(mid), rel=1e-6) and 0.97 < t < 0.99
    assert decisions(torch.tensor([[0.995], [0.6]]), [t]).tolist() == [[1], [0]]
    # everyone positive (no probability below the best threshold) keeps the lowest probability
    assert tune_thresholds(torch.tensor([[0.3], [0.8]]), torch.tensor([[1], [1]]))[0] == \
        pytest.approx(0.3)


def test_3d_patch_baseline_gets_the_same_head_per_slice(tokenizer: Any) -> None:
    """The 3D-patch baseline gives every slice its slab's embedding, so the head attends over
    slices (key slices are slice indices a node maps to SOP instances), and the findings loss
    trains the volumetric tower through the whole volume."""
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "encoder": "patch3d", "patch3d_depth": 8,
                                     "patch3d_patch_depth": 4, "labels": LABELS,
                                     "head_heads": 2})
    view = make_view(13)
    enc = model.encode_slices(view)
    assert enc.embeddings.shape == (13, 32)
    torch.testing.assert_close(enc.z_mm, torch.as_tensor(view.z_mm, dtype=torch.float32))
    slab = model.vision_tower.slab_of_slices(13)
    assert slab.tolist() == sorted(slab.tolist()) and set(slab.tolist()) == {0, 1}
    assert torch.equal(enc.embeddings[0], enc.embeddings[1])  # same slab
    assert not torch.equal(enc.embeddings[0], enc.embeddings[-1])  # the other slab
    found = model.findings([[enc]])
    assert found.attention.shape[-1] == 13
    encoded = encode_sampled(model, [[view]], grad_slices=4, seed=0)
    loss = model.findings(encoded).logits.sum()
    loss.backward()
    grad = model.vision_tower.patch.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_key_slices_are_per_view_and_heaviest_first() -> None:
    attention = torch.tensor([0.0, 0.5, 0.1, 0.05, 0.3, 0.05])  # view 0: 3 slices, view 1: 3
    keys = key_slices(attention, [3, 3], 1)
    assert keys[0][:2] == (0, 1) and keys[1][:2] == (1, 1)
    assert [k[:2] for k in key_slices(attention, [3, 3], 2)] == [(0, 1), (1, 1), (0, 2),
                                                                  (1, 0)]


def test_the_language_model_reads_the_decisions(tokenizer: Any) -> None:
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2}).eval()
    views = [encoded(5)]
    visual, found = model.read([views])
    assert found is not None and found.logits.shape == (1, 2)
    on = model.prefix(visual, torch.tensor([[1, 0]]))
    off = model.prefix(visual, torch.tensor([[0, 0]]))
    assert on.shape[1] == TINY["num_queries"] + 2  # one token per label after the visual ones
    assert not torch.equal(on[:, -2], off[:, -2]) and torch.equal(on[:, -1], off[:, -1])
    ids = torch.tensor([[1, 5, 6, 2]])
    loss = model([views], ids, torch.ones_like(ids), torch.tensor([[1, 0]]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="label states"):
        model.prefix(visual, None)
    report = ReportGenerator(model, tokenizer, {"name": "t"}, "v").report(views, 4)
    assert [f.label for f in report.structured] == LABELS
    assert all(bool(f.key_slices) == f.present for f in report.structured)


def test_a_draft_that_leaves_out_a_stated_finding_is_decoded_again(tokenizer: Any) -> None:
    """``agree_beams``: a language model that writes "No cardiomegaly." most of the time and
    "Cardiomegaly." otherwise, read by a head that states Cardiomegaly: the greedy draft
    contradicts the head, so the generator decodes again with beams and keeps the model's own
    text that agrees; where the greedy draft agrees it is kept and nothing is decoded again."""
    from models.report import encode_targets, format_report

    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2,
                                     "finding_thresholds": [0.0, 2.0]})
    texts = [format_report("No cardiomegaly.", "Normal.")] * 7 + [
        format_report("Cardiomegaly.", "Cardiomegaly.")] * 3
    ids, mask = encode_targets(tokenizer, texts)
    views = [[encoded(5, seed=i)] for i in range(len(texts))]
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):  # the label tokens say absent: the LM learns the 7:3 prior alone
        loss = model(views, ids, mask, torch.zeros(len(texts), 2, dtype=torch.long))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    generator = ReportGenerator(model, tokenizer, {}, "test")

    def stated(report: Any) -> bool:
        return "Cardiomegaly" in generator._labeler.mentions(report.findings) and \
            generator._disagreements(report.findings, report.impression,
                                     torch.tensor([1, 0])) == 0

    greedy = generator.report(views[0])
    assert [f.present for f in greedy.structured] == [True, False]
    assert not stated(greedy) and "redecode_s" not in greedy.timings  # agree_beams 0: as is
    model.config.agree_beams = 4
    again = generator.report(views[0])
    assert stated(again) and "redecode_s" in again.timings, again.text
    assert again.findings == "Cardiomegaly."  # the model's own sentence, not a template
    model.config.finding_thresholds = [2.0, 2.0]  # the head states nothing: greedy agrees
    kept = generator.report(views[0])
    assert kept.text == greedy.text and "redecode_s" not in kept.timings
    # the report-only ablation: the head it does not read never chooses its text
    ablation = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2,
                                        "finding_thresholds": [0.0, 2.0], "agree_beams": 4,
                                        "condition_on_findings": False}).eval()
    alone = ReportGenerator(ablation, tokenizer, {}, "test").report(views[0])
    assert alone.structured[0].present and not stated(alone)
    assert "redecode_s" not in alone.timings


def test_a_present_label_token_carries_where_the_head_found_it(tokenizer: Any) -> None:
    """``finding_evidence``: per label the key-slice-weighted level along the view (and lesion
    cues) joins a present label's token; an absent label's token does not change with it, a
    fresh model (zero evidence weights) reads as without it, and training fits it."""
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2,
                                     "finding_evidence": True}).eval()
    views = [encoded(6)]
    visual, found = model.read([views])
    assert found is not None and found.where is not None
    assert found.where.shape == (1, 2, model.cue_dim + 1)
    assert 0.0 <= float(found.where.min()) and float(found.where.max()) <= 1.0
    states = torch.tensor([[1, 0]])
    low, high = torch.zeros(1, 2, 1), torch.ones(1, 2, 1)
    assert torch.equal(model.prefix(visual, states, low), model.prefix(visual, states, high))
    assert model.evidence is not None
    torch.nn.init.normal_(model.evidence.weight)
    a, b = model.prefix(visual, states, low), model.prefix(visual, states, high)
    assert not torch.equal(a[:, -2], b[:, -2]) and torch.equal(a[:, -1], b[:, -1])
    ids = torch.tensor([[1, 5, 6, 2]])
    model.train()
    model([views], ids, torch.ones_like(ids), states).backward()
    assert model.evidence.weight.grad is not None and model.evidence.weight.grad.abs().sum() > 0


def test_where_from_the_top_key_slice_names_that_slice(tokenizer: Any) -> None:
    """``finding_evidence_slices = 1``: ``where`` is the top key slice's own level along its
    view, not the soft mean (nearly 0.5 over hundreds of slices); in a batch with a shorter
    study the padding is never the top slice."""
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2,
                                     "finding_evidence": True,
                                     "finding_evidence_slices": 1}).eval()
    studies = [[encoded(9, seed=1)], [encoded(5, seed=2)]]
    _, found = model.read(studies)
    assert found is not None and found.where is not None
    for b, n in enumerate((9, 5)):
        top = found.key_weights[b].argmax(dim=-1)  # (N,)
        assert bool((top < n).all())
        torch.testing.assert_close(found.where[b, :, -1], top.float() / (n - 1))
    model.config.finding_evidence_slices = 0
    _, soft = model.read(studies)
    assert soft.where is not None and not torch.allclose(soft.where[..., -1],
                                                         found.where[..., -1])


def test_site_tokens_place_a_nodule_only_while_it_is_stated(tokenizer: Any) -> None:
    """``finding_sites``: after the label tokens four tokens per site say where the views'
    largest components lie, the size and side as the LM's own words (" 10", " right" or
    " left", so the text can copy them); the empty second slot reads "none" in both studies;
    while the label is stated absent nothing of the sites shows; the same component seen in a
    second phase is one site; training reaches the site embeddings."""
    from models.msvlm import study_sites

    torch.manual_seed(0)
    labels = ["Lung nodule", "Cardiomegaly"]
    model = build_tiny(tokenizer, **{**TINY, "labels": labels, "head_heads": 2,
                                     "finding_sites": 2}).eval()
    right, left, twin = encoded(6), encoded(6, seed=1), encoded(5, seed=2)
    right.sites = torch.tensor([[10.2, 0.8, -0.6, -0.4]])
    left.sites = torch.tensor([[9.8, 0.8, 0.6, -0.4]])
    twin.sites = torch.tensor([[9.5, 0.82, -0.55, -0.4], [6.0, 0.3, 0.5, 0.2]])
    visual, found = model.read([[right], [left]])
    assert found is not None and found.sites is not None
    torch.testing.assert_close(found.sites[0], torch.tensor([[10.2, 0.8, -0.6, -0.4],
                                                             [0.0, 0.0, 0.0, 0.0]]))
    stated = model.prefix(visual, torch.tensor([[1, 0], [1, 0]]), None, found.sites)
    assert stated.shape[1] == visual.shape[1] + 2 + 2 * 4

    def word(text: str) -> torch.Tensor:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return model.language_model.get_input_embeddings().weight[ids].mean(dim=0)

    first = stated[:, -8:-4]  # size, side, level, front of each study's first site
    torch.testing.assert_close(first[0, 0], word(" 10"))
    torch.testing.assert_close(first[1, 0], word(" 10"))
    torch.testing.assert_close(first[0, 1], word(" right"))
    torch.testing.assert_close(first[1, 1], word(" left"))
    torch.testing.assert_close(first[0, 2:], first[1, 2:])  # same level and front
    torch.testing.assert_close(stated[0, -4:], stated[1, -4:])  # no second site: "none"
    absent = model.prefix(visual, torch.tensor([[0, 1], [0, 1]]), None, found.sites)
    torch.testing.assert_close(absent[0, -8:], absent[1, -8:])
    assert not torch.allclose(absent[0, -7], word(" right"))
    merged = study_sites([[right, twin]], 2, torch.device("cpu"))
    assert merged[0, :, 0].tolist() == pytest.approx([10.2, 6.0])
    ids = torch.tensor([[1, 5, 6, 2], [1, 5, 6, 2]])
    model.train()
    model([[right], [left]], ids, torch.ones_like(ids), torch.tensor([[1, 0], [1, 0]])).backward()
    assert model.site_tokens is not None
    assert model.site_tokens.level.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="finding_sites_label"):
        build_tiny(tokenizer, **{**TINY, "labels": LABELS, "finding_sites": 2})


def test_site_size_bins_give_a_measured_diameter_a_learned_bin(tokenizer: Any) -> None:
    """``finding_site_size_bins``: a site's diameter token is its whole-mm word plus a learned
    embedding of its bin, so 6.2 mm (" 6") and 6.7 mm (" 7", a word reports that round to even
    sizes never write) share what the LM learns for (6, 7] mm, 5.8 mm does not; training
    reaches the bins; without the option the token is the word alone (test above)."""
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": ["Lung nodule", "Cardiomegaly"],
                                     "head_heads": 2, "finding_sites": 1,
                                     "finding_site_size_bins": True}).eval()
    studies = []
    for seed, size in enumerate((6.2, 6.7, 5.8)):
        view = encoded(6, seed=seed)
        view.sites = torch.tensor([[size, 0.5, -0.5, 0.0]])
        studies.append([view])
    visual, found = model.read(studies)
    assert found is not None and found.sites is not None
    stated = model.prefix(visual, torch.tensor([[1, 0]] * 3), None, found.sites)
    size_token = stated[:, -4]
    embed = model.language_model.get_input_embeddings().weight

    def word(text: str) -> torch.Tensor:
        return embed[tokenizer.encode(text, add_special_tokens=False)].mean(dim=0)

    bins = [size_token[0] - word(" 6"), size_token[1] - word(" 7"), size_token[2] - word(" 6")]
    torch.testing.assert_close(bins[0], bins[1])
    assert not torch.allclose(bins[0], bins[2])
    assert model.site_tokens is not None and model.site_tokens.size is not None
    ids = torch.tensor([[1, 5, 6, 2]] * 3)
    model.train()
    model(studies, ids, torch.ones_like(ids), torch.tensor([[1, 0]] * 3)).backward()
    grad = model.site_tokens.size.weight.grad
    assert grad is not None and grad[3].abs().sum() > 0  # (6, 7] mm
    assert grad[0].abs().sum() == 0  # no site of 4 mm or less


def test_site_level_bins_split_a_lobe_boundary_ten_bins_blur(tokenizer: Any) -> None:
    """``finding_site_level_bins``: with 20 bins a site at level 0.42 and one at 0.48 (either
    side of the phantoms' left fissure at 0.45) get different level tokens, which 10 bins give
    the same; 0.51 and 0.54 share one either way. A count below 2 is a config error."""
    def level_tokens(bins: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_tiny(tokenizer, **{**TINY, "labels": ["Lung nodule", "Cardiomegaly"],
                                         "head_heads": 2, "finding_sites": 1,
                                         "finding_site_level_bins": bins}).eval()
        assert model.site_tokens is not None
        assert model.site_tokens.level.num_embeddings == bins
        studies = []
        for seed, level in enumerate((0.42, 0.48, 0.51, 0.54)):
            view = encoded(6, seed=seed)
            view.sites = torch.tensor([[8.0, level, 0.5, 0.0]])
            studies.append([view])
        visual, found = model.read(studies)
        assert found is not None and found.sites is not None
        with torch.no_grad():
            return model.prefix(visual, torch.tensor([[1, 0]] * 4), None, found.sites)[:, -2]

    ten, twenty = level_tokens(10), level_tokens(20)
    torch.testing.assert_close(ten[0], ten[1])
    assert not torch.allclose(twenty[0], twenty[1])
    torch.testing.assert_close(twenty[2], twenty[3])
    torch.testing.assert_close(ten[2], ten[3])
    with pytest.raises(ValueError, match="finding_site_level_bins"):
        build_tiny(tokenizer, **{**TINY, "labels": ["Lung nodule"], "head_heads": 2,
                                 "finding_sites": 1, "finding_site_level_bins": 1})


def test_site_bias_reaches_every_text_token(tokenizer: Any) -> None:
    """``finding_site_bias``: the stated sites' map is added to every text token the LM embeds,
    in training and at each generated step (not to the prefix), nothing while the label is
    stated absent, and it is gone after the call; a fresh model adds zero."""
    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": ["Lung nodule", "Cardiomegaly"],
                                     "head_heads": 2, "finding_sites": 2,
                                     "finding_site_bias": True}).eval()
    right = encoded(6)
    right.sites = torch.tensor([[10.0, 0.8, -0.6, -0.4]])
    ids = torch.tensor([[1, 5, 6, 2]])
    stated, absent = torch.tensor([[1, 0]]), torch.tensor([[0, 0]])

    def loss(view: EncodedView, states: torch.Tensor) -> float:
        with torch.no_grad():
            return float(model([[view]], ids, torch.ones_like(ids), states))

    before = loss(right, stated), loss(right, absent)  # a fresh map adds zero
    assert model.site_bias is not None
    torch.nn.init.normal_(model.site_bias.weight)
    assert loss(right, stated) != before[0] and loss(right, absent) == before[1]
    sides = torch.tensor([[[10.0, 0.8, -0.6, -0.4], [0.0, 0.0, 0.0, 0.0]],
                          [[10.0, 0.8, 0.6, -0.4], [0.0, 0.0, 0.0, 0.0]]])  # right, left
    on = model.text_bias(torch.tensor([[1, 0], [1, 0]]), sides)
    off = model.text_bias(torch.tensor([[0, 0], [0, 0]]), sides)
    assert on is not None and off is not None
    assert not torch.equal(on[0], on[1]) and torch.equal(off[0], off[1])
    seen: list[tuple[tuple[int, ...], bool]] = []
    model.language_model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append((tuple(args[0].shape),
                                               model._text_bias is not None)))
    model.generate_ids([[right]], 5, stated)
    assert seen == [((1, 1), True)] * 5 and model._text_bias is None  # BOS, then 4 steps


def test_finding_sentences_weigh_more_in_the_report_loss(tokenizer: Any) -> None:
    """``[finetune] finding_weight``: the tokens of a sentence that states a finding (where its
    place and size are said) get the weight, "No ..." sentences, BOS and EOS 1; weights of 1
    give the plain loss, and weighting the finding sentence moves the loss."""
    from models.labeler import RuleLabeler
    from models.report import encode_targets, finding_weights, format_report

    text = format_report("No pleural effusion. A 14 mm solid nodule in the left upper lobe.",
                         "Lung nodule.")
    weights = finding_weights(tokenizer, [text, "No emphysema."], RuleLabeler(), 5.0)
    ids, mask = encode_targets(tokenizer, [text, "No emphysema."])
    assert weights.shape == ids.shape
    pieces = tokenizer.convert_ids_to_tokens(ids[0])
    heavy = "".join(p for p, w in zip(pieces, weights[0].tolist()) if w == 5.0)
    assert heavy.replace("\u0120", " ").strip() == (
        "A 14 mm solid nodule in the left upper lobe.Impression: Lung nodule.")  # not "\n"
    assert weights[1].eq(1.0).all() and weights[0, 0] == 1.0
    # limited to the nodule: its sentences weigh more whether they state or negate it, so the
    # weight does not tip the text towards stating it; other findings weigh 1
    negated = format_report("No lung nodules. Cardiomegaly is present.", "Cardiomegaly.")
    only = finding_weights(tokenizer, [text, negated], RuleLabeler(), 5.0, ["Lung nodule"])
    ids2, _ = encode_targets(tokenizer, [text, negated])
    for row in range(2):
        pieces = tokenizer.convert_ids_to_tokens(ids2[row])
        heavy = "".join(p for p, w in zip(pieces, only[row].tolist()) if w == 5.0)
        assert heavy.replace("\u0120", " ").strip() == [
            "A 14 mm solid nodule in the left upper lobe.Impression: Lung nodule.",
            "Findings: No lung nodules."][row]
    model = build_tiny(tokenizer, **TINY).eval()
    views = [[encoded(4, seed=1)], [encoded(5, seed=2)]]
    with torch.no_grad():
        plain = model(views, ids, mask)
        ones = model(views, ids, mask, None, torch.ones_like(weights))
        weighted = model(views, ids, mask, None, weights)
    torch.testing.assert_close(ones, plain)
    assert not torch.isclose(weighted, plain)


def test_length_groups_give_the_same_loss_and_gradients(tokenizer: Any) -> None:
    """``[finetune] length_groups``: the reports sorted by length and run in groups, each
    padded to its own longest, give the whole batch's loss and gradients (weighted or not),
    with the label tokens, site bias and frozen reads as in the demo."""
    from models.report import encode_targets, finding_weights, format_report
    from models.labeler import RuleLabeler

    torch.manual_seed(0)
    model = build_tiny(tokenizer, **{**TINY, "labels": ["Lung nodule", "Cardiomegaly"],
                                     "head_heads": 2, "finding_sites": 1,
                                     "finding_site_bias": True}).eval()
    assert model.site_bias is not None
    torch.nn.init.normal_(model.site_bias.weight)
    texts = [format_report("No pleural effusion.", "Normal."),
             format_report("Cardiomegaly. Small left pleural effusion. No nodule.",
                           "Cardiomegaly. Left pleural effusion."),
             format_report("A 6 mm nodule in the right upper lobe.", "Right upper lobe nodule."),
             format_report("Lungs are clear.", "No acute abnormality.")]
    ids, mask = encode_targets(tokenizer, texts)
    assert len(set(mask.sum(1).tolist())) == 4  # four lengths: padding to trim
    views = []
    for i in range(4):
        view = encoded(4 + i, seed=i)
        view.sites = torch.tensor([[8.0 + i, 0.5, -0.3, 0.2]])
        views.append([view])
    states = torch.tensor([[0, 0], [0, 1], [1, 0], [0, 0]])
    weights = finding_weights(tokenizer, texts, RuleLabeler(), 3.0)
    frozen = [model.frozen_read(v) for v in views]
    for w in (None, weights):
        grads = []
        for groups in (1, 3):
            model.zero_grad()
            loss = model(views, ids, mask, states, w, frozen, length_groups=groups)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                          if p.grad is not None]))
        torch.testing.assert_close(grads[1][0], grads[0][0])
        assert len(grads[0][1]) == len(grads[1][1]) > 0
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_report_only_ablation_has_no_label_tokens(tokenizer: Any) -> None:
    model = build_tiny(tokenizer, **{**TINY, "labels": LABELS, "head_heads": 2,
                                     "condition_on_findings": False})
    visual, _ = model.read([[encoded(5)]])
    assert model.label_tokens is None and model.prefix(visual, None).shape == visual.shape


def test_pyramid_encoder_keeps_a_small_spot() -> None:
    """A 6 mm (2-pixel) soft-tissue spot in a lung-density slice moves the lower features of
    its cell, and which half of the image it is in shows."""
    from models.cnn import PyramidSliceEncoder

    enc = PyramidSliceEncoder(16, grid=3)
    lung = np.full((2, 96, 96), -860.0, dtype=np.float32)
    spot = lung.copy()
    spot[1, 40:42, 10:12] = 35.0  # left of the image
    a, b = enc.lower(torch.as_tensor(lung)), enc.lower(torch.as_tensor(spot))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    mirrored = enc.lower(torch.as_tensor(spot[:, :, ::-1].copy()))
    assert not torch.equal(mirrored[1], b[1])


def test_detail_encoder_separates_calcium_and_keeps_spots() -> None:
    """The demo's ``detail`` lower part: calcified plaque (800 HU) and cortical bone (700 HU)
    fall in different bins; a 6 mm soft-tissue spot in lung moves the spot responses of its
    material and cell (not only the HU shares); a 512 matrix is read on the same 128 grid."""
    from models.cnn import PyramidSliceEncoder

    enc = PyramidSliceEncoder(16, grid=3, detail=True, matrix=128)
    hu_dims = len(enc.scales) * 9 * enc.bins
    lung = np.full((1, 128, 128), -860.0, dtype=np.float32)
    bone, plaque, spot = lung.copy(), lung.copy(), lung.copy()
    bone[0, 60:63, 60:63] = 700.0
    plaque[0, 60:63, 60:63] = 800.0
    spot[0, 60:62, 60:62] = 35.0
    f = {name: enc.lower(torch.as_tensor(v))[0]
         for name, v in (("lung", lung), ("bone", bone), ("plaque", plaque), ("spot", spot))}
    assert all(v.shape == (enc.in_dim,) for v in f.values())
    changed = (f["bone"][:hu_dims] != f["lung"][:hu_dims]) ^ (
        f["plaque"][:hu_dims] != f["lung"][:hu_dims])
    assert changed.any()  # some HU bin moves for one of them and not the other
    blob_lung, blob_spot = f["lung"][hu_dims:], f["spot"][hu_dims:]
    assert blob_lung[blob_lung > 0].numel() < blob_spot[blob_spot > 0].numel()
    # the same slice on a 512 matrix (each pixel 4 x 4) gives nearly the same features
    big = np.kron(spot, np.ones((1, 4, 4), dtype=np.float32))
    assert torch.allclose(enc.lower(torch.as_tensor(big))[0], f["spot"], atol=0.02)


def test_lesion_cues_tell_a_nodule_from_a_vessel_and_find_a_filling_defect() -> None:
    """``lesions``: an 8 mm soft-tissue spot surrounded by lung gives an isolated-spot response
    in its cell, the same spot touching the mediastinum or a long vessel does not give as
    much; a soft-tissue plug in an enhanced artery raises the gap share of its cell, an artery
    without one does not; MR slices give zeros of the same width."""
    from models.cnn import GAP_DISTANCES, ISOLATED_SPOTS, PyramidSliceEncoder

    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True)
    n_spot, n_gap = len(ISOLATED_SPOTS) * 9, len(GAP_DISTANCES) * 9
    lung = np.full((1, 128, 128), -860.0, dtype=np.float32)
    nodule, vessel = lung.copy(), lung.copy()
    yy, xx = np.mgrid[:128, :128]
    nodule[0][(yy - 64) ** 2 + (xx - 64) ** 2 <= 2 ** 2] = 35.0  # 5 px ~ 13 mm across
    vessel[0, 62:67, 20:110] = 35.0  # a vessel in plane, as wide
    artery = np.full((1, 128, 128), 45.0, dtype=np.float32)
    artery[0, 60:66, 20:110] = 330.0
    plugged = artery.copy()
    plugged[0, 60:66, 62:65] = 40.0  # 3 px ~ 8 mm along the artery
    cues = {name: enc.lower(torch.as_tensor(v))[0, -(n_spot + n_gap):]
            for name, v in (("lung", lung), ("nodule", nodule), ("vessel", vessel),
                            ("artery", artery), ("plugged", plugged))}
    centre = 4  # the middle cell of the 3 x 3 layout
    assert cues["nodule"][centre] > 0.1 and cues["lung"][:n_spot].max() < 1e-3
    assert cues["vessel"][centre] < cues["nodule"][centre] / 2
    gaps = [n_spot + 9 * k + centre for k in range(len(GAP_DISTANCES))]
    assert (cues["plugged"][gaps] > 0).all() and not cues["artery"][n_spot:].any()
    mr = enc.lower(torch.as_tensor(plugged), "MR")[0]
    assert mr.shape == (enc.in_dim,) and not mr[-(n_spot + n_gap):].any()
    # the cues bypass the MLP: the embedding's last values are the cues themselves
    emb = enc(enc.lower(torch.as_tensor(np.concatenate([artery, plugged]))))
    assert emb.shape == (2, 64) and enc.cue_dim == n_spot + n_gap
    at = 64 - enc.cue_dim + gaps[0]
    assert emb[0, at] == 0 and emb[1, at] > 0
    with pytest.raises(ValueError, match="pyramid_lesions"):
        PyramidSliceEncoder(16, lesions=True)
    with pytest.raises(ValueError, match="vision_hidden"):
        PyramidSliceEncoder(16, detail=True, lesions=True)


def _lung_volume() -> tuple[np.ndarray, np.ndarray]:
    """40 slices of aerated lung, 2.5 mm apart, 2.5 mm pixels (128 matrix): an 8 mm nodule
    in the middle cell, and a vessel as thick running along z through every slice in the left
    middle cell (on any one slice the two look alike)."""
    vol = np.full((40, 128, 128), -860.0, dtype=np.float32)
    z, y, x = np.mgrid[:40, :128, :128] * 2.5
    vol[(z - 50) ** 2 + (y - 160) ** 2 + (x - 160) ** 2 <= 4.0 ** 2] = 35.0
    vol[(y - 160) ** 2 + (x - 75) ** 2 <= 4.0 ** 2] = 35.0
    return vol, np.arange(40) * 2.5


def _chest_volume() -> tuple[np.ndarray, np.ndarray]:
    """48 slices 2.5 mm apart, 2.5 mm pixels: a body of soft tissue in air with two lungs from
    slice 4 to 43; a 10 mm nodule high, anterior, in the right lung (the image's left half), and
    a vessel along z in the left lung."""
    vol = np.full((48, 128, 128), -1000.0, dtype=np.float32)
    z, y, x = np.mgrid[:48, :128, :128] * 2.5
    vol[((x - 160) / 140) ** 2 + ((y - 160) / 100) ** 2 <= 1] = 40.0
    lungs = (z >= 10) & (z <= 107.5) & (
        (((x - 100) / 45) ** 2 + ((y - 160) / 70) ** 2 <= 1)
        | (((x - 220) / 45) ** 2 + ((y - 160) / 70) ** 2 <= 1))
    vol[lungs] = -860.0
    vol[(z - 85) ** 2 + (y - 130) ** 2 + (x - 100) ** 2 <= 5.0 ** 2] = 35.0
    vol[lungs & ((y - 170) ** 2 + (x - 220) ** 2 <= 4.0 ** 2)] = 35.0
    return vol, np.arange(48) * 2.5


def test_nodule_sites_place_the_nodule_against_the_lungs() -> None:
    """``nodule_sites``: one site (the vessel is long), about 10 mm (9 once opened), at 0.77
    of the way from the lung base to the apex, in the right lung (-0.57 from the lungs' middle
    column) and in front (-0.43): the air around the body is not lung. Streamed slices give
    the same sites; a coronal view has none (its columns need not run right to left)."""
    from models.cnn import PyramidSliceEncoder, nodule_sites, slice_codes
    from models.view import View

    vol, z = _chest_volume()
    [site] = nodule_sites(slice_codes(vol), z, (2.5, 2.5, 2.5))
    assert 8.0 < site[0] < 11.0  # the opening trims a voxel off its rim
    np.testing.assert_allclose(site[1:], [75 / 97.5, -0.57, -0.43], atol=0.05)
    assert nodule_sites(slice_codes(vol[:, :, ::-1].copy()), z, (2.5, 2.5, 2.5))[0, 2] > 0.5
    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True)
    _, sites = enc.lower_view(vol, "CT", z, (2.5, 2.5), plane="axial")
    np.testing.assert_allclose(sites.numpy(), [site])
    assert len(enc.lower_view(vol, "CT", z, (2.5, 2.5), plane="coronal")[1]) == 0
    tokenizer = train_tokenizer(REPORTS * 5, vocab_size=300)
    model = build_tiny(tokenizer, encoder="pyramid", pyramid_detail=True, pyramid_lesions=True,
                       pyramid_nodules=True, image_size=128, vision_hidden=64, z_hidden=32,
                       labels=["Lung nodule"], finding_sites=2)
    generator = ReportGenerator(model, tokenizer, {}, "test")
    records = [r for i in range(0, 48, 7) for r in generator.stream_records(vol[i:i + 7], "CT")]
    streamed = generator.streamed_view(records, z, (2.5, 2.5), (128, 128), plane="axial")[1]
    whole = generator.encode_slices(View(vol, z, (2.5, 2.5), "CT", "axial")).sites
    assert whole is not None and streamed is not None
    torch.testing.assert_close(streamed, whole)


def test_holes_filled_per_slice_as_scipy_fills_them() -> None:
    """``fill_holes_per_slice`` (the lung field of the nodule codes, the lungs of the sites)
    equals ``scipy.ndimage.binary_fill_holes`` with in-plane connectivity on the chest phantom's
    lungs and air, on random masks (holes touching the edge stay open, a hole's diagonal leak
    does not open it) and on empty and full masks; a hole is never filled through the slice
    above or below."""
    from scipy import ndimage

    from models.cnn import fill_holes_per_slice

    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    vol, _ = _chest_volume()
    rng = np.random.default_rng(0)
    masks = [vol < -500, vol >= -500, rng.random((6, 40, 50)) < 0.55,
             rng.random((3, 17, 9)) < 0.7, np.zeros((2, 8, 8), bool), np.ones((2, 8, 8), bool)]
    for mask in masks:
        np.testing.assert_array_equal(fill_holes_per_slice(mask),
                                      ndimage.binary_fill_holes(mask, plane))
    ring = np.zeros((3, 9, 9), dtype=bool)
    ring[1, 2:7, 2:7] = True
    ring[1, 3:6, 3:6] = False  # a hole in the middle slice only
    filled = fill_holes_per_slice(ring)
    assert filled[1, 4, 4] and not filled[0].any() and not filled[2].any()


def _chest_with_nodules_and_vessel_dots() -> tuple[np.ndarray, np.ndarray]:
    """:func:`_chest_volume` with a 10 mm nodule against the right lung's lateral edge, a 5 mm
    one (2 x 2 x 2 voxels) and a vessel in six dots along one slice, one voxel apart."""
    vol, z = _chest_volume()
    zz, y, x = np.mgrid[:48, :128, :128] * 2.5
    vol[(zz - 60) ** 2 + (y - 160) ** 2 + (x - 59) ** 2 <= 5.0 ** 2] = 35.0  # at the edge
    vol[20:22, 70:72, 36:38] = 35.0  # small
    for k in range(6):  # a vessel in dots along one slice
        vol[30, 75:77, 30 + 3 * k:32 + 3 * k] = 35.0
    return vol, z


def test_detector_2_keeps_a_nodule_at_the_lung_edge_and_a_small_one_and_drops_vessel_dots(
) -> None:
    """``nodule_detector = 2``: a 10 mm nodule against the right lung's lateral edge, a 5 mm
    nodule (2 x 2 x 2 voxels, which the opening erases) and the 10 mm nodule high in the lung
    are found, the latter at its full size; six dots of a vessel sampled at 2.5 mm (each as
    compact as the small nodule, one voxel apart) are not. Detector 1 finds only the nodule
    high in the lung: the one at the edge joins the chest wall. An unknown detector is refused
    naming the key."""
    from models.cnn import PyramidSliceEncoder, _nodule_components, slice_codes

    vol, z = _chest_with_nodules_and_vessel_dots()

    def found(detector: int) -> list[tuple[int, int, int, float]]:
        return sorted(((b[0].start + b[0].stop) // 2, (b[1].start + b[1].stop) // 2,
                       (b[2].start + b[2].stop) // 2, (6 * v / np.pi) ** (1 / 3))
                      for b, v, _ in _nodule_components(slice_codes(vol, detector), (2.5, 2.5, 2.5),
                                                     detector=detector))

    [(zc, row, col, d)] = found(1)
    assert (zc, row, col) == (34, 52, 40) and d < 9.0  # trimmed by the opening
    small, edge, high = found(2)
    assert small[:3] == (21, 71, 37) and 5.0 < small[3] < 7.0
    assert edge[:3] == (24, 64, 25) and 7.0 < edge[3] < 11.0
    assert high[:3] == (34, 52, 40) and 9.5 < high[3] < 11.0
    with pytest.raises(ValueError, match="pyramid_nodule_detector"):
        PyramidSliceEncoder(64, detail=True, lesions=True, nodules=True, nodule_detector=5)
    with pytest.raises(ValueError, match="pyramid_enhanced_nodules"):  # it would repeat the cue
        PyramidSliceEncoder(64, detail=True, lesions=True, nodules=True, nodule_detector=2,
                            enhanced_nodules=True)


def _scored_chest(detector: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, list, list]:
    """The chest of the detector-2 test scored by ``detector`` (3 or 4): its volume, z, codes,
    every component, the six vessel dots' probabilities and the three nodules' (highest first);
    the nodules above every dot and the dots below the detector's site cut."""
    from models.cnn import _nodule_components, site_min_p, slice_codes

    vol, z = _chest_with_nodules_and_vessel_dots()
    codes = slice_codes(vol, detector)
    found = list(_nodule_components(codes, (2.5, 2.5, 2.5), detector=detector))
    dots = [p for b, _, p in found if b[0] == slice(30, 31)]
    nodules = sorted((p for b, _, p in found if b[0] != slice(30, 31)), reverse=True)
    assert len(dots) == 6 and len(nodules) == 3
    assert min(nodules) > max(dots) and max(dots) < site_min_p(detector) <= min(nodules)
    return vol, z, codes, found, dots, nodules


def test_detector_3_ranks_nodules_above_vessel_dots_and_sites_only_likely_ones() -> None:
    """``nodule_detector = 3`` on the chest of the detector-2 test: the classifier fitted on
    phantoms (``NODULE_SCORER``) gives the three nodules (high, small, at the lung's edge) a
    higher probability than each of the six vessel dots, which stay below
    ``NODULE_SITE_MIN_P``; the cue of the small nodule's cell is its probability on the slices
    it cuts; the sites are the two most probable nodules (the high one first, at its size),
    never a dot; and the view's embedding carries the cue once the encoder uses detector 3."""
    from models.cnn import (NODULE_SITE_MIN_P, PyramidSliceEncoder, nodule_cues, nodule_sites,
                            site_min_p)
    from models.msvlm import MSVLMConfig
    from models.train import supervision

    vol, z, codes, found, dots, nodules = _scored_chest(3)
    assert site_min_p(3) == NODULE_SITE_MIN_P  # the helper's cut is detector 3's
    cue = nodule_cues(codes, (2.5, 2.5, 2.5), 3, detector=3)
    [small] = [p for b, _, p in found if b[0] == slice(20, 22)]
    np.testing.assert_allclose(cue[20:22, 3], small, rtol=1e-6)  # the left middle cell
    assert cue[30, 3] == pytest.approx(max(dots)) and cue[:20, 3].max() == 0
    sites = nodule_sites(codes, z, (2.5, 2.5, 2.5), detector=3)
    assert len(sites) == 2 and 9.5 < sites[0, 0] < 11.0 and 5.0 < sites[1, 0] < 7.0
    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True,
                              nodule_detector=3)
    feats, view_sites = enc.lower_view(vol, "CT", z, (2.5, 2.5), plane="axial")
    np.testing.assert_allclose(view_sites.numpy(), sites)
    np.testing.assert_allclose(feats[:, -9:].numpy(), cue)
    # the model card says where the classifier learned from (phantom nodule positions)
    card = supervision(MSVLMConfig(encoder="pyramid", pyramid_nodules=True,
                                   pyramid_nodule_detector=3))
    assert "nodule positions" in card and "nodule positions" not in supervision(MSVLMConfig())


def test_detector_4_scores_with_the_mlp_the_checkpoint_keeps() -> None:
    """``nodule_detector = 4`` on the same chest: detector 3's candidates, scored by the shipped
    MLP (``NODULE_MLP_FILE``), again put the three nodules above every vessel dot and the dots
    below its site cut; the encoder keeps the scorer as buffers, so a checkpoint carries it:
    changed weights in the encoder change its cue, sites and card, not the file's."""
    from models.cnn import NODULE_MLP_KEYS, PyramidSliceEncoder, _nodule_components, nodule_mlp
    from models.msvlm import MSVLMConfig
    from models.train import supervision

    vol, z, codes, _, _, nodules = _scored_chest(4)
    linear = sorted(p for b, _, p in _nodule_components(codes, (2.5, 2.5, 2.5), detector=3)
                    if b[0] != slice(30, 31))
    assert linear != pytest.approx(sorted(nodules))  # not detector 3 under another name
    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True,
                              nodule_detector=4)
    state = enc.state_dict()
    assert all(f"nodule_mlp_{k}" in state for k in NODULE_MLP_KEYS)
    feats, sites = enc.lower_view(vol, "CT", z, (2.5, 2.5), plane="axial")
    assert len(sites) == 2 and 9.5 < sites[0, 0] < 11.0
    assert feats[:, -9:].max().item() == pytest.approx(nodules[0], rel=1e-5)
    with torch.no_grad():  # a checkpoint trained with another scorer
        enc.nodule_mlp_b2.fill_(-50.0)
    feats, sites = enc.lower_view(vol, "CT", z, (2.5, 2.5), plane="axial")
    assert len(sites) == 0 and feats[:, -9:].max().item() < 1e-6
    assert nodule_mlp()["b2"].item() > -50.0  # the shipped file untouched
    card = supervision(MSVLMConfig(encoder="pyramid", pyramid_nodules=True,
                                   pyramid_nodule_detector=4))
    assert "nodule positions of 500 phantoms" in card


def test_cue_scale_per_type_lets_the_maximum_over_cells_compare_sizes() -> None:
    """Training slices where components show up in the central cell only: scaled per cell, a
    0.6 cm component in a corner cell (spread at the floor) outranks a 1.8 cm nodule in the
    central cell after standardisation; with one scale per cue type the larger one is
    larger. An unknown scale is refused naming the key."""
    from models.cnn import PyramidSliceEncoder

    def standardised(scale: str) -> tuple[float, float]:
        enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True,
                                  nodules=True, cue_scale=scale)
        train = torch.rand(400, enc.in_dim)
        train[:, -9:] = 0.0
        train[::4, -5] = torch.linspace(0.4, 1.8, 100)  # central cell, a quarter of slices
        enc.fit_standardisation(train)
        probe = torch.zeros(2, enc.in_dim)
        probe[0, -9], probe[1, -5] = 0.6, 1.8  # corner 6 mm, centre 18 mm
        cues = enc(probe)[:, -9:]
        return float(cues[0, 0]), float(cues[1, 4])

    corner, centre = standardised("cell")
    assert corner > centre
    corner, centre = standardised("type")
    assert centre > corner > 0
    corner, centre = standardised("nodules")  # the nodule cue's cells are the last nine
    assert centre > corner > 0
    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True,
                              cue_scale="nodules")
    train = torch.rand(400, enc.in_dim)
    enc.fit_standardisation(train)
    spots = slice(-enc.cue_dim, -9)  # the other lesion cues keep a scale per cell
    torch.testing.assert_close(enc.feature_std[spots], train.sqrt().std(0)[spots])
    with pytest.raises(ValueError, match="pyramid_cue_scale"):
        PyramidSliceEncoder(64, detail=True, lesions=True, nodules=True, cue_scale="slice")


def test_nodule_cue_follows_a_spot_through_slices() -> None:
    """``nodules``: the nodule's cell carries its size (about 0.8 cm) on the slices that cut
    it and nowhere else; the vessel, round on every slice, gives nothing; MR gives zeros; and
    the cue reaches the embedding's last values."""
    from models.cnn import PyramidSliceEncoder

    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True)
    vol, z = _lung_volume()
    feats = enc.lower_view(vol, "CT", z, (2.5, 2.5))
    cue = feats[:, -9:]  # the last grid*grid lower features
    on = cue[:, 4] > 0
    assert 0.6 < float(cue[:, 4].max()) < 1.0
    assert on[19:22].all() and not on[:17].any() and not on[24:].any()
    assert not cue[:, [0, 1, 2, 3, 5, 6, 7, 8]].any()
    # alone, a slice knows nothing of its neighbours: lower() leaves the cue at zero
    assert not enc.lower(torch.as_tensor(vol[20:21]))[0, -9:].any()
    assert not enc.lower_view(vol, "MR", z, (2.5, 2.5))[:, -9:].any()
    emb = enc(feats)
    assert enc.cue_dim == 45 and emb[20, -5] > emb[0, -5]
    with pytest.raises(ValueError, match="pyramid_nodules"):
        PyramidSliceEncoder(64, detail=True, nodules=True)


def test_enhanced_views_keep_a_small_nodule_the_opening_erases() -> None:
    """``enhanced_nodules``: a 5 mm nodule (2 x 2 pixels on one slice) is gone after the
    opening, so the first nodule cue misses it; the second finds it, in an enhanced view only
    (without contrast a vessel fragment looks the same), and a vessel stays long either way."""
    from models.cnn import PyramidSliceEncoder

    enc = PyramidSliceEncoder(64, grid=3, detail=True, matrix=128, lesions=True, nodules=True,
                              enhanced_nodules=True)
    vol, z = _lung_volume()
    zz, y, x = np.mgrid[:40, :128, :128] * 2.5
    small = (zz - 50) ** 2 + (y - 161.25) ** 2 + (x - 241.25) ** 2 <= 3.0 ** 2  # right middle
    assert small.sum() == 4
    vol[small] = 35.0
    arterial = enc.lower_view(vol, "CT", z, (2.5, 2.5), phase="arterial")
    plain, enhanced = arterial[:, -18:-9], arterial[:, -9:]
    assert float(plain[:, 4].max()) > 0.6  # the 8 mm nodule, in both cues
    assert float(enhanced[:, 4].max()) >= float(plain[:, 4].max())  # nothing opened away
    assert not plain[:, 5].any()  # the small one: erased by the opening
    assert 0.4 < float(enhanced[20, 5]) < 0.6 and int((enhanced[:, 5] > 0).sum()) == 1
    assert not plain[:, 3].any() and not enhanced[:, 3].any()  # the vessel
    for phase in ("non_contrast", "unknown"):
        other = enc.lower_view(vol, "CT", z, (2.5, 2.5), phase=phase)
        assert torch.equal(other[:, :-9], arterial[:, :-9]) and not other[:, -9:].any()
    assert enc.cue_dim == 54 and enc.view_cue_dim == 18
    with pytest.raises(ValueError, match="pyramid_enhanced_nodules"):
        PyramidSliceEncoder(64, detail=True, lesions=True, enhanced_nodules=True)


@pytest.mark.parametrize("enhanced", [False, True])
def test_streamed_slices_get_the_whole_view_nodule_cue(tokenizer: Any, enhanced: bool) -> None:
    """Slices encoded one by one as they arrive (the stream keeps each slice's embedding and
    its codes) give, once the view is whole, the embeddings the whole view gives."""
    from models.view import View

    model = build_tiny(tokenizer, encoder="pyramid", pyramid_detail=True, pyramid_lesions=True,
                       pyramid_nodules=True, pyramid_enhanced_nodules=enhanced, image_size=128,
                       vision_hidden=64, z_hidden=32, labels=LABELS)
    generator = ReportGenerator(model, tokenizer, {}, "test")
    vol, z = _lung_volume()
    records = [r for i in range(0, 40, 7) for r in generator.stream_records(vol[i:i + 7], "CT")]
    nodule = -14 if enhanced else -5  # the nodule's cell in the (first) nodule cue
    for phase in ("arterial", "non_contrast"):  # the enhanced cue needs the view's phase
        whole = generator.encode_slices(View(vol, z, (2.5, 2.5), "CT", phase=phase)).embeddings
        streamed, sites = generator.streamed_view(records, z, (2.5, 2.5), (128, 128), phase)
        assert sites is None  # the model reads no sites
        torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=1e-4)
        assert whole[20, nodule] != whole[0, nodule]  # the nodule's cell, cut by slice 20 only
        if enhanced:
            assert (whole[20, -5] != whole[0, -5]) == (phase == "arterial")


def test_the_head_reads_lesion_cues_as_their_maximum_over_slices() -> None:
    """A cue on one slice moves its label's logit through the cue path (zero at start, so a
    fresh head is the plain attention head); padding never counts."""
    from models.findings import FindingHead

    torch.manual_seed(0)
    head = FindingHead(2, 8, heads=2, cue_dim=3)
    tokens, valid = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    cues = torch.zeros(2, 5, 3)
    base = head(tokens, valid, cues).logits
    assert torch.equal(base, head(tokens, valid).logits)
    with torch.no_grad():
        head.cue.weight[0, 1] = 2.0  # label 0 reads cue 1
    cues[0, 2, 1] = 1.5  # one slice of study 0
    cues[1, 4, 1] = 9.0  # study 1's padding
    found = head(tokens, valid, cues)
    out = found.logits
    assert torch.isclose(out[0, 0] - base[0, 0], torch.tensor(3.0))
    assert torch.equal(out[0, 1], base[0, 1]) and torch.equal(out[1], base[1])
    # key slices: label 0 of study 0 now points at the slice that showed the cue; label 1
    # (no cue weight) keeps its attention; padding gets no weight
    assert int(found.key_weights[0, 0].argmax()) == 2
    assert torch.allclose(found.key_weights[0, 1], found.attention[0, 1])
    assert float(found.key_weights[1, :, 4].abs().sum()) == 0.0
    torch.testing.assert_close(found.key_weights.sum(-1), torch.ones(2, 2))


def test_a_label_the_cue_path_reads_better_is_read_from_it(tokenizer: Any) -> None:
    """``[findings] cue_choice``: on validation a label whose cue path separates better than
    the whole head (by more than the margin) is read from the cue path alone: its logit is the
    cue path's and its key slices are the slices whose cues made it."""
    from models.findings import choose_sources
    from models.view import View

    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    head = torch.tensor([[0.4, 0.9], [0.6, 0.1], [0.5, 0.8], [0.5, 0.3]])
    cues = torch.tensor([[0.9, 0.6], [0.1, 0.5], [0.8, 0.7], [0.2, 0.5]])
    assert choose_sources(head, cues, targets) == ["cues", "head"]
    assert choose_sources(head, cues, torch.zeros(4, 2)) == ["head", "head"]
    torch.manual_seed(0)
    model = build_tiny(tokenizer, encoder="pyramid", pyramid_detail=True, pyramid_lesions=True,
                       image_size=128, vision_hidden=64, z_hidden=32, labels=LABELS,
                       finding_sources=["cues", "head"]).eval()
    assert model.finding_head is not None and model.finding_head.cue is not None
    torch.nn.init.normal_(model.finding_head.cue.weight)
    vol, z = _lung_volume()
    out = model.findings([[model.encode_slices(View(vol, z, (2.5, 2.5), "CT"))]])
    assert out.cue_logits is not None and out.cue_slices is not None
    assert torch.equal(out.logits[0, 0], out.cue_logits[0, 0])
    assert not torch.equal(out.logits[0, 1], out.cue_logits[0, 1])
    assert torch.equal(out.key_weights[0, 0], out.cue_slices[0, 0])
    with pytest.raises(ValueError, match="finding_sources"):
        build_tiny(tokenizer, labels=LABELS, finding_sources=["cues"])


def test_the_cue_path_is_fitted_to_the_cue_that_carries_a_label() -> None:
    """``[findings] cue_fit``: the cue path starts as the logistic regression of each label on
    the studies' cue maxima, so a label one cue decides is read from that cue (with the right
    sign) before any training step."""
    from models.probe import auroc

    head = FindingHead(2, 16, 2, cue_dim=4)
    peaks = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.stack([(peaks[:, 2] > 0.8).float(), (peaks[:, 0] < 0).float()], dim=1)
    head.fit_cues(peaks, targets, torch.tensor([3.0, 1.0]))
    assert head.cue is not None
    logits = (peaks @ head.cue.weight.T + head.cue.bias).detach()
    for j in range(2):
        assert auroc(logits[:, j].numpy(), targets[:, j].numpy()) > 0.99
    assert int(head.cue.weight[0].abs().argmax()) == 2 and float(head.cue.weight[0, 2]) > 0
    assert int(head.cue.weight[1].abs().argmax()) == 0 and float(head.cue.weight[1, 0]) < 0


def test_a_labels_cue_fit_does_not_depend_on_the_other_labels() -> None:
    """Each label's sparse fit is its own regression: fitted beside 18 unrelated labels it gets
    the weights it gets alone (a mean over the labels once divided its gradient by their number
    against the same L1 step and left a nodule's best cue at zero)."""
    g = torch.Generator().manual_seed(2)
    peaks = torch.randn(300, 6, generator=g)
    label = ((peaks[:, 5] + 0.5 * torch.randn(300, generator=g)) > 0.7).float()[:, None]
    others = (torch.rand(300, 18, generator=g) < 0.3).float()
    alone = FindingHead(1, 16, 2, cue_dim=6)
    alone.fit_cues(peaks, label, torch.tensor([2.0]))
    among = FindingHead(19, 16, 2, cue_dim=6)
    among.fit_cues(peaks, torch.cat([label, others], dim=1), torch.full((19,), 2.0))
    assert alone.cue is not None and among.cue is not None
    torch.testing.assert_close(among.cue.weight[0], alone.cue.weight[0])
    assert float(alone.cue.weight[0, 5]) > 0.5


def test_the_cue_fit_reads_only_the_labels_named() -> None:
    """``[findings] cue_labels``: the labels the cues are meant for are fitted as before; every
    other label's row of the cue path stays zero, so a cue that happens to correlate with it in
    training adds nothing to its logit (fitted for all labels, a label no cue measures kept
    20 weak cues in the detector-2 candidate and fell to validation AUROC 0.43)."""
    g = torch.Generator().manual_seed(3)
    peaks = torch.randn(300, 6, generator=g)
    nodule = (peaks[:, 1] > 0.5).float()
    other = ((0.3 * peaks[:, 4] + torch.randn(300, generator=g)) > 0.5).float()  # weakly tied
    targets = torch.stack([other, nodule], dim=1)
    every, named = FindingHead(2, 16, 2, cue_dim=6), FindingHead(2, 16, 2, cue_dim=6)
    every.fit_cues(peaks, targets, torch.tensor([2.0, 2.0]))
    named.fit_cues(peaks, targets, torch.tensor([2.0, 2.0]), labels=[1])
    assert every.cue is not None and named.cue is not None
    assert float(every.cue.weight[0].abs().sum()) > 0  # the weak tie is fitted when allowed
    assert float(named.cue.weight[0].abs().sum()) == 0 and float(named.cue.bias[0]) == 0
    torch.testing.assert_close(named.cue.weight[1], every.cue.weight[1])
    assert int(named.cue.weight[1].abs().argmax()) == 1


def test_the_cue_fit_chooses_each_labels_l1_on_the_training_studies() -> None:
    """``[findings] cue_l1`` as a list: per label the strength that cross-validates best on the
    training studies. A label one cue decides gets the strong L1 (one cue; the weak one keeps
    every noise cue and ranks new studies worse), a label spread over ten weak cues the weak
    one (the strong one zeroes it: chance); one strength for both loses one of them (the
    detector-3 candidate's single 0.01 kept 16 cues for the embolism, validation AUROC 0.954;
    cross-validated, one cue and 0.984)."""
    from models.probe import auroc

    def studies(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 40, generator=g)
        one = ((x[:, 0] + 0.3 * torch.randn(n, generator=g)) > 1.0).float()
        spread = ((x[:, 10:20].sum(1) / 10 ** 0.5 + 0.3 * torch.randn(n, generator=g))
                  > 0.5).float()
        return x, torch.stack([one, spread], dim=1)

    g = torch.Generator().manual_seed(4)
    (x, y), (new_x, new_y) = studies(150, g), studies(2000, g)
    scores, cues = {}, {}
    for l1 in (0.002, 0.3, [0.002, 0.3]):
        head = FindingHead(2, 16, 2, cue_dim=40)
        chosen = head.fit_cues(x, y, torch.tensor([3.0, 2.0]), l1=l1, steps=600, folds=3)
        assert head.cue is not None
        logits = (new_x @ head.cue.weight.T + head.cue.bias).detach()
        scores[str(l1)] = [auroc(logits[:, j].numpy(), new_y[:, j].numpy()) for j in range(2)]
        cues[str(l1)] = [int((head.cue.weight[j].abs() > 1e-6).sum()) for j in range(2)]
    assert chosen == [0.3, 0.002]
    assert cues["[0.002, 0.3]"][0] == 1 and cues["0.002"][0] > 30
    assert scores["[0.002, 0.3]"][0] > scores["0.002"][0] + 0.02  # the single cue ranks better
    assert scores["0.3"][1] == 0.5 and scores["[0.002, 0.3]"][1] > 0.85  # the spread label kept


def test_the_cue_path_reads_a_cue_types_maximum_over_cells() -> None:
    """With ``cue_cells`` the cue path also reads each cue type's maximum over the grid cells:
    a lesion that may lie in any cell (a nodule in one of nine) is read from that maximum,
    which no single cell's cue gives."""
    from models.probe import auroc

    g = torch.Generator().manual_seed(1)
    peaks = torch.randn(400, 6, generator=g)  # 2 cue types x 3 cells, type-major
    targets = (peaks[:, 3:].amax(1) > 1.0).float()[:, None]  # type 1 high in any cell
    scores = {}
    for cells in (0, 3):
        head = FindingHead(1, 16, 2, cue_dim=6, cue_cells=cells)
        head.fit_cues(peaks, targets, torch.tensor([1.5]))
        assert head.cue is not None and head.cue.in_features == (8 if cells else 6)
        logits = (head.cue_inputs(peaks) @ head.cue.weight.T + head.cue.bias).detach()
        scores[cells] = auroc(logits[:, 0].numpy(), targets[:, 0].numpy())
        if cells:
            assert int(head.cue.weight[0].abs().argmax()) == 7  # type 1's maximum
            slices = torch.randn(2, 5, 6, generator=g)  # per slice, then over slices
            torch.testing.assert_close(head.cue_inputs(slices).amax(1),
                                       head.cue_inputs(slices.amax(1)))
    assert scores[3] > 0.99 and scores[3] > scores[0] + 0.03, scores
    with pytest.raises(ValueError, match="cue_cells"):
        FindingHead(1, 16, 2, cue_dim=6, cue_cells=4)


@pytest.mark.parametrize("detail", [False, True])
def test_findings_stage_learns_large_findings(tmp_path: Path, detail: bool) -> None:
    """The real training path (cached lower features, class-balanced BCE, thresholds tuned on
    validation, probe) on a few small phantoms: in 300 steps the head learns to see an enlarged
    heart (and, less surely on so little data, starts on pleural effusion). With ``detail``
    and ``lesions`` (the demo's encoder) the standardisation is fitted on the training slices
    and saved."""
    labels = ["Cardiomegaly", "Pleural effusion"]
    run = RunConfig.from_toml({
        "run": {"out": str(tmp_path / "ckpt"), "device": "cpu", "seed": 3,
                "stages": ["findings"]},
        "model": {"encoder": "pyramid", "pyramid_detail": detail, "pyramid_lesions": detail,
                  "pyramid_nodules": detail, "image_size": 40,
                  "vision_hidden": 48 if detail else 32, "z_hidden": 32, "z_layers": 1,
                  "z_heads": 2, "z_mlp": 64, "num_queries": 4, "labels": labels,
                  "head_heads": 2, "finding_cue_cells": detail, "lm_config": TINY["lm_config"]},
        "findings": {"steps": 300, "batch": 8, "lr": 3e-3, "eval_every": 150,
                     "probe_studies": 24, "select": "auroc" if detail else "loss",
                     "cue_loss": 1.0 if detail else 0.0, "cue_fit": detail,
                     "cue_freeze": detail, "cue_choice": detail}},
        tmp_path / "run.toml")
    data = phantom_dataset(64, 16, seed=5, matrix=40, slices=16, prevalence=0.5)
    trainer = Trainer(run, data)
    trainer.run_stage("findings")
    done = (tmp_path / "ckpt" / "stages" / "findings" / "done.json").read_text()
    assert '"thresholds"' in done and len(trainer.config.finding_thresholds) == 2
    assert len(trainer.config.finding_sources) == (2 if detail else 0)
    curve = trainer.curves["findings"]
    losses = curve["loss"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    if detail:  # selected by the head's AUROC over the whole validation split
        assert len(curve["val_auroc"]) == 2 and max(curve["val_auroc"]) > 0.7
    probs, targets = trainer._head_outputs(data.valid)
    from models.probe import auroc

    scores = [auroc(probs[:, j].numpy(), targets[:, j].numpy()) for j in range(len(labels))]
    assert scores[0] > 0.85 and sum(scores) / len(scores) > 0.7, scores
    assert {"HU histogram (control)", "encoder, mean+max", "Z-former tokens, mean+max"} <= set(
        trainer.probe["table"])
    assert trainer.probe["verdict"] in ("learned", "FAILED")
    assert set(trainer.head_valid["per_label"]) == set(labels)  # for the model card
    tower = trainer.model.vision_tower
    # later stages' embeddings come from the lower features kept in memory: what inference
    # computes from the study's pixels (up to the float16 they are kept in)
    study = data.valid[0]
    kept = trainer.encoded(study)
    fresh = [trainer.model.encode_slices(v) for v in study.load()]
    for a, b in zip(kept, fresh):
        torch.testing.assert_close(a.embeddings, b.embeddings, atol=0.05, rtol=0.02)
    # and written to disk: after a restart they are read, not encoded again
    trainer.reset_cache()
    trainer._lower.clear()
    trainer.model.encode_slices = None  # type: ignore[method-assign,assignment]
    for a, b in zip(kept, trainer.encoded(study)):
        assert torch.equal(a.embeddings, b.embeddings)
    del trainer.model.encode_slices
    if detail:  # cue_freeze: the cue path is still the sparse fit on the training studies
        head = trainer.model.finding_head
        assert head is not None and head.cue is not None and head.cue_cells == 9
        n = trainer.model.cue_dim
        with torch.no_grad():
            peaks = torch.stack([torch.cat([tower(f.float())[:, -n:] for f, _ in
                                            trainer.lower(s)]).amax(0) for s in data.train])
        fresh_head = FindingHead(2, 32, 2, cue_dim=n, cue_cells=9)
        fresh_head.fit_cues(peaks, torch.stack([trainer.targets(s) for s in data.train]),
                            trainer._pos_weight)
        assert fresh_head.cue is not None and float(head.cue.weight.abs().sum()) > 0
        torch.testing.assert_close(head.cue.weight, fresh_head.cue.weight)
        assert "cue path: fitted before the stage" in trainer._frozen_story()[0]  # the card
    if detail:  # fitted, not the identity it starts as, and part of the saved state
        assert float(tower.feature_std.min()) >= 0.0099 and float(tower.feature_mean.abs().max()) > 0
        assert "vision_tower.feature_mean" in trainer.model.state_dict()


def test_worker_processes_compute_what_the_run_itself_computes(tmp_path: Path) -> None:
    """``[run] workers``: the fixed lower features of the findings stage (with the 3D nodule
    cues and sites of detector 3), and of studies the stage did not read, are computed in
    forked processes of one thread each, bit for bit what the run computes itself with two
    threads, and the embeddings of those studies equal :meth:`encode_slices` in the run's own
    process (the trained upper part stays there: a matrix product's last bits depend on the
    thread count); a bad value is refused by name."""
    def run(name: str, workers: int) -> Trainer:
        raw = {"run": {"out": str(tmp_path / name), "device": "cpu", "seed": 3,
                       "stages": ["findings"], "workers": workers},
               "model": {"encoder": "pyramid", "pyramid_detail": True, "pyramid_lesions": True,
                         "pyramid_nodules": True, "pyramid_nodule_detector": 3,
                         "image_size": 64, "vision_hidden": 64, "z_hidden": 32, "z_layers": 1,
                         "z_heads": 2, "z_mlp": 64, "num_queries": 4, "finding_sites": 2,
                         "labels": ["Lung nodule"], "head_heads": 2,
                         "lm_config": TINY["lm_config"]}}
        return Trainer(RunConfig.from_toml(raw, tmp_path / "run.toml"), data)

    data = phantom_dataset(5, 1, seed=5, matrix=64, slices=24, prevalence=0.6)
    torch.set_num_threads(2)
    alone, pooled = run("alone", 1), run("pooled", 2)
    assert alone.workers == 1 and pooled.workers == 2
    pooled.lower_all(data.train)
    for study in data.train:
        for (a, ea), (b, eb) in zip(alone.lower(study), pooled.lower(study)):
            assert torch.equal(a, b) and torch.equal(ea.z_mm, eb.z_mm)
            assert ea.sites is not None and eb.sites is not None and torch.equal(ea.sites,
                                                                                eb.sites)
    assert any(len(e.sites) for s in data.train for _, e in pooled.lower(s))  # sites found
    # studies without lower features in memory (extra studies) are encoded in workers
    extra = [data.train[0], data.valid[0]]
    pooled._lower.pop(extra[0].study_id)
    pooled._prefill()
    for study in extra:
        assert study.study_id not in pooled._lower and study.study_id in pooled._cache
        for a, b in zip(pooled.encoded(study),
                        [alone.model.encode_slices(v) for v in study.load()]):
            assert torch.equal(a.embeddings, b.embeddings)
    with pytest.raises(ValueError, match=r"run.toml: \[run\] workers: must be a whole number"):
        RunConfig.from_toml({"run": {"out": "x", "workers": -1}}, tmp_path / "run.toml")
