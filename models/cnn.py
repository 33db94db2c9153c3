"""A convolutional slice encoder for CPU budgets, behind the same interface as the ViT.

Early convolutions train far faster than a plain ViT from scratch, and the pooling keeps what a
mean over 16-px patches loses: a 6 mm nodule is a few pixels, so besides the mean of the last
feature map every slice carries its spatial maximum, over the whole slice and over each half
(image columns run towards the patient's left, so the halves keep laterality).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, 1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout), cout), nn.GELU())


class ConvSliceEncoder(nn.Module):
    """``(S, C, H, W)`` -> ``(S, embed_dim)``: a stride-2 stem, then per width in ``channels`` a
    stride-2 and a stride-1 convolution, then mean and max pooling projected to ``embed_dim``.

    GroupNorm, not BatchNorm: a slice's embedding never depends on which other slices share its
    batch, so embeddings computed with and without gradients agree. Without normalisation and
    with PyTorch's default initialisation the activations shrink layer by layer and every
    slice's embedding ends up close to the projection's bias (measured: the loss stays at
    chance).
    """

    def __init__(self, in_channels: int, channels: list[int], embed_dim: int) -> None:
        super().__init__()
        if not channels:
            raise ValueError("Invalid 'cnn_channels' - at least one width")
        layers: list[nn.Module] = [_conv(in_channels, channels[0], 2)]
        width = channels[0]
        for c in channels[1:]:
            layers += [_conv(width, c, 2), _conv(c, c, 1)]
            width = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(4 * width, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.features(pixels)  # (S, C, h, w)
        half = f.shape[-1] // 2
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3)),
                            f[..., :half].amax(dim=(2, 3)), f[..., half:].amax(dim=(2, 3))],
                           dim=1)  # (S, 4C)
        return self.proj(pooled)  # (S, D)
