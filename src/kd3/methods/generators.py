"""Image generators for the data-free baselines.

``DAFLGenerator`` is the generator of DAFL (Chen et al., ICCV 2019), as in the authors' released
training script (huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL):
linear -> BN -> ×2 upsample -> conv 3×3 -> BN -> LeakyReLU(0.2) -> ×2 upsample -> conv 3×3 -> BN ->
LeakyReLU(0.2) -> conv 3×3 to the image channels -> tanh -> output mapping.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kd3.data.augment import Normalizer

OUTPUT_MAPPINGS = ("batchnorm", "pixels")


class DAFLGenerator(nn.Module):
    """z (N×latent_dim) -> an image batch N×C×H×W in the teacher's normalised input space.

    ``output`` says how the tanh output reaches that space:

    - ``"batchnorm"`` (DAFL's released code): an affine-free BatchNorm after the tanh, so each
      channel has zero mean and unit variance over the batch, which is what standardised real
      inputs look like. Values are not confined to the range real images can take.
    - ``"pixels"``: tanh in [-1, 1] is read as pixels p = (t + 1) / 2 in [0, 1] and standardised
      with the teacher's own ``Normalizer``; outputs are then always valid images.

    The BatchNorm layers inside the conv stack use eps = 0.8 as in the released code (there the
    second positional argument of ``BatchNorm2d`` is eps, a trait inherited from PyTorch-GAN);
    kept for fidelity. Sizes that are not multiples of 4 are handled by making the second
    upsampling go straight to H×W.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 100, width: int = 128,
                 output: str = "batchnorm", normalize: Normalizer | None = None):
        super().__init__()
        if output not in OUTPUT_MAPPINGS:
            raise ValueError(f"generator output={output!r}; valid: {', '.join(OUTPUT_MAPPINGS)}")
        if output == "pixels" and normalize is None:
            raise ValueError("generator output='pixels' needs the teacher's Normalizer")
        channels, height, width_px = image_shape
        self.image_shape = (channels, height, width_px)
        self.latent_dim = latent_dim
        self.width = width
        self.output = output
        self.init_size = (math.ceil(height / 4), math.ceil(width_px / 4))
        self.l1 = nn.Linear(latent_dim, width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=1, padding=1),
            nn.BatchNorm2d(width, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(width // 2, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
        )
        self.out_bn = nn.BatchNorm2d(channels, affine=False) if output == "batchnorm" else None
        if normalize is not None:
            self.register_buffer("pixel_mean", normalize.mean.clone().view(1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", normalize.std.clone().view(1, -1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _, height, width_px = self.image_shape
        h0, w0 = self.init_size
        out = self.l1(z).view(z.shape[0], self.width, h0, w0)
        out = self.bn0(out)
        out = F.interpolate(out, size=(2 * h0, 2 * w0), mode="nearest")
        out = self.block1(out)
        out = F.interpolate(out, size=(height, width_px), mode="nearest")
        out = self.block2(out)
        if self.out_bn is not None:
            return self.out_bn(out)
        return ((out + 1) / 2 - self.pixel_mean) / self.pixel_std
