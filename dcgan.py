"""DCGAN for chest X-rays: one model per class, 64x64x1 as in the paper (also 32, 128, 256 px).

Davoodi & Lo Giudice, "Synthetic of Chest X-ray Images" (the paper): one DCGAN per class with
exact 64x64x1 layer tables (Table 1: G, 3,574,656 parameters; Table 2: D, 2,763,520), z uniform,
batch 32, Adam 2e-4 with betas (0.5, 0.999), LeakyReLU 0.2, weights N(0, 0.02) (Sec. 3.1-3.3),
logging Loss_D, Loss_G, D(x), D(G(z)) (Sec. 3.4.1). Where it is silent: Radford, Metz & Chintala,
"Unsupervised Representation Learning with Deep Convolutional GANs", ICLR 2016, arXiv:1511.06434.
Noori, "Generating Medical Chest X-Ray Images using Generative Adversarial Network", IJISAE 2024: --beta1 0.55
--batch-size 50 (Table 1), --noise normal (Sec. 6.1); lr: 0.002 in Table 1, 0.0002 in Sec. 7; G out, D in: 64 x 64 (Sec. 6).

  python dcgan.py --data data/synth/train --cls normal --size 32 --epochs 5       # a CPU demo
  python dcgan.py --data data/train --cls viral          # the paper: 64 px, batch 32, 200 epochs
  python dcgan.py --generate 500 --ckpt runs/dcgan_viral_64/checkpoints/last.pt --out fakes/viral
  python dcgan.py --data data/train --cls viral --eval-every 1000 --fid-weights pt_inception.pth

The run folder runs/dcgan_<class>_<size>/ holds config.json; log.csv (per --log-every steps the
means of loss_d = loss_d_real + loss_d_fake, loss_g, d_x = D(x), d_g_z1 / d_g_z2 = D(G(z)) before /
after D's update, ms_per_step); loss_curve.png; samples/step_NNNNNN.png (8 x 8 samples of fixed z;
step 0: untrained); checkpoints/last.pt, step_NNNNNN.pt; metrics.csv (--eval-every: FID, IS, KID).
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
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

NZ = 100                 # z holds "100 random numbers" (Sec. 3.1)
NGF = NDF = 64           # width of G's last and D's first hidden block (Tables 1-2)
MAX_WIDTH = 512          # the widest block of Tables 1-2: larger images get more blocks, not wider
LEAK, INIT_STD = 0.2, 0.02  # LeakyReLU slope; weights ~ N(0, 0.02) (Sec. 3.3.1; Radford et al. Sec. 4)
BATCH_SIZE, LR, BETAS = 32, 2e-4, (0.5, 0.999)  # Sec. 3.3.1
EPOCHS = 200             # the paper's log line reads [200/200] (Sec. 3.4.1)
# Table 2 places Dropout layers, no rate. Kermany normals, 64 px, 1,000 steps: 0.5 collapsed G (diversity 0.54
DROPOUT = 0.0            # of real's), 0 did not (0.81; KID 0.39 vs 0.40). Layers kept; 0.5: --dropout 0.5
SIZES = (32, 64, 128, 256)
CLASSES = ("normal", "bacterial", "viral", "covid")
GRID = 8                 # sample grids are GRID x GRID
STATS = ("loss_d", "loss_d_real", "loss_d_fake", "loss_g", "d_x", "d_g_z1", "d_g_z2")
MAKE_DATA = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"

# -- Models --------------------------------------------------------------------------------------

def block_widths(size, base):
    """Widths of the blocks at side 4, 8, ..., size/2: [512, 256, 128, 64] at 64 px. The width
    doubles as the side halves (Tables 1-2; Radford et al. Fig. 1), capped at MAX_WIDTH; D uses it reversed."""
    return [min(MAX_WIDTH, base * 2 ** i) for i in reversed(range(int(math.log2(size)) - 2))]

class Generator(nn.Sequential):
    """z (B, NZ, 1, 1) -> image (B, channels, size, size) in [-1, 1].

    At 64 px and 1 channel these are the paper's Table 1, layer by layer:
        ConvTranspose2d(100, 512, 4, 1, 0)   (B, 512, 4, 4)       819,200 params, BN 1,024, ReLU
        ConvTranspose2d(512, 256, 4, 2, 1)   (B, 256, 8, 8)     2,097,152 params, BN   512, ReLU
        ConvTranspose2d(256, 128, 4, 2, 1)   (B, 128, 16, 16)     524,288 params, BN   256, ReLU
        ConvTranspose2d(128, 64, 4, 2, 1)    (B, 64, 32, 32)      131,072 params, BN   128, ReLU
        ConvTranspose2d(64, 1, 4, 2, 1)      (B, 1, 64, 64)         1,024 params, Tanh   = 3,574,656
    No bias (BatchNorm shifts). Sec. 3.1's "fully connected layer reshaped to size 4 x 4 x 512" is this 4x4 ConvT of 1x1 z.
    """

    def __init__(self, size=64, channels=1, nz=NZ, ngf=NGF):
        widths = block_widths(size, ngf)
        layers = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),  # (B, widths[0], 4, 4)
                  nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for w_in, w_out in zip(widths, widths[1:]):  # each block doubles the side
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(w_out), nn.ReLU(True)]
        # No BatchNorm on the output; tanh into [-1, 1] (Sec. 3.1).   (B, channels, size, size)
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        super().__init__(*layers)

class Discriminator(nn.Module):
    """image (B, channels, size, size) -> one logit per image, (B,).

    At 64 px and 1 channel these are the paper's Table 2, layer by layer:
        Conv2d(1, 64, 4, 2, 1)      (B, 64, 32, 32)        1,024 params, LeakyReLU, Dropout
        Conv2d(64, 128, 4, 2, 1)    (B, 128, 16, 16)     131,072 params, BN   256, LeakyReLU
        Conv2d(128, 256, 4, 2, 1)   (B, 256, 8, 8)       524,288 params, BN   512, LeakyReLU, Dropout
        Conv2d(256, 512, 4, 2, 1)   (B, 512, 4, 4)     2,097,152 params, BN 1,024, LeakyReLU, Dropout
        Conv2d(512, 1, 4, 1, 0)     (B, 1, 1, 1)           8,192 params               = 2,763,520
    Table 2 puts the last Dropout before its LeakyReLU (the two commute) and ends in a Sigmoid; we return
    the logit and use BCE-with-logits, the same loss but numerically stable and autocast-safe (BCELoss is not).
    """
    def __init__(self, size=64, channels=1, ndf=NDF, dropout=DROPOUT):
        super().__init__()
        layers, w_in = [], channels
        for i, w_out in enumerate(block_widths(size, ndf)[::-1]):  # each block halves the side
            layers.append(nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False))
            if i > 0:  # no BatchNorm on the input block (Sec. 3.2; Radford et al. Sec. 3)
                layers.append(nn.BatchNorm2d(w_out))
            layers.append(nn.LeakyReLU(LEAK, True))
            if i != 1:  # "dropout is applied to each layer ... except for the second" (Sec. 3.2)
                layers.append(nn.Dropout(dropout))
            w_in = w_out
        layers.append(nn.Conv2d(w_in, 1, 4, 1, 0, bias=False))  # the 4x4 map -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()

def init_weights(m):
    """Conv weights ~ N(0, 0.02) (Sec. 3.3.1; Radford et al. Sec. 4); BatchNorm's N(1, 0.02), shift 0: pytorch/examples."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm2d) else 0.0, INIT_STD)
    if isinstance(m, nn.BatchNorm2d):
        nn.init.zeros_(m.bias)

# -- The training step ---------------------------------------------------------------------------

def sample_z(n, kind, device="cpu", generator=None):
    """z (n, NZ, 1, 1) ~ U(-1, 1) (Sec. 3.1: "drawn from a uniform distribution"; the range is ours) or
    N(0, 1) (Noori Sec. 6.1: "normal distribution-based"; pytorch/examples)."""
    if kind == "uniform":
        return torch.rand(n, NZ, 1, 1, device=device, generator=generator) * 2 - 1
    return torch.randn(n, NZ, 1, 1, device=device, generator=generator)

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

def train_step(G, D, opt_g, opt_d, scaler, autocast, real, z, augment=nn.Identity()):
    """One iteration as in pytorch/examples: a D step, then a G step on the same fakes. real: (B, C,
    S, S) in [-1, 1]; augment: diff_augment or none. Returns the STATS as a tensor, without a host sync."""
    bce = F.binary_cross_entropy_with_logits
    opt_d.zero_grad(set_to_none=True)
    with autocast:  # D maximises log D(x) + log(1 - D(G(z))): BCE against 1 for real, 0 for fake
        real_logits = D(augment(real))  # real and fake in separate calls: separate BatchNorm batches
        fake = G(z)
        fake_logits = D(augment(fake.detach()))  # detach: the D step must not reach G
        loss_real = bce(real_logits, torch.ones_like(real_logits))
        loss_fake = bce(fake_logits, torch.zeros_like(fake_logits))
    scaler.scale(loss_real + loss_fake).backward()
    scaler.step(opt_d)
    opt_g.zero_grad(set_to_none=True)
    with autocast:  # non-saturating: G maximises log D(G(z)), as log(1 - D(G(z))) gives G no
        after_logits = D(augment(fake))  # gradient while D rejects every fake (Goodfellow et al. Sec. 3)
        loss_g = bce(after_logits, torch.ones_like(after_logits))
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()  # one scaler for both optimizers: update once per iteration
    d_x, d_g_z1, d_g_z2 = (torch.sigmoid(t.float()).mean() for t in (real_logits, fake_logits, after_logits))
    stats = (loss_real + loss_fake, loss_real, loss_fake, loss_g, d_x, d_g_z1, d_g_z2)
    return torch.stack([t.float() for t in stats]).detach()

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
    """A checkpoint dcgan.py wrote (plain types, so weights_only=True), or a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated and foreign files raise many kinds
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a file dcgan.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("model") != "dcgan":
        raise UserError(f"{path} is not a dcgan.py checkpoint — pass a file dcgan.py wrote")
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
        draw.text((10 + 110 * i, 4), f"{c} (max {top:.3g})" if i == 0 else c, fill=colour)
    img.save(png)

# -- Data, sampling, checkpoints -----------------------------------------------------------------

def load_class(data, cls, size, channels, batch_size):
    """DATA/<cls>/*.png decoded once -> uint8 (N, channels, size, size)."""
    folder, images = Path(data) / cls, []
    if not folder.is_dir():
        raise UserError(f"{'class folder ' + str(folder) if Path(data).is_dir() else 'data folder ' + data} "
                        f"not found — {MAKE_DATA}, then pass --data DATA/train")
    for path in sorted(folder.glob("*.png")):
        try:
            with Image.open(path) as im:  # gray, resized with an antialiasing filter when needed
                images.append(pil_to_tensor(im.convert("L").resize((size, size), Image.Resampling.LANCZOS)))
        except (OSError, SyntaxError) as e:  # Pillow reports some broken PNGs as SyntaxError
            raise UserError(f"cannot read image {path} ({e}) — delete it or {MAKE_DATA}")
    if len(images) < batch_size:
        raise UserError(f"{folder} has {len(images)} PNG images, fewer than --batch-size {batch_size} — "
                        f"lower --batch-size, or {MAKE_DATA}")
    return torch.stack(images).repeat(1, channels, 1, 1)

def batch_indices(n, batch_size, seed, epoch):
    """Each step's image indices in one epoch, from (seed, epoch) alone: a resumed run draws the same."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[: n // batch_size * batch_size].view(-1, batch_size)

def fixed_z(n, kind, seed):
    """n vectors z from their own RNG, one at a time: vector i depends on the seed alone, not on n."""
    rng = torch.Generator().manual_seed(seed)
    return torch.cat([sample_z(1, kind, generator=rng) for _ in range(n)])

@torch.no_grad()
def sample(G, z, batch_size=256):
    """G(z) as uint8 images on the CPU, in eval mode (BatchNorm's running statistics)."""
    G.eval()
    images = torch.cat([((G(z_).float() + 1) * 127.5).round().clamp(0, 255).byte().cpu() for z_ in z.split(batch_size)])
    G.train()
    return images

def save_grid(G, z, path):
    """A GRID x GRID sheet of G(z), one channel (make_grid repeats a gray channel into three)."""
    to_pil_image(torchvision.utils.make_grid(sample(G, z), nrow=GRID)[:1]).save(path)

def restore(ckpt, parts, device):
    """Load a checkpoint into the parts (everything with a state_dict) and the RNGs; returns its step."""
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt["rng_cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    return ckpt["step"]

# -- Train ---------------------------------------------------------------------------------------

def train(args, argv):
    out, last = Path(args.out), Path(args.out) / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(args.resume or last) if args.resume is not None else None
    for key in ("size", "channels", "cls") if ckpt else ():
        if ckpt["args"][key] != getattr(args, key):
            raise UserError(f"{args.resume or last} was trained with --{key} {ckpt['args'][key]}, not "
                            f"{getattr(args, key)} — pass --{key} {ckpt['args'][key]} or another --out")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        print("warning: training on a CPU is slow" + (" — try --size 32" if args.size > 32 else ""))
    images = load_class(args.data, args.cls, args.size, args.channels, args.batch_size)
    evaluator = None
    if args.eval_every:  # metrics.py, only for --eval-every; built now, so missing weights fail now
        import metrics
        try:
            evaluator = metrics.Evaluator(images, weights=args.fid_weights, device=str(device))
        except metrics.UserError as e:
            raise UserError(str(e))
    images, iters = images.to(device), len(images) // args.batch_size  # a batch is one gather
    # The CUDA speed switches: autocast (bf16, or fp16 with a GradScaler), channels_last, fused
    # Adam, cuDNN autotuning. --amp on a CPU gives bf16 autocast there too.
    amp = args.amp if args.amp is not None else cuda
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=amp)
    layout = torch.channels_last if cuda and amp else torch.contiguous_format  # --no-amp: plain fp32, NCHW
    torch.backends.cudnn.benchmark = cuda
    torch.manual_seed(args.seed)  # the global RNG: initial weights, then z and dropout masks
    G, D = (net.apply(init_weights).to(device, memory_format=layout) for net in (
        Generator(args.size, args.channels), Discriminator(args.size, args.channels, dropout=args.dropout)))
    parts = {"G": G, "D": D, "opt_g": torch.optim.Adam(G.parameters(), args.lr, (args.beta1, BETAS[1]), fused=cuda),
             "opt_d": torch.optim.Adam(D.parameters(), args.lr, (args.beta1, BETAS[1]), fused=cuda),
             "scaler": torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)}
    step_args = (torch.compile(G) if args.compile else G, torch.compile(D) if args.compile else D,
                 parts["opt_g"], parts["opt_d"], parts["scaler"], autocast)
    augment = diff_augment if args.diffaug else nn.Identity()
    step = restore(ckpt, parts, device) if ckpt else 0
    for folder in (out / "samples", last.parent):
        folder.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"args": vars(args), "device": str(device), "amp": str(dtype)
                                                 if amp else "off", "torch": torch.__version__}, indent=1))
    for log in ("log.csv", "metrics.csv"):
        rewind_log(out / log, step)
    grid_z = fixed_z(GRID * GRID, args.noise, args.seed).to(device)
    eval_z = fixed_z(args.eval_n, args.noise, args.seed + 1).to(device)
    if step == 0:
        save_grid(G, grid_z, out / "samples/step_000000.png")
    total = min(args.epochs * iters, args.max_steps or math.inf)
    batches = batch_indices(len(images), args.batch_size, args.seed, step // iters).to(device)
    # Ctrl-C and SIGTERM (kill, a job scheduler) only raise a flag: the step in flight finishes and
    # the loop saves, so a checkpoint never holds half a step and --resume is exact.
    stop = []
    handlers = {s: signal.signal(s, lambda *_: stop.append(s)) for s in (signal.SIGINT, signal.SIGTERM)}
    window, n, last_good, t0 = torch.zeros(len(STATS), device=device), 0, step, time.perf_counter()
    try:
        while step < total and not stop:
            epoch, i = divmod(step, iters)
            if i == 0:  # each epoch has its own order
                batches = batch_indices(len(images), args.batch_size, args.seed, epoch).to(device)
            real = (images[batches[i]].float() / 127.5 - 1).contiguous(memory_format=layout)
            window += train_step(*step_args, real, sample_z(args.batch_size, args.noise, device), augment)
            step, n = step + 1, n + 1
            end = step == total or bool(stop)
            save = step % args.save_every == 0 or end
            if step % args.log_every == 0 or save:  # the only host syncs: log and save steps
                if cuda:  # the GPU runs ahead of Python: wait for it before reading the clock
                    torch.cuda.synchronize(device)
                if not torch.isfinite(window).all():
                    raise SystemExit(f"error: non-finite loss at step {step} (after step {last_good}) — "
                                     f"lower --lr or try --no-amp; the last good checkpoint {last} is kept")
                row = {**dict(zip(STATS, (window / n).tolist())), "ms_per_step": 1000 * (time.perf_counter() - t0) / n}
                print(f"[{epoch + 1}/{args.epochs}][{i}/{iters}] Loss_D: {row['loss_d']:.4f} Loss_G: "
                      f"{row['loss_g']:.4f} D(x): {row['d_x']:.4f} D(G(z)): {row['d_g_z1']:.4f} / "
                      f"{row['d_g_z2']:.4f}  {row['ms_per_step']:.0f} ms/step")
                log_row(out / "log.csv", {"step": step, "epoch": epoch + 1, **{k: f"{v:.5g}" for k, v in row.items()}})
                window, n, t0, last_good = window.zero_(), 0, time.perf_counter(), step
            t_side = time.perf_counter()  # sampling, evaluation and saving stay out of ms/step
            if args.sample_every and (step % args.sample_every == 0 or end):
                save_grid(G, grid_z, out / f"samples/step_{step:06d}.png")
            if evaluator and step % args.eval_every == 0:
                scores = evaluator.score(sample(G, eval_z))
                print(f"eval: FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f} ({scores['n_fake']} fakes, "
                      f"{scores['n_real']} real, {scores['network']})")
                log_row(out / "metrics.csv", {"step": step, "epoch": epoch + 1, **scores})
            if save:
                state = {"model": "dcgan", "args": vars(args), "step": step, "rng_cpu": torch.get_rng_state(),
                         "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None,
                         **{name: part.state_dict() for name, part in parts.items()}}  # all --resume needs
                save_atomic(state, last)
                if step % args.save_every == 0:
                    save_atomic(state, last.parent / f"step_{step:06d}.pt")
                plot_losses(out / "log.csv", out / "loss_curve.png", ["loss_d", "loss_g"])
            t0 += time.perf_counter() - t_side
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop:
        again = argv + ([] if args.resume is not None else ["--resume"])
        print(f"interrupted at step {step}; saved {last} — continue with: python dcgan.py {' '.join(again)}")
        raise SystemExit(130)
    print(f"done: step {step}; run folder {out}")

# -- Generate and the command line ---------------------------------------------------------------

def generate(args):
    """Write --generate N PNGs of the checkpoint's class; image i depends only on it and --seed."""
    ckpt = load_checkpoint(args.ckpt)
    a = ckpt["args"]  # the size, channels, class and noise of the run
    device = pick_device(args.device)
    G = Generator(a["size"], a["channels"]).to(device)
    G.load_state_dict(ckpt["G"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    images = sample(G, fixed_z(args.generate, a["noise"], args.seed).to(device), args.batch_size)
    for i, image in enumerate(images):  # one channel stays one channel (PNG mode L)
        to_pil_image(image).save(f"{args.out}/dcgan_{a['cls']}_{i:06d}.png")
    print(f"wrote {len(images)} PNGs ({a['size']} px, class {a['cls']}, step {ckpt['step']}) to {args.out}")

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="dcgan.py", description="DCGAN for chest X-rays, one class per run.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/train", help="split folder holding <class>/*.png")
    p.add_argument("--cls", choices=CLASSES, help="the class to learn (training)")
    p.add_argument("--out", help="run folder (default runs/dcgan_<cls>_<size>); --generate: image folder")
    p.add_argument("--size", type=int, choices=SIZES, default=64, help="image side")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1, or 3 = the gray repeated")
    p.add_argument("--epochs", type=in_range(int, 1), default=EPOCHS, help="epochs in all, across resumes")
    p.add_argument("--batch-size", type=in_range(int, 1), default=BATCH_SIZE, help="images per step")
    p.add_argument("--lr", type=in_range(float, 1e-12), default=LR, help="Adam learning rate of G and D")
    p.add_argument("--beta1", type=in_range(float, 0, 1), default=BETAS[0], help="Adam's beta1 (Noori, Table 1: 'Beta 0.55')")
    p.add_argument("--dropout", type=in_range(float, 0, 1), default=DROPOUT, help="D's dropout (Table 2 gives no rate; see DROPOUT)")
    p.add_argument("--diffaug", action=argparse.BooleanOptionalAction, default=False, help="DiffAugment before D")
    p.add_argument("--noise", choices=("uniform", "normal"), default="uniform", help="z ~ U(-1, 1) or N(0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, z, dropout and data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="autocast (default: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--log-every", type=in_range(int, 1), default=10, help="steps per log row")
    p.add_argument("--sample-every", type=in_range(int, 0), default=200, help="steps per sample grid (0: off)")
    p.add_argument("--save-every", type=in_range(int, 1), default=500, help="steps per step_NNNNNN.pt")
    p.add_argument("--eval-every", type=in_range(int, 0), default=0, help="steps per FID/IS/KID (0: off)")
    p.add_argument("--eval-n", type=in_range(int, 2), default=2048, help="samples per evaluation")
    p.add_argument("--fid-weights", help="local FID Inception weights (default: download)")
    p.add_argument("--resume", nargs="?", const="", help="continue from PATH (alone: <out>/checkpoints/last.pt)")
    p.add_argument("--max-steps", type=in_range(int, 1), help="stop after this step, with a checkpoint")
    p.add_argument("--generate", type=in_range(int, 1), metavar="N", help="write N images from --ckpt to --out")
    p.add_argument("--ckpt", help="the checkpoint --generate reads")
    args = p.parse_args(argv)
    try:
        if args.generate and not (args.ckpt and args.out) or args.ckpt and not args.generate:
            raise UserError("--generate N, --ckpt PATH and --out DIR go together — e.g. --generate 500 --ckpt "
                            "runs/dcgan_normal_64/checkpoints/last.pt --out fakes/normal (to continue: --resume)")
        if not (args.generate or args.cls):
            raise UserError(f"training needs a class — add --cls, one of {', '.join(CLASSES)}")
        args.out = args.out or f"runs/dcgan_{args.cls}_{args.size}"
        if Path(args.out).is_file():
            raise UserError(f"--out {args.out} is a file — pass a folder")
        if not args.generate and args.resume is None and (Path(args.out) / "checkpoints/last.pt").exists():
            raise UserError(f"{args.out} already holds a run — add --resume to continue it, or another --out")
        generate(args) if args.generate else train(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
