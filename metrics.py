"""metrics.py: FID, IS, KID, precision/recall and a memorization check for generated X-rays.

Every number here is the standard one, computed by code you can read in this file:

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the 2048-d "pool3"
  features of the TensorFlow Inception-v3 of 2015-12-05, the network every published FID uses.
  The network is written out below with the module names of pytorch-fid's weights file, and the
  images are prepared exactly as pytorch-fid prepares them, so the numbers are pytorch-fid's
  (tests/test_metrics.py checks this against pytorch-fid itself).
- IS (Salimans et al. 2016) and KID (Binkowski et al. 2018) with torch-fidelity's conventions,
  on the features above: equal to torch-fidelity's on the same features, but not to its
  end-to-end numbers, which resize like TF1 and scale by (x - 128) / 128 (slightly other features).
- Precision and recall for generative models (Kynkaanniemi et al. 2019, k = 3): fidelity and
  diversity separately, which a single FID hides (a mode-collapsed GAN has high precision and low
  recall).
- A memorization check: for each generated image, its nearest training image in feature space
  and in pixel space, compared with how close new real images get to the training set.

Commands (folders are read non-recursively: point at one class, e.g. out/viral):

    python metrics.py fid data/train/viral out/viral              # FID (+ N, network)
    python metrics.py fid data/train/viral --save-stats viral.npz  # real statistics, once
    python metrics.py fid viral.npz out/viral                      # REAL may be a .npz
    python metrics.py is out/viral                                 # Inception Score
    python metrics.py kid data/train/viral out/viral               # Kernel Inception Distance
    python metrics.py pr data/train/viral out/viral                # precision / recall, k=3
    python metrics.py nn data/train/viral out/viral --held-out data/test/viral --grid nn.png
    (every command: --batch-size --device --weights --json --recursive, see --help)

The Inception weights (pt_inception-2015-12-05-6726825d.pth, 95 MB) are downloaded on first use
from pytorch-fid's release into the torch hub cache (~/.cache/torch/hub/checkpoints) and checked
against the SHA-256 prefix in their name. Offline, download the file elsewhere and pass
`--weights PATH` (model scripts: `--fid-weights PATH`) or set FID_WEIGHTS=PATH.

From Python (what the model scripts do with --eval-every):

    ev = metrics.Evaluator(real_uint8, weights=None, device="cuda")   # real features once
    ev.score(fake_uint8)  # {'fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std', 'n_real', ...}

Every result names its feature network: "pt_inception-2015-12-05" only when the weights file is
pytorch-fid's release file (by its SHA-256), else "custom weights <file> sha256:<8 hex>"; .npz
statistics carry the same label, and an FID between two different networks warns.

Read the numbers with their N: FID is biased upwards at small N (FID_N ~ FID_inf + k/N, Chong &
Forsyth 2020) and only comparable at equal N; below 2048 images a warning says so. KID is
unbiased and the better choice for the small sets of medical imaging.
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
from PIL import Image, UnidentifiedImageError
from scipy.linalg import lapack
from scipy.special import logsumexp

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------
NETWORK = "pt_inception-2015-12-05"  # reported next to every number, for the release file only
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the "-6726825d" in the name; torch.hub checks it
WEIGHTS_ENV = "FID_WEIGHTS"             # environment variable for a local weights file
WEIGHTS_HINT = (f"download {FID_WEIGHTS_URL} where there is network and pass --weights PATH "
                f"(model scripts: --fid-weights PATH) or set {WEIGHTS_ENV}=PATH")

INCEPTION_SIZE = 299      # input size of Inception-v3; every image is resized to it
POOL3_DIM = 2048          # FID/KID/PR features: the global average pool before fc
NUM_LOGITS = 1008         # the TF graph has 1008 classes (1000 ImageNet + 8 unused)
BN_EPS = 1e-3             # TensorFlow's BatchNorm epsilon (PyTorch's default is 1e-5)

FID_MIN_N = 2048          # below this the covariance is rank-deficient and FID strongly biased
IS_SPLITS = 10            # OpenAI / torch-fidelity
IS_SHUFFLE_SEED = 2020    # torch-fidelity's rng_seed: shuffle before splitting (see inception_score)
KID_SUBSETS = 100         # torch-fidelity, clean-fid, torchmetrics
KID_SUBSET_SIZE = 1000    # capped at the smaller set's N
KID_SEED = 2020           # torch-fidelity's rng_seed, same draw order
PR_K = 3                  # Kynkaanniemi et al. 2019, Sec. 3: k = 3
COPY_QUANTILE = 0.01      # near-copy: closer to a training image than 99% of real references
PIXEL_SIZE = 64           # pixel-space distances on 64x64 grayscale thumbnails
GRID_PAIRS = 16           # rows in the closest-pairs grid
GRID_CELL = 128           # pixels per image in that grid

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
MAKE_DATA_HINT = "make real data with `python prep.py kermany PATH` or `python prep.py synthetic`"


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


class WeightsError(UserError):
    """The Inception weights cannot be had; the message names the URL and the flag."""


# ---------------------------------------------------------------------------------------------
# The network: TensorFlow's Inception-v3 of 2015-12-05, as used for FID
# ---------------------------------------------------------------------------------------------
# Module names follow torchvision's inception_v3, which is what pytorch-fid's weights file uses,
# so `load_state_dict(strict=True)` works. Three things differ from torchvision's ImageNet model,
# and each changes the numbers: (1) the pool branches average with count_include_pad=False (TF
# does not count padded zeros), (2) the last block's pool branch is a MAX pool (a quirk of the TF
# graph), (3) 1008 output classes. BatchNorm eps is TF's 1e-3.

class BasicConv2d(nn.Module):
    """Conv (no bias: BatchNorm follows) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool, stride 1, that does not count the zero padding (TF's behaviour)."""
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
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)  # 64 + 64 + 96 + pool_features channels


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by stride-2 convs and a max pool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # 384 + 96 + in_channels = 768


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 convolutions (1x7 then 7x1)."""

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
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)  # 4 x 192 = 768


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
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # 320 + 192 + 768 = 1280


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): expanded filter bank. pool="avg" for 7b, "max" for 7c (the TF graph)."""

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
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":  # Mixed_7c: a max pool where the paper has an average pool
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)  # 320 + 768 + 768 + 192 = 2048


class FIDInceptionV3(nn.Module):
    """Inception-v3 for FID: input (B, 3, 299, 299) in [-1, 1] -> (pool3 (B, 2048), logits (B, 1008)).

    The logits are pool3 @ fc.weight.T without the fc bias ("logits_unbiased"): the original IS
    code reads the MatMul before the bias add, and torch-fidelity does the same. FID never uses fc.
    A fresh instance has random He-initialised weights (useful only for tests); real numbers need
    the released weights, see load_fid_inception().
    """

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
        self.fc = nn.Linear(POOL3_DIM, NUM_LOGITS)
        for m in self.modules():  # He init keeps random-weight activations at a sane scale
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):                          # (B, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)                  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5b(x)                       # (B, 256, 35, 35)
        x = self.Mixed_5c(x)                       # (B, 288, 35, 35)
        x = self.Mixed_5d(x)                       # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                       # (B, 768, 17, 17)
        x = self.Mixed_6b(x)                       # (B, 768, 17, 17)
        x = self.Mixed_6c(x)                       # (B, 768, 17, 17)
        x = self.Mixed_6d(x)                       # (B, 768, 17, 17)
        x = self.Mixed_6e(x)                       # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                       # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)                       # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)                       # (B, 2048, 8, 8)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048), as pytorch-fid pools
        logits = pool3 @ self.fc.weight.T          # (B, 1008), no bias (see docstring)
        return pool3, logits


# ---------------------------------------------------------------------------------------------
# Weights: local file, or download once into the torch hub cache with a hash check
# ---------------------------------------------------------------------------------------------

def one_line(e, first_sentence=False):
    """An exception as one line of text (error messages must fit on one line); first_sentence
    cuts torch.load's long explanations (which go on to suggest the unsafe weights_only=False)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text.split(". ")[0] if first_sentence else text


def download_fid_weights():
    """-> (state dict, where it lies, its SHA-256). Downloaded on first use into
    <torch hub dir>/checkpoints, where torch.hub.load_state_dict_from_url would put it; torch.hub
    compares the download's SHA-256 with the 6726825d in the file name, and we check the cached
    file the same way on every load (torch.hub does not), so a damaged file is never used. We call
    torch.hub.download_url_to_file ourselves because load_state_dict_from_url first prints a
    "Downloading" line on stdout: that would break --json, and offline it would come before the
    one-line error."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    if not cached.exists():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256_PREFIX,
                                           progress=True)  # writes a temporary file, moves it in when complete
        except Exception as e:  # offline, proxy, HTTP error, hash mismatch, read-only cache: one message
            raise WeightsError(f"cannot download the FID Inception weights ({one_line(e)}) — {WEIGHTS_HINT}")
        print(f"downloaded the FID Inception weights (95 MB, once) to {cached}", file=sys.stderr)
    sha = sha256_of(cached)
    if not sha.startswith(FID_WEIGHTS_SHA256_PREFIX):
        raise WeightsError(f"{cached} is damaged (its SHA-256 does not start with {FID_WEIGHTS_SHA256_PREFIX}) "
                           f"— delete it to download it again, or {WEIGHTS_HINT}")
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read {cached} ({one_line(e, first_sentence=True)}) — delete it to download "
                           f"it again, or {WEIGHTS_HINT}")
    return state, cached, sha


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def network_label(path, sha):
    """The name reported next to every number: the official network's name only when the file is
    the pytorch-fid release file (its SHA-256 starts with the 6726825d of the release name, the
    check torch.hub makes), else "custom weights <file name> sha256:<first 8>", so that numbers
    from random test weights or a user's own file are never passed off as standard FIDs."""
    if sha.startswith(FID_WEIGHTS_SHA256_PREFIX):
        return NETWORK
    return f"custom weights {Path(path).name} sha256:{sha[:8]}"


def load_fid_inception(weights=None):
    """-> (FIDInceptionV3 in eval mode on the CPU, a line saying which weights it holds, the
    network's label for results: see network_label()).

    weights: a path, or None for $FID_WEIGHTS, or (neither set) the download. Raises WeightsError
    with a one-line message when the file is missing, unreadable or not this network.
    Accepts the 566-key file and the 472-key one without BatchNorm's num_batches_tracked
    (torch-fidelity's converter writes that; BatchNorm fills the counters in).
    """
    path = weights or os.environ.get(WEIGHTS_ENV)
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            origin = "" if weights else f" (from ${WEIGHTS_ENV})"
            raise WeightsError(f"FID Inception weights file {path}{origin} not found — pass the path of "
                               f"pt_inception-2015-12-05-6726825d.pth; {WEIGHTS_HINT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot read {path} as a PyTorch state dict ({one_line(e, first_sentence=True)}) "
                               f"— {WEIGHTS_HINT}")
        sha = sha256_of(path)
    else:
        state, path, sha = download_fid_weights()
    network = network_label(path, sha)
    source = (f"{path} (sha256 {sha[:8]}: " +
              ("the pytorch-fid release file)" if network == NETWORK else
               "NOT the pytorch-fid release file; numbers compare only with this file)"))

    # Built on the meta device and given the loaded tensors (assign=True): no random init of 24 M
    # weights that are overwritten at once, and no copy (about 2 s less per load on 2 cores).
    with torch.device("meta"):
        model = FIDInceptionV3()
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors — {WEIGHTS_HINT}")
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - optional - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path} is not the FID Inception-v3: {len(missing)} keys missing (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}) — {WEIGHTS_HINT}")
    state = {k: state.get(k, torch.zeros((), dtype=torch.long)) for k in expected}  # counters are optional
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}   # fp32 model whatever the file holds
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # right names, wrong shapes
        raise WeightsError(f"{path} does not fit the FID Inception-v3 ({one_line(e)[:300]}) — {WEIGHTS_HINT}")
    return model.eval().requires_grad_(False), source, network


# ---------------------------------------------------------------------------------------------
# Images -> features, exactly as pytorch-fid prepares them
# ---------------------------------------------------------------------------------------------

def preprocess(images):
    """uint8 images (B, C, H, W) with C in {1, 3} (or a list of (C, H, W)) -> (B, 3, 299, 299) in [-1, 1].

    pytorch-fid: ToTensor (uint8 / 255), bilinear resize to 299 with align_corners=False and no
    antialias, then 2x - 1. Same operations in the same order, so the same float32 values. One
    channel is repeated to three at the end; pytorch-fid's Image.convert("RGB") gives R = G = B,
    and resizing each channel alone is the same, only 3x cheaper. A list with mixed sizes is
    resized image by image (each image's result does not depend on its batch).
    """
    if isinstance(images, (list, tuple)):
        if len({tuple(im.shape) for im in images}) > 1:
            return torch.cat([preprocess(im[None]) for im in images])
        images = torch.stack(list(images))
    x = images.float().div(255)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):  # at 299 pytorch-fid's resize is an identity
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@contextlib.contextmanager
def tf32_off(device):
    """CUDA convolutions and matmuls default to TF32 on Ampere and later (about 1e-3 relative
    error, and FID differences of the same order); switch it off while extracting features and
    restore the caller's settings afterwards. Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        flags = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)  # torch >= 2.9 API
        old = [f.fp32_precision for f in flags]
        for f in flags:
            f.fp32_precision = "ieee"
        try:
            yield
        finally:
            for f, value in zip(flags, old):
                f.fp32_precision = value
    else:
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def resolve_device(name):
    """'auto' -> CUDA when present, else the CPU; anything else as torch.device understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({one_line(e)}) — use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available — use --device cpu or auto")
    return device


class InceptionFeatures:
    """The network on a device, turning uint8 images into (pool3, logits) numpy float32 arrays.

    images: a uint8 tensor (N, C, H, W), C in {1, 3}, on any device, or a list of image files
    (decoded by `workers` threads, one batch ahead of the network). channels_last is about 1.6x
    faster on CPU and changes features by ~1e-5 (a different convolution kernel); with
    channels_last=False the CPU features equal pytorch-fid's bit for bit.
    """

    def __init__(self, weights=None, device="cpu", batch_size=50, channels_last=True, workers=None):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        model, self.weights_source, self.network = load_fid_inception(weights)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.batch_size = batch_size
        self.workers = workers or min(8, os.cpu_count() or 1)

    @torch.inference_mode()
    def __call__(self, images):
        if torch.is_tensor(images):
            check_uint8_images(images)
            batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
        else:
            batches = read_batches(images, self.batch_size, self.workers)
        pool3, logits = [], []
        with tf32_off(self.device):
            for batch in batches:  # uint8 goes to the device: 4x less to copy than float
                batch = batch.to(self.device) if torch.is_tensor(batch) else [im.to(self.device) for im in batch]
                x = preprocess(batch).contiguous(memory_format=self.memory_format)
                p, lg = self.model(x)
                pool3.append(p.float().cpu())
                logits.append(lg.float().cpu())
        if not pool3:
            return np.zeros((0, POOL3_DIM), np.float32), np.zeros((0, NUM_LOGITS), np.float32)
        return torch.cat(pool3).numpy(), torch.cat(logits).numpy()


def check_uint8_images(images):
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (N, C, H, W) with C in (1, 3), got {images.dtype} {tuple(images.shape)}; "
            "convert generator output with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")


# ---------------------------------------------------------------------------------------------
# Folders and statistics files
# ---------------------------------------------------------------------------------------------

def list_images(folder, recursive=False):
    """Sorted image files of a folder. Not recursive by default, like pytorch-fid: a class folder
    (out/viral) is one distribution, and pooling out/ with its class subfolders would silently
    mix them. --recursive pools on purpose. Extensions are matched case-insensitively."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder} does not exist — pass a folder of images (a model script's "
                        f"--generate output, or real data: {MAKE_DATA_HINT}) or a .npz statistics file")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder — pass a folder of images or a .npz statistics file")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        subfolders = sorted(d.name for d in folder.iterdir() if d.is_dir() and has_images(d))
        if subfolders and not recursive:
            raise UserError(f"no images directly in {folder}, but its subfolders {', '.join(subfolders)} "
                            f"have some — point at one class (e.g. {folder / subfolders[0]}) or pass "
                            "--recursive to pool them")
        raise UserError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}) — "
                        "check the path, or generate images first")
    return files


def has_images(folder):
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))


def read_image(path):
    """One image file -> uint8 tensor (C, H, W). L and RGB are kept; every other mode (palette,
    RGBA, 16-bit, ...) goes through Image.convert("RGB") exactly as in pytorch-fid."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            a = np.array(img)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({one_line(e)}) — remove or replace the file")
    return torch.from_numpy(a).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)


def read_batches(files, batch_size, workers):
    """Lists of decoded images, batch_size at a time; the next batch decodes in threads (PIL
    releases the GIL) while the network runs on this one. Sizes may differ between images."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(read_image, f) for f in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            current = pending
            pending = [pool.submit(read_image, f) for f in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield [future.result() for future in current]


def is_stats_file(path):
    return str(path).endswith(".npz")


def save_stats(path, mu, sigma, n, network):
    """mu and sigma as pytorch-fid's --save-stats writes them (np.savez_compressed, float64), so
    either program reads the other's file; n and the network's label (network_label()) ride along
    as extra keys, which pytorch-fid ignores."""
    np.savez_compressed(path, mu=mu, sigma=sigma, n=np.array(n), network=np.array(str(network)))


def load_stats(path):
    """-> (mu, sigma, n or None, network label or None). Reads our files and pytorch-fid's (which
    carry neither n nor the network)."""
    if not Path(path).is_file():
        raise UserError(f"statistics file {path} not found — make it with "
                        "`python metrics.py fid FOLDER --save-stats FILE.npz`")
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else None
            network = str(f["network"]) if "network" in f.files else None
    except (KeyError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a statistics file with mu and sigma ({one_line(e)}) — make it "
                        "with `python metrics.py fid FOLDER --save-stats FILE.npz` or pytorch-fid --save-stats")
    if mu.shape != (POOL3_DIM,) or sigma.shape != (POOL3_DIM, POOL3_DIM):
        raise UserError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}, not 2048-d pool3 "
                        "statistics — recompute it with --save-stats (pytorch-fid: --dims 2048)")
    return mu, sigma, n, network


def compare_networks(real, fake):
    """Labels of the two sides of an FID -> (label to report, one-line warning or None).

    An FID between features of two different networks (the release file and random test weights,
    say) measures the networks, not the images. None stands for a pytorch-fid statistics file,
    which names no network; pytorch-fid computes those with the release file, so that is assumed."""
    assumed = f"{NETWORK} (assumed: the statistics file names no network)"
    real, fake = real or assumed, fake or assumed
    if real.split(" (assumed")[0] == fake.split(" (assumed")[0]:
        return (real if real == fake else NETWORK), None
    return (f"{real} (REAL) vs {fake} (FAKE)",
            f"REAL's features come from {real} but FAKE's from {fake}; an FID between different feature "
            "networks is meaningless — compute both with the same weights (--weights / --fid-weights)")


# ---------------------------------------------------------------------------------------------
# The metrics (each on arrays; the CLI and Evaluator below feed them)
# ---------------------------------------------------------------------------------------------

def feature_statistics(features):
    """(N, d) features -> mean (d,) and covariance (d, d) in float64 (pytorch-fid: np.mean, np.cov
    with ddof=1 on a float64 array)."""
    act = np.asarray(features, dtype=np.float64)
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def psd_factor(sigma):
    """R (d, r) with R R^T = sigma, where r is sigma's numerical rank.

    Pivoted Cholesky (LAPACK dpstrf): it takes the largest remaining diagonal entry as the next
    pivot and stops once what is left is rounding noise (below d * eps * max diagonal), so a
    covariance of N < d images gives r = N - 1 columns. It costs about d^2 r / 3 operations,
    against ~9 d^3 for an eigendecomposition.
    """
    c, piv, rank, info = lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf rejected argument {-info}")
    r = np.zeros((len(sigma), rank))
    r[piv - 1] = np.tril(c)[:, :rank]     # undo the pivoting (piv counts from 1)
    return r


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    With S1 = R1 R1^T and S2 = R2 R2^T, S1 S2 is similar to C C^T for C = R1^T R2, so the
    eigenvalues of S1 S2 are the squared singular values of C and Tr((S1 S2)^(1/2)) is the sum of
    the singular values of C (its nuclear norm). This is exact for singular covariances (N <= 2048
    images): C is only (r1, r2), where sqrtm(S1 @ S2) or eigvals(S1 @ S2) (pytorch-fid,
    torch-fidelity) take square roots of ~2000 rounding-noise eigenvalues (at N = 16 that noise is
    2e-6 of the FID) and need an epsilon retry when sqrtm fails. No SciPy sqrtm (slow; its `disp`
    argument is going away). Full rank: agrees with pytorch-fid to ~1e-12 (tests/test_metrics.py).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf (fewer than 2 images, or broken features)")
    diff = mu1 - mu2
    c = psd_factor(sigma1).T @ psd_factor(sigma2)                   # (r1, r2)
    tr_covmean = np.linalg.svd(c, compute_uv=False).sum() if c.size else 0.0
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=IS_SPLITS, shuffle=True, seed=IS_SHUFFLE_SEED):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split; -> (mean, population std) over the splits.

    torch-fidelity's isc_features_to_metric, in float64: 10 contiguous splits i*N//10, and by
    default a shuffle with RandomState(2020) first (torch-fidelity's default). The original OpenAI
    code does not shuffle; shuffle=False gives its numbers. We shuffle because the order matters:
    images listed class by class (AC-GAN output, sorted file names) make each split one class,
    and IS then measures within-class variety instead (62 vs 298 in openai/guided-diffusion #153).
    With fewer images than splits, each image is its own split.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = len(logits)
    if n == 0:
        raise ValueError("inception_score needs at least one image")
    splits = min(splits, n)
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)   # log p(y|x), (N, 1008)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_q = logsumexp(part, axis=0) - np.log(len(part))      # log p(y) of this split
        kl = (np.exp(part) * (part - log_q)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED,
                              device="cpu"):
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    -> (mean, population std, m). Each subset draws m = min(subset_size, N_real, N_fake) images
    without replacement from each set (rng.choice on real, then on fake, as torch-fidelity does,
    so with the same seed the subsets are the same). torch-fidelity raises when N < 1000; we cap m
    like clean-fid and report it. Small negative values are normal for close distributions.
    """
    n1, n2 = len(real), len(fake)
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n1} real and {n2} fake")
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    d = real.shape[1]
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = real[torch.from_numpy(rng.choice(n1, m, replace=False)).to(device)]
        y = fake[torch.from_numpy(rng.choice(n2, m, replace=False)).to(device)]
        k_xx, k_yy, k_xy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        # Unbiased: the diagonals of k_xx and k_yy (an image with itself) are left out.
        mmd2 = ((k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
                - 2 * k_xy.sum() / (m * m))
        mmds.append(mmd2.item())
    return float(np.mean(mmds)), float(np.std(mmds)), m


def pairwise_distances(a, b):
    """Euclidean distances (len(a), len(b)) of float64 tensors, via ||a||^2 + ||b||^2 - 2 a.b."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d2.clamp_min_(0).sqrt_()


def row_blocks(n_rows, n_cols, budget=2 ** 24):
    """Row ranges so that one block of distances holds about `budget` float64 values (128 MB)."""
    step = max(1, budget // max(1, n_cols))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def nearest(query, ref, exclude_self=False):
    """For each query row, the distance to and index of its nearest ref row (float64 tensors).
    exclude_self: query is ref, and a point is not its own neighbour (leave-one-out)."""
    dists, index = [], []
    for i0, i1 in row_blocks(len(query), len(ref)):
        d = pairwise_distances(query[i0:i1], ref)
        if exclude_self:
            rows = torch.arange(i1 - i0, device=d.device)
            d[rows, rows + i0] = float("inf")
        value, idx = d.min(dim=1)
        dists.append(value)
        index.append(idx)
    return torch.cat(dists).cpu().numpy(), torch.cat(index).cpu().numpy()


def kth_neighbour_radius(x, k):
    """Distance from each row of x to its k-th nearest other row (the row itself is the 0th)."""
    radii = []
    for i0, i1 in row_blocks(len(x), len(x)):
        radii.append(pairwise_distances(x[i0:i1], x).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_any_ball(points, centres, radii):
    """Boolean per point: within radius of at least one centre (a k-NN manifold estimate)."""
    inside = []
    for i0, i1 in row_blocks(len(points), len(centres)):
        inside.append((pairwise_distances(points[i0:i1], centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real, fake, k=PR_K, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool3 features -> (precision, recall).

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set. Precision: share of fakes inside the real manifold
    (are the fakes realistic?). Recall: share of reals inside the fake manifold (does the
    generator cover the data?). The paper uses VGG-16 features; these are Inception pool3, so
    compare values only with each other. Matches torch-fidelity's prc_features_to_metric.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    precision = inside_any_ball(fake, real, kth_neighbour_radius(real, k)).double().mean().item()
    recall = inside_any_ball(real, fake, kth_neighbour_radius(fake, k)).double().mean().item()
    return precision, recall


def memorization(train, fake, reference, quantile=COPY_QUANTILE, device="cpu"):
    """Nearest-training-image distances of the fakes against those of real reference images.

    train, fake: (N, d) arrays in one space (pool3 features, or flattened pixel thumbnails).
    reference: (M, d) held-out real images, or None for leave-one-out on train (each training
    image's nearest OTHER training image). A fake is a near-copy when its nearest training image
    is closer than the `quantile` quantile of the reference distances: closer than 99% of new
    real images get. For a generator that does not copy, about `quantile` of its fakes are
    flagged by chance; many more means it reproduces training images.
    -> dict(dist, index, ref_dist, threshold, copies).
    """
    t = torch.as_tensor(np.asarray(train), dtype=torch.float64, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    dist, index = nearest(f, t)
    if reference is None:
        ref_dist, _ = nearest(t, t, exclude_self=True)
    else:
        ref_dist, _ = nearest(torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device), t)
    threshold = float(np.quantile(ref_dist, quantile))
    return dict(dist=dist, index=index, ref_dist=ref_dist, threshold=threshold, copies=dist <= threshold)


def pixel_thumbnails(images):
    """uint8 images (list of (C, H, W)) -> (N, 64*64) float64 grayscale in [0, 1], for pixel-space
    distances. Antialiased bilinear resize (thumbnails must average, not skip, pixels); colour is
    averaged to gray. Distances are divided by sqrt(64*64) below: an RMS difference in [0, 1]."""
    out = []
    for im in images:
        x = im.double().div(255).mean(0, keepdim=True)[None]  # (1, 1, H, W)
        x = F.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.flatten().float())
    return torch.stack(out).numpy()


def save_pairs_grid(path, rows):
    """A PNG with one row per pair: fake | nearest train (features) | nearest train (pixels)."""
    from torchvision.utils import make_grid, save_image  # only the grid needs torchvision
    cells = []
    for files in rows:
        for f in files:
            x = read_image(f).float().div(255).mean(0, keepdim=True)[None]
            cells.append(F.interpolate(x, size=(GRID_CELL, GRID_CELL), mode="bilinear",
                                       antialias=True, align_corners=False)[0])
    save_image(make_grid(torch.stack(cells), nrow=3, padding=4, pad_value=1.0), path)


# ---------------------------------------------------------------------------------------------
# Python API for training scripts
# ---------------------------------------------------------------------------------------------

class Evaluator:
    """FID, IS and KID of generated images against a fixed real set, for evaluation during training.

    real: uint8 tensor (N, C, H, W) with C in {1, 3}, a folder of images, or a .npz statistics
    file (then KID, which needs real features, is NaN). The Inception is loaded here, so missing
    weights raise WeightsError before training starts, and the real features are computed once.
    """

    def __init__(self, real, weights=None, device="cpu", batch_size=50, channels_last=True):
        self.features = InceptionFeatures(weights, device, batch_size, channels_last)
        self.device = self.features.device
        self.real_pool3 = None
        self.network = self.features.network  # label reported with every score
        if isinstance(real, (str, os.PathLike)) and is_stats_file(real):
            self.mu, self.sigma, self.n_real, real_network = load_stats(real)
            self.n_real = self.n_real if self.n_real is not None else -1  # pytorch-fid files omit N
            self.network, mismatch = compare_networks(real_network, self.network)
            if mismatch:
                warnings.warn(mismatch, stacklevel=2)
        else:
            images = real if torch.is_tensor(real) else list_images(real)
            self.real_pool3, _ = self.features(images)
            if len(self.real_pool3) < 2:
                raise ValueError(f"need at least 2 real images, got {len(self.real_pool3)}")
            self.mu, self.sigma = feature_statistics(self.real_pool3)
            self.n_real = len(self.real_pool3)
        self._warned = False

    def score(self, fake):
        """fake: uint8 tensor (N, C, H, W) -> dict of plain Python numbers (see module docstring)."""
        check_uint8_images(fake)
        pool3, logits = self.features(fake)
        n = len(pool3)
        if n < 2:
            raise ValueError(f"need at least 2 generated images, got {n}")
        if min(self.n_real, n) < FID_MIN_N and not self._warned:  # n_real -1: a file without N
            warnings.warn(small_n_message("unknown" if self.n_real < 0 else self.n_real, n), stacklevel=2)
            self._warned = True
        mu, sigma = feature_statistics(pool3)
        is_mean, is_std = inception_score(logits)
        kid_mean = kid_std = float("nan")
        if self.real_pool3 is not None:
            kid_mean, kid_std, _ = kernel_inception_distance(self.real_pool3, pool3, device=self.device)
        return dict(fid=frechet_distance(self.mu, self.sigma, mu, sigma), is_mean=is_mean, is_std=is_std,
                    kid_mean=kid_mean, kid_std=kid_std, n_real=int(self.n_real), n_fake=int(n),
                    network=self.network)


def small_n_message(n_real, n_fake):
    return (f"FID from N_real={n_real}, N_fake={n_fake} (< {FID_MIN_N}): it is biased upwards "
            "(about FID_inf + k/N) and only comparable at equal N; report N with it, or use KID")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    common.add_argument("--weights", "--fid-weights", default=None,
                        help=f"local Inception weights; None: ${WEIGHTS_ENV}, else download once")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    common.add_argument("--recursive", action="store_true",
                        help="read images in subfolders too (pools classes; else this folder only)")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images")
    common.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="faster; --no-channels-last gives pytorch-fid's CPU features bit for bit")

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("fid", parents=[common], formatter_class=fmt, help="Frechet Inception Distance")
    s.add_argument("real", help="folder of real images, or a .npz with mu and sigma")
    s.add_argument("fake", nargs="?", help="folder of generated images (or a .npz)")
    s.add_argument("--save-stats", metavar="FILE.npz", help="also write REAL's mu and sigma (pytorch-fid format)")
    s = sub.add_parser("is", parents=[common], formatter_class=fmt, help="Inception Score")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--splits", type=int, default=IS_SPLITS, help="number of splits")
    s.add_argument("--no-shuffle", action="store_true", help="split in file order (OpenAI's original)")
    s = sub.add_parser("kid", parents=[common], formatter_class=fmt, help="Kernel Inception Distance")
    s.add_argument("real", help="folder of real images")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--subsets", type=int, default=KID_SUBSETS, help="random subsets")
    s.add_argument("--subset-size", type=int, default=KID_SUBSET_SIZE, help="images per subset (capped at N)")
    s = sub.add_parser("pr", parents=[common], formatter_class=fmt, help="precision and recall (k-NN)")
    s.add_argument("real", help="folder of real images")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--k", type=int, default=PR_K, help="k of the k-NN radius")
    s = sub.add_parser("nn", parents=[common], formatter_class=fmt,
                       help="memorization check: nearest training image of each fake")
    s.add_argument("train", help="folder of the training images the GAN saw")
    s.add_argument("fake", help="folder of generated images")
    s.add_argument("--held-out", metavar="DIR",
                   help="real images the GAN did NOT see (e.g. data/test/<class>): the reference; "
                        "default: leave-one-out on the training images")
    s.add_argument("--copy-quantile", type=float, default=COPY_QUANTILE,
                   help="near-copy threshold: this quantile of the reference nearest distances")
    s.add_argument("--grid", default="nn_pairs.png", help="PNG of the closest pairs")
    s.add_argument("--pairs", type=int, default=GRID_PAIRS, help="rows in the grid")
    return p.parse_args(argv)


def check_args(args):
    """Counts with a lower bound: a one-line error before anything is loaded, not a NaN or a traceback."""
    minimum = {"batch_size": 1, "workers": 1, "splits": 1, "subsets": 1, "subset_size": 2, "k": 1, "pairs": 0}
    for flag, least in minimum.items():
        value = getattr(args, flag, least)
        if value < least:
            raise UserError(f"--{flag.replace('_', '-')} {value} is too small — use {least} or more (see --help)")


def image_source(path, args, what, allow_stats=False):
    """A folder -> its files; a .npz -> the path (only where statistics suffice)."""
    if is_stats_file(path):
        if not allow_stats:
            raise UserError(f"{what} {path} is a statistics file, but this metric needs the images' "
                            "features — pass the image folder")
        if not Path(path).is_file():
            raise UserError(f"statistics file {path} not found — make it with "
                            "`python metrics.py fid FOLDER --save-stats FILE.npz`")
        return path
    return list_images(path, args.recursive)


def stats_of(source, features):
    """(mu, sigma, n, network) of a .npz path or a list of image files (features() loads the network)."""
    if isinstance(source, (str, Path)):
        return load_stats(source)
    extract = features()
    pool3, _ = extract(source)
    mu, sigma = feature_statistics(pool3)
    return mu, sigma, len(pool3), extract.network


def run_fid(args, features, say):
    real = image_source(args.real, args, "REAL", allow_stats=True)
    fake = image_source(args.fake, args, "FAKE", allow_stats=True) if args.fake else None
    if args.save_stats and is_stats_file(args.real):
        raise UserError(f"--save-stats needs REAL to be a folder, not {args.real} — pass the image folder")
    if fake is None and not args.save_stats:
        raise UserError("fid needs REAL and FAKE — pass both, or --save-stats FILE.npz to save REAL's statistics")
    mu1, s1, n1, net1 = stats_of(real, features)
    result = {"metric": "fid", "n_real": n1, "network": net1}
    if args.save_stats:
        save_stats(args.save_stats, mu1, s1, n1, net1)
        result["saved_stats"] = str(args.save_stats)
        say(f"saved statistics of {n1} images of {args.real} ({net1}) to {args.save_stats}")
    if fake is not None:
        mu2, s2, n2, net2 = stats_of(fake, features)
        result["network"], mismatch = compare_networks(net1, net2)
        if mismatch:
            warn(mismatch)
        n1_text, n2_text = ("unknown" if n is None else n for n in (n1, n2))
        if n1 is None or n2 is None or min(n1, n2) < FID_MIN_N:
            warn(small_n_message(n1_text, n2_text))
        result.update(fid=frechet_distance(mu1, s1, mu2, s2), n_fake=n2)
        say(f"FID {result['fid']:.4f}  (N_real {n1_text}, N_fake {n2_text}; "
            f"{result['network']} pool3, pytorch-fid preprocessing)")
    return result


def run_is(args, features, say):
    files = image_source(args.fake, args, "FAKE")
    extract = features()
    _, logits = extract(files)
    mean, std = inception_score(logits, splits=args.splits, shuffle=not args.no_shuffle)
    splits = min(args.splits, len(files))
    if len(files) < FID_MIN_N:  # FID's limit; IS <= images per split (it is exp of a mutual information)
        warn(f"IS from N={len(files)} in {splits} splits of about {len(files) // splits} images: IS cannot exceed "
             "the images per split, so it is biased downwards at small N and only comparable at equal N and splits")
    say(f"IS {mean:.4f} ± {std:.4f}  (N {len(files)}, {splits} splits, "
        f"{'file order' if args.no_shuffle else 'shuffled with seed 2020'}; {extract.network} logits without bias)")
    return {"metric": "is", "is_mean": mean, "is_std": std, "n_fake": len(files), "splits": splits,
            "shuffle": not args.no_shuffle, "network": extract.network}


def run_kid(args, features, say):
    real, fake = image_source(args.real, args, "REAL"), image_source(args.fake, args, "FAKE")
    if min(len(real), len(fake)) < 2:
        raise UserError(f"KID needs at least 2 images in each folder ({len(real)} real, {len(fake)} fake) — add images")
    extract = features()
    (f1, _), (f2, _) = extract(real), extract(fake)
    mean, std, m = kernel_inception_distance(f1, f2, args.subsets, args.subset_size, device=extract.device)
    if m == len(real) == len(fake):
        warn(f"every KID subset holds all {m} images of both sets, so the subsets are the same and std is 0")
    say(f"KID {mean:.6f} ± {std:.6f}  (x1000: {1000 * mean:.3f} ± {1000 * std:.3f}; N_real {len(real)}, "
        f"N_fake {len(fake)}, {args.subsets} subsets of {m}; {extract.network} pool3)")
    return {"metric": "kid", "kid_mean": mean, "kid_std": std, "subset_size": m, "subsets": args.subsets,
            "n_real": len(real), "n_fake": len(fake), "network": extract.network}


def run_pr(args, features, say):
    real, fake = image_source(args.real, args, "REAL"), image_source(args.fake, args, "FAKE")
    if min(len(real), len(fake)) <= args.k:
        raise UserError(f"precision/recall with k={args.k} needs more than {args.k} images in each folder "
                        f"({len(real)} real, {len(fake)} fake) — add images or lower --k")
    extract = features()
    (f1, _), (f2, _) = extract(real), extract(fake)
    precision, recall = precision_recall(f1, f2, args.k, device=extract.device)
    say(f"precision {precision:.4f}  recall {recall:.4f}  (k={args.k}; N_real {len(real)}, N_fake {len(fake)}; "
        f"{extract.network} pool3)")
    return {"metric": "pr", "precision": precision, "recall": recall, "k": args.k,
            "n_real": len(real), "n_fake": len(fake), "network": extract.network}


def run_nn(args, features, say):
    train, fake = image_source(args.train, args, "TRAIN"), image_source(args.fake, args, "FAKE")
    held = image_source(args.held_out, args, "--held-out") if args.held_out else None
    if not 0 < args.copy_quantile < 1:
        raise UserError(f"--copy-quantile {args.copy_quantile} is not between 0 and 1 — e.g. 0.01")
    if held is None and len(train) < 2:
        raise UserError("leave-one-out needs at least 2 training images — add images or pass --held-out")
    n_reference = len(held or train)
    if n_reference * args.copy_quantile < 1:
        warn(f"{n_reference} reference images make the {args.copy_quantile:g} quantile threshold coarse (it is "
             f"about their smallest distance); use at least {math.ceil(1 / args.copy_quantile)} for a stable rule")
    extract = features()
    spaces = {}
    for name, files in (("train", train), ("fake", fake), ("held", held)):
        if files is not None:
            pool3, _ = extract(files)
            pixels = pixel_thumbnails([im for batch in read_batches(files, args.batch_size, args.workers)
                                       for im in batch])
            spaces[name] = {"feature": pool3, "pixel": pixels / math.sqrt(PIXEL_SIZE * PIXEL_SIZE)}
    reference = "held-out images" if held else "leave-one-out training images"
    result = {"metric": "nn", "n_train": len(train), "n_fake": len(fake), "n_reference": len(held or train),
              "reference": reference, "copy_quantile": args.copy_quantile, "network": extract.network}
    found = {}
    say(f"memorization check: {len(fake)} fakes against {len(train)} training images; reference: "
        f"nearest training image of {len(held or train)} {reference}")
    say(f"{'space':8} {'fake median':>12} {'ref median':>12} {'threshold':>12} {'near-copies':>14}")
    for space in ("feature", "pixel"):
        r = memorization(spaces["train"][space], spaces["fake"][space],
                         spaces["held"][space] if held else None, args.copy_quantile, device=extract.device)
        found[space] = r
        share = float(r["copies"].mean())
        result[space] = {"fake_median": float(np.median(r["dist"])), "ref_median": float(np.median(r["ref_dist"])),
                         "fake_quantiles": np.quantile(r["dist"], [0.01, 0.05, 0.5]).tolist(),
                         "ref_quantiles": np.quantile(r["ref_dist"], [0.01, 0.05, 0.5]).tolist(),
                         "threshold": r["threshold"], "near_copies": int(r["copies"].sum()), "share": share}
        say(f"{space:8} {np.median(r['dist']):12.5g} {np.median(r['ref_dist']):12.5g} {r['threshold']:12.5g} "
            f"{int(r['copies'].sum()):6d} ({100 * share:.1f}%)")
    both = found["feature"]["copies"] & found["pixel"]["copies"]
    result["near_copies_both"] = int(both.sum())
    result["share_both"] = float(both.mean())
    say(f"near-copies in both spaces: {int(both.sum())} of {len(fake)} ({100 * both.mean():.1f}%); a generator "
        f"that does not copy gets about {100 * args.copy_quantile:g}% in each space by chance")

    # Closest pairs: fakes ranked by feature distance relative to the threshold, so that rank 1
    # is the most copy-like image; each row shows its nearest training image in both spaces.
    order = np.argsort(found["feature"]["dist"] / max(found["feature"]["threshold"], 1e-12))[:args.pairs]
    pairs = [{"fake": str(fake[i]), "train_feature": str(train[found["feature"]["index"][i]]),
              "feature_dist": float(found["feature"]["dist"][i]),
              "train_pixel": str(train[found["pixel"]["index"][i]]), "pixel_rms": float(found["pixel"]["dist"][i]),
              "near_copy": bool(both[i])} for i in order]
    result["closest_pairs"] = pairs
    if args.grid and pairs:
        save_pairs_grid(args.grid, [(p["fake"], p["train_feature"], p["train_pixel"]) for p in pairs])
        result["grid"] = str(args.grid)
        say(f"closest pairs (rows of the grid {args.grid}: fake | nearest train by features | by pixels):")
    for p in pairs:
        say(f"  {p['fake']}  ->  {p['train_feature']} (feature {p['feature_dist']:.4g}), "
            f"{p['train_pixel']} (pixel RMS {p['pixel_rms']:.4g}){'  NEAR-COPY' if p['near_copy'] else ''}")
    return result


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    commands = {"fid": run_fid, "is": run_is, "kid": run_kid, "pr": run_pr, "nn": run_nn}
    say = (lambda line: None) if args.json else print
    loaded = []

    def features():
        """The network, loaded on first use: input errors are reported before the 95 MB load."""
        if not loaded:
            device = resolve_device(args.device)
            extract = InceptionFeatures(args.weights, device, args.batch_size, args.channels_last, args.workers)
            name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{torch.get_num_threads()} threads; about 5-8 images/s on 2 cores")
            print(f"device: {device.type} ({name}); weights: {extract.weights_source}", file=sys.stderr)
            loaded.append(extract)
        return loaded[0]

    try:
        check_args(args)
        result = commands[args.command](args, features, say)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if loaded:
        result["weights"] = loaded[0].weights_source
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
