"""CycleGAN for chest X-rays: unpaired translation of one class into another, e.g. normal -> viral.

Zhu, Park, Isola & Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
Networks", ICCV 2017, arXiv:1703.10593 (where it is silent: its reference code, junyanz/pytorch-
CycleGAN-and-pix2pix). Applied by Lugo-Torres, Peralta-Rodríguez, Valdez-Rodríguez & Calvo,
"Synthetic Generation of Pneumonia Images using CycleGAN Model": normal into pneumonia X-rays, 100 epochs,
an objective with no identity term (--lambda-idt 0); its extended version adds 256 px, a U-Net generator.

    G_src2dst  src -> dst (the paper's G: X -> Y)    D_dst  real dst vs G_src2dst(src) (the paper's D_Y)
    G_dst2src  dst -> src (the paper's F: Y -> X)    D_src  real src vs G_dst2src(dst) (the paper's D_X)
The generators minimise, for x from src and y from dst (Eq. 3, plus the identity term of Sec. 5.2):
    GAN(D_dst(G_src2dst(x))) + GAN(D_src(G_dst2src(y)))                                 adversarial
    + lambda_cyc * (|G_dst2src(G_src2dst(x)) - x|_1 + |G_src2dst(G_dst2src(y)) - y|_1)   cycle
    + lambda_idt * lambda_cyc * (|G_src2dst(y) - y|_1 + |G_dst2src(x) - x|_1)            identity

  python prep.py synthetic --out data/synth                                # phantoms, no download
  python cyclegan.py --src normal --dst viral --data data/synth/train --size 64 --epochs 5      # a CPU demo
  python cyclegan.py --src normal --dst viral      # data/train, 256 px, Zhu et al.'s networks: a GPU job
  python cyclegan.py --src normal --dst viral --generator unet --lambda-idt 0 --eval-every 33625  # FID each
      # 25 epochs (an epoch = max(|src|, |dst|) = 1,345 steps on Kermany normal -> viral at batch 1)
  python cyclegan.py --src normal --dst viral --resume                    # continue after Ctrl-C
  python cyclegan.py --translate data/test/normal --ckpt runs/cyclegan_normal_viral_256/checkpoints/last.pt \\
      --out fakes/viral --grid

The run folder (runs/cyclegan_<src>_<dst>_<size>/) holds config.json; log.csv (per --log-every
steps: lr, the mean of each loss term as it enters the loss and of D's logits on real and pooled
fake images, ms_per_step); loss_curve.png; samples/step_NNNNNN.png (src | G_src2dst(src) | back,
then from dst); checkpoints/last.pt and step_NNNNNN.pt (all state, pools too: --resume is exact);
with --eval-every metrics.csv (FID, IS, KID by metrics.py).
"""

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.optim.lr_scheduler import LambdaLR
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

LAMBDA_CYC = 10.0        # lambda = 10 in Eq. 3 (Sec. 4)
LAMBDA_IDT = 0.5         # the identity weight is 0.5 * lambda (Sec. 5.2, App. 7.1)
POOL_SIZE = 50           # D sees a history of the last 50 fakes (Sec. 4, after Shrivastava et al.)
LR, BETAS = 2e-4, (0.5, 0.999)  # Adam (Sec. 4; beta1 0.5 from the reference code)
BATCH_SIZE = 1           # Sec. 4; instance norm makes single images fine
EPOCHS = 100             # Lugo-Torres et al. (Zhu et al.: 200, the rate decaying over the second half)
JITTER = 286 / 256       # resized 256 -> 286, randomly cropped back to 256 (pix2pix; reference code)
INIT_STD = 0.02          # weights ~ N(0, 0.02) (App. 7.1)
LEAK = 0.2               # LeakyReLU slope (App. 7.2)
NGF = NDF = 64           # width of G's first and D's first layer (App. 7.2)
UNET_DROPOUT, UNET_DROPOUT_BLOCKS = 0.5, 3  # pix2pix's decoder: dropout 0.5 in the first 3 up blocks
SIZES = (32, 64, 128, 256, 512)  # powers of two: the U-Net halves the image down to 1 x 1
CLASSES = ("normal", "bacterial", "viral", "covid", "pneumonia")  # pneumonia: bacterial + viral (ours), for GP
GRID = 4                 # fixed images per class in the sample grids
EVAL_BATCH = 16          # images per forward pass when translating
STATS = ("G_total", "G_adv_src2dst", "G_adv_dst2src", "cycle_src", "cycle_dst", "idt_src2dst", "idt_dst2src",
         "D_src", "D_dst", "D_src_real", "D_src_fake", "D_dst_real", "D_dst_fake")
MAKE_DATA = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"

# -- Models --------------------------------------------------------------------------------------

class ResnetBlock(nn.Sequential):
    """x + F(x), F = pad, conv3x3, norm, ReLU, pad, conv3x3, norm (App. 7.2 "R256"). No ReLU after
    the sum (reference code): the block can pass x through unchanged, as most of an X-ray needs."""

    def __init__(self, width):  # reflection padding: fewer border artefacts than zeros (App. 7.2)
        super().__init__(nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width), nn.ReLU(True),
                         nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width))

    def forward(self, x):
        return x + super().forward(x)

class ResnetGenerator(nn.Sequential):
    """Zhu et al.'s generator (App. 7.2): c7s1-64, d128, d256, R256 x n_blocks, u128, u64, c7s1-C;
    11,378,179 parameters for RGB with 9 blocks. Instance norm (Sec. 4) normalises each image on its
    own, so batch 1 works; without an affine shift, every convolution keeps its bias (reference code)."""

    def __init__(self, channels, n_blocks, ngf=NGF):
        super().__init__(
            nn.ReflectionPad2d(3),  # half the 7x7 kernel (a copy elsewhere pads by the channel count)
            nn.Conv2d(channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True),              # (B, 64, S, S)
            nn.Conv2d(ngf, 2 * ngf, 3, 2, 1), nn.InstanceNorm2d(2 * ngf), nn.ReLU(True),      # (B, 128, S/2, S/2)
            nn.Conv2d(2 * ngf, 4 * ngf, 3, 2, 1), nn.InstanceNorm2d(4 * ngf), nn.ReLU(True),  # (B, 256, S/4, S/4)
            *[ResnetBlock(4 * ngf) for _ in range(n_blocks)],                                 # (B, 256, S/4, S/4)
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, 2, 1, output_padding=1),                 # (B, 128, S/2, S/2)
            nn.InstanceNorm2d(2 * ngf), nn.ReLU(True),
            nn.ConvTranspose2d(2 * ngf, ngf, 3, 2, 1, output_padding=1),                     # (B, 64, S, S)
            nn.InstanceNorm2d(ngf), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh())                   # (B, C, S, S)

class UnetGenerator(nn.Module):
    """pix2pix's U-Net (Isola et al., CVPR 2017, arXiv:1611.07004), the extended pneumonia paper's
    generator, with instance norm. At 256 px with ngf = 64 (widths ngf * 2^i, at most 8 * ngf):
        down 1..8  (B, 1, 256, 256) -> (B, 64, 128, 128) -> ... -> (B, 512, 1, 1)   4x4 stride-2 convs
        up 1..7    -> (B, 512 + 512, 2, 2) -> ... -> (B, 64 + 64, 128, 128)   transposed, ++ the skip
        last       -> (B, 1, 256, 256), tanh      (the skips carry fine detail: ribs, edges)
    No norm on down 1 (the input) nor down 8 (one pixel's instance norm is 0); dropout in up 1..3.
    The shapes are the reference code's unet_256 (54.414 M parameters with its batch norm); it puts
    each activation before its convolution, and its CycleGAN turns the dropout off."""

    def __init__(self, channels, size, ngf=NGF):
        super().__init__()
        widths = [min(ngf * 2 ** i, 8 * ngf) for i in range(int(math.log2(size)))]  # 64, 128, 256, 512, ...
        self.downs, self.ups, w_in = nn.ModuleList(), nn.ModuleList(), channels
        for i, w in enumerate(widths):  # each halves the side
            norm = [nn.InstanceNorm2d(w)] if 0 < i < len(widths) - 1 else []
            self.downs.append(nn.Sequential(nn.Conv2d(w_in, w, 4, 2, 1), *norm, nn.LeakyReLU(LEAK, True)))
            w_in = w
        for i, w in enumerate(widths[-2::-1]):  # each doubles it: 512, 512, ..., 64
            drop = [nn.Dropout(UNET_DROPOUT)] if i < UNET_DROPOUT_BLOCKS else []
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(w_in, w, 4, 2, 1), nn.InstanceNorm2d(w), *drop,
                                          nn.ReLU(True)))
            w_in = 2 * w  # after the concatenation with the skip
        self.last = nn.Sequential(nn.ConvTranspose2d(w_in, channels, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.ups, skips[-2::-1]):  # the encoder outputs, deepest first, but 1 x 1
            x = torch.cat([up(x), skip], 1)
        return self.last(x)

class PatchDiscriminator(nn.Sequential):
    """The 70x70 PatchGAN (App. 7.2 "C64-C128-C256-C512", after pix2pix): each output judges one
    70 x 70 patch, so a 256 x 256 image gets 30 x 30 verdicts; 2,764,737 parameters for RGB. Returns
    logits: LSGAN needs no sigmoid, and BCE-with-logits is stable and allowed under autocast."""

    def __init__(self, channels, ndf=NDF):
        super().__init__(
            nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(LEAK, True),  # (B, 64, 128, 128), no norm
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1), nn.InstanceNorm2d(2 * ndf), nn.LeakyReLU(LEAK, True),      # 64 x 64
            nn.Conv2d(2 * ndf, 4 * ndf, 4, 2, 1), nn.InstanceNorm2d(4 * ndf), nn.LeakyReLU(LEAK, True),  # 32 x 32
            nn.Conv2d(4 * ndf, 8 * ndf, 4, 1, 1), nn.InstanceNorm2d(8 * ndf), nn.LeakyReLU(LEAK, True),  # 31 x 31
            nn.Conv2d(8 * ndf, 1, 4, 1, 1))  # (B, 1, 30, 30) logits

class CycleGAN(nn.Module):
    """The four networks of Fig. 3 in one module, so that they move, save and load together.
    --generator resnet has 6 residual blocks up to 128 px and 9 from 256 (App. 7.2)."""

    def __init__(self, generator, channels, size, ngf=NGF, ndf=NDF):
        super().__init__()
        make = lambda: (UnetGenerator(channels, size, ngf) if generator == "unet"  # noqa: E731
                        else ResnetGenerator(channels, 9 if size >= 256 else 6, ngf))
        self.G_src2dst, self.G_dst2src = make(), make()  # G: X -> Y, F: Y -> X
        self.D_src, self.D_dst = PatchDiscriminator(channels, ndf), PatchDiscriminator(channels, ndf)
        for m in self.modules():  # weights ~ N(0, 0.02) (App. 7.1), biases 0 (ref. code); instance norm has none here
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.normal_(m.weight, 0.0, INIT_STD), nn.init.zeros_(m.bias)

# -- Losses and the training step ----------------------------------------------------------------

def gan_loss(logits, real, mode):
    """D's logits against 1 (real) or 0 (fake), over all patches. lsgan: squared error, more stable
    than Eq. 1's log-likelihood (Sec. 4, after Mao et al.); bce: Eq. 1, non-saturating for G."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    return F.mse_loss(logits, target) if mode == "lsgan" else F.binary_cross_entropy_with_logits(logits, target)

class ImagePool:
    """The history of fakes D learns from (Sec. 4), by the reference code's rule: until it holds `size`
    images each fake is stored and passed on; then with probability 1/2 a random stored fake goes to D and
    the new one takes its place. Size 0: off. Its own seeded CPU generator (no device sync) is checkpointed."""

    def __init__(self, size, seed, device="cpu"):
        self.size, self.rng = size, torch.Generator().manual_seed(seed)
        self.images = torch.empty(0, device=device)  # (n, C, H, W) float32, n <= size

    def query(self, fakes):
        """(B, C, H, W) fakes -> as many images for D, detached: no gradient reaches G."""
        out = fakes.detach().clone()  # clone keeps the memory format (channels_last)
        for i in range(len(out) if self.size else 0):
            if len(self.images) < self.size:
                self.images = torch.cat([self.images, out[i:i + 1].float()])
            elif torch.rand((), generator=self.rng) < 0.5:
                j = int(torch.randint(self.size, (), generator=self.rng))
                out[i], self.images[j] = self.images[j].clone(), out[i].clone()
        return out

    def state_dict(self):
        return {"images": self.images, "rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.images = state["images"].to(self.images.device)
        self.rng.set_state(state["rng"])

def lr_factor(epoch, epochs, decay_epochs):
    """The learning-rate multiplier in `epoch` (0-based): 1, then linear towards 0 over the last
    decay_epochs (App. 7.1); as the reference code, the last epoch runs at 1/(decay_epochs + 1)."""
    return 1.0 - max(0, epoch + 1 - (epochs - decay_epochs)) / (decay_epochs + 1)

def diff_augment(x):
    """DiffAugment (Zhao et al., NeurIPS 2020, arXiv:2006.10738), per image: brightness, contrast, a shift
    of up to 1/8 of the side, a cutout of half the side. Differentiable; no flips (hearts sit left)."""
    b, _, h, w = x.shape
    x = x + torch.rand(b, 1, 1, 1, device=x.device) - 0.5
    x = (x - x.mean((1, 2, 3), True)) * (torch.rand(b, 1, 1, 1, device=x.device) + 0.5) + x.mean((1, 2, 3), True)
    theta = torch.eye(2, 3, device=x.device).repeat(b, 1, 1)  # whole-pixel shifts, zeros come in
    theta[:, :, 2] = 2 * torch.randint(-(h // 8), h // 8 + 1, (b, 2), device=x.device) / h
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    y, c = torch.randint(0, h, (2, b, 1, 1, 1), device=x.device)  # the cutout's centre
    rows, cols = torch.arange(h, device=x.device).view(h, 1), torch.arange(w, device=x.device)
    return x * (((rows - y).abs() >= h // 4) | ((cols - c).abs() >= w // 4))

def train_step(nets, opt_g, opt_d, scaler, pool_src, pool_dst, autocast, x, y, gan_mode="lsgan",
               lambda_cyc=LAMBDA_CYC, lambda_idt=LAMBDA_IDT, augment=nn.Identity()):
    """One iteration in the reference code's order: both generators (the discriminators frozen),
    then both discriminators on real images and pooled fakes. x: a src batch, y: a dst batch,
    (B, C, S, S) in [-1, 1]; augment: diff_augment (every image a D sees) or none. Returns the STATS
    as one tensor, without a host sync."""
    to_dst, to_src, D_src, D_dst = nets.G_src2dst, nets.G_dst2src, nets.D_src, nets.D_dst
    D_src.requires_grad_(False), D_dst.requires_grad_(False)  # L_G's backward need not fill D's grads
    with autocast:
        fake_dst, fake_src = to_dst(x), to_src(y)                        # G(x), F(y)
        adv_dst = gan_loss(D_dst(augment(fake_dst)), True, gan_mode)     # G fools D_Y (Eq. 1)
        adv_src = gan_loss(D_src(augment(fake_src)), True, gan_mode)     # F fools D_X
        cyc_src = lambda_cyc * F.l1_loss(to_src(fake_dst), x)            # F(G(x)) ~ x (Eq. 2)
        cyc_dst = lambda_cyc * F.l1_loss(to_dst(fake_src), y)            # G(F(y)) ~ y
        # Identity (Sec. 5.2, after Taigman et al.): G leaves dst images alone, keeping grey levels.
        idt_dst = lambda_idt * lambda_cyc * F.l1_loss(to_dst(y), y) if lambda_idt else x.new_zeros(())
        idt_src = lambda_idt * lambda_cyc * F.l1_loss(to_src(x), x) if lambda_idt else x.new_zeros(())
        loss_g = adv_dst + adv_src + cyc_src + cyc_dst + idt_dst + idt_src
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)

    D_src.requires_grad_(True), D_dst.requires_grad_(True)
    # Real -> 1, a pooled fake -> 0; halved: "we divide the objective by 2 while optimizing D" (App. 7.1)
    with autocast:  # logits (B, 1, P, P)
        real_src, pooled_src = D_src(augment(x)), D_src(augment(pool_src.query(fake_src)))
        real_dst, pooled_dst = D_dst(augment(y)), D_dst(augment(pool_dst.query(fake_dst)))
        loss_d_src = 0.5 * (gan_loss(real_src, True, gan_mode) + gan_loss(pooled_src, False, gan_mode))
        loss_d_dst = 0.5 * (gan_loss(real_dst, True, gan_mode) + gan_loss(pooled_dst, False, gan_mode))
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d_src + loss_d_dst).backward()
    scaler.step(opt_d)
    scaler.update()  # one scaler for both optimizers: update once per iteration
    stats = [loss_g, adv_dst, adv_src, cyc_src, cyc_dst, idt_dst, idt_src, loss_d_src, loss_d_dst,
             real_src.mean(), pooled_src.mean(), real_dst.mean(), pooled_dst.mean()]
    return torch.stack([s.float() for s in stats]).detach()

# -- Helpers (the same text in every script) -----------------------------------------------------

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

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)

def load_checkpoint(path):
    """A checkpoint cyclegan.py wrote (plain types, so weights_only=True), or a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated and foreign files raise many kinds
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a file cyclegan.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("model") != "cyclegan":
        raise UserError(f"{path} is not a cyclegan.py checkpoint — pass a file cyclegan.py wrote")
    return ckpt

def log_row(path, row):
    """Append one row to a CSV log, with the header first when the file is new."""
    header = [] if path.exists() else [list(row)]
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(header + [list(row.values())])

def rewind_log(path, step):
    """Keep the rows of a CSV log up to `step`: a resumed run writes the later ones again."""
    if path.exists():
        header, *rows = path.read_text().splitlines(keepends=True)
        path.write_text("".join([header] + [r for r in rows if int(r.split(",")[0]) <= step]))

def plot_losses(log_csv, png, columns, w=640, h=360):
    """The loss columns of log.csv against the step, one colour each, drawn with Pillow."""
    rows = list(csv.DictReader(open(log_csv, newline=""))) if log_csv.exists() else []
    top = max([float(r[c]) for r in rows for c in columns] + [1e-9])
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for i, (c, colour) in enumerate(zip(columns, ("red", "blue", "green", "orange", "purple", "gray"))):
        draw.line([(w * k / max(1, len(rows) - 1), h - 20 - (h - 40) * float(r[c]) / top)
                   for k, r in enumerate(rows)], fill=colour, width=2)
        draw.text((10 + 110 * i, 4), c, fill=colour)
    draw.text((10, h - 16), f"step 0 to {rows[-1]['step'] if rows else 0}, y 0 to {top:.3g}", fill="black")
    img.save(png)

# -- Data, sampling, checkpoints -----------------------------------------------------------------

def load_class(data, cls, size, channels, batch_size):
    """DATA/<cls>/*.png decoded once -> uint8 (N, channels, size, size); "pneumonia" reads bacterial and viral."""
    images, folders = [], [Path(data) / c for c in (("bacterial", "viral") if cls == "pneumonia" else (cls,))]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{'class folder ' + str(folder) if Path(data).is_dir() else 'data folder ' + str(data)} "
                            f"not found — {MAKE_DATA}, then pass --data DATA/train")
    for path in sorted(p for folder in folders for p in folder.glob("*.png")):
        try:
            with Image.open(path) as im:  # gray, resized with an antialiasing filter when needed
                images.append(pil_to_tensor(im.convert("L").resize((size, size), Image.Resampling.LANCZOS)))
        except (OSError, SyntaxError) as e:  # Pillow reports some broken PNGs as SyntaxError
            raise UserError(f"cannot read image {path} ({e}) — delete it or {MAKE_DATA}")
    if len(images) < batch_size:
        raise UserError(f"{Path(data) / cls} has {len(images)} PNG images, fewer than --batch-size {batch_size} — "
                        f"lower --batch-size, or {MAKE_DATA}")
    return torch.stack(images).repeat(1, channels, 1, 1)

def epoch_plan(n_src, n_dst, batch_size, crop, flip, seed, epoch):
    """One epoch's draws, (steps, 8, batch_size): index, top, left, flip of the src batch, then of the
    dst batch. Unaligned (Sec. 3): each class in its own random order, the smaller one reshuffled
    and repeated up to max(|src|, |dst|) images (reference code). A function of (seed, epoch) only:
    a resumed run draws what an unbroken run would."""
    rng = torch.Generator().manual_seed(seed * 100003 + epoch)
    n = max(n_src, n_dst) // batch_size * batch_size  # a last, smaller batch is dropped
    order = [torch.cat([torch.randperm(k, generator=rng) for _ in range(-(-n // k))])[:n] for k in (n_src, n_dst)]
    top, left = torch.randint(0, crop + 1, (2, 2, n), generator=rng)
    flips = ((torch.rand(2, n, generator=rng) < 0.5) & flip).long()
    rows = torch.stack([order[0], top[0], left[0], flips[0], order[1], top[1], left[1], flips[1]])
    return rows.view(8, -1, batch_size).transpose(0, 1)

def jitter(images, rows, size):
    """The random jitter (pix2pix; reference code), on the device: rows = (index, top, left, flip) of a batch of the
    uint8 images (decoded at 286/256 x size) -> float (B, C, size, size) in [-1, 1], each cropped at
    (top, left) and mirrored where flip, in one gather."""
    index, top, left, flip = rows
    ar = torch.arange(size, device=images.device)
    r = (top[:, None] + ar)[:, :, None]                                                     # (B, size, 1)
    c = (left[:, None] + torch.where(flip[:, None].bool(), size - 1 - ar, ar))[:, None, :]  # (B, 1, size)
    return images[index[:, None, None], :, r, c].permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, size, size)

@torch.no_grad()
def translate_images(G, images, batch_size=EVAL_BATCH):
    """uint8 (N, C, S, S) -> G(images) as uint8 on the CPU, in eval mode (the U-Net's dropout off)."""
    G.eval()
    device = next(G.parameters()).device
    out = torch.cat([((G(chunk.to(device).float() / 127.5 - 1).float() + 1) * 127.5).round().clamp(0, 255)
                     .byte().cpu() for chunk in images.split(batch_size)])
    G.train()
    return out

def save_grid(nets, src, dst, size, path):
    """Rows src | G_src2dst(src) | G_dst2src(G_src2dst(src)), then the same from dst, of the first GRID
    images of each class, whole at `size`: rows 3 and 6 should look like 1 and 4 (the cycle, Eq. 2)."""
    src, dst = (F.interpolate(x[:GRID].float(), size, mode="bilinear", antialias=True).round().byte().cpu()
                for x in (src, dst))
    fake_dst, fake_src = translate_images(nets.G_src2dst, src), translate_images(nets.G_dst2src, dst)
    rows = [src, fake_dst, translate_images(nets.G_dst2src, fake_dst),
            dst, fake_src, translate_images(nets.G_src2dst, fake_src)]
    to_pil_image(torchvision.utils.make_grid(torch.cat(rows), nrow=len(src))[:1]).save(path)

def checkpoint(parts, step, args, device):
    """Everything --resume needs, as one dict of plain types and tensors (weights_only loads it)."""
    return {"model": "cyclegan", "args": vars(args), "step": step, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            **{name: part.state_dict() for name, part in parts.items()}}

def restore(ckpt, parts, device):
    """Load a checkpoint() into the parts and the RNGs; returns its step."""
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt["rng_cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    return ckpt["step"]

def make_parts(args, device, layout, fp16):
    """Everything with a state_dict that a checkpoint holds: the four networks, one Adam for both G and
    one for both D (reference code), their learning-rate schedules, the grad scaler, the two pools."""
    torch.manual_seed(args.seed)  # the global RNG: initial weights, then the U-Net's dropout
    nets = CycleGAN(args.generator, args.channels, args.size, args.ngf, args.ndf).to(device, memory_format=layout)
    opt_g, opt_d = (torch.optim.Adam([*a.parameters(), *b.parameters()], args.lr, BETAS, fused=device.type == "cuda")
                    for a, b in ((nets.G_src2dst, nets.G_dst2src), (nets.D_src, nets.D_dst)))
    decay = lambda epoch: lr_factor(epoch, args.epochs, args.decay_epochs)  # noqa: E731
    return {"nets": nets, "opt_g": opt_g, "opt_d": opt_d, "sched_g": LambdaLR(opt_g, decay),
            "sched_d": LambdaLR(opt_d, decay), "scaler": torch.amp.GradScaler(device.type, enabled=fp16),
            "pool_src": ImagePool(args.pool_size, args.seed, device),
            "pool_dst": ImagePool(args.pool_size, args.seed + 1, device)}

def make_evaluator(args, device):
    """metrics.py's Evaluator on the real dst training images, whole at --size, and the src images
    whose translations it scores: the test split's (never trained on) if there is one and --eval-src
    test, else the whole source training split (the papers: 1,341 fakes per set, their count of normal X-rays).
    Built before training: missing weights fail now, not after 25 epochs."""
    import metrics  # only --eval-every needs metrics.py: cyclegan.py alone trains without it
    test = Path(args.test_data or Path(args.data).parent / "test")
    test = test if args.eval_src == "test" and (args.test_data or (test / args.src).is_dir()) else args.data
    inputs, real = (load_class(folder, cls, args.size, args.channels, 1)
                    for folder, cls in ((test, args.src), (args.data, args.dst)))
    if min(len(inputs), len(real)) < 2:
        raise UserError(f"--eval-every needs 2 or more images a side, found {len(inputs)} {args.src} in {test} and "
                        f"{len(real)} {args.dst} — add images or leave out --eval-every")
    print(f"eval: G_src2dst of {len(inputs)} {args.src} images in {test} vs {len(real)} real {args.dst} images")
    try:
        return metrics.Evaluator(real, weights=args.fid_weights, device=str(device)), inputs
    except metrics.UserError as e:
        raise UserError(str(e))

# -- Train ---------------------------------------------------------------------------------------

def train(args, argv):
    out, last = Path(args.out), Path(args.out) / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(args.resume or last) if args.resume is not None else None
    for key in ("src", "dst", "size", "channels", "generator", "ngf", "ndf") if ckpt else ():
        if ckpt["args"][key] != getattr(args, key):
            raise UserError(f"{args.resume or last} was trained with --{key} {ckpt['args'][key]}, not "
                            f"{getattr(args, key)} — pass --{key} {ckpt['args'][key]} or another --out")
    load_size = round(args.size * JITTER)  # decoded once at the jitter size: each step crops --size out
    src, dst = (load_class(args.data, c, load_size, args.channels, args.batch_size) for c in (args.src, args.dst))
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        print("warning: training on a CPU is slow" + (" — try --size 64" if args.size > 64 else ""))
    evaluator, eval_src = make_evaluator(args, device) if args.eval_every else (None, None)
    src, dst, iters = src.to(device), dst.to(device), max(len(src), len(dst)) // args.batch_size
    # The CUDA speed switches: autocast (bf16, or fp16 with a GradScaler), channels_last, fused
    # Adam, cuDNN autotuning. --amp on a CPU gives bf16 autocast there too.
    amp = args.amp if args.amp is not None else cuda
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=amp)
    layout = torch.channels_last if cuda and amp else torch.contiguous_format  # --no-amp: plain fp32, NCHW
    torch.backends.cudnn.benchmark = cuda
    parts = make_parts(args, device, layout, fp16=amp and dtype == torch.float16)
    nets, step = parts["nets"], restore(ckpt, parts, device) if ckpt else 0
    for net in nets.children() if args.compile else ():
        net.compile()  # in place: the state_dict keys stay the same
    augment = diff_augment if args.diffaug else nn.Identity()
    step_args = [parts[k] for k in ("nets", "opt_g", "opt_d", "scaler", "pool_src", "pool_dst")]

    (out / "samples").mkdir(parents=True, exist_ok=True)
    last.parent.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({"args": vars(args), "device": str(device), "amp":
                                                 str(dtype) if amp else "off", "torch": torch.__version__}))
    for log in ("log.csv", "metrics.csv"):
        rewind_log(out / log, step)
    if step == 0:
        save_grid(nets, src, dst, args.size, out / "samples/step_000000.png")
    total = min(args.epochs * iters, args.max_steps or math.inf)
    # Ctrl-C and SIGTERM (kill, a job scheduler) only raise a flag: the step in flight finishes and
    # the loop saves, so a checkpoint never holds half a step and --resume is exact.
    stop = []
    handlers = {s: signal.signal(s, lambda *_: stop.append(s)) for s in (signal.SIGINT, signal.SIGTERM)}
    window, n, last_good, t0 = torch.zeros(len(STATS), device=device), 0, step, time.perf_counter()
    plan = None
    try:
        while step < total and not stop:
            epoch, i = divmod(step, iters)
            if i == 0 or plan is None:  # each epoch has its own order, crops and flips
                plan = epoch_plan(len(src), len(dst), args.batch_size, load_size - args.size, args.flip,
                                  args.seed, epoch).to(device)
            x = jitter(src, plan[i, :4], args.size).contiguous(memory_format=layout)
            y = jitter(dst, plan[i, 4:], args.size).contiguous(memory_format=layout)
            window += train_step(*step_args, autocast, x, y, args.gan_loss, args.lambda_cyc, args.lambda_idt, augment)
            step, n = step + 1, n + 1
            end = step == total or bool(stop)
            evaluate = bool(evaluator) and step % args.eval_every == 0
            save = step % args.save_every == 0 or end or evaluate
            if step % args.log_every == 0 or save:  # the only host syncs: log and save steps
                if not torch.isfinite(window).all():
                    raise SystemExit(f"error: non-finite loss at step {step} (after step {last_good}) — "
                                     f"lower --lr or try --no-amp; the last good checkpoint {last} is kept")
                last_good = step
            if step % args.log_every == 0 or end:
                if cuda:  # the GPU runs ahead of Python: wait for it before reading the clock
                    torch.cuda.synchronize(device)
                row = {"lr": parts["opt_g"].param_groups[0]["lr"], **dict(zip(STATS, (window / n).tolist())),
                       "ms_per_step": 1000 * (time.perf_counter() - t0) / n}
                print(f"[{epoch + 1}/{args.epochs}][{i}/{iters}] " + " ".join(f"{k} {row[k]:.3f}" for k in STATS[:9])
                      + f"  {row['ms_per_step']:.0f} ms/step")
                log_row(out / "log.csv", {"step": step, "epoch": epoch + 1, **{k: f"{v:.5g}" for k, v in row.items()}})
                window, n, t0 = window.zero_(), 0, time.perf_counter()
            t_side = time.perf_counter()  # sampling, evaluation and saving stay out of ms/step
            for sched in (parts["sched_g"], parts["sched_d"]) if step % iters == 0 else ():
                sched.step()  # once per epoch, after the optimizers
            if args.sample_every and (step % args.sample_every == 0 or end):
                save_grid(nets, src, dst, args.size, out / f"samples/step_{step:06d}.png")
            if evaluate:
                scores = evaluator.score(translate_images(nets.G_src2dst, eval_src))
                print(f"eval: FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f}, IS {scores['is_mean']:.2f}"
                      f" ({scores['n_fake']} fakes vs {scores['n_real']} real, {scores['network']})")
                log_row(out / "metrics.csv", {"step": step, "epoch": step / iters, **scores})
            if save:
                state = checkpoint(parts, step, args, device)
                save_atomic(state, last)
                if step % args.save_every == 0 or evaluate:  # an evaluated model is kept, to --translate
                    save_atomic(state, last.parent / f"step_{step:06d}.pt")
                plot_losses(out / "log.csv", out / "loss_curve.png", ["G_total", "D_src", "D_dst"])
            t0 += time.perf_counter() - t_side
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop:
        again = argv + ([] if args.resume is not None else ["--resume"])
        print(f"interrupted at step {step}; saved {last} — continue with: python cyclegan.py {' '.join(again)}")
        raise SystemExit(130)
    print(f"done: step {step}; run folder {out}")

# -- Translate and the command line --------------------------------------------------------------

def translate(args):
    """Translate every PNG of --translate DIR with one generator of --ckpt, at the model's size, into
    --out under the same names; --grid also writes panels/<name>: input | translated | back."""
    folder, out = Path(args.translate), Path(args.out)
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise UserError(f"found no PNG images in {folder} — pass a folder of images to --translate")
    if out.resolve() == folder.resolve():
        raise UserError(f"--out {out} is the input folder — pass another --out, or the inputs would be overwritten")
    ckpt = load_checkpoint(args.ckpt)
    a = ckpt["args"]  # the classes, size, channels and networks of the run
    device = pick_device(args.device)
    nets = CycleGAN(a["generator"], a["channels"], a["size"], a["ngf"], a["ndf"]).to(device)
    nets.load_state_dict(ckpt["nets"])
    forward, back = (nets.G_src2dst, nets.G_dst2src)[::1 if args.direction == "src2dst" else -1]
    x = load_class(folder.resolve().parent, folder.resolve().name, a["size"], a["channels"], 1)  # as sorted paths
    fake = translate_images(forward, x)
    (out / "panels" if args.grid else out).mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, fake):  # one channel stays one channel (mode L)
        to_pil_image(image[:1]).save(out / path.name)
    panels = torch.stack([x, fake, translate_images(back, fake)], 1) if args.grid else ()
    for path, panel in zip(paths, panels):
        to_pil_image(torchvision.utils.make_grid(panel, nrow=3)[:1]).save(out / "panels" / path.name)
    print(f"wrote {len(paths)} images by G_{args.direction} ({a['src']} <-> {a['dst']}, step {ckpt['step']}) to {out}")

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="cyclegan.py", description="CycleGAN for chest X-rays: unpaired translation src <-> dst.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", choices=CLASSES, help="the class translated from (the paper's X), e.g. normal")
    p.add_argument("--dst", choices=CLASSES, help="the class translated to (the paper's Y), e.g. viral")
    p.add_argument("--data", default="data/train", help="split folder holding <class>/*.png")
    p.add_argument("--test-data", help="--eval-every translates its <src> images (default: DATA/../test, if any)")
    p.add_argument("--out", help="run folder (default runs/cyclegan_<src>_<dst>_<size>); --translate: image folder")
    p.add_argument("--size", type=int, choices=SIZES, default=256, help="image side")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1, or 3 = the gray repeated")
    p.add_argument("--generator", choices=("resnet", "unet"), default="resnet", help="unet: the extended paper's")
    p.add_argument("--ngf", type=in_range(int, 1), default=NGF, help="generator width")
    p.add_argument("--ndf", type=in_range(int, 1), default=NDF, help="discriminator width")
    p.add_argument("--epochs", type=in_range(int, 1), default=EPOCHS, help="epochs of max(|src|, |dst|) images")
    p.add_argument("--decay-epochs", type=in_range(int, 0), help="the last epochs, lr -> 0 (default: half)")
    p.add_argument("--batch-size", type=in_range(int, 1), default=BATCH_SIZE, help="images per class per step")
    p.add_argument("--lr", type=in_range(float, 1e-12), default=LR, help="Adam learning rate of G and D")
    p.add_argument("--gan-loss", choices=("lsgan", "bce"), default="lsgan", help="adversarial loss")
    p.add_argument("--lambda-cyc", type=in_range(float, 0), default=LAMBDA_CYC, help="weight of the cycle loss")
    p.add_argument("--lambda-idt", type=in_range(float, 0), default=LAMBDA_IDT, help="identity loss / --lambda-cyc")
    p.add_argument("--diffaug", action=argparse.BooleanOptionalAction, default=False, help="DiffAugment before D")
    p.add_argument("--pool-size", type=in_range(int, 0), default=POOL_SIZE, help="fakes D remembers (0: off)")
    p.add_argument("--flip", action="store_true", help="random mirroring (off: it puts the heart on the right)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order, crops, dropout and pools")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="autocast (default: on with CUDA, off on a CPU; --amp on a CPU is bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the four networks")
    p.add_argument("--log-every", type=in_range(int, 1), default=100, help="steps per log row")
    p.add_argument("--sample-every", type=in_range(int, 0), default=1000, help="steps per sample grid (0: off)")
    p.add_argument("--save-every", type=in_range(int, 1), default=1000, help="steps per step_NNNNNN.pt")
    p.add_argument("--eval-every", type=in_range(int, 0), default=0, help="steps per FID/IS/KID (0: off)")
    p.add_argument("--eval-src", choices=("test", "train"), default="test", help="translate these src images to score")
    p.add_argument("--fid-weights", help="local FID Inception weights (default: download)")
    p.add_argument("--resume", nargs="?", const="", help="continue from PATH (no value: <out>/checkpoints/last.pt)")
    p.add_argument("--max-steps", type=in_range(int, 1), help="stop after this step, with a checkpoint")
    p.add_argument("--translate", metavar="DIR", help="translate the PNGs in DIR with --ckpt into --out")
    p.add_argument("--ckpt", help="the checkpoint --translate reads")
    p.add_argument("--direction", choices=("src2dst", "dst2src"), default="src2dst", help="which generator")
    p.add_argument("--grid", action="store_true", help="--translate: also panels input | translated | back")
    args = p.parse_args(argv)
    try:
        if args.translate:
            if not (args.ckpt and args.out):
                raise UserError("--translate DIR needs --ckpt PATH and --out DIR — e.g. --ckpt "
                                "runs/cyclegan_normal_viral_256/checkpoints/last.pt --out fakes/viral")
            return translate(args)
        if args.ckpt or args.grid or not (args.src and args.dst):
            raise UserError(f"training needs --src and --dst, each one of {', '.join(CLASSES)} (--ckpt and --grid "
                            "are for --translate) — e.g. --src normal --dst viral; to continue a run use --resume")
        if args.src == args.dst:
            raise UserError(f"--src and --dst are both {args.src} — translate between two different classes")
        args.decay_epochs = args.epochs // 2 if args.decay_epochs is None else args.decay_epochs
        if args.decay_epochs > args.epochs:
            raise UserError(f"--decay-epochs {args.decay_epochs} is more than --epochs {args.epochs} — lower it")
        args.out = args.out or f"runs/cyclegan_{args.src}_{args.dst}_{args.size}"
        if Path(args.out).is_file():
            raise UserError(f"--out {args.out} is a file — pass a folder")
        if args.resume is None and (Path(args.out) / "checkpoints/last.pt").exists():
            raise UserError(f"{args.out} already holds a run — add --resume to continue it, or pass another --out")
        train(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
