"""DCGAN for chest X-rays: one class at a time, at 32, 64, 128 or 256 px.

Papers (text in ../shared/papers/):
  Davoodi & Lo Giudice, "Synthetic of Chest X-ray Images" ("the paper"): one DCGAN per class,
    the exact 64x64x1 layer tables (Table 1, generator: 3,574,656 parameters; Table 2,
    discriminator: 2,763,520), batch 32, Adam 2e-4 with betas (0.5, 0.999), LeakyReLU 0.2,
    weights N(0, 0.02) (Sec. 3.3.1), and the log line of Sec. 3.4.1.
  Noori, "Generating Medical Chest X-Ray Images using GAN": the same DCGAN at larger sizes,
    with a loss-curve figure (Fig. 7).
  Radford et al. 2015 (the DCGAN paper) and pytorch/examples dcgan/main.py where both are vague.

What it does
  Training reads DATA/<class>/*.png (8-bit grayscale PNGs written by prep.py), trains a
  generator G and a discriminator D on that one class, and writes a run folder. --generate
  loads a checkpoint and writes N PNGs, ready for classify.py and metrics.py.

Commands (from the repo root; each works as written, the last one given the FID weights file):
  python prep.py synthetic --out data/synth --n 256 --size 64 --seed 0   # phantom set, no download
  python dcgan.py --data data/synth/train --cls normal --size 32 --epochs 5   # a quick CPU run
  python dcgan.py --data data/synth/train --cls normal --epochs 50            # 64 px, as the paper
  python dcgan.py --data data/synth/train --cls normal --epochs 100 --resume  # continue the 64 px run
  python dcgan.py --generate 500 --ckpt runs/dcgan_normal_64/checkpoints/last.pt --out fakes/normal
  python -m pytest -q tests/test_dcgan.py
  python dcgan.py --data data/synth/train --cls normal --eval-every 500 \
      --fid-weights pt_inception-2015-12-05-6726825d.pth    # FID/IS/KID during training

A run folder, runs/dcgan_<class>_<size>/ by default, holds
  config.json                every flag, the versions, the device
  log.csv                    one row per --log-every steps: step, epoch, iter, loss_d (= loss_d_real
                             + loss_d_fake), loss_g, d_x, d_g_z1, d_g_z2 (means since the last row),
                             ms_per_step
  loss_curve.png             Loss_D and Loss_G against the step, drawn with Pillow
  samples/step_NNNNNN.png    an 8x8 grid from fixed noise (eval mode, no grad); step 0 = untrained G
  checkpoints/last.pt        everything needed to resume exactly; step_NNNNNN.pt every --save-every
  metrics.csv                with --eval-every: FID, IS, KID against the real images of the class
"""

import argparse
import concurrent.futures
import contextlib
import csv
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

# ------------------------------------------------------------------------------------------------
# Constants: the paper's values, and where they come from.
NZ = 100                   # length of z: "a vector of 100 random numbers" (paper Sec. 3.1)
NGF = 64                   # width of G's last hidden block, 64 x 32 x 32 (Table 1)
NDF = 64                   # width of D's first block, 64 x 32 x 32 (Table 2)
MAX_WIDTH = 512            # the widest block in Tables 1-2: larger images get more blocks, not wider
LEAK = 0.2                 # LeakyReLU slope (Sec. 3.3.1)
INIT_STD = 0.02            # weights ~ N(0, 0.02) (Sec. 3.3.1, Radford et al. Sec. 4)
BATCH_SIZE = 32            # "a small batch size of 32" (Sec. 3.3.1)
LR = 2e-4                  # for both networks (Sec. 3.3.1)
BETAS = (0.5, 0.999)       # Adam beta1, beta2 (Sec. 3.3.1)
DROPOUT = 0.5              # Table 2 places Dropout layers but gives no rate; 0.5 is nn.Dropout()'s
EPOCHS = 200               # the paper's log line reads [200/200] (Sec. 3.4.1)
SIZES = (32, 64, 128, 256)
DEFAULT_SIZE = 64          # the size of Tables 1-2
CLASSES = ("normal", "bacterial", "viral", "covid")
GRID = 8                   # samples/step_*.png is a GRID x GRID grid
RANDOM_DATA_IMAGES = 1024  # --random-data: the "dataset size" that defines an epoch
EVAL_SEED_OFFSET = 1       # eval noise uses seed + 1, so it differs from the sample-grid noise
EPOCH_SEED_STRIDE = 100003  # epoch order seed = seed * stride + epoch (a pure function of both)
PRELOAD_MAX_SHARE = 0.5    # preload only when the images take at most half of the free host memory
MAKE_DATA = "make it with `python prep.py kermany PATH` or `python prep.py synthetic --out data`"


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


class NonFiniteLoss(Exception):
    """A loss became NaN or inf: main() prints it as one line and exits with code 1."""


# ------------------------------------------------------------------------------------------------
# Models


def block_widths(size, base_width, max_width=MAX_WIDTH):
    """Channel widths of the hidden blocks, from the 4x4 block up to the size/2 one.

    At 64 px this is Table 1's [512, 256, 128, 64]: the width doubles each time the resolution
    halves (Radford et al. Fig. 1), from base_width at size/2, capped at max_width. A 32 px
    network drops the 512-wide block; 128 and 256 px networks add blocks at the 4x4 end:
        32: [256, 128, 64]            64: [512, 256, 128, 64]
        128: [512, 512, 256, 128, 64]     256: [512, 512, 512, 256, 128, 64]
    The discriminator uses the same list reversed.
    """
    if size not in SIZES:
        raise ValueError(f"size {size} is not supported; use one of {SIZES}")
    n_blocks = int(math.log2(size)) - 2  # one block per resolution 4, 8, ..., size/2
    return [min(max_width, base_width * 2 ** (n_blocks - 1 - i)) for i in range(n_blocks)]


class Generator(nn.Module):
    """z (B, nz, 1, 1) -> image (B, channels, size, size) in [-1, 1].

    At size 64 with 1 channel these are exactly the layers of the paper's Table 1:
        ConvTranspose2d(100, 512, 4, 1, 0)   (B, 512, 4, 4)       819,200 params
        BatchNorm2d(512) + ReLU                                      1,024
        ConvTranspose2d(512, 256, 4, 2, 1)   (B, 256, 8, 8)     2,097,152
        BatchNorm2d(256) + ReLU                                        512
        ConvTranspose2d(256, 128, 4, 2, 1)   (B, 128, 16, 16)     524,288
        BatchNorm2d(128) + ReLU                                        256
        ConvTranspose2d(128, 64, 4, 2, 1)    (B, 64, 32, 32)      131,072
        BatchNorm2d(64) + ReLU                                         128
        ConvTranspose2d(64, 1, 4, 2, 1)      (B, 1, 64, 64)         1,024
        Tanh                                                     3,574,656 in all
    No convolution has a bias (the counts above have none): BatchNorm's shift does that job.
    Other sizes add or remove blocks (block_widths); every block doubles the resolution.
    """

    def __init__(self, size=DEFAULT_SIZE, channels=1, nz=NZ, ngf=NGF, max_width=MAX_WIDTH):
        super().__init__()
        widths = block_widths(size, ngf, max_width)  # [512, 256, 128, 64] at 64 px
        # The paper calls the first layer "a fully connected layer reshaped to 4x4x512"; a 4x4
        # transposed convolution of a 1x1 input is exactly that (100 * 512 * 4 * 4 weights).
        layers = [
            nn.ConvTranspose2d(nz, widths[0], kernel_size=4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(widths[0]),  # (B, widths[0], 4, 4)
            nn.ReLU(inplace=True),
        ]
        for w_in, w_out in zip(widths, widths[1:]):
            # kernel 4, stride 2, padding 1 doubles the side: (B, w_in, r, r) -> (B, w_out, 2r, 2r)
            layers += [
                nn.ConvTranspose2d(w_in, w_out, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w_out),  # BatchNorm on every layer but the output (Sec. 3.1)
                nn.ReLU(inplace=True),
            ]
        # Output block: no BatchNorm, tanh into [-1, 1] (Sec. 3.1).  (B, channels, size, size)
        layers += [
            nn.ConvTranspose2d(widths[-1], channels, kernel_size=4, stride=2, padding=1, bias=False),
            nn.Tanh(),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z: (B, nz, 1, 1)
        return self.net(z)  # (B, channels, size, size)


class Discriminator(nn.Module):
    """image (B, channels, size, size) -> one logit per image, shape (B,).

    At size 64 with 1 channel these are exactly the layers of the paper's Table 2:
        Conv2d(1, 64, 4, 2, 1)      (B, 64, 32, 32)      1,024 params   LeakyReLU, Dropout
        Conv2d(64, 128, 4, 2, 1)    (B, 128, 16, 16)   131,072 + BN 256   LeakyReLU
        Conv2d(128, 256, 4, 2, 1)   (B, 256, 8, 8)     524,288 + BN 512   LeakyReLU, Dropout
        Conv2d(256, 512, 4, 2, 1)   (B, 512, 4, 4)   2,097,152 + BN 1,024 LeakyReLU, Dropout
        Conv2d(512, 1, 4, 1, 0)     (B, 1, 1, 1)         8,192          2,763,520 in all
    Table 2 ends in a Sigmoid. We return the logit and train with BCE-with-logits instead:
    the same loss, but numerically stable and allowed under autocast (BCELoss is not).
    Table 2 lists the last block as BatchNorm, Dropout, LeakyReLU; we write LeakyReLU before
    Dropout as in the other blocks, which computes the same function: LeakyReLU(c * x) =
    c * LeakyReLU(x) for c >= 0, and dropout multiplies each value by 0 or 1 / (1 - p).
    """

    def __init__(self, size=DEFAULT_SIZE, channels=1, ndf=NDF, max_width=MAX_WIDTH,
                 leak=LEAK, dropout=DROPOUT):
        super().__init__()
        widths = block_widths(size, ndf, max_width)[::-1]  # [64, 128, 256, 512] at 64 px
        layers = []
        w_in = channels
        for i, w_out in enumerate(widths):
            # kernel 4, stride 2, padding 1 halves the side: (B, w_in, r, r) -> (B, w_out, r/2, r/2)
            layers.append(nn.Conv2d(w_in, w_out, kernel_size=4, stride=2, padding=1, bias=False))
            if i > 0:  # no BatchNorm on the input block (Sec. 3.2; Radford et al. Sec. 3)
                layers.append(nn.BatchNorm2d(w_out))
            layers.append(nn.LeakyReLU(leak, inplace=True))
            if i != 1:  # "dropout is applied to each layer ... except for the second" (Sec. 3.2)
                layers.append(nn.Dropout(dropout))  # kept at p = 0 too, so state_dict keys never move
            w_in = w_out
        # A 4x4 convolution of the 4x4 map gives one logit per image.  (B, 1, 1, 1)
        layers.append(nn.Conv2d(w_in, 1, kernel_size=4, stride=1, padding=0, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # x: (B, channels, size, size)
        return self.net(x).flatten()  # (B,)


def init_weights(module, std=INIT_STD):
    """Conv weights ~ N(0, std); BatchNorm scale ~ N(1, std), shift 0 (Radford et al. Sec. 4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, std)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, std)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------
# Losses and small helpers


def discriminator_loss(real_logits, fake_logits, real_target=1.0):
    """Loss_D = BCE(D(x), real_target) + BCE(D(G(z)), 0), returned as (real part, fake part).

    real_target < 1 is one-sided label smoothing (Salimans et al. 2016, Sec. 3.4): only the
    real labels are softened, so D is not rewarded for pushing fakes toward "real".
    """
    loss_real = F.binary_cross_entropy_with_logits(
        real_logits, torch.full_like(real_logits, real_target))
    loss_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return loss_real, loss_fake


def generator_loss(fake_logits):
    """The non-saturating loss: G maximises log D(G(z)), i.e. BCE(D(G(z)), 1).

    Minimising log(1 - D(G(z))) instead gives G no gradient early on, when D rejects every
    fake (Goodfellow et al. 2014, Sec. 3).
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def sample_noise(n, nz, kind, generator=None, device="cpu"):
    """z of shape (n, nz, 1, 1).

    "normal" (default): N(0, 1), as pytorch/examples and Noori (Sec. 6.1). "uniform": U(-1, 1),
    as Radford et al. and this paper ("drawn from a uniform distribution", Sec. 3.1). Both
    train; the flag keeps the paper's choice one switch away.
    """
    if kind == "normal":
        return torch.randn(n, nz, 1, 1, generator=generator, device=device)
    return torch.rand(n, nz, 1, 1, generator=generator, device=device) * 2 - 1


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of G's tanh."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], exactly as metrics.py expects (conventions)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_png(path, image_uint8):
    """Write one (C, H, W) uint8 image: mode L for one channel (never forced to RGB), RGB for 3."""
    array = image_uint8.cpu().numpy()
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


def image_grid(images_uint8, rows, pad=2):
    """(rows * cols, C, H, W) -> one (C, rows * (H + pad), cols * (W + pad)) image, black gaps.

    torchvision's make_grid would turn one channel into three, so we tile by hand.
    """
    n, c, h, w = images_uint8.shape
    cols = n // rows
    padded = F.pad(images_uint8, (0, pad, 0, pad))  # (n, C, H + pad, W + pad)
    tiles = padded.view(rows, cols, c, h + pad, w + pad)
    return tiles.permute(2, 0, 3, 1, 4).reshape(c, rows * (h + pad), cols * (w + pad))


def append_csv(path, row):
    """Append one row to a CSV file, writing the header first when the file is new."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path):
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate_csv(path, last_step):
    """Drop rows after last_step: a resumed run rewrites the steps the checkpoint did not keep."""
    rows = read_csv(path)
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= last_step)


def draw_loss_curve(log_csv, png_path, width=800, height=450):
    """Loss_D and Loss_G against the step (as Noori's Fig. 7), drawn with Pillow only."""
    rows = read_csv(log_csv)
    if len(rows) < 2:
        return
    steps = [int(r["step"]) for r in rows]
    curves = {"Loss_D": ([float(r["loss_d"]) for r in rows], (200, 40, 40)),
              "Loss_G": ([float(r["loss_g"]) for r in rows], (40, 70, 200))}
    left, right, top, bottom = 60, 20, 30, 45  # margins in pixels
    y_max = 1.05 * max(max(values) for values, _ in curves.values()) or 1.0
    x_span = (steps[-1] - steps[0]) or 1

    def xy(step, value):
        x = left + (step - steps[0]) / x_span * (width - left - right)
        y = height - bottom - value / y_max * (height - top - bottom)
        return x, y

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):  # 5 ticks on each axis
        _, y = xy(steps[0], y_max * k / 4)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((5, y - 6), f"{y_max * k / 4:.2f}", fill="black")
        step = steps[0] + round(x_span * k / 4)  # steps are whole numbers
        x, _ = xy(step, 0)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        draw.text((x - 12, height - bottom + 8), str(step), fill="black")
    for i, (name, (values, colour)) in enumerate(curves.items()):
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=colour, width=2)
        draw.text((left + 10 + 90 * i, 10), name, fill=colour)
    draw.text((width // 2 - 12, height - 18), "step", fill="black")
    img.save(png_path)


# ------------------------------------------------------------------------------------------------
# Data


def class_paths(data, cls):
    """The sorted PNG paths of DATA/<cls>/, or a UserError saying how to make them."""
    folder = Path(data) / cls
    if not Path(data).is_dir():
        raise UserError(f"data folder {data} not found — {MAKE_DATA}, then pass --data DATA/train")
    if not folder.is_dir():
        raise UserError(f"class folder {folder} not found — {MAKE_DATA}, or pick another --cls")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise UserError(f"no PNG images in {folder} — {MAKE_DATA}, or pick another --cls")
    return paths


def load_image(path, size, channels):
    """One PNG -> (channels, size, size) uint8. Other sizes are resized with LANCZOS (antialiased)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports a broken PNG as SyntaxError
        raise UserError(f"cannot read image {path} ({e}) — delete or re-create it ({MAKE_DATA})")
    return torch.from_numpy(array)[None].repeat(channels, 1, 1)  # (channels, size, size)


def load_images(paths, size, channels, workers):
    """Decode all images once, in parallel threads -> (N, channels, size, size) uint8."""
    if workers <= 1:
        return torch.stack([load_image(p, size, channels) for p in paths])
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return torch.stack(list(pool.map(lambda p: load_image(p, size, channels), paths)))


def free_host_memory_bytes():
    """Host memory available now, in bytes: MemAvailable of /proc/meminfo on Linux, free pages
    elsewhere, None when neither can be read (then the caller assumes the images fit)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def preload_fits(n_bytes):
    """Can n_bytes of uint8 images be held in host memory? Issue 8: the whole Kermany set at 256 px
    (about 0.4 GB) should, and the loader falls back to reading from disk when it does not."""
    free = free_host_memory_bytes()
    if free is None or n_bytes <= PRELOAD_MAX_SHARE * free:
        return True
    print(f"note: preloading {n_bytes / 1e9:.2f} GB of uint8 images needs more than half of the "
          f"{free / 1e9:.2f} GB of free host memory; reading PNGs from disk each epoch instead "
          "(slower)")
    return False


def epoch_batches(n_images, batch_size, seed, epoch):
    """The image indices of one epoch, (iters, batch_size): a pure function of (seed, epoch).

    That is what makes resume exact: a run resumed in epoch e sees the same order and skips the
    batches it already did. The last incomplete batch is dropped (a tiny batch gives noisy
    BatchNorm statistics); the next epoch's shuffle brings those images back.
    """
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(
        seed * EPOCH_SEED_STRIDE + epoch))
    iters = n_images // batch_size
    return order[: iters * batch_size].view(iters, batch_size)


class PngDataset(torch.utils.data.Dataset):
    """The plain pipeline (--no-fast): decode each PNG from disk every time it is used."""

    def __init__(self, paths, size, channels):
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size, self.channels)


class BatchSource:
    """Gives the uint8 batches (B, C, S, S) of each epoch on the training device, in epoch_batches
    order. Three modes:
      "preload" (--fast, the default): every image decoded once into one uint8 tensor, kept on
          the GPU when it fits, so a batch is one indexing op (DESIGN.md "Speed");
      "disk" (--no-fast): a DataLoader decodes the PNGs every epoch, the plain reference;
      "random" (--random-data): random uint8 tensors, to measure what the input pipeline costs.
    """

    def __init__(self, mode, n_images, batch_size, seed, device, images=None, paths=None,
                 image_shape=None, workers=0):
        self.mode, self.n_images, self.batch_size = mode, n_images, batch_size
        self.seed, self.device, self.workers = seed, device, workers
        self.iters = n_images // batch_size
        self.image_shape = image_shape  # (C, S, S)
        self.images = images
        if mode == "preload" and device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            if images.numel() < 0.25 * free_bytes:  # leave room for the networks
                self.images = images.to(device)
        self.dataset = PngDataset(paths, image_shape[1], image_shape[0]) if mode == "disk" else None

    def epoch(self, epoch, skip=0):
        """Yield the batches of epoch `epoch`, leaving out the first `skip` (already done)."""
        if self.mode == "random":
            for _ in range(skip, self.iters):
                yield torch.randint(0, 256, (self.batch_size, *self.image_shape),
                                    dtype=torch.uint8, device=self.device)
            return
        batches = epoch_batches(self.n_images, self.batch_size, self.seed, epoch)[skip:]
        if self.mode == "preload":
            if self.images.is_cuda:  # the epoch's indices in one asynchronous copy: a blocking
                # .to() of each batch's indices would wait for the GPU at every step (a host sync)
                batches = batches.pin_memory().to(self.images.device, non_blocking=True)
            for idx in batches:
                batch = self.images[idx]  # (B, C, S, S) uint8, one gather
                if self.device.type == "cuda" and not batch.is_cuda:
                    batch = batch.pin_memory()  # so that the copy below is truly asynchronous
                yield batch.to(self.device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches.tolist(), num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: otherwise each new DataLoader iterator draws its worker seed from
            # the global RNG, and a resumed run would draw one number more than an unbroken run
            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            yield batch.to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------------
# Train


def train_step(netG, netD, optG, optD, scaler, real, z, real_target, amp):
    """One DCGAN iteration in the order of pytorch/examples: a D step, then a G step.

    real: (B, C, S, S) in [-1, 1]; z: (B, nz, 1, 1); amp: an autocast context (or a null one).
    Returns, without a host sync, the tensor [loss_d, loss_d_real, loss_d_fake, loss_g, D(x),
    D(G(z)) before the D step, D(G(z)) after it] (Sec. 3.4.1 "Evaluation Metrics").
    """
    # (1) D step: maximise log D(x) + log(1 - D(G(z))). Real and fake go through D in separate
    # calls, hence separate BatchNorm batches, as in Radford et al.'s code.
    optD.zero_grad(set_to_none=True)
    with amp:
        real_logits = netD(real)  # (B,)
        fake = netG(z)  # (B, C, S, S)
        fake_logits = netD(fake.detach())  # (B,)  detach: the D step must not update G
        loss_d_real, loss_d_fake = discriminator_loss(real_logits, fake_logits, real_target)
        loss_d = loss_d_real + loss_d_fake
    scaler.scale(loss_d).backward()
    scaler.step(optD)

    # (2) G step: the same fakes, judged by the updated D, with the non-saturating loss.
    optG.zero_grad(set_to_none=True)
    with amp:
        fake_logits_after = netD(fake)  # (B,)
        loss_g = generator_loss(fake_logits_after)
    scaler.scale(loss_g).backward()
    scaler.step(optG)
    scaler.update()  # one GradScaler for both optimizers: update once per iteration

    probs = [torch.sigmoid(logits.float()).mean()
             for logits in (real_logits, fake_logits, fake_logits_after)]
    return torch.stack([loss_d, loss_d_real, loss_d_fake, loss_g, *probs]).detach().float()


STAT_NAMES = ("loss_d", "loss_d_real", "loss_d_fake", "loss_g", "d_x", "d_g_z1", "d_g_z2")


def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device; says once which device it is."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r} — use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but CUDA is not available — use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} GPUs — "
                            "use cuda:0 or auto")
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device: {device.type}")
    return device


def make_adam(params, lr, device, fast):
    """Adam as the paper (Sec. 3.3.1); --fast picks the fused CUDA kernel or foreach on CPU."""
    if not fast:
        return torch.optim.Adam(params, lr=lr, betas=BETAS, foreach=False)
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, betas=BETAS, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=BETAS, foreach=True)


def load_checkpoint(path):
    """Read a dcgan.py checkpoint (plain types and tensors only), or raise a UserError."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found — check the path (runs/<name>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a broken or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} ({reason}) — pass a file dcgan.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("model") != "dcgan":
        raise UserError(f"{path} is not a dcgan.py checkpoint — pass a file dcgan.py wrote")
    return ckpt


def check_checkpoint(ckpt, path, **expected):
    """A checkpoint of another size, channel count or class is a UserError naming the mismatch."""
    for key, want in expected.items():
        if want is not None and ckpt[key] != want:
            raise UserError(f"{path} was trained with --{key} {ckpt[key]}, not {want} — "
                            f"pass --{key} {ckpt[key]} or another checkpoint")


def save_checkpoint(path, netG, netD, optG, optD, scaler, step, epoch, args, device):
    """One dict of plain types and tensors (loads with weights_only=True); written to a temporary
    file and moved into place, so a crash never leaves a broken checkpoint."""
    state = {
        "model": "dcgan", "size": args.size, "channels": args.channels, "cls": args.cls,
        "nz": NZ, "noise": args.noise, "dropout": args.dropout,
        "netG": netG.state_dict(), "netD": netD.state_dict(),
        "optG": optG.state_dict(), "optD": optD.state_dict(), "scaler": scaler.state_dict(),
        "step": step, "epoch": epoch, "args": vars(args),
        # the global RNG draws z and the dropout masks; the data order needs no state (epoch_batches)
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def build_evaluator(real_uint8, args, device):
    """metrics.Evaluator on the real images of the class, built before training so that missing
    Inception weights fail now, not hours in. metrics is imported only here (--eval-every)."""
    try:
        import metrics
    except ImportError as e:
        raise UserError(f"--eval-every needs metrics.py next to dcgan.py ({e}) — "
                        "run from the repo root or drop --eval-every")
    try:
        return metrics.Evaluator(real_uint8, weights=args.fid_weights, device=str(device))
    except metrics.WeightsError as e:
        raise UserError(str(e))


def noise_batches(n, nz, noise, seed, batch_size):
    """n vectors z in batches, from a CPU generator seeded with `seed`: the same z on any device,
    and the global RNG that training uses is not touched. Drawn one vector at a time, so that
    vector i depends on neither N nor the batch size (torch.randn of a whole batch does not
    promise that: its values depend on the tensor's length)."""
    rng = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        yield torch.cat([sample_noise(1, nz, noise, generator=rng) for _ in range(b)])


@torch.no_grad()
def sample(netG, z):
    """G(z) as uint8 images on the CPU, in eval mode (BatchNorm uses its running statistics)
    and without autograd; G goes back to the mode it was in."""
    was_training = netG.training
    netG.eval()
    images = to_uint8(netG(z).float()).cpu()
    netG.train(was_training)
    return images


def evaluate(netG, evaluator, args, device):
    """FID, IS and KID of --eval-n samples against the real images (metrics.py); prints them.
    The z are the same at every evaluation (seed + EVAL_SEED_OFFSET), so scores compare."""
    fakes = torch.cat([sample(netG, z.to(device)) for z in noise_batches(
        args.eval_n, NZ, args.noise, args.seed + EVAL_SEED_OFFSET, args.batch_size)])
    s = evaluator.score(fakes)
    print(f"eval: FID {s['fid']:.2f}  IS {s['is_mean']:.3f} ± {s['is_std']:.3f}  KID "
          f"{s['kid_mean']:.4f} ± {s['kid_std']:.4f}  (N real {s['n_real']}, N fake "
          f"{s['n_fake']}, {s['network']})")
    return s


def non_finite_error(step, last_check, last_ckpt):
    """The NaN/inf message. The flag is only looked at every few steps, so all we know is that
    the first bad loss came after the last check."""
    where = (f"the last good checkpoint is {last_ckpt}" if last_ckpt.exists()
             else "no checkpoint was saved before it")
    return NonFiniteLoss(f"non-finite loss at step {step} (first seen at this check, so after "
                         f"step {last_check}) — lower --lr, try --no-amp or --label-smoothing "
                         f"0.1; {where}")


def train(args, argv):
    """Train one class; write the run folder. Returns normally at the end, raises SystemExit(130)
    on Ctrl-C (after saving checkpoints/last.pt) and NonFiniteLoss on a NaN/inf loss."""
    out = Path(args.out)
    ckpt_dir, sample_dir = out / "checkpoints", out / "samples"
    resume_path = None
    if args.resume is not None:
        resume_path = Path(args.resume) if args.resume else ckpt_dir / "last.pt"
    elif (ckpt_dir / "last.pt").exists():
        raise UserError(f"{out} already holds a run — add --resume to continue it, "
                        "or pass another --out (or delete the folder) to start afresh")
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt:  # fail on a wrong checkpoint before any data is read
        check_checkpoint(ckpt, resume_path, size=args.size, channels=args.channels, cls=args.cls)

    device = pick_device(args.device)
    if device.type == "cpu":
        smaller = f"--size {SIZES[0]} (now {args.size}) or " if args.size > SIZES[0] else ""
        print(f"warning: training on the CPU is slow; for a quick try use {smaller}a GPU")
    fast = args.fast
    # --amp auto (no flag): autocast with CUDA + --fast, fp32 on the CPU. An explicit --amp on a
    # CPU gives bf16 autocast there, so "autocast changes results only by noise" can be checked
    # anywhere. bf16 where supported, else fp16 (which needs the GradScaler below).
    use_amp = fast and (args.amp if args.amp is not None else device.type == "cuda")
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    amp_dtype = torch.bfloat16 if bf16 else torch.float16
    amp = (torch.autocast(device.type, dtype=amp_dtype) if use_amp
           else contextlib.nullcontext())
    channels_last = fast and device.type == "cuda"
    if fast and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the shapes never change: let cuDNN pick kernels

    # Data: the real images of one class (one DCGAN per class, paper Sec. 3.3.1).
    image_shape = (args.channels, args.size, args.size)
    real_uint8 = None
    if args.random_data:
        source = BatchSource("random", max(RANDOM_DATA_IMAGES, args.batch_size), args.batch_size,
                             args.seed, device, image_shape=image_shape)
    else:
        paths = class_paths(args.data, args.cls)
        if len(paths) < args.batch_size:
            raise UserError(f"{args.data}/{args.cls} has {len(paths)} images, fewer than "
                            f"--batch-size {args.batch_size} — lower --batch-size")
        # Decoded once for --fast and for the evaluator's real side, when host memory allows.
        n_bytes = len(paths) * args.channels * args.size ** 2  # uint8: one byte per value
        if (fast or args.eval_every) and preload_fits(n_bytes):
            real_uint8 = load_images(paths, args.size, args.channels, args.workers)
        else:  # the plain path still checks every file once, so a broken PNG fails now
            for p in paths:
                try:
                    with Image.open(p) as im:
                        im.verify()
                except (OSError, SyntaxError, ValueError) as e:
                    raise UserError(f"cannot read image {p} ({e}) — delete or re-create it "
                                    f"({MAKE_DATA})")
        mode = "preload" if fast and real_uint8 is not None else "disk"
        source = BatchSource(mode, len(paths), args.batch_size,
                             args.seed, device, images=real_uint8, paths=paths,
                             image_shape=image_shape, workers=args.workers)
        print(f"data: {len(paths)} images of class {args.cls} from {args.data}, "
              f"{source.iters} iterations per epoch")
    if args.eval_every:  # the real images in memory, or else metrics.py reads the class folder
        real = real_uint8 if real_uint8 is not None else Path(args.data) / args.cls
        evaluator = build_evaluator(real, args, device)
    else:
        evaluator = None

    # Models and optimizers. The global RNG, seeded here, initialises the weights and later
    # draws z and the dropout masks.
    torch.manual_seed(args.seed)
    netG = Generator(args.size, args.channels).to(device)
    netD = Discriminator(args.size, args.channels, dropout=args.dropout).to(device)
    netG.apply(init_weights)
    netD.apply(init_weights)
    if channels_last:
        netG.to(memory_format=torch.channels_last)
        netD.to(memory_format=torch.channels_last)
    optG = make_adam(netG.parameters(), args.lr, device, fast)
    optD = make_adam(netD.parameters(), args.lr, device, fast)
    # fp16 needs loss scaling, bf16 does not; one scaler serves both optimizers.
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    stepG, stepD = (torch.compile(netG), torch.compile(netD)) if args.compile else (netG, netD)

    step = 0
    if ckpt:
        netG.load_state_dict(ckpt["netG"])
        netD.load_state_dict(ckpt["netD"])
        optG.load_state_dict(ckpt["optG"])
        optD.load_state_dict(ckpt["optD"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        step = ckpt["step"]
        print(f"resumed from {resume_path} at step {step}")
    iters = source.iters
    total_steps = args.epochs * iters
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    # The run folder.
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sample_dir.mkdir(parents=True, exist_ok=True)
    config = {"args": vars(args), "command": "python dcgan.py " + shlex.join(argv),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "amp": str(amp_dtype).replace("torch.", "") if use_amp else "off",
              "iters_per_epoch": iters, "resumed_from_step": step,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "numpy": np.__version__}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log_csv, metrics_csv = out / "log.csv", out / "metrics.csv"
    for path in (log_csv, metrics_csv):
        truncate_csv(path, step)  # rows the checkpoint does not cover will be written again

    # Fixed noise for the sample grids: every grid shows the same GRID * GRID z.
    fixed_z = next(noise_batches(GRID * GRID, NZ, args.noise, args.seed, GRID * GRID)).to(device)
    if step == 0:  # step_000000.png: what the untrained generator draws
        save_png(sample_dir / "step_000000.png", image_grid(sample(netG, fixed_z), GRID))

    # Ctrl-C (or SIGTERM from `kill`, a scheduler) sets a flag; the loop stops after the current
    # step and saves (conventions).
    interrupted = threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        old_handlers = {sig: signal.signal(sig, lambda *_: interrupted.set())
                        for sig in (signal.SIGINT, signal.SIGTERM)}

    real_target = 1.0 - args.label_smoothing  # one-sided label smoothing (0 by default)
    all_finite = torch.ones((), dtype=torch.bool, device=device)  # all losses finite so far?
    last_check = step  # the last step at which all_finite was looked at (and was true)
    window = torch.zeros(len(STAT_NAMES), device=device)  # sums of the stats since the last log
    window_steps = 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t_window, t_other = time.perf_counter(), 0.0  # t_other: time spent on samples/eval/saving
    try:
        while step < total_steps:
            epoch = step // iters
            for real_uint8_batch in source.epoch(epoch, skip=step % iters):
                real = to_model_range(real_uint8_batch)  # (B, C, S, S) in [-1, 1]
                if channels_last:
                    real = real.contiguous(memory_format=torch.channels_last)
                z = sample_noise(real.shape[0], NZ, args.noise, device=device)  # (B, nz, 1, 1)
                stats = train_step(stepG, stepD, optG, optD, scaler, real, z, real_target, amp)
                step += 1
                window += stats
                window_steps += 1
                all_finite &= torch.isfinite(stats).all()  # on the device: no sync per step
                last_step = step == total_steps or interrupted.is_set()

                if step % args.log_every == 0 or last_step:  # the only per-log host sync
                    sync()
                    ms = 1000 * (time.perf_counter() - t_window - t_other) / window_steps
                    if not bool(all_finite):
                        raise non_finite_error(step, last_check, ckpt_dir / "last.pt")
                    last_check = step
                    means = dict(zip(STAT_NAMES, (window / window_steps).tolist()))
                    i = (step - 1) % iters  # as the paper's log: epoch from 1, batch from 0
                    print(f"[{epoch + 1}/{args.epochs}][{i}/{iters}] "
                          f"Loss_D: {means['loss_d']:.4f} Loss_G: {means['loss_g']:.4f} "
                          f"D(x): {means['d_x']:.4f} D(G(z)): {means['d_g_z1']:.4f} / "
                          f"{means['d_g_z2']:.4f}  {ms:.1f} ms/step")
                    append_csv(log_csv, {"step": step, "epoch": epoch + 1, "iter": i,
                                         **{k: f"{v:.6f}" for k, v in means.items()},
                                         "ms_per_step": f"{ms:.3f}"})
                    window.zero_()
                    window_steps, t_window, t_other = 0, time.perf_counter(), 0.0

                do_sample = args.sample_every > 0 and (step % args.sample_every == 0 or step == total_steps)
                do_eval = evaluator is not None and step % args.eval_every == 0
                do_save = step % args.save_every == 0 or last_step
                if do_sample or do_eval or do_save:  # timed apart, so ms/step is training only
                    sync()
                    t0 = time.perf_counter()
                    if do_sample:
                        grid = image_grid(sample(netG, fixed_z), GRID)
                        save_png(sample_dir / f"step_{step:06d}.png", grid)
                    if do_eval:
                        scores = evaluate(netG, evaluator, args, device)
                        append_csv(metrics_csv, {"step": step, "epoch": epoch + 1, **scores})
                    if do_save:
                        if not bool(all_finite):  # never write a checkpoint from non-finite state
                            raise non_finite_error(step, last_check, ckpt_dir / "last.pt")
                        last_check = step
                        names = ["last.pt"] + ([f"step_{step:06d}.pt"]
                                               if step % args.save_every == 0 else [])
                        for name in names:
                            save_checkpoint(ckpt_dir / name, netG, netD, optG, optD, scaler,
                                            step, epoch, args, device)
                        draw_loss_curve(log_csv, out / "loss_curve.png")
                    sync()
                    t_other += time.perf_counter() - t0

                if interrupted.is_set():
                    again = argv + ([] if args.resume is not None else ["--resume"])
                    print(f"interrupted at step {step}; saved {ckpt_dir / 'last.pt'}. "
                          f"Resume with: python dcgan.py {shlex.join(again)}")
                    raise SystemExit(130)
                if step == total_steps:
                    break
    finally:
        if on_main_thread:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        draw_loss_curve(log_csv, out / "loss_curve.png")
    print(f"done: step {step}; run folder {out}")


# ------------------------------------------------------------------------------------------------
# Generate


def generate(args):
    """--generate N --ckpt PATH --out DIR: write N PNGs of the checkpoint's size and channels.
    Image i depends only on the checkpoint and --seed, not on N or --batch-size (noise_batches)."""
    ckpt = load_checkpoint(args.ckpt)
    check_checkpoint(ckpt, args.ckpt, size=args.size, channels=args.channels, cls=args.cls)
    device = pick_device(args.device)
    netG = Generator(ckpt["size"], ckpt["channels"], ckpt["nz"]).to(device)
    netG.load_state_dict(ckpt["netG"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    i = 0
    for z in noise_batches(args.generate, ckpt["nz"], ckpt["noise"], args.seed, args.batch_size):
        for image in sample(netG, z.to(device)):
            save_png(out / f"dcgan_{ckpt['cls']}_{i:06d}.png", image)
            i += 1
    print(f"wrote {i} PNGs ({ckpt['size']}x{ckpt['size']}, {ckpt['channels']} channel"
          f"{'s' if ckpt['channels'] > 1 else ''}, class {ckpt['cls']}, step {ckpt['step']}) to {out}")


# ------------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes end with one `error:` line and exit code 2 (conventions)."""

    def error(self, message):
        print(f"error: {message} — see python dcgan.py --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = OneLineParser(description="DCGAN for chest X-rays, one class per run (see the docstring).",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/train", help="split folder holding <class>/*.png")
    p.add_argument("--cls", choices=CLASSES, help="the class to learn (required for training)")
    p.add_argument("--out", help="training: run folder (default runs/dcgan_<cls>_<size>); "
                                 "--generate: the image folder")
    p.add_argument("--size", type=int, choices=SIZES,
                   help=f"image side in px (training default {DEFAULT_SIZE}; --generate uses "
                        "the checkpoint's)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="1 or 3 (the gray channel repeated); training default 1, --generate "
                        "uses the checkpoint's")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs in all, across resumes")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per step")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate of G and D")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, z, dropout, data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads that decode PNGs at preload; DataLoader workers with --no-fast")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast; default (auto): on with CUDA and --fast (bf16 if supported, "
                        "else fp16 + GradScaler), off on a CPU. --amp on a CPU: bf16 autocast; "
                        "--no-amp: fp32. Needs --fast")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="speed switches: preloaded uint8 data, channels_last, autocast, fused "
                        "Adam; --no-fast is the plain fp32 variant that reads PNGs every epoch")
    p.add_argument("--random-data", action="store_true",
                   help="train on random tensors instead of images (benchmarking only)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="D dropout rate (Table 2)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="one-sided: D's real target is 1 - this")
    p.add_argument("--noise", choices=("normal", "uniform"), default="normal",
                   help="z ~ N(0, 1) or U(-1, 1) (the paper's Sec. 3.1 says uniform)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--sample-every", type=int, default=200, help="steps between sample grids (0: off)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=0, help="steps between FID/IS/KID (0: off)")
    p.add_argument("--eval-n", type=int, default=2048, help="generated images per evaluation")
    p.add_argument("--fid-weights", help="local FID Inception weights (pt_inception-2015-12-05)")
    p.add_argument("--resume", nargs="?", const="",
                   help="continue from PATH (no value: <out>/checkpoints/last.pt)")
    p.add_argument("--max-steps", type=int, help="stop after this global step, saving a checkpoint")
    p.add_argument("--generate", type=int, metavar="N", help="write N images from --ckpt to --out")
    p.add_argument("--ckpt", help="checkpoint for --generate")
    return p.parse_args(argv)


def check_args(args):
    """Flag values and combinations argparse cannot check; fills in the mode-dependent defaults."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--lr": args.lr,
                "--log-every": args.log_every, "--save-every": args.save_every,
                "--eval-n": args.eval_n}
    for flag, value in positive.items():
        if not 0 < value < math.inf:  # also refuses nan, which every comparison fails
            raise UserError(f"{flag} must be positive, not {value} — pass a number above 0")
    not_negative = {"--workers": args.workers, "--sample-every": args.sample_every,
                    "--eval-every": args.eval_every}
    for flag, value in not_negative.items():
        if value < 0:
            raise UserError(f"{flag} must be 0 or more, not {value} — pass 0 (off) or more")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder — pass a folder path")
    if args.generate is not None:
        if args.generate <= 0 or not args.ckpt or not args.out:
            raise UserError("--generate N needs N > 0, --ckpt PATH and --out DIR — e.g. --generate 500 "
                            "--ckpt runs/dcgan_normal_64/checkpoints/last.pt --out fakes/normal")
        if args.resume is not None:
            raise UserError("--generate and --resume do not go together — drop one")
        return
    if args.ckpt:
        raise UserError("--ckpt is only for --generate — to continue training use --resume PATH")
    if args.cls is None:
        raise UserError(f"training needs a class — add --cls, one of {', '.join(CLASSES)}")
    if not 0 <= args.dropout < 1 or not 0 <= args.label_smoothing < 0.5:
        raise UserError(f"--dropout {args.dropout} / --label-smoothing {args.label_smoothing} out of range — "
                        "use --dropout in [0, 1) and --label-smoothing in [0, 0.5)")
    if args.amp and not args.fast:
        raise UserError("--amp needs --fast (--no-fast is the plain fp32 run) — drop one of them")
    if args.random_data and args.eval_every:
        raise UserError("--eval-every needs real images — drop --random-data")
    if args.eval_every and args.eval_n < 2:
        raise UserError(f"--eval-n {args.eval_n} is too small — use 2 or more (FID needs a covariance)")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, not {args.max_steps} — pass 1 or more")
    args.size = args.size or DEFAULT_SIZE
    args.channels = args.channels or 1
    args.out = args.out or f"runs/dcgan_{args.cls}_{args.size}"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        check_args(args)
        if args.generate is not None:
            generate(args)
        else:
            train(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
