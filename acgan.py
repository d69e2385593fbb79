"""AC-GAN: one class-conditional GAN that draws normal, bacterial and viral chest X-rays.

Paper: Dhawan & Nijhawan, "Cross-Modality Synthetic Data Augmentation using GANs"
(shared/papers/acgan-chest-xray-mri.txt, section 3.3-3.4), which builds on the AC-GAN of
Odena, Olah & Shlens, "Conditional Image Synthesis With Auxiliary Classifier GANs" (ICML 2017).
The generator gets noise z and a class label; the discriminator answers two questions about
every image: "real or fake?" (source head) and "which class?" (class head). Both networks are
trained to make the class head right, so the generator learns to draw the class it is asked for.

Exact commands (run from the repository root):

    # a small synthetic set, then a short CPU run at 64x64 with narrow networks (3 min measured
    # on one thread of a quiet 2-core machine; a few times that on a busy one)
    python prep.py synthetic --out data/synth --n 200 --size 64 --seed 0
    python acgan.py --data data/synth/train --size 64 --g-channels 128 --d-channels 16 \\
        --max-steps 1200 --device cpu

    # the paper's setting (112x112, RMSprop lr 1e-4, batch 32) on the Kermany X-rays, on a GPU
    # (--crop: cut to the body, as the paper's preprocessing, section 3.2)
    python prep.py kermany PATH/TO/chest-xray-pneumonia.zip --out data --size 112 --crop
    python acgan.py --data data/train

    # continue that run where it stopped (reads runs/acgan_normal_bacterial_viral_112/checkpoints/last.pt)
    python acgan.py --data data/train --resume

    # FID / IS / KID per class every 2000 steps (metrics.py; a local Inception weights file)
    python acgan.py --data data/train --eval-every 2000 --fid-weights pt_inception-2015-12-05-6726825d.pth

    # 500 one-channel PNGs per class into fake/acgan/<class>/, ready for classify.py
    python acgan.py --generate 500 --ckpt runs/acgan_normal_bacterial_viral_112/checkpoints/last.pt \\
        --out fake/acgan

A run leaves in its folder (default runs/acgan_<classes>_<size>): config.json, log.csv (losses,
D(x), D(G(z)), ms/step), epochs.csv (the discriminator's real/fake and class accuracies per
epoch), samples/step_NNNNNN.png (one row per class, fixed noise), checkpoints/last.pt and
step_NNNNNN.pt, and metrics.csv with --eval-every.

Class imbalance (the Kermany train set has about 1,341 normal / 2,530 bacterial / 1,345 viral):
real batches are drawn with balanced sampling (every class equally likely, with replacement),
and the labels asked of the generator are drawn uniformly. So the class mix of real and fake
batches is the same, and the source head cannot use "bacterial is more often real" as a cue.

Sizes: 112 (the paper), 64 and 128. The generator starts from a (size / 16) map (7, 4 or 8) and
upsamples it four times; the discriminator halves four times back to it. Other sizes are refused.
"""

import argparse
import csv
import json
import math
import os
import platform
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

# ----------------------------------------------------------------------------------------------
# Constants (each one says where it comes from)
# ----------------------------------------------------------------------------------------------
MODEL_NAME = "acgan"                      # written into every checkpoint and checked on load
KNOWN_CLASSES = ("normal", "bacterial", "viral", "covid")   # the data contract's class names
DEFAULT_CLASSES = "normal,bacterial,viral"                  # the paper's three classes
SUPPORTED_SIZES = (64, 112, 128)          # 112 is the paper's; size / 16 must be a whole map
N_UPSAMPLINGS = 4                         # paper 3.3: "4 transpose convolutional layers"
START_DIVISOR = 2 ** N_UPSAMPLINGS        # start map = size / 16: 7x7 at 112 (paper), 4x4 at 64, 8x8 at 128
LATENT_DIM = 100                          # length of z: not given in the paper; 100 as DCGAN
LABEL_EMBED_DIM = 50                      # paper 3.3: "An embedding of dimension 50"
G_CHANNELS = 1024                         # paper 3.3: noise through "a 1024 x 7 x 7 dense layer"
D_CHANNELS = 32                           # first D block, doubled per stage: 32 -> 256 (no widths in paper)
KERNEL = 4                                # kernel 4, stride 2, padding 1 doubles / halves a map exactly
LEAKY_SLOPE = 0.2                         # LeakyReLU slope (paper 3.3 names LeakyReLU; 0.2 as DCGAN)
D_DROPOUT = 0.5                           # dropout in every D block (paper 3.3 names it without a rate)
INIT_STD = 0.02                           # N(0, 0.02) weights, as DCGAN (Radford et al. 2015)
RMSPROP_LR = 1e-4                         # paper 3.4: RMSProp, learning rate 1e-4
RMSPROP_ALPHA = 0.9                       # paper used TensorFlow: Keras RMSprop rho 0.9 (torch default 0.99)
RMSPROP_EPS = 1e-7                        # Keras RMSprop epsilon
ADAM_LR = 2e-4                            # --optimizer adam: DCGAN's lr and betas
ADAM_BETAS = (0.5, 0.999)
BATCH_SIZE = 32                           # paper 3.4: "a batch size of 32 images"
EPOCHS = 200                              # paper 3.4's "32000 epochs" at batch 32 reads as ~32000 steps,
#                                           i.e. ~200 passes over the 5,216 Kermany training images
SAMPLES_PER_CLASS = 8                     # columns of the sample grid (one row per class)
SEED_STRIDE = 100003                      # data order of epoch e is seeded with seed * SEED_STRIDE + e
FIXED_NOISE_SEED_OFFSET = 1               # the sample grid's noise has its own generator ...
EVAL_NOISE_SEED_OFFSET = 2                # ... and so has evaluation, so neither touches the training RNG
RANDOM_DATA_IMAGES = 1024                 # --random-data: images in one "epoch" of random tensors
PRELOAD_MAX_SHARE = 0.5                   # preload only when it takes at most half the free host memory
EXIT_NONFINITE = 1                        # a NaN/inf loss stops the run with this code
EXIT_INTERRUPTED = 130                    # Ctrl-C: the shell's code for SIGINT
# Flags that define a run: resuming with a different value would not continue the same run.
RUN_DEFINING_FLAGS = ("size", "channels", "classes", "latent_dim", "g_channels", "d_channels",
                      "optimizer", "lr", "batch_size", "seed", "random_data")
MAKE_DATA_HINT = ("make it with `python prep.py kermany PATH` (real X-rays) or "
                  "`python prep.py synthetic --out data` (a phantom set), or pass --data")


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


class NonFiniteLossError(Exception):
    """A NaN or inf loss: main() prints it as one line and exits with code 1."""


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """(z, class) -> image in [-1, 1].

    Paper 3.3: the label goes through an embedding of size 50 and a dense layer with linear
    activation to one 7x7 map; z goes through a dense layer to 1024 maps of 7x7; the two are
    concatenated and pass four transposed convolutions, BatchNorm + ReLU after the first three,
    tanh at the end. Shapes below are for size 112 (s0 = 7) and g_channels 1024.
    """

    def __init__(self, n_classes, channels=1, size=112, latent_dim=LATENT_DIM,
                 g_channels=G_CHANNELS, embed_dim=LABEL_EMBED_DIM):
        super().__init__()
        if size % START_DIVISOR or g_channels % 2 ** (N_UPSAMPLINGS - 1):
            raise ValueError(f"size must be a multiple of {START_DIVISOR} and g_channels of 8")
        self.s0 = size // START_DIVISOR          # 7 at 112, 4 at 64, 8 at 128
        self.g_channels = g_channels
        c = g_channels
        # label branch: (B,) -> (B, 50) -> (B, s0*s0), linear activation as the paper says
        self.label_embedding = nn.Embedding(n_classes, embed_dim)        # (B,) -> (B, 50)
        self.label_dense = nn.Linear(embed_dim, self.s0 * self.s0)       # (B, 50) -> (B, 49)
        # noise branch: (B, latent) -> (B, 1024*s0*s0), then a ReLU (the paper is silent; the
        # Keras AC-GAN examples it builds on use one)
        self.noise_dense = nn.Linear(latent_dim, c * self.s0 * self.s0)  # (B, 100) -> (B, 50176)
        self.upsample = nn.Sequential(
            # (B, 1024 + 1, 7, 7) -> (B, 512, 14, 14); no bias: BatchNorm adds its own shift
            nn.ConvTranspose2d(c + 1, c // 2, KERNEL, 2, 1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(inplace=True),
            # (B, 512, 14, 14) -> (B, 256, 28, 28)
            nn.ConvTranspose2d(c // 2, c // 4, KERNEL, 2, 1, bias=False),
            nn.BatchNorm2d(c // 4),
            nn.ReLU(inplace=True),
            # (B, 256, 28, 28) -> (B, 128, 56, 56)
            nn.ConvTranspose2d(c // 4, c // 8, KERNEL, 2, 1, bias=False),
            nn.BatchNorm2d(c // 8),
            nn.ReLU(inplace=True),
            # (B, 128, 56, 56) -> (B, C, 112, 112); no BatchNorm on the output layer (paper, DCGAN)
            nn.ConvTranspose2d(c // 8, channels, KERNEL, 2, 1),
            nn.Tanh(),                           # images are scaled to [-1, 1]
        )

    def forward(self, z, labels):
        b = z.size(0)
        label_map = self.label_dense(self.label_embedding(labels))              # (B, 49)
        label_map = label_map.view(b, 1, self.s0, self.s0)                       # (B, 1, 7, 7)
        noise_maps = F.relu(self.noise_dense(z))                                # (B, 50176)
        noise_maps = noise_maps.view(b, self.g_channels, self.s0, self.s0)       # (B, 1024, 7, 7)
        x = torch.cat([noise_maps, label_map], dim=1)                          # (B, 1025, 7, 7)
        return self.upsample(x)                                                 # (B, C, 112, 112)


class Discriminator(nn.Module):
    """image -> (source logit, class logits).

    Paper 3.3: convolutional layers, each followed by BatchNorm, LeakyReLU and dropout, the
    input downsized at each stage, and two outputs. The paper puts a sigmoid and a softmax on
    them; we return LOGITS and the losses apply them (BCE-with-logits, cross-entropy): a sigmoid
    before BCE is unsafe under autocast, and a softmax before CrossEntropyLoss applies softmax
    twice (the bug of the popular PyTorch-GAN acgan.py). Shapes for size 112, d_channels 32.
    """

    def __init__(self, n_classes, channels=1, size=112, d_channels=D_CHANNELS, dropout=D_DROPOUT):
        super().__init__()
        if size % START_DIVISOR:
            raise ValueError(f"size must be a multiple of {START_DIVISOR}")
        s0 = size // START_DIVISOR
        d = d_channels

        def block(c_in, c_out):
            # conv (halves H and W) -> BatchNorm -> LeakyReLU -> dropout, in the paper's order
            return [nn.Conv2d(c_in, c_out, KERNEL, 2, 1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                    nn.Dropout(dropout)]

        self.features = nn.Sequential(
            *block(channels, d),        # (B, C, 112, 112) -> (B, 32, 56, 56)
            *block(d, d * 2),           # (B, 32, 56, 56)  -> (B, 64, 28, 28)
            *block(d * 2, d * 4),       # (B, 64, 28, 28)  -> (B, 128, 14, 14)
            *block(d * 4, d * 8),       # (B, 128, 14, 14) -> (B, 256, 7, 7)
            nn.Flatten(),               # (B, 256, 7, 7)   -> (B, 12544)
        )
        self.source_head = nn.Linear(d * 8 * s0 * s0, 1)          # (B, 12544) -> (B, 1): real/fake logit
        self.class_head = nn.Linear(d * 8 * s0 * s0, n_classes)   # (B, 12544) -> (B, K): class logits

    def forward(self, x):
        h = self.features(x)                                      # (B, 12544)
        return self.source_head(h).squeeze(1), self.class_head(h)  # (B,), (B, K)


def init_weights(module):
    """DCGAN initialisation: conv and dense weights N(0, 0.02), BatchNorm scale N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Losses (Odena et al. 2017, section 3)
# ----------------------------------------------------------------------------------------------
# Odena et al. write the two log-likelihoods
#     L_S = E[log P(S=real | X_real)] + E[log P(S=fake | X_fake)]     (right source)
#     L_C = E[log P(C=c | X_real)]    + E[log P(C=c | X_fake)]        (right class)
# D maximises L_S + L_C. G maximises L_C - L_S; as is common practice we give G the
# non-saturating form of -L_S (Goodfellow et al. 2014, section 3): G wants its fakes judged
# REAL, which gives strong gradients early on, when D easily spots fakes.
# A negative log-likelihood of a logit is BCE-with-logits; of class logits, cross-entropy.

def discriminator_loss(src_real, cls_real, y_real, src_fake, cls_fake, y_fake):
    """-(L_S + L_C): the summed negative log-likelihoods of the right source and right class."""
    terms = {
        "d_src_real": F.binary_cross_entropy_with_logits(src_real, torch.ones_like(src_real)),
        "d_src_fake": F.binary_cross_entropy_with_logits(src_fake, torch.zeros_like(src_fake)),
        "d_cls_real": F.cross_entropy(cls_real, y_real),
        "d_cls_fake": F.cross_entropy(cls_fake, y_fake),
    }
    return sum(terms.values()), terms


def generator_loss(src_fake, cls_fake, y_fake):
    """G wants its fakes judged real (non-saturating) and of the class it was asked for."""
    terms = {
        "g_src": F.binary_cross_entropy_with_logits(src_fake, torch.ones_like(src_fake)),
        "g_cls": F.cross_entropy(cls_fake, y_fake),
    }
    return sum(terms.values()), terms


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def to_uint8(x):
    """Generator output in [-1, 1] -> uint8 in [0, 255] (the conversion metrics.py expects)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_model_input(x_uint8, channels, channels_last):
    """uint8 (B, 1, H, W) -> float in [-1, 1], (B, C, H, W); --channels 3 repeats the channel."""
    x = x_uint8.float().div_(127.5).sub_(1.0)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def parse_classes(text, at_least=2):
    """'normal,bacterial,viral' -> ['normal', 'bacterial', 'viral'], with one-line errors."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in classes if c not in KNOWN_CLASSES]
    if unknown:
        raise UserError(f"unknown class {unknown[0]!r} in --classes — choose from "
                        f"{','.join(KNOWN_CLASSES)}")
    duplicated = sorted({c for c in classes if classes.count(c) > 1})
    if duplicated:
        raise UserError(f"class {duplicated[0]!r} appears twice in --classes — list each class once")
    if len(classes) < at_least:
        raise UserError("AC-GAN needs at least two classes in --classes — "
                        "for one class use dcgan.py, or add one (e.g. --classes normal,viral)")
    return classes


def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device, saying once which one is used."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available — use --device cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} — use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name} but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s) — use cuda or cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    return device


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def write_csv_row(path, row):
    """Append one row to a CSV file, writing the header first when the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path, last_step):
    """On resume: drop the rows an interrupted run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keep = [r for r in rows if int(r["step"]) <= last_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)


# ----------------------------------------------------------------------------------------------
# Data: DATA/<class>/*.png (the data contract in DESIGN.md), read as 8-bit grayscale
# ----------------------------------------------------------------------------------------------
def find_images(data_dir, classes):
    """-> (list of PNG paths, LongTensor of class indices), checking every class has images."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} not found — {MAKE_DATA_HINT}")
    paths, labels = [], []
    for k, name in enumerate(classes):
        class_dir = data_dir / name
        if not class_dir.is_dir():
            raise UserError(f"class folder {class_dir} not found — {MAKE_DATA_HINT}, or drop "
                            f"{name!r} from --classes")
        files = sorted(class_dir.glob("*.png"))
        if not files:
            raise UserError(f"class folder {class_dir} holds no PNG images — {MAKE_DATA_HINT}")
        paths += files
        labels += [k] * len(files)
    return paths, torch.tensor(labels, dtype=torch.long)


def load_png(path, size):
    """One PNG -> uint8 array (size, size), mode L. Other sizes are resized with LANCZOS."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for unreadable/truncated files
        raise UserError(f"cannot read image {path} ({type(e).__name__}) — delete it or make the "
                        f"folder again with prep.py") from None


def verify_pngs(paths):
    """Cheap check of every file's PNG structure (no decode): for --no-fast, which decodes later."""
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}) — delete it or make "
                            f"the folder again with prep.py") from None


def preload(paths, size, workers):
    """Decode every PNG once, in parallel threads (PIL releases the GIL) -> uint8 (N, 1, S, S)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        arrays = list(pool.map(lambda p: load_png(p, size), paths))
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def free_host_memory_bytes():
    """Host memory available now, in bytes: MemAvailable on Linux, free pages elsewhere, None
    when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # the file counts in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def preload_fits(n_bytes):
    """Can --fast preload n_bytes of uint8 images? If they need more than half of the free host
    memory, say so once and let the caller read PNGs from disk each epoch (issue 8)."""
    free = free_host_memory_bytes()
    if free is None or n_bytes <= PRELOAD_MAX_SHARE * free:
        return True                                             # unknown free memory: assume it fits
    print(f"note: preloading {n_bytes / 1e9:.2f} GB of uint8 images needs more than half of the "
          f"{free / 1e9:.2f} GB of free host memory; reading PNGs from disk each epoch instead (slower)")
    return False


class PNGDataset(Dataset):
    """--no-fast: decode PNGs from disk every epoch (the plain pipeline the benchmark compares)."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(load_png(self.paths[i], self.size)).unsqueeze(0), self.labels[i]


def balanced_order(labels, n_classes, steps, batch_size, seed, epoch):
    """Indices of one epoch's real batches, (steps, batch_size), every class equally likely.

    Balanced sampling against the class imbalance: each image is drawn with probability
    1 / (K * count of its class), with replacement, so a batch holds each class about equally
    often (small classes repeat, large ones are subsampled). A pure function of (seed, epoch),
    so a resumed run sees exactly the batches an uninterrupted one would.
    """
    counts = torch.bincount(labels, minlength=n_classes).double()
    weights = 1.0 / counts[labels]
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)
    order = torch.multinomial(weights, steps * batch_size, replacement=True, generator=g)
    return order.view(steps, batch_size)


class RealData:
    """Where real batches come from: preloaded tensor (--fast), PNG DataLoader (--no-fast, or
    --fast when the preload would not fit in host memory) or noise (--random-data)."""

    def __init__(self, args, classes, device):
        self.args, self.device, self.n_classes = args, device, len(classes)
        self.images = None
        if args.random_data:            # benchmarking only: what does the input pipeline cost?
            self.counts = [0] * len(classes)
            self.steps_per_epoch = max(1, RANDOM_DATA_IMAGES // args.batch_size)
            return
        self.paths, self.labels = find_images(args.data, classes)
        self.counts = torch.bincount(self.labels, minlength=len(classes)).tolist()
        self.steps_per_epoch = max(1, len(self.paths) // args.batch_size)
        # the preload is one uint8 channel whatever --channels (3 repeats it on the device)
        if args.fast and preload_fits(len(self.paths) * args.size * args.size):
            images = preload(self.paths, args.size, args.workers)
            if device.type == "cuda":   # on the GPU when it fits with room to spare, else pinned memory
                fits = images.numel() * 4 < torch.cuda.mem_get_info(device)[0]
                images = images.to(device) if fits else images.pin_memory()
            self.images = images
            self.labels_on_device = self.labels.to(images.device)
        else:
            verify_pngs(self.paths)

    def class_images(self, k):
        """All real images of class k as uint8 (N, 1, S, S) on the CPU (for metrics.Evaluator)."""
        if self.images is not None:
            return self.images[self.labels_on_device == k].cpu()
        return preload([p for p, y in zip(self.paths, self.labels.tolist()) if y == k],
                       self.args.size, self.args.workers)

    def batches(self, epoch, skip):
        """Yield (uint8 images (B, 1, S, S), labels (B,)) on the device for one epoch, skipping
        the first `skip` batches (already trained on before a resume)."""
        a, dev = self.args, self.device
        n_steps = self.steps_per_epoch - skip
        if a.random_data:
            for _ in range(n_steps):
                shape = (a.batch_size, 1, a.size, a.size)
                yield (torch.randint(0, 256, shape, dtype=torch.uint8, device=dev),
                       torch.randint(self.n_classes, (a.batch_size,), device=dev))
            return
        order = balanced_order(self.labels, self.n_classes, self.steps_per_epoch, a.batch_size,
                               a.seed, epoch)[skip:]
        if self.images is not None:
            for idx in order.to(self.images.device):        # one small copy per epoch, not per step
                yield self.images[idx].to(dev, non_blocking=True), self.labels_on_device[idx].to(dev)
            return
        # a private generator: the DataLoader must not draw its seed from the training RNG
        loader = DataLoader(PNGDataset(self.paths, self.labels, a.size), batch_sampler=order.tolist(),
                            num_workers=a.workers, generator=torch.Generator())
        for x, y in loader:
            yield x.to(dev), y.to(dev)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one dict of plain types and tensors (torch.load(weights_only=True) reads it)
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Write to path.tmp, then move into place: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """Read an acgan.py checkpoint; anything else is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found — check the path (runs/<name>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # not a torch file, truncated, or pickled objects we refuse to run
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}) — "
                        f"pass a checkpoint written by acgan.py") from None
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if model != MODEL_NAME:
        raise UserError(f"{path} is a {model or 'non-acgan'} checkpoint, not an acgan one — "
                        f"pass a checkpoint written by acgan.py")
    return ckpt


def check_resume_compatible(ckpt, args):
    """Resuming must continue the same run: the flags that define it must match."""
    saved = ckpt["args"]
    for key in RUN_DEFINING_FLAGS:
        if saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"checkpoint was trained with {flag} {saved[key]}, this command has "
                            f"{getattr(args, key)} — repeat the original run's flags with --resume")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_step(G, D, opt_g, opt_d, scaler, autocast, x_real, y_real, n_classes, latent_dim):
    """One AC-GAN iteration: a D update, then a G update on the same fakes. Returns detached
    device tensors (no host sync here; the loop reads them only at log steps)."""
    b = x_real.size(0)
    z = torch.randn(b, latent_dim, device=x_real.device)                 # z ~ N(0, 1) (paper 3.3)
    y_fake = torch.randint(n_classes, (b,), device=x_real.device)        # uniform, as the real batches

    # Discriminator: maximise the log-likelihood of the right source and class, real and fake
    with autocast:
        fake = G(z, y_fake)                                              # (B, C, S, S)
        src_real, cls_real = D(x_real)
        src_fake, cls_fake = D(fake.detach())                            # no gradient into G here
        loss_d, d_terms = discriminator_loss(src_real, cls_real, y_real, src_fake, cls_fake, y_fake)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)

    # Generator: fakes judged real and of the asked class, by the just-updated D
    D.requires_grad_(False)                                              # G's backward needs no D gradients
    with autocast:
        src_fake_g, cls_fake_g = D(fake)
        loss_g, g_terms = generator_loss(src_fake_g, cls_fake_g, y_fake)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()                                                      # one GradScaler, one update
    D.requires_grad_(True)

    src_real, src_fake = src_real.detach().float(), src_fake.detach().float()
    return {
        "loss_d": loss_d.detach().float(), **{k: v.detach().float() for k, v in d_terms.items()},
        "loss_g": loss_g.detach().float(), **{k: v.detach().float() for k, v in g_terms.items()},
        "d_x": torch.sigmoid(src_real).mean(),                           # D(x): P(real) on real images
        "d_g_z": torch.sigmoid(src_fake).mean(),                         # D(G(z)): P(real) on fakes, D step
        # counts for the per-epoch accuracies (a logit > 0 means "real")
        "n": torch.full((), float(b), device=x_real.device),            # a fill, not a host->device copy
        "src_real_right": (src_real > 0).float().sum(),
        "src_fake_right": (src_fake < 0).float().sum(),
        "cls_real_right": (cls_real.detach().argmax(1) == y_real).float().sum(),
        "cls_fake_right": (cls_fake.detach().argmax(1) == y_fake).float().sum(),
    }


LOSS_KEYS = ("loss_d", "d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake",
             "loss_g", "g_src", "g_cls", "d_x", "d_g_z")
EPOCH_KEYS = ("n", "src_real_right", "src_fake_right", "cls_real_right", "cls_fake_right")


def fixed_sample_inputs(n_classes, latent_dim, seed, device):
    """The sample grid's inputs: the SAME noise in every row, so a column shows one z drawn as
    each class, and rows differ only by the label."""
    g = torch.Generator().manual_seed(seed + FIXED_NOISE_SEED_OFFSET)
    z = torch.randn(SAMPLES_PER_CLASS, latent_dim, generator=g).repeat(n_classes, 1)   # (K*8, nz)
    y = torch.arange(n_classes).repeat_interleave(SAMPLES_PER_CLASS)                 # (K*8,)
    return z.to(device), y.to(device)


@torch.no_grad()
def save_sample_grid(G, z, y, path):
    """One row per class from fixed noise, in eval mode (BatchNorm running statistics)."""
    was_training = G.training
    G.eval()
    images = G(z, y).float().cpu()                                       # (K*8, C, S, S)
    G.train(was_training)
    grid = make_grid(images, nrow=SAMPLES_PER_CLASS, padding=2, normalize=True, value_range=(-1, 1))
    if images.size(1) == 1:
        grid = grid[:1]                                  # make_grid repeats 1 channel to 3; keep 1
    array = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@torch.no_grad()
def generate_images(G, k, n, latent_dim, noise_generator, batch_size):
    """n images of class k as uint8 (n, C, S, S) on the CPU, in eval mode."""
    device = next(G.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, latent_dim, generator=noise_generator, device=device)
        y = torch.full((b,), k, dtype=torch.long, device=device)
        out.append(to_uint8(G(z, y).float()).cpu())
    return torch.cat(out)


def evaluate(G, evaluators, args, device):
    """FID / IS / KID of each class's fakes against that class's real images (metrics.py).
    Same noise at every evaluation (its own generator), so scores over time are comparable."""
    was_training = G.training
    G.eval()
    noise = torch.Generator(device=device).manual_seed(args.seed + EVAL_NOISE_SEED_OFFSET)
    rows = []
    for k, (name, ev) in enumerate(evaluators.items()):
        fake = generate_images(G, k, args.eval_n, args.latent_dim, noise, args.batch_size)
        rows.append({"class": name, **ev.score(fake)})
    G.train(was_training)
    return rows


def build_evaluators(data, classes, args, device):
    """One metrics.Evaluator per class, built BEFORE training so missing weights fail early."""
    import metrics   # lazily: only --eval-every needs it (and its Inception network)
    evaluators = {}
    for k, name in enumerate(classes):
        try:
            evaluators[name] = metrics.Evaluator(data.class_images(k), weights=args.fid_weights,
                                                 device=str(device))
        except metrics.WeightsError as e:
            raise UserError(str(e)) from None
    return evaluators


def make_optimizer(name, params, lr, fused):
    """RMSprop as the paper (3.4), or Adam; fused Adam on CUDA with --fast, foreach otherwise."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS, foreach=True)
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, **kernel)


def epoch_accuracies(step, steps_per_epoch, epoch_sums):
    """The epoch's counts -> the discriminator's accuracies (a row of epochs.csv).
    d_acc_real/fake: source head right on real/fake; cls_acc_real/fake: class head right."""
    n, src_real, src_fake, cls_real, cls_fake = epoch_sums.tolist()
    return {"step": step, "epoch": step // steps_per_epoch,
            "d_acc_real": round(src_real / n, 4), "d_acc_fake": round(src_fake / n, 4),
            "cls_acc_real": round(cls_real / n, 4), "cls_acc_fake": round(cls_fake / n, 4),
            "n_images": int(n)}


def write_config(out, args, device, data, amp_name):
    """config.json: every flag, the versions, the device and what the data looked like."""
    config = {**vars(args), "model": MODEL_NAME, "device_name": device_name(device),
              "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
              "python": platform.python_version(),
              "class_counts": dict(zip(args.classes, data.counts)),
              "steps_per_epoch": data.steps_per_epoch,
              "amp": amp_name, "preloaded": data.images is not None,
              "imbalance": "balanced sampling of real batches; fake labels uniform",
              "resize": "PIL LANCZOS when a PNG is not --size"}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def autocast_and_scaler(args, device):
    """--amp: None (auto) = on with CUDA + --fast, off on the CPU; True = on (the CPU uses bf16, so
    the "autocast changes results only by noise" check runs anywhere); False = fp32. --no-fast is
    plain fp32 (check_args refuses --no-fast --amp). CUDA: bf16 where supported (no scaler
    needed), else fp16 + ONE GradScaler."""
    cuda = device.type == "cuda"
    use_amp = args.fast and (cuda if args.amp is None else args.amp)
    if not use_amp:
        return nullcontext(), torch.amp.GradScaler("cuda", enabled=False), "off"
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return torch.autocast(device.type, dtype=dtype), scaler, str(dtype).replace("torch.", "")


def train(args, device):
    out = Path(args.out)
    classes = args.classes
    n_classes = len(classes)
    cuda = device.type == "cuda"
    fast = args.fast
    channels_last = fast and cuda
    if fast and cuda:
        torch.backends.cudnn.benchmark = True
    autocast, scaler, amp_name = autocast_and_scaler(args, device)
    ckpt_dir = out / "checkpoints"
    if args.resume is None and (ckpt_dir / "last.pt").exists():   # before any data is read
        raise UserError(f"{out} already holds a run — add --resume to continue it, or pass "
                        f"another --out (or delete the folder) to start afresh")

    data = RealData(args, classes, device)
    steps_per_epoch = data.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    evaluators = build_evaluators(data, classes, args, device) if args.eval_every else None

    torch.manual_seed(args.seed)
    G = Generator(n_classes, args.channels, args.size, args.latent_dim, args.g_channels).to(device)
    D = Discriminator(n_classes, args.channels, args.size, args.d_channels).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    if channels_last:
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    opt_g = make_optimizer(args.optimizer, G.parameters(), args.lr, fused=fast and cuda)
    opt_d = make_optimizer(args.optimizer, D.parameters(), args.lr, fused=fast and cuda)
    G_run, D_run = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)

    step = 0
    epoch_sums = torch.zeros(len(EPOCH_KEYS), device=device)   # accuracy counts of the current epoch
    if args.resume is not None:
        path = Path(args.resume) if args.resume else ckpt_dir / "last.pt"
        ckpt = load_checkpoint(path, device)
        check_resume_compatible(ckpt, args)
        G.load_state_dict(ckpt["generator"])
        D.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        if scaler.is_enabled() and ckpt["scaler"]:             # empty when saved without fp16 autocast
            scaler.load_state_dict(ckpt["scaler"])
        epoch_sums = ckpt["epoch_sums"].to(device)
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng_cpu"].cpu())             # noise, fake labels and dropout continue
        if cuda and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        print(f"resumed from {path} at step {step}")
    # drop rows written after the checkpoint we continue from; on a fresh run (step 0), the rows
    # of an earlier run in this folder that stopped before its first checkpoint
    for name in ("log.csv", "epochs.csv", "metrics.csv"):
        truncate_csv(out / name, step)

    out.mkdir(parents=True, exist_ok=True)
    write_config(out, args, device, data, amp_name)
    n_g, n_d = (sum(p.numel() for p in net.parameters()) for net in (G, D))
    source = "random tensors" if args.random_data else f"{dict(zip(classes, data.counts))} images"
    print(f"classes: {source}, balanced sampling; {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"G {n_g / 1e6:.1f}M / D {n_d / 1e6:.2f}M parameters; autocast {amp_name}")

    fixed_z, fixed_y = fixed_sample_inputs(n_classes, args.latent_dim, args.seed, device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # stays True while every loss is finite
    last_saved = None                                          # last good checkpoint, for the NaN message

    def state():
        """Everything an exact resume needs, as plain types and tensors."""
        s = {"model": MODEL_NAME, "step": step, "epoch": step // steps_per_epoch, "args": vars(args),
             "classes": classes, "generator": G.state_dict(), "discriminator": D.state_dict(),
             "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
             "epoch_sums": epoch_sums.cpu(), "rng_cpu": torch.get_rng_state(),
             "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}}
        if cuda:
            s["rng_cuda"] = torch.cuda.get_rng_state(device)
        return s

    def check_finite(first_step):
        # one host sync, only at log steps and before saves; a NaN dates from the last check
        weights = (*G.parameters(), *D.parameters())
        params_ok = torch.stack([torch.isfinite(p).all() for p in weights]).all()
        if not bool(finite & params_ok):
            where = last_saved if last_saved else "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (first seen after step {first_step}) — lower --lr, "
                f"or try --no-amp / --optimizer adam; the last good checkpoint is {where}")

    def checkpoint(paths, first_step):
        nonlocal last_saved
        check_finite(first_step)
        s = state()
        for p in paths:
            save_checkpoint(p, s)
        last_saved = paths[-1]

    # Ctrl-C or SIGTERM (`kill`, a scheduler): finish the step, save last.pt, exit 130 (the
    # handler only sets a flag)
    interrupted = []
    old_handlers = {sig: signal.signal(sig, lambda signum, frame: interrupted.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sums = {k: torch.zeros((), device=device) for k in LOSS_KEYS}
        n_since_log, last_check = 0, step
        t_log, t_excluded = time.perf_counter(), 0.0
        while step < total_steps:
            epoch = step // steps_per_epoch
            for x_u8, y_real in data.batches(epoch, skip=step % steps_per_epoch):
                x_real = to_model_input(x_u8, args.channels, channels_last)
                stats = train_step(G_run, D_run, opt_g, opt_d, scaler, autocast, x_real, y_real,
                                   n_classes, args.latent_dim)
                finite &= torch.isfinite(stats["loss_d"]) & torch.isfinite(stats["loss_g"])
                for k in LOSS_KEYS:
                    sums[k] += stats[k]
                epoch_sums += torch.stack([stats[k] for k in EPOCH_KEYS])
                step += 1
                n_since_log += 1
                done = step >= total_steps

                if step % args.log_every == 0 or done:
                    if cuda:
                        torch.cuda.synchronize(device)      # honest timing: wait for the GPU
                    ms = (time.perf_counter() - t_log - t_excluded) * 1000 / n_since_log
                    check_finite(last_check)
                    last_check = step
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                           **{k: round(sums[k].item() / n_since_log, 5) for k in LOSS_KEYS},
                           "ms_per_step": round(ms, 2)}
                    write_csv_row(out / "log.csv", row)
                    print(f"step {step}/{total_steps} epoch {row['epoch']:.2f}  "
                          f"loss_d {row['loss_d']:.3f} loss_g {row['loss_g']:.3f}  "
                          f"D(x) {row['d_x']:.3f} D(G(z)) {row['d_g_z']:.3f}  {ms:.1f} ms/step")
                    sums = {k: torch.zeros((), device=device) for k in LOSS_KEYS}
                    n_since_log, t_log, t_excluded = 0, time.perf_counter(), 0.0

                # sampling/saving/eval time is not step time; wait for the GPU first, or the
                # training kernels still queued would be counted as side work
                side_work = (step % steps_per_epoch == 0 or step % args.sample_every == 0 or done
                             or step % args.save_every == 0 or interrupted
                             or (args.eval_every and step % args.eval_every == 0))
                if cuda and side_work:
                    torch.cuda.synchronize(device)
                t_side = time.perf_counter()
                if step % steps_per_epoch == 0:             # end of an epoch: the D's accuracies
                    e = epoch_accuracies(step, steps_per_epoch, epoch_sums)
                    write_csv_row(out / "epochs.csv", e)
                    print(f"epoch {e['epoch']}: D real/fake accuracy {e['d_acc_real']:.3f} / "
                          f"{e['d_acc_fake']:.3f}, class accuracy on real {e['cls_acc_real']:.3f}, "
                          f"on fake {e['cls_acc_fake']:.3f}")
                    epoch_sums.zero_()
                if step % args.sample_every == 0 or done:
                    save_sample_grid(G, fixed_z, fixed_y, out / "samples" / f"step_{step:06d}.png")
                if args.eval_every and (step % args.eval_every == 0 or done):
                    for r in evaluate(G, evaluators, args, device):
                        write_csv_row(out / "metrics.csv",
                                      {"step": step, "epoch": round(step / steps_per_epoch, 3), **r})
                        print(f"eval step {step} {r['class']}: FID {r['fid']:.2f} IS {r['is_mean']:.3f} "
                              f"KID {r['kid_mean']:.4f} (N real {r['n_real']}, fake {r['n_fake']})")
                if step % args.save_every == 0:
                    checkpoint([ckpt_dir / f"step_{step:06d}.pt", ckpt_dir / "last.pt"], last_check)
                elif done:
                    checkpoint([ckpt_dir / "last.pt"], last_check)
                if interrupted and not done:
                    checkpoint([ckpt_dir / "last.pt"], last_check)
                    print(f"interrupted at step {step}; checkpoint saved to {ckpt_dir / 'last.pt'}. "
                          f"Resume with the same command plus --resume", file=sys.stderr)
                    sys.exit(EXIT_INTERRUPTED)
                t_excluded += time.perf_counter() - t_side
                if done:
                    break
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    print(f"done: {step} steps; samples, logs and checkpoints in {out}")


# ----------------------------------------------------------------------------------------------
# Generation: N one-channel PNGs per class into DIR/<class>/ (ready for classify.py)
# ----------------------------------------------------------------------------------------------
def generate(args, device):
    ckpt = load_checkpoint(args.ckpt, device)
    saved, trained = ckpt["args"], ckpt["classes"]
    wanted = trained if args.classes is None else args.classes
    missing = [c for c in wanted if c not in trained]
    if missing:
        raise UserError(f"checkpoint was trained on {','.join(trained)}, not {missing[0]!r} — "
                        f"leave out --classes or pick from those")
    G = Generator(len(trained), saved["channels"], saved["size"], saved["latent_dim"], saved["g_channels"])
    G.load_state_dict(ckpt["generator"])
    G.to(device).eval()
    noise = torch.Generator(device=device).manual_seed(args.seed)
    out = Path(args.out)
    for name in wanted:
        images = generate_images(G, trained.index(name), args.generate, saved["latent_dim"], noise,
                                 args.batch_size)
        if images.size(1) == 3:              # --channels 3 models repeat one channel: save it once
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy()).save(out / name / f"{name}_{i:05d}.png")
    print(f"wrote {args.generate} images per class for {','.join(wanted)} into {out}/<class>/ "
          f"(step {ckpt['step']} of {args.ckpt})")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (exit 2) like every other user mistake."""

    def error(self, message):
        print(f"error: {message} — see python acgan.py --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineErrorParser(
        description="AC-GAN for chest X-rays (one model, all classes). Class imbalance: real "
        "batches are drawn with balanced sampling (every class equally likely, with replacement) "
        "and the labels asked of the generator uniformly; the losses carry no class weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/train", help="split folder with <class>/*.png")
    p.add_argument("--out", default=None, help="run folder (default runs/acgan_<classes>_<size>); "
                   "with --generate, the image folder")
    p.add_argument("--classes", default=None, help=f"comma-separated classes (default {DEFAULT_CLASSES}; "
                   f"any of {','.join(KNOWN_CLASSES)}; sampled balanced); with --generate, a subset "
                   f"of the checkpoint's")
    p.add_argument("--size", type=int, default=112,
                   help=f"image size, one of {SUPPORTED_SIZES} (paper: 112)")
    p.add_argument("--channels", type=int, default=1, help="1 (grayscale) or 3 (the gray channel repeated)")
    p.add_argument("--latent-dim", type=int, default=LATENT_DIM, help="length of the noise vector z")
    p.add_argument("--g-channels", type=int, default=G_CHANNELS,
                   help="channels of the generator's start map, halved at each upsampling (paper: 1024)")
    p.add_argument("--d-channels", type=int, default=D_CHANNELS,
                   help="channels of the first discriminator block, doubled at each stage")
    p.add_argument("--optimizer", choices=("rmsprop", "adam"), default="rmsprop",
                   help="rmsprop (paper) or adam (betas 0.5, 0.999)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {RMSPROP_LR} for rmsprop, {ADAM_LR} for adam)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per batch (paper: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, noise and data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4,
                   help="threads decoding PNGs at preload; DataLoader workers with --no-fast")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="speed features (uint8 data preloaded when it takes at most half the free host "
                   "memory; on CUDA channels_last, autocast, fused Adam); --no-fast: plain fp32 with "
                   "PNGs decoded from disk each epoch")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast. Unset (auto): on with CUDA and --fast (bf16 if supported, else "
                   "fp16 + GradScaler), off on the CPU. --amp on a CPU: bf16 autocast (to check that "
                   "autocast changes results only by noise). --no-amp: fp32. --no-fast is fp32 "
                   "(with --amp: an error)")
    p.add_argument("--compile", action="store_true", help="torch.compile the two networks")
    p.add_argument("--random-data", action="store_true",
                   help="train on random tensors instead of images (benchmarking the input pipeline only)")
    p.add_argument("--log-every", type=int, default=50, help="steps between log.csv rows (each the mean over those steps)")
    p.add_argument("--sample-every", type=int, default=500, help="steps between sample grids")
    p.add_argument("--save-every", type=int, default=1000, help="steps between step_NNNNNN.pt checkpoints")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between FID/IS/KID evaluations per class (0: off)")
    p.add_argument("--eval-n", type=int, default=2048, help="generated images per class per evaluation")
    p.add_argument("--fid-weights", default=None,
                   help="local FID Inception weights (pt_inception-2015-12-05); without it metrics.py "
                   "downloads them")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="resume from PATH, or with no value from <out>/checkpoints/last.pt")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this global step (0: no limit)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="write N images per class from --ckpt into --out/<class>/ instead of training")
    p.add_argument("--ckpt", default=None, help="checkpoint for --generate")
    return p.parse_args(argv)


def check_args(args):
    """Flag values and combinations argparse cannot check; fills in the derived defaults."""
    if args.size not in SUPPORTED_SIZES:
        sizes = ", ".join(map(str, SUPPORTED_SIZES))
        raise UserError(f"unsupported --size {args.size} — use one of {sizes} (the generator "
                        f"starts from a size/16 map and upsamples 4 times)")
    if args.channels not in (1, 3):
        raise UserError(f"unsupported --channels {args.channels} — use 1 or 3")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder — pass a folder name")
    if args.generate:
        if args.generate < 0 or not args.ckpt or not args.out:
            raise UserError("--generate N needs N > 0, --ckpt PATH and --out DIR — e.g. "
                            "--generate 500 --ckpt runs/<run>/checkpoints/last.pt --out fake/acgan")
        if args.resume is not None:
            raise UserError("--generate and --resume do not go together — generate from --ckpt instead")
        args.classes = None if args.classes is None else parse_classes(args.classes, at_least=1)
        return args
    if args.ckpt:
        raise UserError("--ckpt is only for --generate — to continue training use --resume PATH")
    args.classes = parse_classes(args.classes or DEFAULT_CLASSES)
    if args.g_channels < 8 or args.g_channels % 8:
        raise UserError(f"--g-channels {args.g_channels} is not a multiple of 8 — it is halved three "
                        f"times (use e.g. 128, 256 or 1024)")
    for flag in ("epochs", "batch_size", "log_every", "sample_every", "save_every", "d_channels",
                 "latent_dim", "eval_n"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is too small — use 1 or more")
    for flag in ("workers", "eval_every"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is negative — use 0 or more")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr {args.lr} is not a positive number — e.g. --lr 1e-4 (RMSprop, the paper)")
    if args.amp and not args.fast:
        raise UserError("--amp needs --fast (--no-fast is the plain fp32 run) — drop one of them")
    if args.eval_every and args.random_data:
        raise UserError("--eval-every needs real images — drop --random-data")
    if args.lr is None:
        args.lr = RMSPROP_LR if args.optimizer == "rmsprop" else ADAM_LR
    if args.out is None:
        args.out = f"runs/{MODEL_NAME}_{'_'.join(args.classes)}_{args.size}"
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args = check_args(args)
        device = pick_device(args.device)
        if args.generate:
            generate(args, device)
            return
        if device.type == "cpu":
            print(f"warning: training on the CPU is slow; for a quick run use --size 64 --g-channels 128 "
                  f"--d-channels 16 (now --size {args.size} --g-channels {args.g_channels})")
        train(args, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)


if __name__ == "__main__":
    main()
