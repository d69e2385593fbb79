"""AC-GAN for chest X-rays: one class-conditional model draws normal, bacterial and viral images.

Dhawan & Nijhawan, "Cross-Modality Synthetic Data Augmentation using GANs: Enhancing Brain MRI and
Chest X-ray Classification", medRxiv 2024, doi:10.1101/2024.06.09.24308649 (the paper), Sec. 3.3-3.4,
with the losses of Odena, Olah & Shlens, "Conditional Image Synthesis with Auxiliary Classifier GANs",
ICML 2017, arXiv:1610.09585, Sec. 3: D tells real from fake and names the class, and both networks
are trained to get the class right, so G draws the class it is asked for. Where the paper is silent
we follow DCGAN (Radford, Metz & Chintala, ICLR 2016, arXiv:1511.06434).

  python prep.py synthetic --out data/synth --n 200 --size 64                 # phantoms, no download
  python acgan.py --data data/synth/train --size 64 --g-channels 128 --d-channels 16 --max-steps 1200
  python prep.py kermany PATH/TO/chest-xray-pneumonia.zip --out data --size 112 --crop --zscore  # Sec. 3.2
  python acgan.py --data data/train            # the paper: 112 px, RMSprop 1e-4, batch 32 (a GPU job)
  python acgan.py --data data/train --resume                                 # continue after Ctrl-C
  python acgan.py --data data/train --eval-every 2000 --fid-weights pt_inception-2015-12-05-6726825d.pth
  python acgan.py --generate 500 --ckpt runs/acgan_normal_bacterial_viral_112/checkpoints/last.pt --out fake

Class imbalance (Kermany train: ~1,341 normal, 2,530 bacterial, 1,345 viral): real batches come from
balanced sampling and G is asked for uniform labels, so real and fake batches have the same class
mix, the source head cannot use "bacterial is more often real" as a cue, and no loss needs weights.

The run folder (runs/acgan_<classes>_<size>/) holds config.json; log.csv (every loss term, D(x),
D(G(z)) before / after D's step, the class head's accuracy on real and fake images, ms_per_step);
loss_curve.png; samples/step_NNNNNN.png (a row per class, the same z in every row); checkpoints/
last.pt and step_NNNNNN.pt (--resume is exact); metrics.csv (--eval-every: FID, IS, KID per class).
--generate N writes N one-channel PNGs per class into OUT/<class>/, as classify.py --fake reads them.
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

NZ = 100                 # length of z: the paper is silent; 100 as DCGAN
EMBED_DIM = 50           # "an embedding of dimension 50" for the label (Sec. 3.3)
G_CHANNELS = 1024        # z through "a 1024 x 7 x 7 dense layer" (Sec. 3.3)
D_CHANNELS = 32          # D's first block, doubled per block to 256: the paper gives no widths
LEAK, DROPOUT = 0.2, 0.5  # D's LeakyReLU slope and dropout rate: Sec. 3.3 names both, without values
INIT_STD = 0.02          # weights ~ N(0, 0.02) (Radford et al. Sec. 4)
BATCH_SIZE, LR = 32, 1e-4  # Sec. 3.4, with RMSprop
RMSPROP_ALPHA, RMSPROP_EPS = 0.9, 1e-7  # the paper used TensorFlow: Keras' RMSprop rho and epsilon
EPOCHS = 200             # Sec. 3.4: "32000 epochs" at batch 32; we read ~32,000 steps: ~200 passes
SIZES = (64, 112, 128)   # size/16 must be whole: G starts from a 4, 7 or 8 px map
CLASSES = ("normal", "bacterial", "viral", "covid")
DEFAULT_CLASSES = "normal,bacterial,viral"  # the paper's three
RUN_FLAGS = ("size", "channels", "classes", "g_channels", "d_channels")  # a resumed run keeps them
GRID = 8                 # sample grids have GRID columns, one row per class
STATS = ("loss_d", "d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake", "loss_g", "g_src", "g_cls",
         "d_x", "d_g_z1", "d_g_z2", "cls_acc_real", "cls_acc_fake")
MAKE_DATA = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"

# -- Models --------------------------------------------------------------------------------------

class Generator(nn.Module):
    """(z (B, NZ) ~ N(0, 1), labels (B,)) -> image (B, channels, size, size) in [-1, 1] (Sec. 3.3).

    At 112 px (start map s0 = size / 16 = 7) and g_channels 1024:
        label: Embedding(K, 50) -> Linear(50, 49), linear activation    (B, 1, 7, 7)
        z:     Linear(100, 1024 * 49) -> ReLU                           (B, 1024, 7, 7)
        the two concatenated                                            (B, 1025, 7, 7)
        ConvTranspose2d(1025, 512, 4, 2, 1)   (B, 512, 14, 14)    BN, ReLU
        ConvTranspose2d(512, 256, 4, 2, 1)    (B, 256, 28, 28)    BN, ReLU
        ConvTranspose2d(256, 128, 4, 2, 1)    (B, 128, 56, 56)    BN, ReLU
        ConvTranspose2d(128, C, 4, 2, 1)      (B, C, 112, 112)    Tanh
    """
    def __init__(self, n_classes, channels=1, size=112, g_channels=G_CHANNELS, nz=NZ, embed_dim=EMBED_DIM):
        super().__init__()
        self.s0, self.g_channels = size // 16, g_channels
        self.label_embedding = nn.Embedding(n_classes, embed_dim)
        self.label_dense = nn.Linear(embed_dim, self.s0 ** 2)
        self.noise_dense = nn.Linear(nz, g_channels * self.s0 ** 2)
        widths, layers = [g_channels + 1, g_channels // 2, g_channels // 4, g_channels // 8], []
        for w_in, w_out in zip(widths, widths[1:]):  # no bias: the BatchNorm after it has the shift
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # no BatchNorm on the output
        self.upsample = nn.Sequential(*layers)

    def forward(self, z, labels):
        label_map = self.label_dense(self.label_embedding(labels)).view(-1, 1, self.s0, self.s0)
        noise_maps = F.relu(self.noise_dense(z)).view(-1, self.g_channels, self.s0, self.s0)  # ReLU: as Keras' AC-GAN
        return self.upsample(torch.cat([noise_maps, label_map], 1))

class Discriminator(nn.Module):
    """image (B, channels, size, size) -> (source logit (B,), class logits (B, K)) (Sec. 3.3).

    Four blocks (ours; the paper: "multiple") Conv2d(4, 2, 1) -> BatchNorm -> LeakyReLU -> Dropout halve
    the side: at 112 px, d_channels 32 (B, 32, 56, 56) ... (B, 256, 7, 7), 12,544 features for two linear
    heads. The paper ends them in a sigmoid and a softmax; we return logits for BCE-with-logits (autocast-
    safe, unlike sigmoid + BCELoss) and cross-entropy (a softmax before it would apply the softmax twice).
    """
    def __init__(self, n_classes, channels=1, size=112, d_channels=D_CHANNELS, dropout=DROPOUT):
        super().__init__()
        widths, layers = [channels, d_channels, 2 * d_channels, 4 * d_channels, 8 * d_channels], []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out),
                       nn.LeakyReLU(LEAK, True), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.source_head = nn.Linear(widths[-1] * (size // 16) ** 2, 1)
        self.class_head = nn.Linear(widths[-1] * (size // 16) ** 2, n_classes)

    def forward(self, x):
        h = self.features(x)
        return self.source_head(h).flatten(), self.class_head(h)

def init_weights(module):
    """Conv and dense weights ~ N(0, 0.02) (Radford et al. Sec. 4); biases 0, BatchNorm's N(1, 0.02): pytorch/examples."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)

# -- The training step ---------------------------------------------------------------------------

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

def train_step(G, D, opt_g, opt_d, scaler, autocast, real, y_real, z, y_fake, augment=nn.Identity()):
    """One AC-GAN iteration: a D step, then a G step on the same fakes (as pytorch/examples). Odena et al. Sec. 3: with L_S,
    L_C the log-likelihoods of the right source and class, D maximises L_S + L_C, G maximises L_C - L_S
    (as BCE-with-logits and cross-entropy). G's -L_S is non-saturating: log(1 - D(G(z))) gives G no
    gradient while D rejects every fake (Goodfellow et al., arXiv:1406.2661, Sec. 3). real: (B, C, S, S)
    in [-1, 1]; augment: diff_augment or none. Returns the STATS, without a host sync."""
    bce, ce = F.binary_cross_entropy_with_logits, F.cross_entropy
    opt_d.zero_grad(set_to_none=True)
    with autocast:
        fake = G(z, y_fake)
        src_real, cls_real = D(augment(real))  # real and fake in separate calls: separate BatchNorm batches
        src_fake, cls_fake = D(augment(fake.detach()))  # detach: the D step must not reach G
        d_terms = [bce(src_real, torch.ones_like(src_real)), bce(src_fake, torch.zeros_like(src_fake)),
                   ce(cls_real, y_real), ce(cls_fake, y_fake)]
    scaler.scale(sum(d_terms)).backward()
    scaler.step(opt_d)
    opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)  # G's backward needs D's input gradients, not its weight gradients
    with autocast:  # judged by the D just updated, as pytorch/examples' DCGAN
        src_after, cls_after = D(augment(fake))
        g_terms = [bce(src_after, torch.ones_like(src_after)), ce(cls_after, y_fake)]
    scaler.scale(sum(g_terms)).backward()
    scaler.step(opt_g)
    scaler.update()  # one scaler for both optimizers: update once per iteration
    D.requires_grad_(True)
    probs = [torch.sigmoid(t.float()).mean() for t in (src_real, src_fake, src_after)]
    accs = [(c.argmax(1) == y).float().mean() for c, y in ((cls_real, y_real), (cls_fake, y_fake))]
    return torch.stack([t.float() for t in (sum(d_terms), *d_terms, sum(g_terms), *g_terms, *probs, *accs)]).detach()

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
    """A checkpoint acgan.py wrote (plain types, so weights_only=True), or a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated and foreign files raise many kinds
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a file acgan.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("model") != "acgan":
        raise UserError(f"{path} is not a acgan.py checkpoint — pass a file acgan.py wrote")
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

def class_list(text):
    """argparse type: two or more comma-separated classes, each known and named once -> the same text."""
    names = text.split(",")
    if len(names) < 2 or any(c not in CLASSES or names.count(c) > 1 for c in names):
        raise argparse.ArgumentTypeError(f"{text!r} is not 2+ of {', '.join(CLASSES)}, each once (1: use dcgan.py)")
    return text

def load_images(data, classes, size, channels):
    """DATA/<class>/*.png of every class decoded once -> uint8 (N, channels, size, size), class indices (N,)."""
    images, labels = [], []
    for k, cls in enumerate(classes):
        folder = Path(data) / cls
        if not folder.is_dir():
            raise UserError(f"{'class folder ' + str(folder) if Path(data).is_dir() else 'data folder ' + data} "
                            f"not found — {MAKE_DATA}, then pass --data DATA/train")
        paths = sorted(folder.glob("*.png"))
        if not paths:
            raise UserError(f"{folder} has 0 PNG images — {MAKE_DATA}, or drop {cls} from --classes")
        for path in paths:
            try:
                with Image.open(path) as im:  # gray, resized with an antialiasing filter when needed
                    images.append(pil_to_tensor(im.convert("L").resize((size, size), Image.Resampling.LANCZOS)))
            except (OSError, SyntaxError) as e:  # Pillow reports some broken PNGs as SyntaxError
                raise UserError(f"cannot read image {path} ({e}) — delete it or {MAKE_DATA}")
        labels += [k] * len(paths)
    return torch.stack(images).repeat(1, channels, 1, 1), torch.tensor(labels)

def batch_indices(labels, batch_size, seed, epoch):
    """The indices of each step's batch in one epoch, (steps, batch_size), by balanced sampling: image j
    has probability 1 / (K * count of its class), with replacement (small classes repeat). A function
    of (seed, epoch) only: a resumed run draws the batches an unbroken run would."""
    weights = 1 / torch.bincount(labels)[labels].double()
    steps = max(1, len(labels) // batch_size)
    rng = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.multinomial(weights, steps * batch_size, replacement=True, generator=rng).view(steps, batch_size)

def fixed_z(n, seed):
    """n vectors z ~ N(0, 1), one at a time from their own RNG: vector i depends on the seed alone (not
    on n or the batch size), and the training RNG is not touched."""
    rng = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, NZ, generator=rng) for _ in range(n)])

@torch.no_grad()
def sample(G, z, labels, batch_size=256):
    """G(z, labels) as uint8 images on the CPU, in eval mode (BatchNorm's running statistics)."""
    G.eval()
    images = torch.cat([((G(zs, ys).float() + 1) * 127.5).round().clamp(0, 255).byte().cpu()
                        for zs, ys in zip(z.split(batch_size), labels.split(batch_size))])
    G.train()
    return images

def save_grid(G, n_classes, seed, path):
    """Row k: G(z_j, k) for the same GRID fixed z_j in every row, so a column is one z drawn as each
    class. One channel (make_grid repeats a gray channel into three)."""
    z, labels = fixed_z(GRID, seed).repeat(n_classes, 1), torch.arange(n_classes).repeat_interleave(GRID)
    device = next(G.parameters()).device
    to_pil_image(torchvision.utils.make_grid(sample(G, z.to(device), labels.to(device)), nrow=GRID)[:1]).save(path)

def checkpoint(parts, step, args, device):
    """Everything --resume needs, as one dict of plain types and tensors (weights_only loads it)."""
    return {"model": "acgan", "args": vars(args), "step": step, "rng_cpu": torch.get_rng_state(),
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

def make_evaluators(images, labels, classes, args, device):
    """metrics.py's Evaluator on each class's real images, built before training: missing weights fail now."""
    import metrics  # only --eval-every needs metrics.py: acgan.py alone trains without it
    try:
        return {c: metrics.Evaluator(images[labels == k], weights=args.fid_weights, device=str(device))
                for k, c in enumerate(classes)}
    except metrics.UserError as e:
        raise UserError(str(e))

# -- Train ---------------------------------------------------------------------------------------

def train(args, argv):
    out, last = Path(args.out), Path(args.out) / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(args.resume or last) if args.resume is not None else None
    for key in RUN_FLAGS if ckpt else ():
        if ckpt["args"][key] != getattr(args, key):
            raise UserError(f"{args.resume or last} was trained with --{key.replace('_', '-')} {ckpt['args'][key]}, "
                            f"not {getattr(args, key)} — repeat its flags with --resume, or pass another --out")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        print("warning: training on a CPU is slow — try --size 64 --g-channels 128 --d-channels 16")
    classes = args.classes.split(",")
    images, labels = load_images(args.data, classes, args.size, args.channels)  # labels stay on the CPU
    evaluators = make_evaluators(images, labels, classes, args, device) if args.eval_every else {}
    images, labels_dev, iters = images.to(device), labels.to(device), max(1, len(labels) // args.batch_size)
    # The CUDA speed switches: autocast (bf16, or fp16 with a GradScaler), channels_last, cuDNN
    # autotuning (RMSprop has no fused kernel: torch picks its multi-tensor one). --amp on a CPU is bf16.
    amp = args.amp if args.amp is not None else cuda
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=amp)
    layout = torch.channels_last if cuda and amp else torch.contiguous_format  # --no-amp: plain fp32, NCHW
    torch.backends.cudnn.benchmark = cuda
    torch.manual_seed(args.seed)  # the global RNG: initial weights, then z, G's labels and dropout
    G, D = (net.apply(init_weights).to(device, memory_format=layout) for net in (
        Generator(len(classes), args.channels, args.size, args.g_channels),
        Discriminator(len(classes), args.channels, args.size, args.d_channels)))
    opt_g, opt_d = (torch.optim.RMSprop(net.parameters(), args.lr, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS)
                    for net in (G, D))
    parts = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d,
             "scaler": torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)}
    augment = diff_augment if args.diffaug else nn.Identity()
    step_args = (torch.compile(G) if args.compile else G, torch.compile(D) if args.compile else D,
                 opt_g, opt_d, parts["scaler"], autocast)
    step = restore(ckpt, parts, device) if ckpt else 0

    (out / "samples").mkdir(parents=True, exist_ok=True)
    last.parent.mkdir(exist_ok=True)
    counts = dict(zip(classes, labels.bincount().tolist()))
    (out / "config.json").write_text(json.dumps({"args": vars(args), "device": str(device), "torch": torch.__version__,
                                                 "amp": str(dtype) if amp else "off", "class_counts": counts}))
    for log in ("log.csv", "metrics.csv"):
        rewind_log(out / log, step)
    eval_z = fixed_z(args.eval_n, args.seed + 1).to(device)  # the same z for every class and evaluation
    if step == 0:
        save_grid(G, len(classes), args.seed, out / "samples/step_000000.png")
    total = min(args.epochs * iters, args.max_steps or math.inf)
    batches = batch_indices(labels, args.batch_size, args.seed, step // iters).to(device)
    # Ctrl-C and SIGTERM (kill, a job scheduler) only raise a flag: the step in flight finishes and
    # the loop saves, so a checkpoint never holds half a step and --resume is exact.
    stop = []
    handlers = {s: signal.signal(s, lambda *_: stop.append(s)) for s in (signal.SIGINT, signal.SIGTERM)}
    window, n, last_good, t0 = torch.zeros(len(STATS), device=device), 0, step, time.perf_counter()
    try:
        while step < total and not stop:
            epoch, i = divmod(step, iters)
            if i == 0:  # each epoch has its own draw
                batches = batch_indices(labels, args.batch_size, args.seed, epoch).to(device)
            real = (images[batches[i]].float() / 127.5 - 1).contiguous(memory_format=layout)
            z = torch.randn(args.batch_size, NZ, device=device)
            y_fake = torch.randint(len(classes), (args.batch_size,), device=device)  # uniform (see the docstring)
            window += train_step(*step_args, real, labels_dev[batches[i]], z, y_fake, augment)
            step, n = step + 1, n + 1
            end = step == total or bool(stop)
            save = step % args.save_every == 0 or end
            if step % args.log_every == 0 or save:  # the only host syncs: log and save steps
                if not torch.isfinite(window).all():
                    raise SystemExit(f"error: non-finite loss at step {step} (after step {last_good}) — lower "
                                     f"--lr or try --no-amp; the last good checkpoint {last} is kept")
                last_good = step
            if step % args.log_every == 0 or end:
                if cuda:  # the GPU runs ahead of Python: wait for it before reading the clock
                    torch.cuda.synchronize(device)
                row = {**dict(zip(STATS, (window / n).tolist())), "ms_per_step": 1000 * (time.perf_counter() - t0) / n}
                print(f"[{epoch + 1}/{args.epochs}][{i}/{iters}] Loss_D: {row['loss_d']:.4f} Loss_G: "
                      f"{row['loss_g']:.4f} D(x): {row['d_x']:.4f} D(G(z)): {row['d_g_z1']:.4f} / {row['d_g_z2']:.4f} "
                      f"class acc real/fake: {row['cls_acc_real']:.3f} / {row['cls_acc_fake']:.3f}  "
                      f"{row['ms_per_step']:.0f} ms/step")
                log_row(out / "log.csv", {"step": step, "epoch": epoch + 1, **{k: f"{v:.5g}" for k, v in row.items()}})
                window, n, t0 = window.zero_(), 0, time.perf_counter()
            t_side = time.perf_counter()  # sampling, evaluation and saving stay out of ms/step
            if args.sample_every and (step % args.sample_every == 0 or end):
                save_grid(G, len(classes), args.seed, out / f"samples/step_{step:06d}.png")
            if evaluators and step % args.eval_every == 0:
                for k, (cls, evaluator) in enumerate(evaluators.items()):
                    labels_k = torch.full((args.eval_n,), k, device=device)
                    scores = evaluator.score(sample(G, eval_z, labels_k, args.batch_size))
                    print(f"eval {cls}: FID {scores['fid']:.2f} KID {scores['kid_mean']:.4f} IS {scores['is_mean']:.2f}"
                          f" ({scores['n_fake']} fakes vs {scores['n_real']} real, {scores['network']})")
                    log_row(out / "metrics.csv", {"step": step, "epoch": epoch + 1, "class": cls, **scores})
            if save:
                state = checkpoint(parts, step, args, device)
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
        print(f"interrupted at step {step}; saved {last} — continue with: python acgan.py {' '.join(again)}")
        raise SystemExit(130)
    print(f"done: step {step}; run folder {out}")

# -- Generate and the command line ---------------------------------------------------------------

def generate(args):
    """Write --generate N PNGs per class into OUT/<class>/; image i of every class comes from z_i."""
    ckpt = load_checkpoint(args.ckpt)
    a, classes = ckpt["args"], ckpt["args"]["classes"].split(",")  # the run's size, channels and classes
    device = pick_device(args.device)
    G = Generator(len(classes), a["channels"], a["size"], a["g_channels"]).to(device)
    G.load_state_dict(ckpt["G"])
    z = fixed_z(args.generate, args.seed).to(device)
    for k, cls in enumerate(classes):
        (Path(args.out) / cls).mkdir(parents=True, exist_ok=True)
        labels = torch.full((args.generate,), k, device=device)
        for i, image in enumerate(sample(G, z, labels, args.batch_size)):  # one channel stays one (mode L)
            to_pil_image(image[:1]).save(Path(args.out) / cls / f"acgan_{cls}_{i:06d}.png")
    print(f"wrote {args.generate} PNGs per class ({a['size']} px, {a['classes']}, step {ckpt['step']}) "
          f"to {args.out}/<class>/")

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="acgan.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="AC-GAN for "
               "chest X-rays, one model for all classes. Against class imbalance, real batches come from balanced "
               "sampling and G's labels are uniform, so the losses carry no class weights.")
    p.add_argument("--data", default="data/train", help="split folder holding <class>/*.png")
    p.add_argument("--classes", type=class_list, default=DEFAULT_CLASSES, help="comma-separated, for training")
    p.add_argument("--out", help="run folder (default runs/acgan_<classes>_<size>); --generate: image folder")
    p.add_argument("--size", type=int, choices=SIZES, default=112, help="image side (the paper: 112)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1, or 3 = the gray repeated")
    p.add_argument("--g-channels", type=in_range(int, 8), default=G_CHANNELS, help="G's start maps, halved per layer")
    p.add_argument("--d-channels", type=in_range(int, 1), default=D_CHANNELS, help="D's first block, doubled 3 times")
    p.add_argument("--lr", type=in_range(float, 1e-12), default=LR, help="RMSprop learning rate of G and D")
    p.add_argument("--epochs", type=in_range(int, 1), default=EPOCHS, help="epochs in all, across resumes")
    p.add_argument("--batch-size", type=in_range(int, 1), default=BATCH_SIZE, help="images per step")
    p.add_argument("--diffaug", action=argparse.BooleanOptionalAction, default=False, help="DiffAugment before D")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, z, labels, dropout and data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="autocast (default: on with CUDA, off on a CPU; --amp on a CPU is bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--log-every", type=in_range(int, 1), default=50, help="steps per log row")
    p.add_argument("--sample-every", type=in_range(int, 0), default=500, help="steps per sample grid (0: off)")
    p.add_argument("--save-every", type=in_range(int, 1), default=1000, help="steps per step_NNNNNN.pt")
    p.add_argument("--eval-every", type=in_range(int, 0), default=0, help="steps per FID/IS/KID (0: off)")
    p.add_argument("--eval-n", type=in_range(int, 2), default=2048, help="samples per class and evaluation")
    p.add_argument("--fid-weights", help="local FID Inception weights (default: download)")
    p.add_argument("--resume", nargs="?", const="", help="continue from PATH (no value: <out>/checkpoints/last.pt)")
    p.add_argument("--max-steps", type=in_range(int, 1), help="stop after this step, with a checkpoint")
    p.add_argument("--generate", type=in_range(int, 1), metavar="N", help="write N images per class from --ckpt")
    p.add_argument("--ckpt", help="the checkpoint --generate reads")
    args = p.parse_args(argv)
    try:
        if args.generate or args.ckpt:
            if not (args.generate and args.ckpt and args.out) or Path(args.out).is_file():
                raise UserError("--generate N, --ckpt PATH and --out DIR (a folder) go together — e.g. --generate "
                                "500 --ckpt runs/acgan_normal_bacterial_viral_112/checkpoints/last.pt --out fake/acgan;"
                                " to continue a run use --resume")
            return generate(args)
        args.out = args.out or f"runs/acgan_{args.classes.replace(',', '_')}_{args.size}"
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
