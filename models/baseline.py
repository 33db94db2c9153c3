"""The 3D sub-volume patch baseline (CT-CLIP / M3D style) behind the vision-encoder interface.

The volume is resampled to a fixed depth, cut into 3D patches that span several slices, and a
ViT runs over all patches at once; tokens are pooled per slab of ``patch_depth`` slices, so the
Z-former, resampler and language model downstream are exactly MS-VLM's. What changes is the
claim under test: a small finding inside one slice is averaged with its neighbours in a patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Patch3DEncoder(nn.Module):
    """Volumetric encoder: ``(S, C, H, W)`` -> ``(depth // patch_depth, D)`` slab embeddings
    (``MSVLM.encode_slices`` gives each slice its slab's embedding).

    Parameters
    ----------
    image_size, patch_size : in-plane input size and patch size
    depth, patch_depth : resampled depth and slices per patch
    channels, hidden, layers, heads, mlp : the ViT
    """

    volumetric = True

    def __init__(self, image_size: int = 64, patch_size: int = 8, depth: int = 32,
                 patch_depth: int = 4, channels: int = 3, hidden: int = 64, layers: int = 2,
                 heads: int = 2, mlp: int = 128) -> None:
        super().__init__()
        if image_size % patch_size or depth % patch_depth:
            raise ValueError("Invalid patch sizes - image_size and depth must be multiples of "
                             "patch_size and patch_depth")
        self.depth, self.patch_depth = depth, patch_depth
        self.grid = (depth // patch_depth, image_size // patch_size, image_size // patch_size)
        self.embed_dim = hidden
        self.patch = nn.Conv3d(channels, hidden, (patch_depth, patch_size, patch_size),
                               stride=(patch_depth, patch_size, patch_size))
        n = self.grid[0] * self.grid[1] * self.grid[2]
        self.position = nn.Parameter(torch.randn(1, n, hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, mlp, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Linear(hidden, channels * patch_depth * patch_size * patch_size)
        self.patch_size = patch_size

    def slab_of_slices(self, num_slices: int) -> torch.Tensor:
        """For each original slice ``(S,)`` the slab its resampled position falls in, so each
        slice carries its slab's embedding (the Z-former, the finding head's attention and the
        key slices then work per slice, as for the slice encoders)."""
        position = torch.linspace(0, self.depth - 1, num_slices)  # align_corners resampling
        return (position / self.patch_depth).floor().long().clamp_max(self.grid[0] - 1)

    def _resample(self, volume: torch.Tensor) -> torch.Tensor:
        x = volume.permute(1, 0, 2, 3)[None]  # (1, C, S, H, W)
        return F.interpolate(x, size=(self.depth, *volume.shape[-2:]), mode="trilinear",
                             align_corners=True)  # (1, C, depth, H, W)

    def masked_loss(self, volume: torch.Tensor, generator: torch.Generator,
                    mask_ratio: float = 0.6) -> torch.Tensor:
        """Self-supervised pretraining (SimMIM-style): hide patches, regress their voxels (L1)."""
        x = self._resample(volume)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (1, N, D)
        hide = torch.rand(tokens.shape[1], generator=generator,
                          device=tokens.device) < mask_ratio  # (N,)
        hide[0] = True  # at least one hidden patch
        tokens = torch.where(hide[None, :, None], self.mask_token.expand_as(tokens), tokens)
        pred = self.decoder(self.norm(self.encoder(tokens + self.position)))[0]  # (N, P)
        C, p = x.shape[1], self.patch_size
        d, h, w = self.grid
        target = x[0].reshape(C, d, self.patch_depth, h, p, w, p).permute(1, 3, 5, 0, 2, 4, 6)
        target = target.reshape(d * h * w, -1)  # (N, P), in the order of the conv's tokens
        return (pred - target).abs()[hide].mean()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = self._resample(volume)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (1, N, D)
        tokens = self.norm(self.encoder(tokens + self.position))
        d, h, w = self.grid
        return tokens.view(d, h * w, -1).mean(dim=1)  # (d, D) one embedding per slab
