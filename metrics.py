"""metrics.py: FID, IS, KID, precision/recall and a memorization check for generated X-rays.

- FID (M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, arXiv:1706.08500):
  the Frechet distance of Gaussians fitted to the 2048-d pool3 features of TensorFlow's
  Inception-v3 of 2015-12-05 (C. Szegedy et al., "Rethinking the Inception Architecture for
  Computer Vision", CVPR 2016, arXiv:1512.00567), the network of the reference FID code. Written
  out below with the module names of pytorch-fid's weights file and its preprocessing, so the
  numbers are pytorch-fid's (tests/test_metrics.py checks it against pytorch-fid itself).
- IS (T. Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016, arXiv:1606.03498,
  Sec. 4); its classes are ImageNet's, so it means little on X-rays.
- KID (M. Binkowski, D. J. Sutherland, M. Arbel, A. Gretton, "Demystifying MMD GANs", ICLR 2018,
  arXiv:1801.01401): unbiased, the better choice for the small sets of medical imaging.
- Precision and recall (T. Kynkaanniemi, T. Karras, S. Laine, J. Lehtinen, T. Aila, "Improved
  Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019, arXiv:1904.06991):
  fidelity and diversity apart (mode collapse: high precision, low recall).
  IS, KID and precision/recall follow torch-fidelity's conventions.
- Memorization (`nn`): each fake's nearest training image, in features and in pixels, against
  how near real images the GAN never saw (--held-out) come to the training set. Fakes nearer than
  99% of those are near-copies (about 1% by chance). Writes OUT/nn_pairs.png, a row per closest
  fake: fake | nearest training image by features | by pixels.

    python metrics.py fid data/train/viral fakes/viral               # FID, with N and the network
    python metrics.py fid data/train/viral --save-stats viral.npz    # real statistics, once
    python metrics.py fid viral.npz fakes/viral                      # either side may be a .npz
    python metrics.py is fakes/viral                                 # Inception Score
    python metrics.py kid data/train/viral fakes/viral               # Kernel Inception Distance
    python metrics.py pr data/train/viral fakes/viral                # precision and recall, k = 3
    python metrics.py nn data/train/viral fakes/viral --held-out data/test/viral --out nn_viral

A folder (data/ from prep.py, fakes/ from a model script's --generate) is one distribution, e.g.
one class: its subfolders are not read. Every command takes --weights PATH, --device, --batch-size
and --json (one JSON object on stdout, the text on stderr). The weights, pytorch-fid's
pt_inception-2015-12-05-6726825d.pth (95 MB), are downloaded on first use into the torch hub cache,
checked against the SHA-256 prefix in the name; offline, fetch the file elsewhere and pass
--weights PATH (model scripts: --fid-weights PATH). Every result names its network:
"pt_inception-2015-12-05" for that file only (by SHA-256), else "custom weights <file>
sha256:<8 hex>"; .npz statistics carry the name, and an FID across two networks warns.

From Python (the model scripts' --eval-every):

    ev = metrics.Evaluator(real_uint8, weights=None, device="cuda")  # (N, C, H, W) or a folder
    ev.score(fake_uint8)  # {fid, is_mean, is_std, kid_mean, kid_std, n_real, n_fake, network}

Read every number with its N: FID is biased upwards at small N (FID_N ~ FID_inf + k/N; M. J. Chong,
D. Forsyth, "Effectively Unbiased FID and Inception Score and Where to Find Them", CVPR 2020,
arXiv:1911.07023) and comparable only at equal N; below 2048 images a warning says so.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.linalg import lapack
from scipy.special import logsumexp
from torchvision.utils import make_grid, save_image

NETWORK = "pt_inception-2015-12-05"    # the name reported for pytorch-fid's release weights only
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
RELEASE_SHA256 = "6726825d"            # the hash prefix in the release file's name
WEIGHTS_HINT = (f"pass --weights PATH (model scripts: --fid-weights PATH) with pytorch-fid's "
                f"weights file, downloaded where there is network from {FID_WEIGHTS_URL}")
MAKE_DATA_HINT = "make real data with `python prep.py kermany PATH` or `python prep.py synthetic`"
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's

INCEPTION_SIZE = 299      # Inception-v3's input side; every image is resized to it
BN_EPS = 1e-3             # TensorFlow's BatchNorm epsilon (PyTorch's default is 1e-5)
BATCH_SIZE = 50           # pytorch-fid's default; results do not depend on it on the CPU
FID_MIN_N = 2048          # below the feature dimension the covariance is singular and FID biased
SEED = 2020               # torch-fidelity's seed (IS shuffle, KID subsets): the same draws as it
IS_SPLITS = 10            # the OpenAI code of Salimans et al. 2016, and torch-fidelity
KID_SUBSETS = 100         # torch-fidelity, clean-fid and torchmetrics
KID_SUBSET_SIZE = 1000    # the same; capped at the smaller set's N
PR_K = 3                  # the k of Kynkaanniemi et al. 2019
COPY_QUANTILE = 0.01      # near-copy: nearer to a training image than 99% of the reference images
PIXEL_SIZE = 64           # pixel-space distances on 64 x 64 grayscale thumbnails
GRID_PAIRS, GRID_CELL = 16, 128  # rows of the closest-pairs picture, pixels per image in it
CHUNK_ROWS = 1024         # distance matrices in row blocks: 1024 x 10^4 float64 is 80 MB

# --- The network: TensorFlow's Inception-v3 of 2015-12-05, as FID uses it -------------------
# Module names are torchvision's inception_v3 (as in pytorch-fid's weights file), so
# load_state_dict is strict. Three differences to torchvision's ImageNet model change the
# numbers: average pools do not count the zero padding (TF), the last block's pool branch is a
# MAX pool (a quirk of the TF graph), and there are 1008 classes (1000 + 8 unused).

class BasicConv2d(nn.Module):
    """Conv (no bias: BatchNorm follows) -> BatchNorm(eps=1e-3) -> ReLU."""
    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def tf_avg_pool(x):
    """3x3 average pool, stride 1, that ignores the zero padding, as TensorFlow's does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 5x5 | double 3x3 | pool, concatenated."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)

class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by stride-2 convolutions and a max pool."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)

class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): expanded filter bank; pool "avg" for 7b, "max" for 7c (the TF graph)."""
    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

class FIDInceptionV3(nn.Module):
    """(B, 3, 299, 299) in [-1, 1] -> pool3 (B, 2048), logits (B, 1008) without the fc bias, as the
    original IS code and torch-fidelity read them. Fresh: random He-initialised weights (tests)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        for m in self.modules():  # He init keeps random-weight activations at a sane scale
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):                              # (B, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)                      # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                      # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                      # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)   # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                      # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)   # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))           # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                         # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                                         # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))                          # (B, 2048, 8, 8)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)               # (B, 2048)
        return pool3, pool3 @ self.fc.weight.T                       # (B, 1008), no bias

def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def load_inception(weights=None, device="cpu"):
    """weights: a file, or None: pytorch-fid's release file, downloaded once into the torch hub cache
    -> (FIDInceptionV3 in eval mode, channels_last, on `device`; its label for results). Files
    without BatchNorm's num_batches_tracked (472 keys: torch-fidelity's converter) load too."""
    path = Path(weights or Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1])
    if weights is None and path.exists() and not sha256_of(path).startswith(RELEASE_SHA256):
        raise UserError(f"{path} is damaged (its SHA-256 is not the release's) — delete it to download it again")
    try:
        if weights is None:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", check_hash=True,
                                                       weights_only=True)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        with torch.device("meta"):  # no random init of 24 M weights that are overwritten at once
            model = FIDInceptionV3()
        counters = {k: torch.tensor(0) for k in model.state_dict() if k.endswith("num_batches_tracked")}
        model.to_empty(device="cpu").load_state_dict({**counters, **state})  # strict: names and shapes
    except Exception as e:  # missing, offline, not a state dict, another network: one line for all
        reason = " ".join(str(e).split()).split(". ")[0][:160]
        raise UserError(f"cannot load the FID Inception weights from {weights or FID_WEIGHTS_URL} "
                        f"({type(e).__name__}: {reason}) — {WEIGHTS_HINT}")
    sha = sha256_of(path)
    network = NETWORK if sha.startswith(RELEASE_SHA256) else f"custom weights {path.name} sha256:{sha[:8]}"
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last), network

# --- Images -> features, as pytorch-fid prepares them ------------------------------------------

def preprocess(images):
    """uint8 (B, C, H, W), C in {1, 3} -> (B, 3, 299, 299) float32 in [-1, 1], as pytorch-fid:
    gray repeated to RGB (its Image.convert("RGB")), / 255, bilinear resize (align_corners=False,
    no antialias), 2x - 1. Repeating before the resize keeps the float32 values bit for bit."""
    x = images.expand(-1, 3, -1, -1).float().div(255)
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1

@contextlib.contextmanager
def tf32_off():
    """CUDA convolutions default to TF32 (~1e-3 relative error; FID moves as much): off while
    extracting features, then the caller's settings back. Nothing changes on the CPU."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

@torch.inference_mode()
def inception_features(model, images, batch_size=BATCH_SIZE):
    """uint8 tensor (N, C, H, W), C in {1, 3}, on any device, or a list of image files ->
    pool3 (N, 2048) and logits (N, 1008) as float32 numpy arrays. Files are decoded by threads
    and resized one by one (their sizes may differ); fp32 with channels_last, TF32 off."""
    if torch.is_tensor(images) and (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3)):
        raise ValueError(f"expected uint8 images (N, C, H, W) with C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)} — convert with ((x + 1) * 127.5).round().clamp(0, 255).byte()")
    device = next(model.parameters()).device
    pool3, logits = [], []
    with tf32_off(), ThreadPoolExecutor() as pool:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]  # uint8 goes to the device: 4x less to copy than float
            if torch.is_tensor(batch):
                x = preprocess(batch.to(device))
            else:
                x = torch.cat([preprocess(im[None].to(device)) for im in pool.map(read_image, batch)])
            p, lg = model(x.contiguous(memory_format=torch.channels_last))  # ~1.6x faster on CPU
            pool3.append(p.cpu())
            logits.append(lg.cpu())
    return torch.cat(pool3).numpy(), torch.cat(logits).numpy()

# --- The metrics, on feature arrays ----------------------------------------------------------

def feature_statistics(features):
    """(N, d) features -> mean (d,) and covariance (d, d), float64, as pytorch-fid (np.cov, ddof=1)."""
    act = np.asarray(features, dtype=np.float64)
    if len(act) < 2:
        raise UserError(f"a covariance needs at least 2 images, got {len(act)} — add images")
    return act.mean(axis=0), np.cov(act, rowvar=False)

def psd_factor(sigma):
    """R (d, r) with R R^T = sigma and r its numerical rank: pivoted Cholesky (LAPACK dpstrf) stops
    once the rest is rounding noise, so N < d images give r = N - 1 at ~d^2 r / 3 operations."""
    c, piv, rank, _ = lapack.dpstrf(sigma, lower=1)
    r = np.zeros((len(sigma), rank))
    r[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting (piv counts from 1)
    return r

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    With S1 = R1 R1^T and S2 = R2 R2^T, S1 S2 has the eigenvalues of C C^T for C = R1^T R2, so
    Tr((S1 S2)^(1/2)) is the sum of C's singular values. Exact for the singular covariances of
    N < 2048 images, where sqrtm(S1 @ S2) (pytorch-fid) takes square roots of ~2000 rounding-noise
    eigenvalues; otherwise equal to pytorch-fid's to ~1e-12 (tests/test_metrics.py), and faster.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    diff = mu1 - mu2
    c = psd_factor(sigma1).T @ psd_factor(sigma2)  # (r1, r2)
    tr_covmean = np.linalg.svd(c, compute_uv=False).sum() if c.size else 0.0
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def inception_score(logits, splits=IS_SPLITS, shuffle=True, seed=SEED):
    """exp(E_x KL(p(y|x) || p(y))) per split -> (mean, population std) over the splits, as
    torch-fidelity: contiguous splits after a shuffle (files listed class by class would make each
    split one class); shuffle=False gives the original OpenAI numbers. At most a split per image."""
    logits = np.asarray(logits, dtype=np.float64)
    n, splits = len(logits), min(splits, len(logits))
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)   # log p(y|x), (N, 1008)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - np.log(len(part))    # log p(y) in this split
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))

def kernel_inception_distance(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=SEED,
                              device="cpu"):
    """Unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3, over random subsets -> (mean, std, m). Each
    subset draws m = min(subset_size, N_real, N_fake) images without replacement, real then fake, as
    torch-fidelity (same seed: same subsets). Small negative values are normal for close sets."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise UserError(f"KID needs at least 2 images per set, got {len(real)} and {len(fake)} — add images")
    real, fake, rng = f64(real, device), f64(fake, device), np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        k_xx, k_yy, k_xy = [(a @ b.T / real.shape[1] + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        # unbiased: an image against itself (the diagonals of k_xx and k_yy) is left out
        mmd2 = ((k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k_xy.mean())
        mmds.append(mmd2.item())
    return float(np.mean(mmds)), float(np.std(mmds)), m

def f64(array, device):
    return torch.as_tensor(np.asarray(array), dtype=torch.float64, device=device)

def kth_nearest(query, ref, k=1):
    """(distance, index) of the k-th nearest row of ref for each row of query (k=1: the nearest)."""
    parts = [torch.cdist(q, ref).kthvalue(k, dim=1) for q in query.split(CHUNK_ROWS)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

def share_inside(points, centres, k):
    """Share of points inside at least one centre's ball, its radius the distance to the centre's
    k-th nearest other centre: the k-NN estimate of the centres' manifold."""
    radii = kth_nearest(centres, centres, k + 1)[0]  # k + 1: each centre is its own nearest
    inside = [(torch.cdist(p, centres) <= radii).any(dim=1) for p in points.split(CHUNK_ROWS)]
    return torch.cat(inside).double().mean().item()

def precision_recall(real, fake, k=PR_K, device="cpu"):
    """-> (precision: share of fakes inside the real manifold, recall: share of reals inside the
    fake manifold), as torch-fidelity. The paper uses VGG-16 features; these are pool3, so
    compare the values only with each other."""
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images per set, got "
                        f"{len(real)} and {len(fake)} — add images or lower --k")
    real, fake = f64(real, device), f64(fake, device)
    return share_inside(fake, real, k), share_inside(real, fake, k)

def memorization(train, fake, reference=None, quantile=COPY_QUANTILE, device="cpu"):
    """Each fake's nearest training image against real reference images' (None: leave-one-out on
    train), all (N, d) arrays in one space. A fake is a near-copy when nearer than the `quantile`
    of the reference distances; a generator that does not copy has about that share by chance.
    -> dict(dist, index, ref_dist, threshold, copies)."""
    train = f64(train, device)
    dist, index = (t.cpu().numpy() for t in kth_nearest(f64(fake, device), train))
    ref = train if reference is None else f64(reference, device)
    ref_dist = kth_nearest(ref, train, 1 if reference is not None else 2)[0].cpu().numpy()  # 2: not itself
    threshold = float(np.quantile(ref_dist, quantile))
    return dict(dist=dist, index=index, ref_dist=ref_dist, threshold=threshold, copies=dist <= threshold)

# --- Small helpers, the same in every script ---------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix: main() prints `error: <what> — <fix>` and exits with code 2."""

class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error:` line and exit code 2, like every other UserError."""

    def error(self, message):
        self.exit(2, f"error: {message} — see python {self.prog} --help\n")

def in_range(kind, low, high=math.inf):
    """argparse type: a kind (int or float) in [low, high), not nan; else a one-line error."""
    def number(text):  # a ValueError from kind() becomes argparse's "invalid number value"
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"{text!r} is not in [{low}, {high})")
        return kind(text)
    return number

def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device, said once; CUDA that is not there is a UserError."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r} — use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}, but there is no such CUDA device here — use --device cpu or auto")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}")
    return device

def warn(message):
    print(f"warning: {message}", file=sys.stderr)

def small_n_message(n_real, n_fake):
    return (f"FID from N_real={n_real}, N_fake={n_fake} (< {FID_MIN_N}) is biased upwards (about "
            "FID_inf + k/N) and comparable only at equal N; report N with it, or use KID")

# --- Data: image folders and statistics files ----------------------------------------------------

def list_images(folder):
    """The image files directly in `folder`, sorted (subfolders are other distributions)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder — pass a folder of images: a model script's "
                        f"--generate output, or real data ({MAKE_DATA_HINT})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        subfolders = sorted(d.name for d in folder.iterdir() if d.is_dir())
        raise UserError(f"no images directly in {folder} (subfolders: {', '.join(subfolders) or 'none'}) — "
                        "point at one folder of images, e.g. one class")
    return files

def read_image(path):
    """An image file -> uint8 (C, H, W). L and RGB stay; other modes (palette, RGBA, 16-bit) go
    through Image.convert("RGB"), as in pytorch-fid."""
    try:
        with Image.open(path) as img:
            a = np.array(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise UserError(f"cannot read image {path} ({type(e).__name__}) — remove or replace the file")
    return torch.from_numpy(a)[None] if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)

def thumbnails(files, size=PIXEL_SIZE):
    """Image files -> (N, 1, size, size) float64 grayscale in [0, 1]; antialiased, so that a
    thumbnail averages pixels instead of skipping them."""
    return torch.cat([F.interpolate(read_image(f)[None].double().mean(1, keepdim=True) / 255, size=(size, size),
                                    mode="bilinear", antialias=True) for f in files])

def save_stats(path, mu, sigma, n, network):
    """mu and sigma as pytorch-fid's --save-stats writes them (either program reads the other's
    file), plus N and the network's label, which pytorch-fid ignores. Atomic: tmp + rename."""
    with open(f"{path}.tmp", "wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma, n=n, network=network)
    os.replace(f"{path}.tmp", path)

def load_stats(path):
    """-> (mu, sigma, N or None, network label or None): ours, or pytorch-fid's (without either)."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else None
            network = str(f["network"]) if "network" in f.files else None
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot read statistics {path} ({type(e).__name__}) — make it with "
                        "`python metrics.py fid FOLDER --save-stats FILE.npz`")
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise UserError(f"{path} holds {mu.shape[0]}-d statistics, not pool3's 2048 — make it with --save-stats")
    return mu, sigma, n, network

# --- Python API for the model scripts ---------------------------------------------------------

class Evaluator:
    """FID, IS and KID of generated images against a fixed real set, for --eval-every. real: uint8
    (N, C, H, W), C in {1, 3}, or a folder of images. The network loads here, so missing weights
    raise UserError before training starts; the real features are computed once."""
    def __init__(self, real, weights=None, device="cpu", batch_size=BATCH_SIZE):
        self.device, self.batch_size = torch.device(device), batch_size
        self.model, self.network = load_inception(weights, self.device)
        images = real if torch.is_tensor(real) else list_images(real)
        self.real = inception_features(self.model, images, batch_size)[0]
        self.n_real = len(self.real)
        self.mu, self.sigma = feature_statistics(self.real)

    def score(self, fake):
        """fake: uint8 tensor (N, C, H, W) -> dict of plain numbers (see the module docstring)."""
        pool3, logits = inception_features(self.model, fake, self.batch_size)
        if min(self.n_real, len(pool3)) < FID_MIN_N:
            warnings.warn(small_n_message(self.n_real, len(pool3)), stacklevel=2)
        kid_mean, kid_std, _ = kernel_inception_distance(self.real, pool3, device=self.device)
        is_mean, is_std = inception_score(logits)
        return dict(fid=frechet_distance(self.mu, self.sigma, *feature_statistics(pool3)), is_mean=is_mean,
                    is_std=is_std, kid_mean=kid_mean, kid_std=kid_std, n_real=self.n_real, n_fake=len(pool3),
                    network=self.network)

# --- Commands ------------------------------------------------------------------------------------

def features_of(args, *folders):
    """-> (each folder's files, their (pool3, logits), the network's label, its device). Every folder
    is listed before the network loads, so a wrong path fails before the 95 MB load."""
    files = [list_images(f) for f in folders]
    model, network = load_inception(args.weights, pick_device(args.device))
    return files, [inception_features(model, f, args.batch_size) for f in files], network, model.fc.weight.device

def cmd_fid(args):
    if args.fake is None and not args.save_stats:
        raise UserError("fid needs REAL and FAKE — pass both, or --save-stats FILE.npz to save REAL's statistics")
    if args.save_stats and args.real.endswith(".npz"):
        raise UserError(f"--save-stats needs REAL to be a folder of images, not {args.real} — pass the folder")
    sides = [p for p in (args.real, args.fake) if p]
    stats = {p: load_stats(p) for p in sides if p.endswith(".npz")}   # (mu, sigma, N, network)
    folders = [p for p in sides if p not in stats]
    if folders:
        _, features, network, _ = features_of(args, *folders)
        stats.update({p: (*feature_statistics(f[0]), len(f[0]), network) for p, f in zip(folders, features)})
    mu1, s1, n1, net1 = stats[args.real]
    result = {"metric": "fid", "n_real": n1, "network": net1}
    if args.save_stats:
        save_stats(args.save_stats, mu1, s1, n1, net1)
        print(f"saved the statistics of {n1} images of {args.real} ({net1}) to {args.save_stats}")
    if args.fake:
        mu2, s2, n2, net2 = stats[args.fake]
        net1, net2 = net1 or NETWORK, net2 or NETWORK  # a pytorch-fid .npz names none: its release file
        if net1 != net2:
            warn(f"REAL's features come from {net1} but FAKE's from {net2}: an FID between different "
                 "feature networks is meaningless — compute both with the same --weights")
        if n1 is None or n2 is None or min(n1, n2) < FID_MIN_N:
            warn(small_n_message(n1 or "unknown", n2 or "unknown"))
        fid = frechet_distance(mu1, s1, mu2, s2)
        result.update(fid=fid, n_fake=n2, network=net1 if net1 == net2 else f"{net1} (REAL) vs {net2} (FAKE)")
        print(f"FID {fid:.4f}  (N_real {n1 or 'unknown'}, N_fake {n2 or 'unknown'}; {result['network']} pool3)")
    return result

def cmd_is(args):
    (files,), [(_, logits)], network, _ = features_of(args, args.fake)
    mean, std = inception_score(logits, splits=args.splits)
    n, splits = len(files), min(args.splits, len(files))
    if n < FID_MIN_N:
        warn(f"IS from N={n} in {splits} splits: IS cannot exceed the images per split, so it is biased "
             "downwards at small N and comparable only at equal N and splits")
    print(f"IS {mean:.4f} ± {std:.4f}  (N {n}, {splits} splits; {network} logits)")
    return {"metric": "is", "is_mean": mean, "is_std": std, "n_fake": n, "splits": splits, "network": network}

def cmd_kid(args):
    _, [(real, _), (fake, _)], network, device = features_of(args, args.real, args.fake)
    mean, std, m = kernel_inception_distance(real, fake, args.subsets, args.subset_size, device=device)
    print(f"KID {mean:.6f} ± {std:.6f}  (x1000: {1000 * mean:.3f}; N_real {len(real)}, N_fake {len(fake)}, "
          f"{args.subsets} subsets of {m}; {network} pool3)")
    return {"metric": "kid", "kid_mean": mean, "kid_std": std, "subset_size": m, "subsets": args.subsets,
            "n_real": len(real), "n_fake": len(fake), "network": network}

def cmd_pr(args):
    _, [(real, _), (fake, _)], network, device = features_of(args, args.real, args.fake)
    precision, recall = precision_recall(real, fake, args.k, device)
    print(f"precision {precision:.4f}  recall {recall:.4f}  (k={args.k}; N_real {len(real)}, "
          f"N_fake {len(fake)}; {network} pool3)")
    return {"metric": "pr", "precision": precision, "recall": recall, "k": args.k, "n_real": len(real),
            "n_fake": len(fake), "network": network}

def cmd_nn(args):
    files, features, network, device = features_of(args, *[f for f in (args.train, args.fake, args.held_out) if f])
    (train, fake), held = files[:2], args.held_out is not None
    result = {"metric": "nn", "n_train": len(train), "n_fake": len(fake), "network": network,
              "reference": "held-out images" if held else "training images, leave-one-out"}
    print(f"{len(fake)} fakes, {len(train)} training images; reference: {result['reference']}")
    found = {}
    for space, x in (("feature", [pool3 for pool3, _ in features]),
                     ("pixel", [thumbnails(f).flatten(1) / PIXEL_SIZE for f in files])):  # / 64: RMS distances
        r = found[space] = memorization(x[0], x[1], x[2] if held else None, device=device)
        result[space] = {"fake_median": float(np.median(r["dist"])), "ref_median": float(np.median(r["ref_dist"])),
                         "threshold": r["threshold"], "near_copies": int(r["copies"].sum()),
                         "share": float(r["copies"].mean())}
        print(f"{space:7}: median distance to the nearest training image {result[space]['fake_median']:.4g} "
              f"(fakes) vs {result[space]['ref_median']:.4g} (reference); near-copies: {r['copies'].sum()}")
    feature, pixel = found["feature"], found["pixel"]
    both = feature["copies"] & pixel["copies"]
    result.update(near_copies_both=int(both.sum()), share_both=float(both.mean()))
    print(f"near-copies in both spaces: {both.sum()} of {len(fake)} (about {100 * COPY_QUANTILE:g}% in each by chance)")
    order = np.argsort(feature["dist"] / max(feature["threshold"], 1e-12))[:GRID_PAIRS]  # most copy-like first
    result["closest_pairs"] = [{"fake": str(fake[i]), "train_feature": str(train[feature["index"][i]]),
                                "feature_dist": float(feature["dist"][i]), "train_pixel": str(train[pixel["index"][i]]),
                                "pixel_rms": float(pixel["dist"][i]), "near_copy": bool(both[i])} for i in order]
    result["grid"] = str(Path(args.out) / "nn_pairs.png")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = thumbnails([p[k] for p in result["closest_pairs"] for k in ("fake", "train_feature", "train_pixel")],
                       GRID_CELL)
    save_image(make_grid(cells.float(), nrow=3, padding=4, pad_value=1.0), result["grid"])
    print(f"{result['grid']}: the {len(order)} most copy-like fakes, a row each: fake | nearest training "
          "image by features | by pixels (--json lists them)")
    return result

def main(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", "--fid-weights", help="local Inception weights file; default: download once")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    common.add_argument("--batch-size", type=in_range(int, 1), default=BATCH_SIZE, help="images per forward pass")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout (text: stderr)")
    pair = argparse.ArgumentParser(add_help=False, parents=[common])
    pair.add_argument("real", help="folder of real images")
    pair.add_argument("fake", help="folder of generated images")
    p = Parser(prog="metrics.py", description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("fid", parents=[common], formatter_class=fmt, help="Frechet Inception Distance")
    s.add_argument("real", help="folder of real images, or a .npz of statistics")
    s.add_argument("fake", nargs="?", help="folder of generated images, or a .npz")
    s.add_argument("--save-stats", metavar="FILE.npz", help="write REAL's mu and sigma (pytorch-fid's format)")
    s.set_defaults(run=cmd_fid)
    s = sub.add_parser("is", parents=[common], formatter_class=fmt, help="Inception Score")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--splits", type=in_range(int, 1), default=IS_SPLITS, help="number of splits")
    s.set_defaults(run=cmd_is)
    s = sub.add_parser("kid", parents=[pair], formatter_class=fmt, help="Kernel Inception Distance")
    s.add_argument("--subsets", type=in_range(int, 1), default=KID_SUBSETS, help="random subsets")
    s.add_argument("--subset-size", type=in_range(int, 2), default=KID_SUBSET_SIZE, help="images per subset (capped at N)")
    s.set_defaults(run=cmd_kid)
    s = sub.add_parser("pr", parents=[pair], formatter_class=fmt, help="precision and recall (k-NN)")
    s.add_argument("--k", type=in_range(int, 1), default=PR_K, help="k of the k-NN radius")
    s.set_defaults(run=cmd_pr)
    s = sub.add_parser("nn", parents=[common], formatter_class=fmt, help="memorization: nearest training images")
    s.add_argument("train", help="folder of the training images the GAN saw")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--held-out", metavar="DIR", help="real images the GAN never saw; none: leave-one-out on TRAIN")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for nn_pairs.png")
    s.set_defaults(run=cmd_nn)
    args = p.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            result = args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
