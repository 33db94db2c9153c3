"""What a configuration costs before anything is allocated: parameter counts (built on the
``meta`` device) and an estimate of the GPU memory of the report-generation step.

Activation memory of a transformer layer without recomputation, 16-bit activations, after
Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models"):
``s * b * h * 34 + 5 * a * s^2 * b`` bytes for sequence ``s``, batch ``b``, width ``h`` and ``a``
heads. With activation checkpointing only each layer's input (``2 * s * b * h``) stays, plus one
layer's activations during the recomputation.
"""

from __future__ import annotations

from typing import Any

import torch

from models.msvlm import MSVLM, SITE_WORDS, MSVLMConfig

GIB = 2**30


def meta_model(config: MSVLMConfig, vocab_size: int = 32000) -> MSVLM:
    """The whole model on the ``meta`` device: shapes and counts, no memory, no weights (a
    ``lm_path`` is replaced by the same shape's ``lm_config``)."""
    values = config.to_dict()
    values.update(lm_path=None, vision_path=None)
    if values["finding_sites"] and not values["finding_site_words"]:  # shapes only: any ids
        values["finding_site_words"] = {w: [0] for w in SITE_WORDS}
    with torch.device("meta"):
        return MSVLM(MSVLMConfig.from_dict(values), vocab_size,
                     {"pad": 0, "bos": 1, "eos": 2})


def parameter_counts(model: MSVLM) -> dict[str, int]:
    parts = {"vision_tower": model.vision_tower, "z_former": model.z_former,
             "resampler": model.resampler, "projector": model.multi_modal_projector,
             "language_model": model.language_model}
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
    counts["trainable_in_finetune"] = sum(p.numel() for n, p in model.language_model
                                          .named_parameters() if "lora_" in n) + counts[
        "resampler"] + counts["projector"] + counts["z_former"]
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def layer_activations(s: int, b: int, h: int, a: int) -> int:
    """Bytes of one transformer layer's saved activations (16-bit, no recomputation)."""
    return s * b * h * 34 + 5 * a * s * s * b


def finetune_memory(config: MSVLMConfig, slices: int = 240, text_tokens: int = 512,
                    batch: int = 1, checkpointing: bool = True) -> dict[str, Any]:
    """GiB for one finetune step on one GPU: bf16 weights, LoRA + trainable parts in fp32 with
    AdamW states, and the activations of the Z-former and the LM (the vision tower is frozen by
    then: slice embeddings come from the cache)."""
    model = meta_model(config)
    counts = parameter_counts(model)
    lm = config.lm_config
    h, layers, heads = lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"]
    s_lm = config.num_queries + len(config.labels) + text_tokens
    s_z = slices + config.z_global_tokens
    z_act = config.z_layers * layer_activations(s_z, batch, config.z_hidden, config.z_heads)
    if checkpointing:
        lm_act = layers * 2 * s_lm * batch * h + layer_activations(s_lm, batch, h, heads)
    else:
        lm_act = layers * layer_activations(s_lm, batch, h, heads)
    logits = s_lm * batch * (lm.get("vocab_size", 32000)) * 4  # fp32 logits for the loss
    weights = counts["total"] * 2
    trainable = counts["trainable_in_finetune"] * (4 + 4 + 8)  # fp32 master, grad, Adam
    total = weights + trainable + z_act + lm_act + logits
    return {"weights_gib": weights / GIB, "trainable_gib": trainable / GIB,
            "z_former_activations_gib": z_act / GIB, "lm_activations_gib": lm_act / GIB,
            "logits_gib": logits / GIB, "total_gib": total / GIB, "sequence": s_lm,
            "batch": batch, "checkpointing": checkpointing}
