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


# HU bin edges: air, emphysema, aerated lung, ground glass, fat, fluid, soft tissue, enhanced
# blood, calcium and bone, metal (a CT's materials, not tuned to any finding)
HU_EDGES = (-1024.0, -990.0, -960.0, -920.0, -880.0, -840.0, -800.0, -700.0, -600.0, -500.0,
            -400.0, -300.0, -200.0, -100.0, -50.0, -20.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0,
            60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0, 700.0, 1000.0, 1500.0)


class PyramidSliceEncoder(nn.Module):
    """A slice encoder in two parts, for CPU budgets.

    ``lower`` (fixed, no parameters, cacheable): per slice, the share of pixels in each HU bin
    within each cell of a ``grid x grid`` layout, at full resolution and after 2x2 and 4x4
    averaging. Counting keeps a small spot: a 6 mm nodule is a few pixels in a soft-tissue bin of
    a lung cell, which a mean over a 16-px patch loses; averaging tells a blob, which survives
    it, from a vessel or a septal line, which does not. ``upper`` (trained with the finding
    loss): an MLP from those shares to the embedding. MR is binned uniformly on the view's
    percentile-scaled intensities.
    """

    raw_input = True  # encode_slices hands it the view's own values, not windowed channels

    def __init__(self, embed_dim: int, grid: int = 3, hidden: int = 256) -> None:
        super().__init__()
        self.grid = grid
        self.scales = (1, 2, 4)
        self.register_buffer("edges", torch.tensor(HU_EDGES[1:]), persistent=False)
        bins = len(HU_EDGES)
        self.in_dim = len(self.scales) * grid * grid * bins
        self.upper = nn.Sequential(nn.Linear(self.in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, embed_dim))
        self.embed_dim = embed_dim

    @torch.no_grad()
    def lower(self, values: torch.Tensor, modality: str = "CT") -> torch.Tensor:
        """``(S, H, W)`` HU (or MR intensities) -> ``(S, in_dim)`` bin shares."""
        x = values.float()
        if modality == "CT":
            edges = self.edges.to(x.device)
        else:
            lo, hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 1_000_000)],
                                    torch.tensor([0.005, 0.995], device=x.device))
            x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
            edges = torch.linspace(0, 1, len(HU_EDGES) + 1, device=x.device)[1:-1]
        S = x.shape[0]
        bins = len(HU_EDGES)
        out = []
        for k in self.scales:
            y = x if k == 1 else nn.functional.avg_pool2d(x[:, None], k)[:, 0]
            H, W = y.shape[-2:]
            rows = torch.clamp(torch.arange(H, device=x.device) * self.grid // H, max=self.grid - 1)
            cols = torch.clamp(torch.arange(W, device=x.device) * self.grid // W, max=self.grid - 1)
            cell = (rows[:, None] * self.grid + cols[None, :]).flatten()  # (H*W,)
            b = torch.bucketize(y.reshape(S, -1), edges)  # (S, H*W) in [0, bins)
            index = cell[None, :] * bins + b
            counts = torch.zeros(S, self.grid * self.grid * bins, device=x.device)
            counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
            per_cell = torch.bincount(cell, minlength=self.grid * self.grid).float()
            out.append(counts / per_cell.repeat_interleave(bins)[None, :])
        return torch.cat(out, dim=1)  # (S, in_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # square-root shares: a few pixels of a rare material still move the input
        return self.upper(features.clamp_min(0).sqrt())
