"""MS-VLM, top to bottom: config, preprocessing, vision tower, Z-former, resampler, the model.

Shapes: ``S`` slices of one view, ``L`` slices of a whole study (all views concatenated), ``B``
studies in a batch, ``G`` global tokens, ``Q`` resampler queries, ``D`` widths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.findings import FindingHead, FindingOutput, decisions
from models.view import MODALITIES, PHASES, PLANES, View


@dataclass
class MSVLMConfig:
    """Everything that defines a model; saved as JSON with the weights."""

    # preprocessing: CT HU windows (center, width) become channels; MR is scaled per view
    image_size: int = 64
    ct_windows: list[list[float]] = field(default_factory=lambda: [[-600.0, 1500.0],
                                                                   [40.0, 400.0],
                                                                   [400.0, 1800.0]])
    # vision tower: "slice" a transformers ViTModel built from these (or loaded from
    # vision_path); "cnn" a convolutional slice encoder (models/cnn.py) keeping small spots by
    # max pooling; "pyramid" fixed per-cell HU-bin shares at three scales under a trained MLP
    # (models/cnn.py, the CPU demo's encoder); "patch3d" the 3D sub-volume baseline (models/baseline.py) with the same sizes
    encoder: str = "slice"
    pyramid_grid: int = 3
    pyramid_detail: bool = False  # calcium bins and spot responses (models/cnn.py)
    pyramid_lesions: bool = False  # isolated spots in lung, gaps in contrast (needs detail)
    pyramid_dropout: float = 0.0  # on the pyramid MLP's hidden layer, while training
    pyramid_nodules: bool = False  # compact solid components in lung, in 3D (needs lesions)
    # a second nodule cue, before the opening, in enhanced views only (needs nodules)
    pyramid_enhanced_nodules: bool = False
    # which nodule detector (models/cnn.py NODULE_DETECTORS): 1 as the demos until 2026-12-03,
    # 2 a lung field that keeps a nodule touching its edge and vessel dots told from
    # nodules, 3 detector 2's lung field with every candidate scored by a classifier fitted on
    # phantom nodule positions
    pyramid_nodule_detector: int = 1
    # lesion cues standardised per grid "cell", with one scale per cue "type" or per type for
    # the nodule cues only, "nodules" (models/cnn.py
    # fit_standardisation); used when the findings stage fits it, then saved with the weights
    pyramid_cue_scale: str = "cell"
    cnn_channels: list[int] = field(default_factory=lambda: [16, 32, 48, 64])
    patch3d_depth: int = 32
    patch3d_patch_depth: int = 4
    vision_path: str | None = None
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 128
    pooling: str = "cls"  # "cls" or "mean" (of patch tokens)
    slice_batch: int = 64
    freeze_vision: bool = False
    # Z-former
    z_hidden: int = 64
    z_layers: int = 2
    z_heads: int = 2
    z_mlp: int = 128
    z_window: int = 16
    z_global_tokens: int = 4
    full_attention_max: int = 256
    max_views: int = 8
    mem_mask_ratio: float = 0.3
    # resampler and projector
    num_queries: int = 32
    resampler_layers: int = 1
    resampler_heads: int = 2
    # finding head (models/findings.py): one query per label over the Z-former tokens; an empty
    # list means no head. Thresholds are tuned on the validation split and stored here.
    labels: list[str] = field(default_factory=list)
    head_heads: int = 4
    finding_thresholds: list[float] = field(default_factory=list)
    key_slices: int = 3
    # the language model reads the head's decisions as label tokens (PromptMRG-style); False is
    # the paper's "report only" path
    condition_on_findings: bool = True
    # a present label's token also carries where the head found it: the key-slice-weighted mean
    # of the slices' lesion cues (cell, size) and of their relative position along the view
    # (level), so the text can say which lung and lobe and how large (zero at start)
    finding_evidence: bool = False
    # ``where`` from the k slices the head weighs most (each 1/k) instead of all its key
    # weights: with hundreds of slices the soft weights are nearly flat, so the mean of the
    # cues said little and the level was ~0.5 for every study (measured); 0: the soft weights
    finding_evidence_slices: int = 0
    # tokens after the label tokens placing the largest compact solid components the axial
    # views hold (models/cnn.py nodule_sites: size and side as words, level between lung base
    # and apex and front-back as learned bins; SiteTokens), given while
    # ``finding_sites_label`` is stated present (the others read "none"), so the text can copy
    # the place and size rather than infer them from a pooled vector; 0: none
    finding_sites: int = 0
    finding_sites_label: str = "Lung nodule"
    # the token ids of the words site tokens use (site_words; filled from the tokenizer)
    finding_site_words: dict[str, list[int]] = field(default_factory=dict)
    # also add a linear map (zero at start) of the shown sites (per slot right, left, level,
    # front, diameter / 20 mm) to every text token's input embedding: the place reaches each
    # position directly rather than through attention to the site tokens (measured: after
    # 1,000 steps the LM's teacher-forced P(right) at a nodule's side word was 0.5-0.65
    # whatever the site said)
    finding_site_bias: bool = False
    # add to each site's diameter word a learned embedding of its diameter's bin
    # (SITE_SIZE_EDGES): a measured 6.7 mm is the word " 7", which reports that round to even
    # sizes never write (the demo's tokenizer makes it the mean of " " and "7"), so the LM had
    # no trained token to copy from
    finding_site_size_bins: bool = False
    # how many equal bins the site's level (lung base 0 .. apex 1) falls into (site_level_edges):
    # 10 put a lobe boundary of the phantoms (the left fissure at 0.45) inside one bin, where the
    # text's lobe could only guess; the measured level is within 0.003 of the true one for half
    # the nodules and within 0.06 for 90% (470 matched sites of seeds 1 and 4): finer bins hold
    finding_site_level_bins: int = 10
    # per label "head" (the whole head's logit) or "cues" (its cue path alone), chosen on the
    # validation split ([findings] cue_choice); empty: the head for every label
    finding_sources: list[str] = field(default_factory=list)
    # the head's cue path also reads each lesion cue type's maximum over the pyramid's grid
    # cells (a nodule lies in one of nine cells; models/findings.py)
    finding_cue_cells: bool = False
    # language model (a Llama built from lm_config, or any causal LM loaded from lm_path)
    lm_path: str | None = None
    lm_config: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512})
    lora: dict[str, Any] | None = None  # e.g. {"r": 8, "alpha": 16, "target_modules": [...]}
    # generation
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # when the greedy draft's text disagrees with the head's decisions (the rule labeler's
    # reading), decode again with this many beams and keep the candidate that agrees best
    # (the greedy draft on a tie; models/generator.py; never for the report-only ablation,
    # whose LM does not read the head); 0: greedy only
    agree_beams: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MSVLMConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Invalid model config keys {sorted(unknown)} - not in MSVLMConfig")
        return cls(**values)


# -- preprocessing ---------------------------------------------------------------------------------

def preprocess(pixels: np.ndarray | torch.Tensor, modality: str, config: MSVLMConfig,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Slices -> network input ``(S, C, image_size, image_size)`` in [-1, 1].

    CT: one channel per HU window (clipped to the window, scaled). MR: the view scaled by its
    0.5th and 99.5th percentiles, repeated on every channel.
    """
    x = torch.as_tensor(pixels, dtype=torch.float32, device=device)  # (S, H, W)
    if modality == "CT":
        channels = []
        for center, width in config.ct_windows:
            low = center - width / 2
            channels.append(((x - low) / width).clamp(0.0, 1.0))
        x = torch.stack(channels, dim=1)  # (S, C, H, W)
    else:
        flat = x.flatten()
        sample = flat[:: max(1, flat.numel() // 1_000_000)]
        lo, hi = torch.quantile(sample, 0.005), torch.quantile(sample, 0.995)
        x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
        x = x.unsqueeze(1).expand(-1, len(config.ct_windows), -1, -1)  # (S, C, H, W)
    if x.shape[-2:] != (config.image_size, config.image_size):
        x = F.interpolate(x, size=(config.image_size, config.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    return x * 2.0 - 1.0


# -- vision tower ----------------------------------------------------------------------------------

class SliceEncoder(Protocol):
    """What the model needs from a vision tower: per-slice embeddings of width ``embed_dim``.

    A 2D encoder embeds each slice alone; the 3D-patch baseline implements the same interface
    with patches that span several slices.
    """

    embed_dim: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:  # (S, C, H, W) -> (S, D)
        ...


class ViTSliceEncoder(nn.Module):
    """A transformers ``ViTModel`` (or ``Dinov2Model``): one embedding per slice, [CLS] or the
    mean of the patch tokens. Built from the config, or loaded from ``vision_path``; its input
    size is then the checkpoint's, and ``image_size`` should match it."""

    def __init__(self, config: MSVLMConfig) -> None:
        super().__init__()
        from transformers import AutoModel, ViTConfig, ViTModel

        self.vit: Any
        if config.vision_path:  # a ViTModel or Dinov2Model saved in a local folder
            self.vit = AutoModel.from_pretrained(config.vision_path, local_files_only=True)
        else:
            self.vit = ViTModel(ViTConfig(
                image_size=config.image_size, patch_size=config.patch_size,
                num_channels=len(config.ct_windows), hidden_size=config.vision_hidden,
                num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                intermediate_size=config.vision_mlp), add_pooling_layer=False)
        self.embed_dim = int(self.vit.config.hidden_size)
        self.pooling = config.pooling

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.vit(pixel_values=pixels).last_hidden_state  # (S, 1 + N, D)
        if self.pooling == "mean":
            return hidden[:, 1:].mean(dim=1)  # (S, D)
        return hidden[:, 0]  # (S, D)


# -- Z-former --------------------------------------------------------------------------------------

def z_encoding(z_mm: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of positions in mm (wavelengths 2 mm to 2 m), ``(..., dim)``."""
    half = dim // 2
    wavelengths = torch.logspace(math.log10(2.0), math.log10(2000.0), half,
                                 device=z_mm.device, dtype=torch.float32)
    angles = z_mm.float().unsqueeze(-1) * (2 * math.pi / wavelengths)  # (..., half)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class Block(nn.Module):
    """Pre-norm transformer block with a boolean attention mask (True = may attend)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class ZFormer(nn.Module):
    """Transformer across slices: each slice's embedding plus its z position (mm), plane, phase,
    modality and view; global tokens; windowed attention for long studies.
    """

    def __init__(self, config: MSVLMConfig, vision_dim: int) -> None:
        super().__init__()
        D = config.z_hidden
        self.config = config
        # the slice embeddings are standardised first (they can be nearly constant across
        # slices), and the position/plane/phase embeddings start small so they do not swamp them
        self.input_norm = nn.LayerNorm(vision_dim)
        self.input = nn.Linear(vision_dim, D)
        self.z_proj = nn.Linear(D, D)
        nn.init.normal_(self.z_proj.weight, std=0.02)
        self.plane = nn.Embedding(len(PLANES), D)
        self.phase = nn.Embedding(len(PHASES), D)
        self.modality = nn.Embedding(len(MODALITIES), D)
        self.view = nn.Embedding(config.max_views, D)
        for table in (self.plane, self.phase, self.modality, self.view):
            nn.init.normal_(table.weight, std=0.02)
        self.globals = nn.Parameter(torch.randn(config.z_global_tokens, D) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(vision_dim))
        self.blocks = nn.ModuleList(Block(D, config.z_heads, config.z_mlp)
                                    for _ in range(config.z_layers))
        self.norm = nn.LayerNorm(D)
        self.mem_head = nn.Linear(D, vision_dim)

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """``(B, 1, G+L, G+L)`` boolean: globals see and are seen by all; slices see slices
        within ``z_window`` when the study (its own slices, not the padded batch) is longer
        than ``full_attention_max``, so a study reads the same in any batch as alone."""
        B, L = valid.shape
        G = self.config.z_global_tokens
        keys = torch.cat([valid.new_ones(B, G), valid], dim=1)  # (B, G+L)
        mask = keys[:, None, None, :].expand(B, 1, G + L, G + L)
        if L > self.config.full_attention_max:
            idx = torch.arange(L, device=valid.device)
            local = (idx[:, None] - idx[None, :]).abs() <= self.config.z_window  # (L, L)
            full = torch.ones(G + L, G + L, dtype=torch.bool, device=valid.device)
            full[G:, G:] = local
            short = valid.sum(dim=1) <= self.config.full_attention_max  # (B,)
            mask = mask & (full | short[:, None, None, None])
        return mask

    def forward(self, emb: torch.Tensor, meta: torch.Tensor, z_mm: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """``emb (B, L, Dv)``, ``meta (B, L, 4)`` long (plane, phase, modality, view),
        ``z_mm (B, L)``, ``valid (B, L)`` -> ``(B, G+L, D)``."""
        x = self.input(self.input_norm(emb)) + self.z_proj(z_encoding(z_mm,
                                                                      self.config.z_hidden))
        x = x + self.plane(meta[..., 0]) + self.phase(meta[..., 1])
        x = x + self.modality(meta[..., 2]) + self.view(meta[..., 3])  # (B, L, D)
        B = x.shape[0]
        x = torch.cat([self.globals.expand(B, -1, -1), x], dim=1)  # (B, G+L, D)
        mask = self.attention_mask(valid)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def mem_loss(self, emb: torch.Tensor, meta: torch.Tensor, z_mm: torch.Tensor,
                 valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked embedding modelling: hide ``mem_mask_ratio`` of the slices, predict them (L1)."""
        hide = (torch.rand(valid.shape, generator=generator, device=emb.device)
                < self.config.mem_mask_ratio) & valid  # (B, L)
        first = valid & (valid.cumsum(1) == 1)
        hide = hide | (first & ~hide.any(dim=1, keepdim=True))  # hide at least one per study
        masked = torch.where(hide[..., None], self.mask_token.expand_as(emb), emb)
        out = self.forward(masked, meta, z_mm, valid)[:, self.config.z_global_tokens:]
        pred = self.mem_head(out)  # (B, L, Dv)
        return (pred - emb).abs()[hide].mean()


class PerceiverResampler(nn.Module):
    """``Q`` learned queries cross-attend to the Z-former sequence; keeps the last attention
    over slices (``last_attention``, ``(B, Q, G+L)``) for key-slice evidence."""

    def __init__(self, config: MSVLMConfig) -> None:
        super().__init__()
        D = config.z_hidden
        self.queries = nn.Parameter(torch.randn(config.num_queries, D) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm_q": nn.LayerNorm(D), "norm_kv": nn.LayerNorm(D),
                           "attn": nn.MultiheadAttention(D, config.resampler_heads,
                                                         batch_first=True),
                           "norm_ff": nn.LayerNorm(D),
                           "ff": nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(),
                                               nn.Linear(4 * D, D))})
            for _ in range(config.resampler_layers))
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, Q, D)
        for module in self.layers:
            layer: Any = module
            kv = layer["norm_kv"](x)
            attended, weights = layer["attn"](layer["norm_q"](q), kv, kv,
                                              key_padding_mask=~key_valid, need_weights=True)
            q = q + attended
            q = q + layer["ff"](layer["norm_ff"](q))
            self.last_attention = weights.detach()  # (B, Q, G+L)
        return q


# -- the model -------------------------------------------------------------------------------------

@dataclass
class EncodedView:
    """Slice embeddings of one view plus what the Z-former needs to place them.

    This is the cacheable half of the model (keyed by series and model version): streaming
    ingest can compute it slice by slice before the study is complete.
    """

    embeddings: torch.Tensor  # (S, Dv)
    z_mm: torch.Tensor  # (S,)
    modality: str
    plane: str
    phase: str
    series_instance_uid: str = ""
    # ``(K, 4)`` compact solid components of the view (models/cnn.py nodule_sites); None for a
    # tower that finds none
    sites: torch.Tensor | None = None


@dataclass
class FrozenRead:
    """What the Z-former and the finding head make of one study (:meth:`MSVLM.frozen_read`):
    while neither trains, the language stages compute it once per study, not at every step."""

    seq: torch.Tensor  # (G+L, Dz) Z-former tokens
    findings: FindingOutput | None  # batch of one; with where and sites as read() sets them


# A site is written for the language model as four tokens: its diameter and its side as the
# words the reports use (the LM's own embeddings of " 14" and " left", so the text can copy
# them), then its level between lung base (0) and apex (1) and its front-back position
# (-1 anterior .. 1) as learned embeddings of bins (which lobe a level is, the LM learns).
SITE_SIZES_MM = range(3, 41)  # diameters written as a whole number of millimetres
SITE_FRONT_EDGES = (-0.5, 0.0, 0.5)
# diameter bins (mm) of [model] finding_site_size_bins: 1 mm wide where the 6 and 8 mm
# thresholds of nodule follow-up lie, wider above
SITE_SIZE_EDGES = (4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 25.0, 30.0)
SITE_TOKENS = 4  # per site
SITE_WORDS = ("right", "left", *(str(d) for d in SITE_SIZES_MM))


def site_level_edges(bins: int = 10) -> tuple[float, ...]:
    """The inner edges of ``bins`` equal level bins over [0, 1] (10: 0.1, 0.2 .. 0.9)."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"Invalid 'finding_site_level_bins' {bins!r} - a whole number >= 2")
    return tuple(float(v) for v in np.linspace(0, 1, bins + 1)[1:-1].round(6))


def site_words(tokenizer: Any) -> dict[str, list[int]]:
    """The token ids of the words site tokens are made of (``[model] finding_site_words``):
    " right", " left" and each diameter in :data:`SITE_SIZES_MM` as the reports write it."""
    return {w: [int(i) for i in tokenizer.encode(f" {w}", add_special_tokens=False)]
            for w in SITE_WORDS}


class SiteTokens(nn.Module):
    """``(B, K, 4)`` sites (diameter 0: none) -> ``(B, K * 4, D)`` LM tokens: per site the
    mean word embedding of its diameter (whole mm), that of its side (" right" where the
    component lies in the first half of the lungs' columns: the patient's right on an axial
    image in the standard orientation), and learned embeddings of its level bin
    (``level_bins`` equal bins over [0, 1]) and front bin plus its slot; with ``size_bins``
    the diameter's token also adds a learned embedding of its bin (:data:`SITE_SIZE_EDGES`).
    An absent site, or any while the label is not stated, is K * 4 learned "none" tokens."""

    def __init__(self, slots: int, width: int, words: dict[str, list[int]],
                 size_bins: bool = False, level_bins: int = 10) -> None:
        super().__init__()
        missing = set(SITE_WORDS) - set(words)
        if missing:
            raise ValueError(f"Invalid 'finding_site_words' - missing {sorted(missing)[:5]}")
        self.slots = slots
        level_edges = site_level_edges(level_bins)
        self.level = nn.Embedding(len(level_edges) + 1, width)
        self.front = nn.Embedding(len(SITE_FRONT_EDGES) + 1, width)
        self.slot = nn.Embedding(slots, width)
        self.none = nn.Embedding(slots * SITE_TOKENS, width)
        self.size = nn.Embedding(len(SITE_SIZE_EDGES) + 1, width) if size_bins else None
        for module in (self.level, self.front, self.slot, self.none, self.size):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
        # per word a row of its (at most 4) token ids and their averaging weights
        ids = torch.zeros(len(SITE_WORDS), 4, dtype=torch.long)
        weights = torch.zeros(len(SITE_WORDS), 4)
        for row, name in enumerate(SITE_WORDS):
            pieces = words[name][:4]
            ids[row, : len(pieces)] = torch.tensor(pieces)
            weights[row, : len(pieces)] = 1.0 / len(pieces)
        self.register_buffer("word_ids", ids, persistent=False)
        self.register_buffer("word_weights", weights, persistent=False)
        self.register_buffer("level_edges", torch.tensor(level_edges), persistent=False)
        self.register_buffer("front_edges", torch.tensor(SITE_FRONT_EDGES), persistent=False)
        self.register_buffer("size_edges", torch.tensor(SITE_SIZE_EDGES), persistent=False)

    def forward(self, sites: torch.Tensor, shown: torch.Tensor,
                words: nn.Embedding) -> torch.Tensor:
        """``shown (B,)``: whether the sites are given at all (the label is stated present);
        ``words``: the LM's input embeddings."""
        B, K, _ = sites.shape
        sites = sites.float()
        size = sites[..., 0].round().clamp(SITE_SIZES_MM[0], SITE_SIZES_MM[-1]).long()
        row = torch.where(sites[..., 2] < 0, 0, 1)  # (B, K): " right" / " left"
        size_row = 2 + size - SITE_SIZES_MM[0]

        def word(r: torch.Tensor) -> torch.Tensor:  # (B, K) word rows -> (B, K, D)
            vectors = F.embedding(self.word_ids[r], words.weight)  # not the module: no hooks
            return (vectors * self.word_weights[r][..., None]).sum(dim=-2)

        slot = self.slot.weight[None, :K]
        level = self.level(torch.bucketize(sites[..., 1].contiguous(), self.level_edges))
        front = self.front(torch.bucketize(sites[..., 3].contiguous(), self.front_edges))
        diameter = word(size_row)
        if self.size is not None:
            diameter = diameter + self.size(torch.bucketize(sites[..., 0].contiguous(),
                                                            self.size_edges))
        tokens = torch.stack([diameter, word(row), level + slot, front + slot], dim=2)
        present = (sites[..., 0] > 0) & shown[:, None]  # (B, K)
        none = self.none.weight[: K * SITE_TOKENS].view(1, K, SITE_TOKENS, -1)
        tokens = torch.where(present[..., None, None], tokens.to(none.dtype), none)
        return tokens.reshape(B, K * SITE_TOKENS, -1)


def study_sites(studies: Sequence[Sequence[EncodedView]], slots: int,
                device: torch.device) -> torch.Tensor:
    """``(B, slots, 4)``: per study the largest sites over its views, largest first; a site
    within 0.1 of a larger one in level and 0.2 in side and front (the same component in
    another phase) is dropped; rows of zeros where fewer."""
    out = torch.zeros(len(studies), slots, 4, device=device)
    for b, views in enumerate(studies):
        found = [v.sites for v in views if v.sites is not None and len(v.sites)]
        if not found:
            continue
        # largest first; ties (the same component in two phases) in a fixed order, so the
        # order of the views or of a sort never changes the tokens
        rows = sorted(torch.cat(found).float().to(device),
                      key=lambda r: (-float(r[0]), *(float(v) for v in r[1:])))
        kept: list[torch.Tensor] = []
        for row in rows:
            if all((row[1] - k[1]).abs() >= 0.1 or (row[2:] - k[2:]).abs().max() >= 0.2
                   for k in kept):
                kept.append(row)
            if len(kept) == slots:
                break
        out[b, : len(kept)] = torch.stack(kept)
    return out


class MSVLM(nn.Module):
    """vision_tower -> Z-former -> resampler -> multi_modal_projector -> language_model."""

    def __init__(self, config: MSVLMConfig, vocab_size: int, special_ids: dict[str, int],
                 vision_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.special_ids = dict(special_ids)
        tower: Any = vision_tower
        if tower is None and config.encoder == "patch3d":
            from models.baseline import Patch3DEncoder

            tower = Patch3DEncoder(config.image_size, config.patch_size, config.patch3d_depth,
                                   config.patch3d_patch_depth, len(config.ct_windows),
                                   config.vision_hidden, config.vision_layers,
                                   config.vision_heads, config.vision_mlp)
        elif tower is None and config.encoder == "pyramid":
            from models.cnn import PyramidSliceEncoder

            tower = PyramidSliceEncoder(config.vision_hidden, config.pyramid_grid,
                                        detail=config.pyramid_detail,
                                        lesions=config.pyramid_lesions,
                                        matrix=config.image_size,
                                        dropout=config.pyramid_dropout,
                                        nodules=config.pyramid_nodules,
                                        enhanced_nodules=config.pyramid_enhanced_nodules,
                                        nodule_detector=config.pyramid_nodule_detector,
                                        cue_scale=config.pyramid_cue_scale)
        elif tower is None and config.encoder == "cnn":
            from models.cnn import ConvSliceEncoder

            tower = ConvSliceEncoder(len(config.ct_windows), config.cnn_channels,
                                     config.vision_hidden)
        elif tower is None:
            if config.encoder != "slice":
                raise ValueError(f"Invalid 'encoder' {config.encoder!r} - slice, cnn, pyramid "
                                 "or patch3d")
            tower = ViTSliceEncoder(config)
        self.vision_tower = tower
        self.z_former = ZFormer(config, int(tower.embed_dim))
        self.resampler = PerceiverResampler(config)
        self.language_model = build_language_model(config, vocab_size, special_ids)
        lm_width = int(self.language_model.get_input_embeddings().weight.shape[1])
        self.multi_modal_projector = nn.Sequential(
            nn.Linear(config.z_hidden, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        self.last_findings: FindingOutput | None = None
        self.last_states: torch.Tensor | None = None
        self.finding_head: FindingHead | None = None
        self.label_tokens: nn.Embedding | None = None
        self.evidence: nn.Linear | None = None
        self.site_tokens: SiteTokens | None = None
        self.site_bias: nn.Linear | None = None
        self._text_bias: torch.Tensor | None = None  # (B, D) while a call runs
        if config.labels:
            if config.finding_thresholds and len(config.finding_thresholds) != len(config.labels):
                raise ValueError("Invalid 'finding_thresholds' - one per label")
            if config.finding_sources and (
                    len(config.finding_sources) != len(config.labels)
                    or set(config.finding_sources) - {"head", "cues"}):
                raise ValueError("Invalid 'finding_sources' - 'head' or 'cues', one per label")
            cells = config.pyramid_grid ** 2 if config.finding_cue_cells and self.cue_dim else 0
            self.finding_head = FindingHead(len(config.labels), config.z_hidden,
                                            config.head_heads, self.cue_dim, cells)
            if config.condition_on_findings:  # (label, absent/present) -> one LM token each
                self.label_tokens = nn.Embedding(2 * len(config.labels), lm_width)
                nn.init.normal_(self.label_tokens.weight, std=0.02)
                if config.finding_evidence:
                    self.evidence = nn.Linear(self.cue_dim + 1, lm_width)
                    nn.init.zeros_(self.evidence.weight)
                    nn.init.zeros_(self.evidence.bias)
                if config.finding_sites:
                    if config.finding_sites_label not in config.labels:
                        raise ValueError(f"Invalid 'finding_sites_label' "
                                         f"{config.finding_sites_label!r} - not in 'labels'")
                    self.site_tokens = SiteTokens(config.finding_sites, lm_width,
                                                  config.finding_site_words,
                                                  config.finding_site_size_bins,
                                                  config.finding_site_level_bins)
                    if config.finding_site_bias:
                        self.site_bias = nn.Linear(config.finding_sites * 5, lm_width)
                        nn.init.zeros_(self.site_bias.weight)
                        nn.init.zeros_(self.site_bias.bias)
                        # every text token the LM embeds, in training and in generation
                        self.language_model.get_input_embeddings().register_forward_hook(
                            self._add_text_bias)
        if config.freeze_vision:
            self.vision_tower.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def cue_dim(self) -> int:
        """Trailing slice-embedding values that are lesion cues the head reads directly."""
        return int(getattr(self.vision_tower, "cue_dim", 0))

    def _head(self, seq: torch.Tensor, emb: torch.Tensor, valid: torch.Tensor) -> FindingOutput:
        assert self.finding_head is not None
        cues = emb[..., -self.cue_dim:] if self.cue_dim else None
        out = self.finding_head(seq[:, self.config.z_global_tokens:], valid, cues)
        if "cues" in self.config.finding_sources and out.cue_logits is not None:
            use = torch.tensor([s == "cues" for s in self.config.finding_sources],
                               device=out.logits.device)
            out.logits = torch.where(use, out.cue_logits, out.logits)
            if out.evidence is not None and out.cue_slices is not None:
                out.evidence = torch.where(use[:, None], out.cue_slices, out.evidence)
        return out

    # -- encode: slices -> embeddings (cacheable) ---------------------------------------------------
    def encode_slices(self, view: View, grad: bool = False) -> EncodedView:
        """Embed every slice of ``view``, ``slice_batch`` slices at a time.

        Without ``grad`` the work runs under ``inference_mode``, so peak memory is one chunk of
        activations whatever the slice count.
        """
        chunks = []
        z = torch.as_tensor(view.z_mm, dtype=torch.float32, device=self.device)
        volumetric = bool(getattr(self.vision_tower, "volumetric", False))
        raw = bool(getattr(self.vision_tower, "raw_input", False))
        context = torch.enable_grad() if grad else torch.inference_mode()
        sites: torch.Tensor | None = None
        with context:
            if volumetric:  # the 3D-patch baseline sees the whole volume at once
                x = preprocess(view.pixels, view.modality, self.config, self.device)
                slabs = self.vision_tower(x)  # (slabs, Dv); each slice gets its slab's
                chunks.append(slabs[self.vision_tower.slab_of_slices(view.num_slices).to(
                    slabs.device)])
            elif raw:  # the tower's fixed lower part reads the values (HU) itself
                feats, sites = self.lower_slices(view)
                chunks.append(self.upper_slices(feats))
            else:
                for start in range(0, view.num_slices, self.config.slice_batch):
                    x = preprocess(view.pixels[start:start + self.config.slice_batch],
                                   view.modality, self.config, self.device)  # (s, C, H, W)
                    chunks.append(self.vision_tower(x))  # (s, Dv)
        emb = torch.cat(chunks)  # (S, Dv)
        if not grad:
            emb, z = emb.clone(), z.clone()  # leave inference mode
        sites = sites.clone() if sites is not None else None
        return EncodedView(emb, z, view.modality, view.plane, view.phase,
                           view.series_instance_uid, sites)

    def lower_slices(self, view: View) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A two-part tower's fixed lower features ``(S, F)`` of a view, with its nodule sites
        where the model takes them (else None); :meth:`upper_slices` finishes the embedding."""
        feats = self.vision_tower.lower_view(
            view.pixels, view.modality, view.z_mm, view.pixel_spacing_mm,
            self.config.slice_batch, self.device, view.phase,
            plane=view.plane if self.config.finding_sites else None)
        return feats if self.config.finding_sites else (feats, None)

    def upper_slices(self, feats: torch.Tensor) -> torch.Tensor:
        """A two-part tower's trained upper part on a view's lower features ``(S, F)``,
        ``slice_batch`` slices at a time (as :meth:`encode_slices`; a matrix product's last bits
        depend on its shape and the thread count, so every path uses this one)."""
        return torch.cat([self.vision_tower(feats[start:start + self.config.slice_batch])
                          for start in range(0, len(feats), self.config.slice_batch)])

    # -- decode: embeddings of all views -> visual tokens -> text ------------------------------------
    def collate(self, studies: Sequence[Sequence[EncodedView]]) -> tuple[torch.Tensor, ...]:
        """Concatenate each study's views and pad the batch: ``emb (B, L, Dv)``,
        ``meta (B, L, 4)``, ``z (B, L)``, ``valid (B, L)``."""
        if not studies or any(not views for views in studies):
            raise ValueError("Invalid 'studies' - every study needs at least one view")
        rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for views in studies:
            if len(views) > self.config.max_views:
                raise ValueError(f"Invalid study - {len(views)} views, at most "
                                 f"{self.config.max_views}")
            meta = [torch.tensor([PLANES.index(v.plane), PHASES.index(v.phase),
                                  MODALITIES.index(v.modality), i], device=self.device)
                    .expand(v.embeddings.shape[0], 4) for i, v in enumerate(views)]
            rows.append((torch.cat([v.embeddings for v in views]), torch.cat(meta),
                         torch.cat([v.z_mm - v.z_mm[0] for v in views])))
        L = max(r[0].shape[0] for r in rows)
        emb = torch.stack([F.pad(r[0], (0, 0, 0, L - r[0].shape[0])) for r in rows])
        meta_t = torch.stack([F.pad(r[1], (0, 0, 0, L - r[1].shape[0])) for r in rows])
        z = torch.stack([F.pad(r[2], (0, L - r[2].shape[0])) for r in rows])
        valid = torch.stack([torch.arange(L, device=self.device) < r[0].shape[0] for r in rows])
        return emb, meta_t, z, valid

    def read(self, studies: Sequence[Sequence[EncodedView]],
             frozen: Sequence[FrozenRead] | None = None) -> tuple[torch.Tensor,
                                                                   FindingOutput | None]:
        """Z-former once, then both readers of its tokens: ``(B, Q, D_lm)`` visual tokens and
        the finding head's output (None without a head). ``frozen``: each study's
        :meth:`frozen_read`, kept while the Z-former and head do not train (the language
        stages), so only the resampler reads them again."""
        if frozen is not None:
            T = max(f.seq.shape[0] for f in frozen)
            seq = torch.stack([F.pad(f.seq, (0, 0, 0, T - f.seq.shape[0])) for f in frozen])
            key_valid = torch.stack([torch.arange(T, device=seq.device) < f.seq.shape[0]
                                     for f in frozen])
            visual = self.multi_modal_projector(self.resampler(seq, key_valid))
            heads = [f.findings for f in frozen]
            return visual, (None if any(h is None for h in heads)
                            else FindingOutput.stack(heads))  # type: ignore[arg-type]
        emb, meta, z, valid = self.collate(studies)
        seq = self.z_former(emb, meta, z, valid)  # (B, G+L, Dz)
        G = self.config.z_global_tokens
        key_valid = torch.cat([valid.new_ones(valid.shape[0], G), valid], dim=1)
        visual = self.multi_modal_projector(self.resampler(seq, key_valid))
        return visual, self._read_findings(studies, seq, emb, valid)

    @torch.no_grad()
    def frozen_read(self, views: Sequence[EncodedView]) -> FrozenRead:
        """One study's Z-former tokens and finding-head output (with its evidence and sites)
        as :meth:`read` computes them for that study alone, as at inference; for
        ``read(..., frozen=...)`` while neither trains."""
        emb, meta, z, valid = self.collate([views])
        seq = self.z_former(emb, meta, z, valid)
        return FrozenRead(seq[0], self._read_findings([views], seq, emb, valid))

    def _read_findings(self, studies: Sequence[Sequence[EncodedView]], seq: torch.Tensor,
                       emb: torch.Tensor, valid: torch.Tensor) -> FindingOutput | None:
        """The finding head on the Z-former tokens, with ``where`` the evidence tokens carry and
        the views' nodule ``sites`` set when the model uses them; None without a head."""
        if self.finding_head is None:
            return None
        findings = self._head(seq, emb, valid)
        if self.evidence is not None:
            findings.where = self._where(studies, emb, findings, valid)
        if self.site_tokens is not None:
            findings.sites = study_sites(studies, self.config.finding_sites, self.device)
        return findings

    def _where(self, studies: Sequence[Sequence[EncodedView]], emb: torch.Tensor,
               findings: FindingOutput, valid: torch.Tensor) -> torch.Tensor:
        """``(B, N, cue_dim + 1)``: per label the key-slice weights' mean of each slice's lesion
        cues and its position along its view (0 first slice, 1 last); with
        ``finding_evidence_slices`` k the plain mean over the label's k top key slices."""
        L = emb.shape[1]
        rows = []
        for views in studies:
            parts = []
            for v in views:
                z = v.z_mm.float() - v.z_mm.float().min()
                parts.append(z / z.max().clamp_min(1e-6))
            row = torch.cat(parts)
            rows.append(F.pad(row, (0, L - row.shape[0])))
        level = torch.stack(rows).to(emb.dtype)[..., None]  # (B, L, 1)
        cues = emb[..., emb.shape[-1] - self.cue_dim:]  # (B, L, C), C may be 0
        weights = findings.key_weights.to(emb.dtype)  # (B, N, L)
        k = min(self.config.finding_evidence_slices, L)
        if k > 0:
            top = weights.masked_fill(~valid[:, None, :], -1.0).topk(k, dim=-1).indices
            weights = torch.zeros_like(weights).scatter_(-1, top, 1.0 / k)
        return torch.einsum("bnl,blc->bnc", weights, torch.cat([cues, level], dim=-1))

    def visual_tokens(self, studies: Sequence[Sequence[EncodedView]]) -> tuple[torch.Tensor,
                                                                                torch.Tensor]:
        """``(B, Q, D_lm)`` visual tokens and the Z-former's valid mask ``(B, L)``."""
        visual, _ = self.read(studies)
        return visual, self.collate(studies)[3]

    def slice_relevance(self) -> torch.Tensor | None:
        """Mean resampler attention over slices from the last call, ``(B, L)``."""
        att = self.resampler.last_attention
        if att is None:
            return None
        return att[:, :, self.config.z_global_tokens:].mean(dim=1)

    def findings(self, studies: Sequence[Sequence[EncodedView]]) -> FindingOutput:
        """The finding head alone (its training loss and the validation threshold tuning)."""
        if self.finding_head is None:
            raise ValueError("Invalid model - the config names no labels, so it has no head")
        emb, meta, z, valid = self.collate(studies)
        return self._head(self.z_former(emb, meta, z, valid), emb, valid)

    def decide(self, findings: FindingOutput) -> torch.Tensor:
        """``(B, N)`` 0/1 decisions with the thresholds stored in the checkpoint."""
        return decisions(findings.logits.sigmoid(), self.config.finding_thresholds)

    def prefix(self, visual: torch.Tensor, states: torch.Tensor | None,
               where: torch.Tensor | None = None,
               sites: torch.Tensor | None = None) -> torch.Tensor:
        """What the LM reads before BOS: the visual tokens, then (when the model is conditioned
        on its findings) one token per label saying present or absent, ``(B, Q[+N], D_lm)``;
        with ``finding_evidence`` a present label's token also carries ``where``
        (:meth:`read`); with ``finding_sites`` K * 4 tokens placing the views' components
        follow (:class:`SiteTokens`, shown while ``finding_sites_label`` is stated present)."""
        if self.label_tokens is None:
            return visual
        if states is None:
            raise ValueError("Invalid call - a findings-conditioned model needs label states")
        n = states.shape[1]
        ids = 2 * torch.arange(n, device=states.device) + states.long()  # (B, N)
        tokens = self.label_tokens(ids).to(visual.dtype)
        if self.evidence is not None and where is not None:
            tokens = tokens + states[..., None].to(visual.dtype) * self.evidence(
                where.to(visual.dtype))
        parts = [visual, tokens]
        if self.site_tokens is not None:
            if sites is None:
                sites = visual.new_zeros(visual.shape[0], self.config.finding_sites, 4)
            shown = states[:, self.config.labels.index(self.config.finding_sites_label)] > 0
            parts.append(self.site_tokens(sites, shown, self.language_model
                                          .get_input_embeddings()).to(visual.dtype))
        return torch.cat(parts, dim=1)

    def _add_text_bias(self, module: nn.Module, inputs: Any, output: torch.Tensor
                       ) -> torch.Tensor:
        if self._text_bias is None:
            return output
        return output + self._text_bias[:, None, :].to(output.dtype)

    def text_bias(self, states: torch.Tensor | None,
                  sites: torch.Tensor | None) -> torch.Tensor | None:
        """``(B, D)`` what ``finding_site_bias`` adds to each text token: the linear map of the
        sites shown (all zero while the label is not stated); None without it."""
        if self.site_bias is None or states is None or sites is None:
            return None
        shown = states[:, self.config.labels.index(self.config.finding_sites_label)] > 0
        present = ((sites[..., 0] > 0) & shown[:, None]).float()  # (B, K)
        side = sites[..., 2]
        feats = torch.stack([(side < 0).float(), (side >= 0).float(), sites[..., 1],
                             sites[..., 3], sites[..., 0] / 20.0], dim=-1) * present[..., None]
        return self.site_bias(feats.flatten(1).float())

    def forward(self, studies: Sequence[Sequence[EncodedView]], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, label_states: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None,
                frozen: Sequence[FrozenRead] | None = None,
                length_groups: int = 1) -> torch.Tensor:
        """Teacher-forced loss of ``input_ids (B, T)`` (BOS, report, EOS, padding) given the
        studies (and, for a conditioned model, the label states it is told; the head's own
        decisions when None); the prefix and BOS carry no loss. ``token_weights (B, T)``: the
        loss is the weighted mean over the predicted tokens (each weighs 1 without).
        ``frozen``: as :meth:`read`. ``length_groups`` > 1 runs the language model on that
        many groups of reports of similar length, each padded to its own longest: the same
        loss and gradients with less padding (a demo batch's reports run from ~50 to ~190
        tokens)."""
        visual, findings = self.read(studies, frozen)
        if label_states is None and self.label_tokens is not None and findings is not None:
            label_states = self.decide(findings)
        prefix = self.prefix(visual, label_states,
                             findings.where if findings is not None else None,
                             findings.sites if findings is not None else None)  # (B, P, D)
        self._text_bias = self.text_bias(
            label_states, findings.sites if findings is not None else None)
        try:
            tokens = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D)
        finally:
            self._text_bias = None
        if length_groups > 1:
            return self._grouped_loss(prefix, tokens, input_ids, attention_mask, token_weights,
                                      length_groups)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, P+T, D)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        labels = torch.where(attention_mask.bool(), input_ids, -100)
        labels[:, 0] = -100  # BOS is given, not predicted
        labels = torch.cat([labels.new_full(prefix.shape[:2], -100), labels], dim=1)
        if token_weights is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                       labels=labels).loss
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        weights = torch.cat([token_weights.new_zeros(prefix.shape[:2]), token_weights], dim=1)
        target, weights = labels[:, 1:], weights[:, 1:] * (labels[:, 1:] != -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                               ignore_index=-100, reduction="none")
        return (loss * weights.flatten()).sum() / weights.sum().clamp_min(1e-6)

    def _grouped_loss(self, prefix: torch.Tensor, tokens: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, token_weights: torch.Tensor | None,
                      groups: int) -> torch.Tensor:
        """:meth:`forward`'s loss with the rows sorted by report length and split into
        ``groups``, each trimmed to its longest report (the padding is on the right)."""
        weights = attention_mask.float() if token_weights is None else \
            token_weights * attention_mask
        weights = weights.clone()
        weights[:, 0] = 0.0  # BOS is given, not predicted
        lengths = attention_mask.sum(dim=1)
        total = prefix.new_zeros((), dtype=torch.float32)
        for rows in torch.argsort(lengths, stable=True).tensor_split(groups):
            if rows.numel() == 0:
                continue
            t = int(lengths[rows].max())
            embeds = torch.cat([prefix[rows], tokens[rows, :t]], dim=1)
            mask = torch.cat([attention_mask.new_ones(len(rows), prefix.shape[1]),
                              attention_mask[rows, :t]], dim=1)
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
            # the logit at position p predicts the token at p + 1: the text's from P - 1 on
            pred = logits[:, prefix.shape[1] - 1:-1].float()
            loss = F.cross_entropy(pred.flatten(0, 1), input_ids[rows, :t].flatten(),
                                   reduction="none")
            total = total + (loss * weights[rows, :t].flatten()).sum()
        return total / weights.sum().clamp_min(1e-6)

    @torch.inference_mode()
    def generate_ids(self, studies: Sequence[Sequence[EncodedView]],
                     max_new_tokens: int | None = None,
                     label_states: torch.Tensor | None = None,
                     num_beams: int = 1) -> torch.Tensor:
        """Greedy (deterministic) decoding; returns the new token ids ``(B, T)``; with
        ``num_beams`` > 1 beam search returning every beam, ``(B * num_beams, T)`` (a study's
        beams together, best first). The head's output of this call is kept in
        ``last_findings`` (and its decisions, or the given ``label_states``, in
        ``last_states``)."""
        visual, findings = self.read(studies)
        if label_states is None and findings is not None:
            label_states = self.decide(findings)
        self.last_findings, self.last_states = findings, label_states
        prefix = self.prefix(visual, label_states,
                             findings.where if findings is not None else None,
                             findings.sites if findings is not None else None)
        bos = torch.full((visual.shape[0], 1), self.special_ids["bos"], device=self.device)
        kwargs: dict[str, Any] = {}
        if self.config.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.config.repetition_penalty
        if self.config.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.config.no_repeat_ngram_size
        self._text_bias = self.text_bias(
            label_states, findings.sites if findings is not None else None)
        try:  # BOS and every generated token get the bias (the embedding's hook)
            embeds = torch.cat([prefix, self.language_model.get_input_embeddings()(bos)], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            if num_beams > 1:
                kwargs["num_return_sequences"] = num_beams
                if self._text_bias is not None:  # generate repeats each study per beam
                    self._text_bias = self._text_bias.repeat_interleave(num_beams, 0)
            return self.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=num_beams,
                max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                eos_token_id=self.special_ids["eos"], pad_token_id=self.special_ids["pad"],
                bos_token_id=self.special_ids["bos"], **kwargs)
        finally:
            self._text_bias = None


def build_language_model(config: MSVLMConfig, vocab_size: int,
                         special_ids: dict[str, int]) -> Any:
    """A causal LM from ``lm_path`` (local files only) or a small Llama from ``lm_config``;
    with ``lora`` set, wrapped by peft so only the adapters train."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    lm: Any
    if config.lm_path:
        lm = AutoModelForCausalLM.from_pretrained(config.lm_path, local_files_only=True)
        if lm.get_input_embeddings().weight.shape[0] < vocab_size:
            lm.resize_token_embeddings(vocab_size)
    else:
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, bos_token_id=special_ids["bos"],
            eos_token_id=special_ids["eos"], pad_token_id=special_ids["pad"],
            tie_word_embeddings=True, **config.lm_config))
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = dict(config.lora)
        lm = get_peft_model(lm, LoraConfig(
            r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
            task_type="CAUSAL_LM"))
    return lm
