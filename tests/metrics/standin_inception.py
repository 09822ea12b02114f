"""A stand-in for torch-fidelity's FeatureExtractorInceptionV3, which cannot be built here (torch-fidelity
imports torchvision, which does not install beside this machine's torch): the same interface (uint8
(B, 3, H, W) -> (pool, logits)) and a `Mixed_6d.branch1x1` module whose output is (B, 192, 17, 17), as
the real network's is at any input size. `pool_dim=2048, grid=17` give the real feature sizes; smaller
ones keep the Fréchet distances of a test fast (a 2048-d matrix square root takes most of a minute)."""

import torch
import torch.nn.functional as F
from torch import nn


class StandInInception(nn.Module):
    def __init__(self, pool_dim: int = 16, grid: int = 3, classes: int = 10):
        super().__init__()
        self.grid = grid
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Sequential(nn.Conv2d(3, 192, 1), nn.ReLU())
        self.pool = nn.Linear(192, pool_dim)
        self.fc = nn.Linear(pool_dim, classes, bias=False)

    def forward(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        grid = F.interpolate(images.float() / 255, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        pool = self.pool(self.Mixed_6d.branch1x1(grid).mean((2, 3))).relu()
        return pool, self.fc(pool)
