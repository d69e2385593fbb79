"""The judge shared by tests/evidence_dcgan.py and tests/evidence_cyclegan.py: a small CNN trained on
the synthetic phantoms, whose 64 pooled features stand in for the Inception network (a
random-weights Inception would give meaningless numbers offline), and FID/KID on those features
with metrics.py's functions (tested against pytorch-fid and torch-fidelity in test_metrics.py).
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402

KID_SUBSETS, KID_SUBSET_SIZE = 50, 100   # subsets of up to 100 images: the sets here are small


class SmallCNN(nn.Module):
    """(B, 1, S, S) -> class logits; features() gives the 64 globally pooled channels."""

    def __init__(self, n_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),   # (B, 64, S/4, S/4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten())                           # (B, 64)
        self.head = nn.Linear(64, n_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def to_float(images_uint8):
    return images_uint8.float() / 127.5 - 1


def train_classifier(x, y, test_x, test_y, n_classes, epochs, seed=0):
    """-> (SmallCNN in eval mode, test accuracy). x, test_x: uint8 (N, 1, S, S); y: class indices."""
    torch.manual_seed(seed)
    net = SmallCNN(n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(to_float(x[idx])), y[idx]).backward()
            opt.step()
    # Batch-norm statistics of the final weights over the whole train split: the running averages
    # of the last steps can be far off (seen: test accuracy at chance in eval mode, 0.99 in train).
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                  # a plain average over the batches below
    with torch.no_grad():
        for idx in torch.arange(len(x)).split(64):
            net(to_float(x[idx]))
    net.eval()
    with torch.no_grad():
        acc = (net(to_float(test_x)).argmax(1) == test_y).float().mean().item()
    return net, acc


def kid(a, b):
    """KID of two (N, d) float64 arrays -> (mean, std) over KID_SUBSETS subsets."""
    mean, std, _ = metrics.kernel_inception_distance(a, b, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
    return mean, std


def fid(a, b):
    """Fréchet distance of Gaussians fitted to two (N, d) feature arrays."""
    return metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
