"""cyclegan.py: unpaired translation of one-channel chest X-rays, normal -> pneumonia, as CycleGAN.

Paper: Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017 (arXiv:1703.10593), with the details of its reference code
(junyanz/pytorch-CycleGAN-and-pix2pix). Application: Lugo-Torres et al., "Synthetic Generation of
Pneumonia Images using CycleGAN Model" and its extended version, which translate normal X-rays
into general, bacterial and viral pneumonia at 256x256, train 100 epochs and report FID and IS at
epochs 25, 50, 75 and 100.

Two generators and two discriminators (Zhu et al. Sec. 3, Fig. 3), named for what they do:

    G_src2dst  src -> dst   the paper's G: X -> Y   (e.g. normal -> viral)
    G_dst2src  dst -> src   the paper's F: Y -> X
    D_dst      tells real dst images from G_src2dst(src)   the paper's D_Y
    D_src      tells real src images from G_dst2src(dst)   the paper's D_X

What the generators minimise (Sec. 3.3 Eq. 3, plus the identity term of Sec. 5.2), x from src and
y from dst:

    GAN(D_dst(G_src2dst(x)), real) + GAN(D_src(G_dst2src(y)), real)                  adversarial
    + lambda_cyc * (|G_dst2src(G_src2dst(x)) - x|_1 + |G_src2dst(G_dst2src(y)) - y|_1)   cycle
    + lambda_idt * lambda_cyc * (|G_src2dst(y) - y|_1 + |G_dst2src(x) - x|_1)            identity

Commands (data from prep.py; `python prep.py kermany PATH --out data --size 256` for the real set):

    python prep.py synthetic                     # phantoms in data/synthetic (128 px), seconds
    python cyclegan.py --src normal --dst viral --data data/synthetic/train --size 64 \\
        --epochs 5 --decay-epochs 2              # a first run on a CPU: 1,000 steps, ~4 s each on 2 busy cores
    python cyclegan.py --src normal --dst viral  # the papers' setting: data/train, 256 px (a GPU job)
    python cyclegan.py --src normal --dst viral --eval-every 25      # FID/IS/KID at epochs 25..100
    python cyclegan.py --src normal --dst viral --resume             # continue after a stop
    python cyclegan.py --translate data/test/normal --out fake_viral --grid \\
        --ckpt runs/cyclegan_normal_viral_256/checkpoints/last.pt

A run leaves in runs/cyclegan_<src>_<dst>_<size>/ (or --out): config.json, log.csv (every loss
term, the discriminators' mean outputs, ms/step), samples/step_NNNNNN.png, checkpoints/last.pt and
step_NNNNNN.pt, and metrics.csv with --eval-every. The file reads top to bottom: models, losses
and small helpers, data, training, translation, command line.
"""
import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

# --- Constants: the paper's numbers, each where it comes from --------------------------------------
CLASSES = ("normal", "bacterial", "viral", "covid")     # the data contract's class names
SUPPORTED_SIZES = (32, 64, 128, 256, 512, 1024)         # powers of two: the U-Net halves down to 1x1
LOAD_SCALE = 286 / 256       # App. 7.1 / reference code: resize 256 -> 286, random-crop back to 256
LAMBDA_CYC = 10.0            # Sec. 4 "Training details": lambda = 10 in Eq. 3
LAMBDA_IDT = 0.5             # App. 7.1: identity loss weight 0.5 * lambda
POOL_SIZE = 50               # Sec. 4: a buffer of the 50 previously generated images
LEARNING_RATE = 2e-4         # Sec. 4 / App. 7.1: Adam with learning rate 0.0002
ADAM_BETAS = (0.5, 0.999)    # reference code (beta1 = 0.5, as DCGAN)
INIT_STD = 0.02              # App. 7.1: weights initialised from N(0, 0.02)
LEAKY_SLOPE = 0.2            # App. 7.2: leaky ReLUs with slope 0.2 in the discriminator
RESNET_BLOCKS_UP_TO_128 = 6  # App. 7.2: 6 residual blocks for 128x128 training images ...
RESNET_BLOCKS_FROM_256 = 9   # ... and 9 for 256x256 or higher
UNET_DROPOUT = 0.5           # pix2pix U-Net (as the pneumonia papers' generator): dropout 0.5 ...
UNET_DROPOUT_BLOCKS = 3      # ... in the first three up blocks, the ones nearest the bottleneck
EPOCHS, DECAY_EPOCHS = 100, 50   # the papers train 100 epochs; Zhu et al. decay over the last half
CPU_SUGGESTED_SIZE = 64      # what the CPU warning suggests
SAMPLE_COUNT = 4             # fixed images per domain in the sample grids
TRANSLATE_BATCH = 16         # images per forward pass in --translate and --eval-every
RANDOM_DATA_STEPS_PER_EPOCH = 1000   # --random-data has no folder to count, so an epoch is this
PRELOAD_GPU_FRACTION = 0.5   # preload the data set on the GPU when it takes less of the free memory
PRELOAD_HOST_FRACTION = 0.5  # ... and at all only when it takes less of the free host memory (issue 8)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# What PIL raises for a file that is not a readable image (a broken PNG chunk is a SyntaxError).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAKE_DATA = ("make it with `python prep.py kermany PATH --out data` (real X-rays) or "
             "`python prep.py synthetic` (phantoms, then --data data/synthetic/train)")


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


class TrainingDiverged(Exception):
    """A loss became NaN or inf: main() prints it as one line and exits with code 1."""


# ===================================================================================================
# Models
# ===================================================================================================

class ResnetBlock(nn.Module):
    """x + F(x), F = pad, conv3x3, norm, ReLU, pad, conv3x3, norm (App. 7.2 "R256", after Johnson et
    al.). There is no ReLU after the sum, as in the reference code: the block can then pass x through
    unchanged, which is what most of an X-ray needs when only the lungs change."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),                    # (B, C, H+2, W+2) reflection, not zeros:
            nn.Conv2d(channels, channels, 3),         # (B, C, H, W)      fewer border artefacts (App. 7.2)
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),                    # (B, C, H+2, W+2)
            nn.Conv2d(channels, channels, 3),         # (B, C, H, W)
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x):
        return x + self.body(x)                       # (B, C, H, W)


class ResnetGenerator(nn.Module):
    """Zhu et al.'s generator (App. 7.2): c7s1-64, d128, d256, R256 x n_blocks, u128, u64, c7s1-C.

    Instance norm throughout (Sec. 4, after Ulyanov et al.): each image is normalised on its own, so
    batch size 1 works. Convolutions keep their bias because instance norm without affine parameters
    has none to replace it (reference code: use_bias when the norm is instance norm). Shapes below
    are for ngf = 64 and an S x S input; the output has the input's size.
    """

    def __init__(self, in_channels, out_channels, n_blocks, ngf=64):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        layers = [
            # Pad by 3, half the 7x7 kernel, so the size is kept. (A copy elsewhere pads by the
            # channel count, which happens to be 3 for RGB and breaks one-channel X-rays.)
            nn.ReflectionPad2d(3),                                        # (B, C_in, S+6, S+6)
            nn.Conv2d(in_channels, ngf, 7),                               # (B, 64, S, S)      c7s1-64
            nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True),
            nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1),              # (B, 128, S/2, S/2) d128
            nn.InstanceNorm2d(2 * ngf), nn.ReLU(inplace=True),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1),          # (B, 256, S/4, S/4) d256
            nn.InstanceNorm2d(4 * ngf), nn.ReLU(inplace=True),
        ]
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]         # (B, 256, S/4, S/4) R256
        layers += [
            # Transposed convolutions upsample (App. 7.2 "u128", "u64"); output_padding=1 makes
            # the size exactly double.
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(2 * ngf), nn.ReLU(inplace=True),            # (B, 128, S/2, S/2) u128
            nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True),                # (B, 64, S, S)      u64
            nn.ReflectionPad2d(3),                                        # (B, 64, S+6, S+6)
            nn.Conv2d(ngf, out_channels, 7),                              # (B, C_out, S, S)   c7s1-C
            nn.Tanh(),                          # [-1, 1], the range the images are normalised to
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class UnetGenerator(nn.Module):
    """The U-Net generator of pix2pix (Isola et al. 2017), which the pneumonia papers use with
    instance norm: log2(S) downsamplings by 4x4 stride-2 convolutions take an S x S image to 1x1
    (8 of them at 256 px, 6 at 64 px), then as many 4x4 stride-2 transposed convolutions come back,
    each concatenated with the encoder output of the same size (the skip connections carry the
    fine detail: ribs, edges, the text markers). Dropout 0.5 in the first three up blocks, at
    every size, as pix2pix's decoder table (CD512-CD512-CD512-C512-...). Widths are ngf * 2^i,
    capped at 8 * ngf. The layer shapes are those of the reference code's unet_256 (54.414 M
    parameters with its batch norm), which differs in three details: each activation comes before
    its convolution (so a skip carries the features before the activation), the dropout sits in the
    up blocks to 4x4, 8x8 and 16x16, and its CycleGAN turns dropout off. At 256 px with ngf = 64:

        down 1   (B, 1, 256, 256) -> (B, 64, 128, 128)     conv, LeakyReLU (no norm on the input)
        down 2                    -> (B, 128, 64, 64)      conv, norm, LeakyReLU
        down 3                    -> (B, 256, 32, 32)
        down 4..7                 -> (B, 512, 16, 16) ... (B, 512, 2, 2)
        down 8                    -> (B, 512, 1, 1)        no norm: the instance norm of one pixel is 0
        up 1     (B, 512, 1, 1)   -> (B, 512, 2, 2)   ++ down 7 -> (B, 1024, 2, 2)    dropout
        up 2                      -> (B, 512, 4, 4)   ++ down 6 -> (B, 1024, 4, 4)    dropout
        up 3                      -> (B, 512, 8, 8)   ++ down 5 -> (B, 1024, 8, 8)    dropout
        up 4..7                   -> ... (B, 64, 128, 128) ++ down 1 -> (B, 128, 128, 128)
        last                      -> (B, 1, 256, 256)  transposed conv, tanh
    """

    def __init__(self, in_channels, out_channels, size, ngf=64):
        super().__init__()
        if size not in SUPPORTED_SIZES:
            raise ValueError(f"the U-Net needs a power-of-two size in {SUPPORTED_SIZES}, got {size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        n_downs = int(math.log2(size))
        widths = [min(ngf * 2 ** i, 8 * ngf) for i in range(n_downs)]  # 64, 128, 256, 512, 512, ...
        self.downs = nn.ModuleList()
        previous = in_channels
        for i, width in enumerate(widths):
            layers = [nn.Conv2d(previous, width, 4, stride=2, padding=1)]   # halves the size
            if 0 < i < n_downs - 1:
                layers.append(nn.InstanceNorm2d(width))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            self.downs.append(nn.Sequential(*layers))
            previous = width
        self.ups = nn.ModuleList()
        for i, width in enumerate(reversed(widths[:-1])):                  # 512, 512, 512, ..., 64
            layers = [nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1),  # doubles it
                      nn.InstanceNorm2d(width)]
            if i < UNET_DROPOUT_BLOCKS:
                layers.append(nn.Dropout(UNET_DROPOUT))
            layers.append(nn.ReLU(inplace=True))
            self.ups.append(nn.Sequential(*layers))
            previous = 2 * width                                           # after the concatenation
        self.last = nn.Sequential(nn.ConvTranspose2d(previous, out_channels, 4, stride=2, padding=1),
                                  nn.Tanh())

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips = skips[-2::-1]                # the encoder outputs, deepest first, without the 1x1
        for up, skip in zip(self.ups, skips):
            x = torch.cat([up(x), skip], dim=1)
        return self.last(x)


def make_generator(kind, channels, size, ngf=64):
    """The generator for `--generator kind` at `size` px, channels -> channels (one for X-rays)."""
    if size not in SUPPORTED_SIZES:
        raise ValueError(f"size {size} is not supported; use one of {SUPPORTED_SIZES}")
    if kind == "resnet":
        n_blocks = RESNET_BLOCKS_FROM_256 if size >= 256 else RESNET_BLOCKS_UP_TO_128
        return ResnetGenerator(channels, channels, n_blocks, ngf)
    if kind == "unet":
        return UnetGenerator(channels, channels, size, ngf)
    raise ValueError(f"unknown generator {kind!r}; use resnet or unet")


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN (App. 7.2 "C64-C128-C256-C512", after pix2pix): a fully convolutional net
    whose every output judges one 70x70 patch, so a 256 x 256 input gives 30 x 30 verdicts. Ck is
    4x4 conv, instance norm, LeakyReLU(0.2); C64 has no norm; C512 has stride 1 (reference code).

    Returns logits, no sigmoid: LSGAN compares them with 1 and 0 by squared error, and the "bce"
    loss uses BCEWithLogitsLoss, which is numerically stable where Sigmoid + BCELoss is not.
    Shapes for a 256 x 256 input and ndf = 64:
    """

    def __init__(self, in_channels, ndf=64):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),          # (B, 64, 128, 128) C64
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(ndf, 2 * ndf, 4, stride=2, padding=1),              # (B, 128, 64, 64)  C128
            nn.InstanceNorm2d(2 * ndf), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(2 * ndf, 4 * ndf, 4, stride=2, padding=1),          # (B, 256, 32, 32)  C256
            nn.InstanceNorm2d(4 * ndf), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(4 * ndf, 8 * ndf, 4, stride=1, padding=1),          # (B, 512, 31, 31)  C512
            nn.InstanceNorm2d(8 * ndf), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(8 * ndf, 1, 4, stride=1, padding=1),                # (B, 1, 30, 30)    logits
        )

    def forward(self, x):
        return self.model(x)


def init_weights(net, std=INIT_STD):
    """Convolution weights from N(0, std) and zero biases (App. 7.1). Instance norm here has no
    affine parameters, so there is nothing else to initialise."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CycleGAN(nn.Module):
    """The four networks of Fig. 3 in one module, so they move, save and load together."""

    def __init__(self, generator, channels, size, ngf=64, ndf=64):
        super().__init__()
        self.G_src2dst = make_generator(generator, channels, size, ngf)   # G: X -> Y
        self.G_dst2src = make_generator(generator, channels, size, ngf)   # F: Y -> X
        self.D_src = PatchDiscriminator(channels, ndf)                    # D_X
        self.D_dst = PatchDiscriminator(channels, ndf)                    # D_Y
        for net in self.children():
            init_weights(net)


# ===================================================================================================
# Losses and small helpers
# ===================================================================================================

def gan_loss(logits, target_is_real, mode):
    """The adversarial loss of D's logits against "real" (1) or "fake" (0), averaged over all patches.

    lsgan (default): (logit - target)^2, the least-squares GAN that Zhu et al. use instead of the
    log-likelihood of Eq. 1 because it trains more stably (Sec. 4, after Mao et al.).
    bce: the log-likelihood of Eq. 1 on logits; for G, target "real" is the non-saturating form.
    """
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def identity_loss(G, real):
    """|G(y) - y|_1 for an image y that is already in G's output domain (Sec. 5.2, after Taigman
    et al.): it keeps G from changing what needs no change, such as the overall grey levels. It is
    only defined when G maps C channels to C channels (the reference code asserts the same)."""
    if G.in_channels != G.out_channels:
        raise ValueError(f"the identity loss needs as many input as output channels, got "
                         f"{G.in_channels} -> {G.out_channels}; set --lambda-idt 0")
    return F.l1_loss(G(real), real)


class ImagePool:
    """A history of generated images for the discriminator updates (Sec. 4, after Shrivastava et
    al.): D then sees fakes from the last several generators, not only the newest, which damps
    oscillation. Per image: until the pool holds `size` images, store it and return it; after that,
    with probability 1/2 return a random stored image and put the new one in its place, else return
    the new one. Size 0 turns the pool off.

    Random draws come from `generator`, a CPU torch.Generator (decided on the host, no device sync),
    so the whole state is tensors: `images` and the generator's state, both kept in checkpoints.
    """

    def __init__(self, size, generator=None):
        self.size = size
        self.generator = generator
        self.images = None                             # (n, C, H, W) float32, n <= size

    def query(self, images):
        """(B, C, H, W) fakes -> (B, C, H, W) images for D, detached (no gradient reaches G)."""
        if self.size == 0:
            return images.detach()
        chosen = []
        for image in images.detach():
            image = image.float()
            if self.images is None or len(self.images) < self.size:
                stored = image[None].clone()
                self.images = stored if self.images is None else torch.cat([self.images, stored])
                chosen.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                chosen.append(self.images[i].clone())
                self.images[i] = image
            else:
                chosen.append(image)
        return torch.stack(chosen).to(images.dtype)

    def state(self):
        return self.images if self.images is not None else torch.empty(0)

    def load(self, images, device):
        self.images = images.to(device) if len(images) else None


def lr_factor(epoch, epochs, decay_epochs):
    """The learning-rate multiplier during `epoch` (0-based): 1 for the first epochs - decay_epochs
    epochs, then linear towards 0 (App. 7.1: "keep the same learning rate for the first 100 epochs
    and linearly decay the rate to zero over the next 100"). As the reference code,
    1 - max(0, epoch + 1 - constant) / (decay_epochs + 1): the last epoch runs at 1/(decay_epochs + 1)
    of the rate, and the rate would be 0 one epoch later. The scheduler steps once per epoch, after
    the optimizers (calling it before them skips the first value and makes PyTorch warn)."""
    constant = epochs - decay_epochs
    return 1.0 - max(0, epoch + 1 - constant) / (decay_epochs + 1)


def to_model_input(images, channels, device, memory_format=torch.contiguous_format):
    """uint8 (B, 1 or C, S, S) -> float (B, channels, S, S) in [-1, 1] on `device`, the tanh range of
    the generators (the reference code's Normalize(0.5, 0.5)). --channels 3 repeats the grey."""
    x = images.to(device, non_blocking=True).float() / 127.5 - 1.0
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return x.contiguous(memory_format=memory_format)


def to_uint8(x):
    """[-1, 1] float -> [0, 255] uint8, the form images are saved and scored in (metrics.py)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(image):
    """(C, H, W) uint8 -> PIL image: one channel stays one channel ('L'), never forced to RGB."""
    array = image.cpu().numpy()
    if len(array) == 1:
        return Image.fromarray(array[0], "L")
    return Image.fromarray(array.transpose(1, 2, 0), "RGB")


@contextlib.contextmanager
def eval_mode(*nets):
    """Sampling, evaluation and translation: eval mode (dropout off) and no autograd, restored after."""
    was_training = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for net, mode in zip(nets, was_training):
            net.train(mode)


def translate_images(G, images, device, batch_size=TRANSLATE_BATCH):
    """uint8 (N, C, S, S) -> uint8 (N, C_out, S, S) on the CPU, G applied in batches (call inside
    eval_mode). Used by the sample grids, --eval-every and --translate."""
    out = [to_uint8(G(to_model_input(chunk, G.in_channels, device))).cpu()
           for chunk in images.split(batch_size)]
    return torch.cat(out)


def save_grid(images, path, nrow):
    """uint8 (N, C, H, W) -> one PNG grid, saved with C channels (one for X-rays)."""
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255)
    to_pil(grid[:images.shape[1]]).save(path)         # make_grid repeats one channel to three


def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device, said once."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r} — use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but no CUDA GPU is visible — use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} GPUs — use cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1}")
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    elif device.type == "cpu":
        print("device: cpu")
    else:
        raise UserError(f"--device {name} is not supported — use auto, cpu, cuda or cuda:N")
    return device


# ===================================================================================================
# Data
# ===================================================================================================

def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def class_images(data, cls, flag="--data"):
    """The image files of one class, <data>/<cls>/*.png, or a UserError saying how to make them."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder {data} not found — {MAKE_DATA}, or pass {flag}")
    folder = data / cls
    if not folder.is_dir():
        raise UserError(f"class folder {folder} not found — {MAKE_DATA}, or pick another class")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"no images in {folder} — {MAKE_DATA}")
    return paths


def open_gray(path):
    """One image file as a grayscale ('L') PIL image, or a UserError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("L")
    except UNREADABLE as e:
        raise UserError(f"cannot read image {path} ({e}) — delete it, or make the folder again "
                        f"with prep.py") from None


def check_images(paths, workers=1):
    """A UserError naming the first broken file, before training reads the images from disk. PIL's
    verify() reads each file and checks its PNG chunk checksums without decoding the pixels (about
    0.1 ms per 256 px image), so a truncated or damaged file fails now, not in the middle of an
    epoch in a DataLoader worker."""
    def verify(path):
        try:
            with Image.open(path) as im:
                im.verify()
        except UNREADABLE as e:
            raise UserError(f"cannot read image {path} ({e}) — delete it, or make the folder again "
                            f"with prep.py") from None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(verify, paths))


def load_image(path, size):
    """One image as a (1, size, size) uint8 tensor. An image of another size is resized with PIL's
    LANCZOS filter (antialiased when shrinking, sharp when enlarging)."""
    im = open_gray(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(im))[None]


def load_images(paths, size, workers=1):
    """Many images as one (N, 1, size, size) uint8 tensor, decoded by `workers` threads."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return torch.stack(list(pool.map(lambda p: load_image(p, size), paths)))


def free_host_memory_bytes():
    """Host memory available now, in bytes: MemAvailable of /proc/meminfo on Linux (free memory
    plus caches the kernel can drop), else free pages x page size; None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024               # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def preload_fits(n_images, load_size):
    """Whether n_images one-channel uint8 images of load_size^2 take at most PRELOAD_HOST_FRACTION
    of the free host memory (Kermany normal + viral at 286 px: 2,686 x 286^2 = 0.22 GB). If not, says
    so in one line and the caller reads the PNGs from disk instead. Unknown free memory: assume it fits."""
    need, free = n_images * load_size * load_size, free_host_memory_bytes()
    if free is None or need <= PRELOAD_HOST_FRACTION * free:
        return True
    print(f"note: preloading {need / 1e9:.3g} GB of uint8 images needs more than half of the "
          f"{free / 1e9:.3g} GB of free host memory; reading PNGs from disk each epoch instead (slower)")
    return False


def random_crop_flip(image, top, left, size, flip):
    """(C, L, L) uint8 -> (C, size, size): the random jitter of App. 7.1 (resize to 286, crop 256),
    optionally mirrored. The same code runs on the GPU (--fast) and in DataLoader workers."""
    image = image[:, top:top + size, left:left + size]
    return image.flip(-1) if flip else image


@dataclass
class DomainPlan:
    """What the steps of one epoch take from one domain, one entry per image: which file, where to
    crop it, whether to mirror it."""
    index: list
    top: list
    left: list
    flip: list


def epoch_plan(n_images, n_rows, crop_range, flip, generator):
    """The plan for one domain: its images in a random order, the order repeated (reshuffled) when
    the other domain is larger, with random crop offsets in [0, crop_range] and, with --flip, a coin
    per image."""
    repeats = -(-n_rows // n_images)
    index = torch.cat([torch.randperm(n_images, generator=generator) for _ in range(repeats)])[:n_rows]
    top, left = torch.randint(0, crop_range + 1, (2, n_rows), generator=generator)
    mirror = torch.rand(n_rows, generator=generator) < 0.5 if flip else torch.zeros(n_rows, dtype=torch.bool)
    return DomainPlan(index.tolist(), top.tolist(), left.tolist(), mirror.tolist())


class PlanDataset(torch.utils.data.Dataset):
    """The disk pipeline (--no-fast, or too little host memory to preload): each item decodes its
    src and dst PNG from disk (in --workers processes) and crops them as the epoch plan says.

    An image that cannot be read gives its UserError message (a str) instead of the pair, which
    collate_or_error passes on: raised inside a worker process, the error would reach the main
    process wrapped in the worker's traceback, not as the one-line error."""

    def __init__(self, src_paths, dst_paths, src_plan, dst_plan, load_size, size, first_row):
        self.paths = {"src": src_paths, "dst": dst_paths}
        self.plans = {"src": src_plan, "dst": dst_plan}
        self.load_size, self.size, self.first_row = load_size, size, first_row

    def __len__(self):
        return len(self.plans["src"].index) - self.first_row

    def _image(self, domain, row):
        plan = self.plans[domain]
        image = load_image(self.paths[domain][plan.index[row]], self.load_size)
        return random_crop_flip(image, plan.top[row], plan.left[row], self.size, plan.flip[row])

    def __getitem__(self, i):
        row = self.first_row + i
        try:
            return self._image("src", row), self._image("dst", row)
        except UserError as e:
            return str(e)


def collate_or_error(items):
    """The DataLoader's collate_fn: a batch of (src, dst) pairs, or the first error message in it."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.utils.data.default_collate(items)


class UnpairedImages:
    """The training images of two classes, walked as unaligned pairs (Sec. 3: no pairs needed):
    each step takes a batch from src and one from dst, each domain in its own random order. An
    epoch is max(|src|, |dst|) images of each (reference code), the smaller domain repeated, so
    every image of both classes is seen at least once per epoch.

    The epoch plan (order, crops, flips) is a pure function of (seed, epoch), so a resumed run
    replays exactly the batches an uninterrupted one would. With fast=True the images are decoded
    once into a uint8 tensor at the jitter size (on the GPU when it fits) and cropped there, unless
    that would take more than half of the free host memory (issue 8); with fast=False, or then, a
    DataLoader decodes the PNGs from disk every epoch. Both give the same batches.
    """

    def __init__(self, src_paths, dst_paths, size, batch_size, flip, seed, fast, workers, device):
        self.src_paths, self.dst_paths = src_paths, dst_paths
        self.size, self.batch_size, self.flip, self.seed = size, batch_size, flip, seed
        self.fast, self.workers, self.device = fast, workers, device
        self.load_size = round(size * LOAD_SCALE)       # 286 for 256, 143 for 128, 72 for 64
        self.steps_per_epoch = max(len(src_paths), len(dst_paths)) // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {batch_size} is larger than both classes "
                            f"({len(src_paths)} and {len(dst_paths)} images) — use a smaller one")
        self.preloaded = fast and preload_fits(len(src_paths) + len(dst_paths), self.load_size)
        if self.preloaded:
            self.src_images = self._preload(src_paths)  # (N_src, 1, L, L) uint8
            self.dst_images = self._preload(dst_paths)  # (N_dst, 1, L, L) uint8
        else:
            check_images(src_paths + dst_paths, workers)   # fail now, not in a DataLoader worker
        # Fixed inputs for the sample grids: the first images of each class, whole, not jittered.
        self.fixed_src = load_images(src_paths[:SAMPLE_COUNT], size, workers)
        self.fixed_dst = load_images(dst_paths[:SAMPLE_COUNT], size, workers)

    def _preload(self, paths):
        images = load_images(paths, self.load_size, self.workers)
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            if images.numel() < PRELOAD_GPU_FRACTION * free_bytes:
                return images.to(self.device)
            return images.pin_memory()
        return images

    def batches(self, epoch, first_step=0):
        """Yield (src, dst) uint8 batches (B, 1, S, S) for the steps first_step.. of `epoch`."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        n_rows, crop_range = self.steps_per_epoch * self.batch_size, self.load_size - self.size
        src_plan = epoch_plan(len(self.src_paths), n_rows, crop_range, self.flip, generator)
        dst_plan = epoch_plan(len(self.dst_paths), n_rows, crop_range, self.flip, generator)
        if not self.preloaded:
            dataset = PlanDataset(self.src_paths, self.dst_paths, src_plan, dst_plan,
                                  self.load_size, self.size, first_step * self.batch_size)
            # Its own generator, so that starting the loader leaves the global RNG alone (resume).
            loader = torch.utils.data.DataLoader(dataset, self.batch_size, num_workers=self.workers,
                                                 collate_fn=collate_or_error, generator=torch.Generator())
            for batch in loader:
                if isinstance(batch, str):                 # an image a worker could not read
                    raise UserError(batch)
                yield batch
            return
        for step in range(first_step, self.steps_per_epoch):
            rows = range(step * self.batch_size, (step + 1) * self.batch_size)
            yield self._crop(self.src_images, src_plan, rows), self._crop(self.dst_images, dst_plan, rows)

    def _crop(self, images, plan, rows):
        return torch.stack([random_crop_flip(images[plan.index[r]], plan.top[r], plan.left[r],
                                             self.size, plan.flip[r]) for r in rows])


class RandomImages:
    """--random-data: random uint8 images made on the device instead of X-rays, for benchmarks only:
    the ms/step it gives is what training costs when the input pipeline costs nothing."""

    def __init__(self, size, batch_size, seed, device):
        self.size, self.batch_size, self.device = size, batch_size, device
        self.steps_per_epoch = RANDOM_DATA_STEPS_PER_EPOCH
        fixed = torch.Generator().manual_seed(seed)
        self.fixed_src, self.fixed_dst = torch.randint(0, 256, (2, SAMPLE_COUNT, 1, size, size),
                                                       generator=fixed, dtype=torch.uint8)

    def batches(self, epoch, first_step=0):
        shape = (self.batch_size, 1, self.size, self.size)
        for _ in range(first_step, self.steps_per_epoch):
            yield (torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device),
                   torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device))


# ===================================================================================================
# Training
# ===================================================================================================

# The columns of log.csv after step, epoch and lr. The G and identity terms are weighted as they
# enter the loss. D_<x>_real / D_<x>_fake are D's mean logit on real images / on the pooled fakes
# ("D(x)" and "D(G(z))"; with LSGAN the targets are 1 and 0).
LOG_TERMS = ("G_adv_src2dst", "G_adv_dst2src", "cycle_src", "cycle_dst", "idt_src2dst", "idt_dst2src",
             "G_total", "D_src", "D_dst", "D_src_real", "D_src_fake", "D_dst_real", "D_dst_fake")
METRICS_COLUMNS = ("step", "epoch", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "n_real",
                   "n_fake", "network", "checkpoint")
MODEL_ARGS = ("src", "dst", "size", "channels", "generator", "ngf", "ndf")   # fixed by a checkpoint


def train_step(model, opt_G, opt_D, scaler, pool_src, pool_dst, real_src, real_dst, *, gan_mode,
               lambda_cyc, lambda_idt, autocast, memory_format):
    """One iteration, in the reference code's order: both generators first, with the discriminators
    frozen, then both discriminators on real images and pooled fakes. Returns the LOG_TERMS as
    0-dim tensors still on the device (reading them would make the host wait for the GPU)."""
    G_src2dst, G_dst2src, D_src, D_dst = model.G_src2dst, model.G_dst2src, model.D_src, model.D_dst
    terms = {}

    # 1) Generators. Freezing D keeps L_G's backward pass out of D's weights, which D's own step
    #    would otherwise have to clear (and saves the work).
    D_src.requires_grad_(False)
    D_dst.requires_grad_(False)
    with autocast():
        fake_dst = G_src2dst(real_src)                 # G(x)       (B, C, S, S)
        rec_src = G_dst2src(fake_dst)                  # F(G(x)) ~ x
        fake_src = G_dst2src(real_dst)                 # F(y)
        rec_dst = G_src2dst(fake_src)                  # G(F(y)) ~ y
        terms["G_adv_src2dst"] = gan_loss(D_dst(fake_dst), True, gan_mode)   # fool D_Y (Eq. 1)
        terms["G_adv_dst2src"] = gan_loss(D_src(fake_src), True, gan_mode)   # fool D_X
        terms["cycle_src"] = lambda_cyc * F.l1_loss(rec_src, real_src)       # forward cycle (Eq. 2)
        terms["cycle_dst"] = lambda_cyc * F.l1_loss(rec_dst, real_dst)       # backward cycle
        if lambda_idt > 0:
            terms["idt_src2dst"] = lambda_idt * lambda_cyc * identity_loss(G_src2dst, real_dst)
            terms["idt_dst2src"] = lambda_idt * lambda_cyc * identity_loss(G_dst2src, real_src)
        else:
            terms["idt_src2dst"] = terms["idt_dst2src"] = torch.zeros((), device=real_src.device)
        loss_G = sum(terms.values())
    terms["G_total"] = loss_G
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)

    # 2) Discriminators: real images -> 1, a fake from the pool -> 0. The loss is halved "to slow
    #    down the rate at which D learns relative to G" (App. 7.1).
    D_src.requires_grad_(True)
    D_dst.requires_grad_(True)
    with autocast():
        pooled_dst = pool_dst.query(fake_dst).contiguous(memory_format=memory_format)  # detached
        pooled_src = pool_src.query(fake_src).contiguous(memory_format=memory_format)
        d_dst_real, d_dst_fake = D_dst(real_dst), D_dst(pooled_dst)                    # (B, 1, P, P)
        d_src_real, d_src_fake = D_src(real_src), D_src(pooled_src)
        terms["D_dst"] = 0.5 * (gan_loss(d_dst_real, True, gan_mode) + gan_loss(d_dst_fake, False, gan_mode))
        terms["D_src"] = 0.5 * (gan_loss(d_src_real, True, gan_mode) + gan_loss(d_src_fake, False, gan_mode))
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(terms["D_src"] + terms["D_dst"]).backward()
    scaler.step(opt_D)
    scaler.update()                                    # once per iteration: one scaler, both steps

    terms.update(D_src_real=d_src_real.mean(), D_src_fake=d_src_fake.mean(),
                 D_dst_real=d_dst_real.mean(), D_dst_fake=d_dst_fake.mean())
    return {name: terms[name].detach().float() for name in LOG_TERMS}


class LossMonitor:
    """Sums the logged terms on the device between log steps (no per-step host sync) and keeps a
    device flag that turns False when any term is NaN or inf. `check` reads the flag (one sync); it
    runs at log steps and before every checkpoint, so no checkpoint is written from a broken state."""

    def __init__(self, device):
        self.device = device
        self.sums = torch.zeros(len(LOG_TERMS), device=device)
        self.count = 0
        self.all_finite = torch.ones((), dtype=torch.bool, device=device)
        self.checked_step = 0                          # every loss up to this step was finite

    def add(self, terms):
        values = torch.stack([terms[name] for name in LOG_TERMS])
        self.sums += values
        self.count += 1
        self.all_finite &= torch.isfinite(values).all()

    def check(self, step, last_good):
        if not bool(self.all_finite):
            raise TrainingDiverged(
                f"non-finite loss at step {step} (first bad step after {self.checked_step}) — lower "
                f"--lr, try --no-amp or --gan-loss lsgan; the last good checkpoint is {last_good}")
        self.checked_step = step

    def means(self):
        means = dict(zip(LOG_TERMS, (self.sums / max(self.count, 1)).tolist()))
        self.sums.zero_()
        self.count = 0
        return means


class StepTimer:
    """Milliseconds per training step, averaged over the steps since the last read. Sampling,
    saving and evaluation are left out (`paused`). The device is synchronised before each clock
    read, because CUDA runs asynchronously: without it the clock would time kernel launches."""

    def __init__(self, device):
        self.device, self.seconds, self.steps = device, 0.0, 0
        self.started = self._now()

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.seconds += self._now() - self.started
        try:
            yield
        finally:
            self.started = self._now()

    def read_ms(self):
        with self.paused():
            ms = 1000 * self.seconds / max(self.steps, 1)
            self.seconds, self.steps = 0.0, 0
        return ms


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the flags: what an exact resume needs."""
    model: CycleGAN
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: torch.optim.lr_scheduler.LRScheduler
    sched_D: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    pool_src: ImagePool
    pool_dst: ImagePool
    pool_rng: torch.Generator
    step: int = 0


def make_checkpoint(s, args, steps_per_epoch, device):
    """One dict of plain types and tensors, loadable with torch.load(weights_only=True)."""
    return {
        "model": "cyclegan",
        "step": s.step,
        "epoch": s.step // steps_per_epoch,               # completed epochs
        "steps_per_epoch": steps_per_epoch,
        "args": dict(vars(args)),
        "models": {name: net.state_dict() for name, net in s.model.named_children()},
        "opt_G": s.opt_G.state_dict(), "opt_D": s.opt_D.state_dict(),
        "sched_G": s.sched_G.state_dict(), "sched_D": s.sched_D.state_dict(),
        "scaler": s.scaler.state_dict(),
        "pool_src": s.pool_src.state(), "pool_dst": s.pool_dst.state(),
        "rng": {"torch": torch.get_rng_state(),       # U-Net dropout, --random-data
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "pool": s.pool_rng.get_state()},
    }


def save_checkpoint(checkpoint, path):
    """Write to path.tmp, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path):
    """A CycleGAN checkpoint as a dict (tensors on the CPU), or a UserError that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found — pass a checkpoints/*.pt file of a cyclegan.py run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a "
                        f"checkpoints/*.pt file written by cyclegan.py") from None
    kind = checkpoint.get("model") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if kind != "cyclegan":
        raise UserError(f"{path} is not a CycleGAN checkpoint (it holds {kind!r}) — pass a "
                        f"checkpoints/*.pt file written by cyclegan.py")
    return checkpoint


def restore(s, checkpoint, device):
    """Put a checkpoint's state back into s: weights, optimizers, schedulers, scaler, pools, RNGs."""
    for name, net in s.model.named_children():
        net.load_state_dict(checkpoint["models"][name])
    s.opt_G.load_state_dict(checkpoint["opt_G"])
    s.opt_D.load_state_dict(checkpoint["opt_D"])
    s.sched_G.load_state_dict(checkpoint["sched_G"])
    s.sched_D.load_state_dict(checkpoint["sched_D"])
    if s.scaler.is_enabled() and checkpoint["scaler"]:
        s.scaler.load_state_dict(checkpoint["scaler"])
    s.pool_src.load(checkpoint["pool_src"], device)
    s.pool_dst.load(checkpoint["pool_dst"], device)
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    s.pool_rng.set_state(checkpoint["rng"]["pool"])
    s.step = checkpoint["step"]


def check_resumable(checkpoint, path, args, steps_per_epoch):
    """A checkpoint can only continue the run it came from: same classes, size, channels, nets, data."""
    saved = checkpoint["args"]
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (this run: {getattr(args, k)})"
             for k in MODEL_ARGS if saved.get(k) != getattr(args, k)]
    if diffs:
        raise UserError(f"checkpoint {path} does not match this run: it has {', '.join(diffs)} — "
                        f"resume with the checkpoint's flags, or start a new run with another --out")
    if checkpoint["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"checkpoint {path} had {checkpoint['steps_per_epoch']} steps per epoch, the data "
                        f"now gives {steps_per_epoch} — resume with the same --data and --batch-size")


def open_csv(path, columns, keep_up_to_step=None):
    """Open a CSV log for writing. A resumed run keeps the rows up to its checkpoint's step and
    drops later ones, so the file reads as one uninterrupted run."""
    rows = []
    if keep_up_to_step is not None and path.exists():
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_up_to_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer


def make_evaluator(args, device):
    """For --eval-every: the metrics.Evaluator with the real dst images, and the src test images to
    translate. Built before training, so missing Inception weights fail now, not after 25 epochs.

    Real: every dst image of the training split (the distribution G_src2dst learns to match; the
    larger N, the less biased FID). Fake: G_src2dst of every src image of the test split, which G
    never saw. Both at --size, whole, never jittered.
    """
    import metrics    # only here: training without --eval-every does not need metrics.py

    test_data = Path(args.test_data) if args.test_data else Path(args.data).parent / "test"
    real = load_images(class_images(args.data, args.dst), args.size, args.workers)        # (N, 1, S, S)
    src_test = load_images(class_images(test_data, args.src, "--test-data"), args.size, args.workers)
    if min(len(real), len(src_test)) < 2:
        raise UserError(f"--eval-every needs at least 2 real {args.dst} and 2 test {args.src} images, "
                        f"found {len(real)} and {len(src_test)} — add images or leave out --eval-every")
    try:
        evaluator = metrics.Evaluator(real, weights=args.fid_weights, device=str(device))
    except metrics.WeightsError as e:
        raise UserError(str(e)) from None
    print(f"evaluation: G_src2dst({len(src_test)} {args.src} images of {test_data}) against "
          f"{len(real)} real {args.dst} images of {args.data}, every {args.eval_every} epochs")
    return evaluator, src_test


def save_samples(model, fixed_src, fixed_dst, device, path):
    """The sample grid from the fixed inputs, in eval mode without autograd. Columns are images;
    rows: src | G_src2dst(src) | G_dst2src(G_src2dst(src)) | dst | G_dst2src(dst) | G_src2dst(G_dst2src(dst)).
    The third and sixth rows should look like the first and fourth: the cycle (Eq. 2)."""
    G_src2dst, G_dst2src = model.G_src2dst, model.G_dst2src
    with eval_mode(G_src2dst, G_dst2src):
        fake_dst = translate_images(G_src2dst, fixed_src, device)
        fake_src = translate_images(G_dst2src, fixed_dst, device)
        rows = [fixed_src.expand_as(fake_dst), fake_dst, translate_images(G_dst2src, fake_dst, device),
                fixed_dst.expand_as(fake_src), fake_src, translate_images(G_src2dst, fake_src, device)]
    save_grid(torch.cat(rows), path, nrow=len(fixed_src))


def evaluate(model, evaluator, src_test, device, metrics_log, step, epoch, checkpoint_path):
    """FID, IS and KID of G_src2dst(src test images) against the real dst images (the papers'
    Table I), one row of metrics.csv. The RNG is forked, so evaluating does not change training."""
    with eval_mode(model.G_src2dst), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        scores = evaluator.score(translate_images(model.G_src2dst, src_test, device))
    metrics_log.writerow({"step": step, "epoch": epoch, "checkpoint": checkpoint_path, **scores})
    print(f"epoch {epoch}: FID {scores['fid']:.2f}, IS {scores['is_mean']:.3f} ± {scores['is_std']:.3f}, "
          f"KID {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f} (N fake {scores['n_fake']}, "
          f"N real {scores['n_real']}, {scores['network']})")


def train(args):
    """Train a CycleGAN as args say; returns the exit code (0, or 130 after Ctrl-C)."""
    # The class folders first: missing data is the likeliest mistake, so its error comes alone.
    if not args.random_data:
        src_paths, dst_paths = class_images(args.data, args.src), class_images(args.data, args.dst)
    device = pick_device(args.device)
    if device.type == "cpu" and args.size > CPU_SUGGESTED_SIZE:
        print(f"warning: training on the CPU is slow at {args.size} px; "
              f"try --size {CPU_SUGGESTED_SIZE} for a first run")
    cuda = device.type == "cuda"
    # Speed switches (--fast, the default): mixed precision, channels_last, cuDNN autotuning.
    # Autocast: --amp None (auto) means on with CUDA, off on a CPU; an explicit --amp on a CPU runs
    # bf16 autocast there too, to check that it changes the losses only by noise (tests/bench.py).
    use_amp = args.fast and (cuda if args.amp is None else args.amp)
    amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    memory_format = torch.channels_last if args.fast and cuda else torch.contiguous_format
    torch.backends.cudnn.benchmark = args.fast and cuda

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    out = Path(args.out)
    last_path = out / "checkpoints" / "last.pt"
    resume_path = None
    if args.resume is not None:
        resume_path = last_path if args.resume == "last" else Path(args.resume)
    elif last_path.exists():
        raise UserError(f"{out} already holds a run — add --resume to continue it, or pass another --out")
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    torch.manual_seed(args.seed)

    # Data, and the evaluation set-up before anything is trained.
    if args.random_data:
        data = RandomImages(args.size, args.batch_size, args.seed, device)
    else:
        data = UnpairedImages(src_paths, dst_paths, args.size, args.batch_size, args.flip, args.seed,
                              args.fast, args.workers, device)
    steps_per_epoch = data.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    evaluator, eval_src = make_evaluator(args, device) if args.eval_every else (None, None)

    # Networks, optimizers (one for both G, one for both D, as the reference code), schedule, pools.
    model = CycleGAN(args.generator, args.channels, args.size, args.ngf, args.ndf)
    model = model.to(device, memory_format=memory_format)
    adam = dict(lr=args.lr, betas=ADAM_BETAS)
    if args.fast and cuda:
        adam["fused"] = True                           # one kernel for all parameters
    else:
        adam["foreach"] = args.fast                    # --no-fast: the plain per-parameter loop
    opt_G = torch.optim.Adam(itertools.chain(model.G_src2dst.parameters(), model.G_dst2src.parameters()), **adam)
    opt_D = torch.optim.Adam(itertools.chain(model.D_src.parameters(), model.D_dst.parameters()), **adam)

    def schedule(epoch):
        return lr_factor(epoch, args.epochs, args.decay_epochs)

    pool_rng = torch.Generator().manual_seed(args.seed)
    s = TrainState(model, opt_G, opt_D,
                   torch.optim.lr_scheduler.LambdaLR(opt_G, schedule),
                   torch.optim.lr_scheduler.LambdaLR(opt_D, schedule),
                   torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16),
                   ImagePool(args.pool_size, pool_rng), ImagePool(args.pool_size, pool_rng), pool_rng)
    last_good = "none (no checkpoint was saved before it)"
    if checkpoint is not None:
        check_resumable(checkpoint, resume_path, args, steps_per_epoch)
        restore(s, checkpoint, device)
        last_good = f"{resume_path} (step {s.step})"
        print(f"resumed from {resume_path} at step {s.step} (epoch {s.step // steps_per_epoch})")
    if args.compile:
        for net in model.children():
            net.compile()                              # in place: state_dict keys stay the same
    n_params = sum(p.numel() for p in model.G_src2dst.parameters())
    print(f"CycleGAN {args.src} <-> {args.dst} at {args.size} px, {args.generator} generators "
          f"({n_params / 1e6:.1f} M parameters each), {steps_per_epoch} steps per epoch, "
          f"{total_steps} steps in all")
    if s.step >= total_steps:
        print(f"nothing to do: the checkpoint is at step {s.step} and the run ends at step {total_steps}")
        return 0

    # The run folder.
    (out / "samples").mkdir(parents=True, exist_ok=True)
    config = {"args": vars(args), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "amp": str(amp_dtype).replace("torch.", "") if use_amp else "off",
              "steps_per_epoch": steps_per_epoch, "python": platform.python_version(),
              "torch": torch.__version__, "torchvision": torchvision.__version__}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    resumed_at = s.step if checkpoint is not None else None
    log_file, log = open_csv(out / "log.csv", ("step", "epoch", "lr", *LOG_TERMS, "ms_per_step"), resumed_at)
    metrics_file, metrics_log = (open_csv(out / "metrics.csv", METRICS_COLUMNS, resumed_at)
                                 if evaluator else (None, None))

    def save(*paths):
        nonlocal last_good
        monitor.check(s.step, last_good)               # never save a NaN state
        state = make_checkpoint(s, args, steps_per_epoch, device)
        for path in paths:
            save_checkpoint(state, path)
        last_good = f"{last_path} (step {s.step})"

    def step_path():
        return out / "checkpoints" / f"step_{s.step:06d}.pt"

    # Ctrl-C or SIGTERM (`kill`, a scheduler): finish the step, save, exit 130 (the loop checks
    # the flag after each step).
    interrupted = threading.Event()
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, lambda signum, frame: interrupted.set())
                        for sig in (signal.SIGINT, signal.SIGTERM)}

    monitor, timer = LossMonitor(device), StepTimer(device)
    monitor.checked_step = s.step
    batches = None
    try:
        while s.step < total_steps:
            epoch, step_in_epoch = divmod(s.step, steps_per_epoch)
            if batches is None or step_in_epoch == 0:
                batches = iter(data.batches(epoch, step_in_epoch))
            src_u8, dst_u8 = next(batches)
            real_src = to_model_input(src_u8, args.channels, device, memory_format)   # (B, C, S, S)
            real_dst = to_model_input(dst_u8, args.channels, device, memory_format)
            terms = train_step(s.model, s.opt_G, s.opt_D, s.scaler, s.pool_src, s.pool_dst,
                               real_src, real_dst, gan_mode=args.gan_loss, lambda_cyc=args.lambda_cyc,
                               lambda_idt=args.lambda_idt, autocast=autocast, memory_format=memory_format)
            monitor.add(terms)
            lr_used = s.opt_G.param_groups[0]["lr"]     # before the epoch's scheduler step below
            s.step += 1
            timer.steps += 1
            epochs_done = s.step // steps_per_epoch

            if s.step % steps_per_epoch == 0:          # the end of an epoch
                s.sched_G.step()                       # after the optimizers, once per epoch
                s.sched_D.step()
                if evaluator and (epochs_done % args.eval_every == 0 or epochs_done == args.epochs):
                    with timer.paused():
                        save(last_path, step_path())   # the evaluated model, to --translate later
                        evaluate(s.model, evaluator, eval_src, device, metrics_log, s.step, epochs_done,
                                 step_path())
                        metrics_file.flush()

            if s.step % args.log_every == 0 or s.step == total_steps:
                monitor.check(s.step, last_good)
                ms = timer.read_ms()
                with timer.paused():
                    means = monitor.means()
                    epoch_now = (s.step - 1) // steps_per_epoch + 1
                    log.writerow({"step": s.step, "epoch": epoch_now, "lr": f"{lr_used:.6g}",
                                  **{k: f"{v:.5g}" for k, v in means.items()}, "ms_per_step": f"{ms:.1f}"})
                    log_file.flush()
                    print(f"step {s.step}/{total_steps} epoch {epoch_now} | "
                          f"G adv {means['G_adv_src2dst']:.3f}/{means['G_adv_dst2src']:.3f} "
                          f"cycle {means['cycle_src']:.3f}/{means['cycle_dst']:.3f} "
                          f"idt {means['idt_src2dst']:.3f}/{means['idt_dst2src']:.3f} | "
                          f"D {means['D_src']:.3f}/{means['D_dst']:.3f} | {ms:.1f} ms/step")
            if s.step % args.sample_every == 0 or s.step == total_steps:
                with timer.paused():
                    save_samples(s.model, data.fixed_src, data.fixed_dst, device,
                                 out / "samples" / f"step_{s.step:06d}.png")
            if s.step % args.save_every == 0 or s.step == total_steps:
                with timer.paused():
                    save(last_path, step_path())
            if interrupted.is_set():
                save(last_path)
                print(f"interrupted at step {s.step}; saved {last_path} — continue with the same "
                      f"command plus --resume", file=sys.stderr)
                return 130
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        log_file.close()
        if metrics_file:
            metrics_file.close()
    print(f"done: step {s.step}, checkpoint {last_path}, samples in {out / 'samples'}")
    return 0


# ===================================================================================================
# Translation: --translate DIR --ckpt PATH --out DIR
# ===================================================================================================

def translate(args):
    """Translate every image of a folder with one generator of a checkpoint. Each output keeps its
    input's file name and size: the image is resized (not cropped) to the model size, translated,
    and resized back, so a non-square input is squeezed and unsqueezed. With --grid, also writes
    panels/<name>.png: input | translated | reconstructed (translated back), as the papers' figures."""
    in_dir, out_dir = Path(args.translate), Path(args.out)
    if not in_dir.is_dir():
        raise UserError(f"folder {in_dir} not found — pass a folder of images to --translate")
    paths = list_images(in_dir)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {in_dir} — pass a folder of images")
    if out_dir.resolve() == in_dir.resolve():
        raise UserError(f"--out {out_dir} is the input folder — pass another --out, or the inputs "
                        f"would be overwritten")
    checkpoint = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    saved = checkpoint["args"]
    model = CycleGAN(saved["generator"], saved["channels"], saved["size"], saved["ngf"], saved["ndf"])
    for name, net in model.named_children():
        net.load_state_dict(checkpoint["models"][name])
    model.to(device)
    forward, backward = model.G_src2dst, model.G_dst2src
    names = (saved["src"], saved["dst"])
    if args.direction == "dst2src":
        forward, backward, names = backward, forward, names[::-1]

    (out_dir / "panels" if args.grid else out_dir).mkdir(parents=True, exist_ok=True)

    size = saved["size"]
    with eval_mode(forward, backward):
        for first in range(0, len(paths), TRANSLATE_BATCH):
            chunk = paths[first:first + TRANSLATE_BATCH]
            originals = [open_gray(p) for p in chunk]                              # each at its own size
            resized = [im.resize((size, size), Image.Resampling.LANCZOS) for im in originals]
            x = torch.stack([torch.from_numpy(np.array(im))[None] for im in resized])  # (B, 1, S, S) uint8
            fake = translate_images(forward, x, device)
            rec = translate_images(backward, fake, device) if args.grid else None
            for k, (path, original) in enumerate(zip(chunk, originals)):
                translated = to_pil(fake[k]).resize(original.size, Image.Resampling.LANCZOS)
                translated.save(out_dir / path.name, quality=95)                   # same name and size
                if args.grid:
                    reconstructed = to_pil(rec[k]).resize(original.size, Image.Resampling.LANCZOS)
                    panel = Image.new(translated.mode, (3 * original.width, original.height))
                    for i, im in enumerate((original.convert(translated.mode), translated, reconstructed)):
                        panel.paste(im, (i * original.width, 0))
                    panel.save(out_dir / "panels" / f"{path.stem}.png")
    print(f"translated {len(paths)} images {names[0]} -> {names[1]} into {out_dir}"
          + (f" (panels in {out_dir / 'panels'})" if args.grid else ""))


# ===================================================================================================
# Command line
# ===================================================================================================

class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the repo's one-line error and exit code 2."""

    def error(self, message):
        print(f"error: {message} — see python cyclegan.py --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineArgumentParser(description="CycleGAN for chest X-rays: unpaired translation src <-> dst "
                                          "(Zhu et al. 2017).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--src", choices=CLASSES, help="the class translated from (the paper's X), e.g. normal")
    g.add_argument("--dst", choices=CLASSES, help="the class translated to (the paper's Y), e.g. viral")
    g.add_argument("--data", default="data/train", help="the training split folder, <data>/<class>/*.png")
    g.add_argument("--test-data", default=None,
                   help="where --eval-every takes the src images to translate; None: the sibling "
                        "test split, <data>/../test")
    g.add_argument("--size", type=int, default=256, help=f"image side in pixels, one of {SUPPORTED_SIZES}")
    g.add_argument("--channels", type=int, choices=(1, 3), default=1,
                   help="1 for X-rays; 3 repeats the grey channel")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips; off because a mirrored chest X-ray puts the heart on "
                        "the wrong side, which G would learn to draw")
    g.add_argument("--random-data", action="store_true",
                   help="train on random tensors instead of images (benchmarks only; needs no data)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads that decode the PNGs at start-up, and DataLoader workers with --no-fast")
    g = p.add_argument_group("model")
    g.add_argument("--generator", choices=("resnet", "unet"), default="resnet",
                   help="resnet: Zhu et al.'s (9 blocks at 256 px, 6 below); unet: the pneumonia papers'")
    g.add_argument("--ngf", type=int, default=64, help="generator width (channels of the first layer)")
    g.add_argument("--ndf", type=int, default=64, help="discriminator width (channels of the first layer)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=EPOCHS,
                   help="epochs in all (an epoch: max(|src|, |dst|) images)")
    g.add_argument("--decay-epochs", type=int, default=DECAY_EPOCHS,
                   help="the last epochs, over which the learning rate falls linearly to zero")
    g.add_argument("--batch-size", type=int, default=1, help="images per domain per step (Zhu et al.: 1)")
    g.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam learning rate, G and D")
    g.add_argument("--gan-loss", choices=("lsgan", "bce"), default="lsgan", help="adversarial loss")
    g.add_argument("--lambda-cyc", type=float, default=LAMBDA_CYC, help="weight of the cycle loss")
    g.add_argument("--lambda-idt", type=float, default=LAMBDA_IDT,
                   help="weight of the identity loss, times --lambda-cyc (0 turns it off)")
    g.add_argument("--pool-size", type=int, default=POOL_SIZE, help="image pool for D (0 turns it off)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order, crops and pool")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this global step, with a checkpoint")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="PATH",
                   help="continue a run; without PATH from <out>/checkpoints/last.pt")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None,
                   help="training: the run folder (None: runs/cyclegan_<src>_<dst>_<size>); "
                        "--translate: the folder for the translated images")
    g.add_argument("--log-every", type=int, default=100, help="steps between rows of log.csv")
    g.add_argument("--sample-every", type=int, default=1000, help="steps between sample grids")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=0,
                   help="epochs between FID/IS/KID evaluations (the papers: 25; 0: none)")
    g.add_argument("--fid-weights", default=None,
                   help="local FID Inception weights file for --eval-every; None: $FID_WEIGHTS or "
                        "metrics.py's download")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="preloaded data cropped on the device, mixed precision, channels_last, fused Adam; "
                        "--no-fast: fp32, PNGs decoded by a DataLoader every epoch")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast; None: on with CUDA (bf16 where supported, else fp16 with a grad "
                        "scaler), off on a CPU. --amp on a CPU: bf16 autocast there; --no-amp: fp32. "
                        "Needs --fast")
    g.add_argument("--compile", action="store_true", help="torch.compile the four networks")
    g = p.add_argument_group("translate (instead of training)")
    g.add_argument("--translate", metavar="DIR", default=None, help="translate every image in DIR")
    g.add_argument("--ckpt", default=None, help="the checkpoint to translate with")
    g.add_argument("--direction", choices=("src2dst", "dst2src"), default="src2dst",
                   help="which generator: G_src2dst or G_dst2src")
    g.add_argument("--grid", action="store_true", help="also write panels input | translated | reconstructed")
    return p.parse_args(argv)


def check_args(args):
    """Flag combinations argparse cannot check, as UserErrors; fills in the default --out."""
    if args.translate is not None:
        if args.ckpt is None or args.out is None:
            raise UserError("--translate needs --ckpt PATH and --out DIR — e.g. --translate data/test/normal "
                            "--ckpt runs/cyclegan_normal_viral_256/checkpoints/last.pt --out fake_viral")
        return
    if args.ckpt is not None or args.grid:
        raise UserError("--ckpt and --grid go with --translate — to continue training use --resume PATH")
    if args.src is None or args.dst is None:
        raise UserError("training needs --src and --dst — e.g. --src normal --dst viral")
    if args.src == args.dst:
        raise UserError(f"--src and --dst are both {args.src} — translate between two different classes")
    if args.size not in SUPPORTED_SIZES:
        raise UserError(f"--size {args.size} is not supported — use one of {', '.join(map(str, SUPPORTED_SIZES))}")
    for flag in ("epochs", "batch_size", "log_every", "sample_every", "save_every", "ngf", "ndf"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is too small — use 1 or more")
    for flag in ("decay_epochs", "pool_size", "eval_every", "workers", "lambda_cyc", "lambda_idt"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is negative — use 0 or more")
    if args.decay_epochs > args.epochs:
        raise UserError(f"--decay-epochs {args.decay_epochs} is more than --epochs {args.epochs} — lower it")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps {args.max_steps} is too small — use 1 or more")
    if args.amp and not args.fast:
        raise UserError("--amp goes with --fast; --no-fast is the plain fp32 run — leave out one of them")
    if args.eval_every and args.random_data:
        raise UserError("--eval-every needs real images — leave out --random-data")
    if args.out is None:
        args.out = f"runs/cyclegan_{args.src}_{args.dst}_{args.size}"


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        if args.translate is not None:
            translate(args)
            return
        code = train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
