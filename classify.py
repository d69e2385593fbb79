"""classify.py: do synthetic chest X-rays help a classifier, and do they look real?

- train: a classifier on real, generated ("fake") or real+fake images; accuracy, precision, sensitivity
  (recall), specificity and F1 on real test images, per class and macro, mean ± std over seeds/folds.
  Davoodi B., Lo Giudice M., "Synthetic of Chest X-ray Images", Sec. 3.3.2, Tables 4a/4b (4 folds);
  Dhawan K., Nijhawan S.S., "Cross-Modality Synthetic Data Augmentation using GANs", Table I, with an
  EfficientNetV2, early stopping, a validation split (Sec. 3.4, 4); ours: --arch efficientnet_v2_s --val-frac 0.1.
  Table I does not say how it averages over classes; its F1 0.93 above both P 0.84 and R 0.77 fits neither
  macro nor weighted means (each class's F1 is at most the mean of its P and R). Ours are macro means.
- judge: the share of generated images a classifier accepts as their class with p > 0.98, beside real ones, as
  the ViT judge of Lugo-Torres G. et al., "Synthetic Generation of Pneumonia Images using CycleGAN Model",
  extended version. It measures confidence, not realism, so it also gives the domain FID: the Frechet distance
  (Heusel M. et al., NeurIPS 2017, arXiv:1706.08500) of the two sets in the classifier's features.
- study: a reader study as the same authors' (real or synthetic? which class?): one page, then the readers' scores.

    python classify.py train --real data/train --fake fakes/acgan --mode real fake real+fake --seeds 3
    python classify.py train --real data/train --folds 4 --recipe paper
    python classify.py judge --ckpt runs/classify/real/seed0/model.pt --images fakes/dcgan_viral --expect viral
    python classify.py study make --real data/test --fake fakes/acgan --n 100 --fake-share 0.8 --out study
    python classify.py study score --key study/key.json answers_*.json

Data: DATA/{train,test}/<class>/*.png (prep.py); --test: the `test` beside --real; --folds K splits --real by
patient (DATA/manifest.csv). Fakes: FAKE/<class>/*.png (acgan.py) or CLASS=FAKE (a flat folder). train writes
to --out table.txt, results.json (after each run), <mode>/confusion.png, <mode>/seed<S>[_fold<K>]/model.pt...
"""
import argparse
import base64
import copy
import csv
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import save_image

MODES = ("real", "fake", "real+fake")
ARCHS = ("small", "efficientnet_v2_s")  # EfficientNetV2: Dhawan & Nijhawan, Sec. 4
MAKE_DATA = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"
# "paper": Davoodi & Lo Giudice Sec. 3.3.2, SGD with "lr = 0.01", Nesterov momentum 0.9, batch 256 and
# no schedule named. "default" (ours): AdamW with a cosine decay trains the small CNN in a few epochs.
RECIPES = {"default": dict(lr=1e-3, batch_size=64), "paper": dict(lr=0.01, batch_size=256)}
PAPER_MOMENTUM, ADAMW_WEIGHT_DECAY = 0.9, 1e-4
SMALL_WIDTHS = (16, 32, 64, 128)  # the small CNN's four stages; the last is the feature size D
SCRATCH, IMAGENET_GRAY = (0.5, 0.5), (0.449, 0.226)  # input mean, std: [0, 1] -> [-1, 1]; ImageNet's RGB averaged
EFFICIENTNET_DROPOUT = 0.2        # torchvision's own efficientnet_v2_s head
AUGMENT = v2.Compose([v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(1.0, 1.15)),  # --augment (ours):
                      v2.ColorJitter(brightness=0.1, contrast=0.1)])  # no flips: the heart is on the patient's left
JUDGE_THRESHOLD, EVAL_BATCH = 0.98, 256  # Lugo-Torres et al. (extended): ViT p "above 0.98"; images per pass
METRICS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Sensitivity", "specificity": "Specificity",
           "f1": "F1"}  # result key -> table heading

# ---- The models: (B, 1, H, W) in [0, 1] -> logits; features() -> (B, D) for the domain FID

class Classifier(nn.Module):
    """A body (normalised image -> (B, D) features) and a linear layer to the logits (no softmax: F.cross_entropy
    takes logits). mean and std are buffers, so a checkpoint needs no download."""

    def __init__(self, body, dim, n_classes, mean_std, dropout=0.0):
        super().__init__()
        self.body, self.feature_dim = body, dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))
        self.register_buffer("mean", torch.tensor(mean_std[0]))
        self.register_buffer("std", torch.tensor(mean_std[1]))

    def features(self, x):
        return self.body((x - self.mean) / self.std)                # (B, D)

    def forward(self, x):
        return self.head(self.features(x))                          # (B, n_classes)

def build_model(arch, n_classes, pretrained=False):
    """small (ours): four stages of [conv3x3-BN-ReLU] x 2 + max-pool, ~0.29 M parameters; two convs at full
    resolution, where viral and normal lungs differ. Else torchvision's net, ImageNet weights if pretrained."""
    if arch == "small":
        layers = []
        for c_in, c in zip((1,) + SMALL_WIDTHS, SMALL_WIDTHS):     # no conv bias before a BatchNorm
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]                             # (B, c, H/2, W/2)
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # (B, D) at any input size
        return Classifier(body, SMALL_WIDTHS[-1], n_classes, SCRATCH)
    net = getattr(torchvision.models, arch)()
    if pretrained:
        url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        try:
            net.load_state_dict(torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                                   weights_only=True))
        except Exception as e:  # offline, a timeout, a corrupt cached file: all mean "no weights"
            raise UserError(f"cannot get the ImageNet weights for {arch} from {url} ({type(e).__name__}) — go "
                            f"online once (they are cached in {Path(torch.hub.get_dir()) / 'checkpoints'}, where "
                            "a copied file works too) or drop --pretrained") from None
    rgb = net.features[0][0]                                        # (out, 3, k, k), no bias
    gray = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=False)
    # The RGB filters SUMMED: on a gray image copied into R, G and B this computes the same, so the
    # pretrained BatchNorm after it stays valid (averaging them would scale its input by 1/3).
    gray.weight = nn.Parameter(rgb.weight.detach().sum(1, keepdim=True))
    net.features[0][0], dim, net.classifier = gray, net.classifier[1].in_features, nn.Identity()  # D = 1280
    return Classifier(net, dim, n_classes, IMAGENET_GRAY if pretrained else SCRATCH, EFFICIENTNET_DROPOUT)

# ---- Metrics, all from the confusion matrix cm[true, predicted]

def metrics_from_confusion(cm, classes):
    """Overall accuracy; per class, one vs rest (TP = cm[c, c], FN = rest of row c, FP = rest of column c):
    accuracy (TP + TN) / N as Davoodi & Lo Giudice's Table 4, precision, recall (sensitivity), specificity, F1;
    their macro means. 0/0 counts as 0 (scikit-learn's zero_division=0): no credit for a class never predicted."""
    cm = np.asarray(cm, dtype=np.int64)
    n, tp = int(cm.sum()), np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = n - tp - fn - fp
    num = np.stack([tp + tn, tp, tp, tn, 2 * tp])                   # F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN)
    den = np.stack([np.full_like(tp, n), tp + fp, tp + fn, tn + fp, 2 * tp + fp + fn])
    values = dict(zip(METRICS, np.divide(num, den, out=np.zeros(num.shape), where=den > 0)))
    per_class = {c: {k: float(v[i]) for k, v in values.items()} | {"support": int(tp[i] + fn[i])}
                 for i, c in enumerate(classes)}
    return {"accuracy": float(tp.sum() / max(n, 1)), "n": n, "confusion": cm.tolist(),
            "per_class": per_class, "macro": {k: float(v.mean()) for k, v in values.items()}}

def cell(values):
    """'0.912 ± 0.021': the mean ± the sample std (ddof=1) over the runs; the value alone for one run."""
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")

def table(title, rows, first="class"):
    """rows: [(name, [a dict of metrics per run])] -> a line per name under the METRICS headings."""
    return "\n".join([title, f"{first:<12}" + "".join(f"{h:>15}" for h in METRICS.values())] + [
        f"{name:<12}" + "".join(f"{cell([r[k] for r in runs]):>15}" for k in METRICS) for name, runs in rows])

def mode_table(title, runs, classes):
    """Davoodi & Lo Giudice's Table 4 (a row per class, overall accuracy), plus macro means and the summed confusion matrix."""
    cm = np.sum([r["confusion"] for r in runs], axis=0)
    rows = [(c, [r["per_class"][c] for r in runs]) for c in classes] + [("macro", [r["macro"] for r in runs])]
    return "\n".join([table(title, rows), f"overall accuracy {cell([r['accuracy'] for r in runs])}",
                      "confusion matrix summed over the runs (rows = true class, columns = predicted):"]
                     + [f"{c:<12}" + "".join(f"{v:>8}" for v in row) for c, row in zip(classes, cm)])

def save_confusion_png(cm, path, px=48):
    """cm as gray tiles: rows = true class, columns = predicted; darker = a larger share of the row."""
    share = torch.as_tensor(cm, dtype=torch.float32)
    share = share / share.sum(1, keepdim=True).clamp(min=1)
    save_image((1 - share).reshape(-1, 1, 1, 1).expand(-1, 1, px, px), path, nrow=len(share), pad_value=0.5)

# ---- The helpers every script carries

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
    """A checkpoint classify.py wrote (plain types, so weights_only=True), or a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated and foreign files raise many kinds
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a file classify.py wrote")
    if not isinstance(ckpt, dict) or ckpt.get("model") != "classify":
        raise UserError(f"{path} is not a classify.py checkpoint — pass a file classify.py wrote")
    return ckpt

# ---- Data: PNG folders, decoded once into uint8 (N, 1, S, S)

Images = namedtuple("Images", "x y paths")  # uint8 (N, 1, S, S), int64 class ids (N,), N file names

def pngs(folder):
    return sorted(Path(folder).glob("*.png"))

def class_folders(split, what):
    """{class: [PNG files]} from SPLIT/<class>/*.png, classes sorted by name, or a UserError."""
    found = {d.name: pngs(d) for d in sorted(Path(split).glob("*")) if d.is_dir()}
    if not found:
        raise UserError(f"{what} folder {split} does not exist or has no <class>/ subfolders — {MAKE_DATA}"
                        + (" (pass a flat folder of one class as --fake CLASS=DIR)" if what == "fake" else ""))
    for c, files in found.items():
        if not files:
            raise UserError(f"{what} class folder {Path(split) / c} holds no .png images — fill or remove it")
    return found

def load_images(paths, size):
    """PNG files -> uint8 (N, 1, size, size): 8-bit gray, resized with an antialiasing filter if needed."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(pil_to_tensor(im.convert("L").resize((size, size), Image.Resampling.LANCZOS)))
        except (OSError, SyntaxError) as e:  # Pillow reports some broken PNGs as SyntaxError
            raise UserError(f"cannot read image {p} ({e}) — delete or re-create it") from None
    return torch.stack(images)

def load_set(files, classes, size):
    """{class: [PNG files]} -> Images, the label of a class being its place in classes."""
    paths = [p for c in classes for p in files.get(c, [])]
    y = torch.tensor([i for i, c in enumerate(classes) for _ in files.get(c, [])], dtype=torch.long)
    return Images(load_images(paths, size), y, [str(p) for p in paths])

def take(images, idx):
    return Images(images.x[idx], images.y[idx], [images.paths[i] for i in idx.tolist()])

def subsample(y, n, generator):
    """Sorted indices of at most n random images per class (all of them when n is None)."""
    per_class = [torch.nonzero(y == c).flatten() for c in y.unique()]
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)][:n] for idx in per_class]).sort().values

def patient_folds(split, images, k, seed):
    """Fold id (0..k-1) per image; all images of a patient (DATA/manifest.csv; else each image is its own)
    share a fold. Patients are dealt to the folds in turn, seeded and grouped by class: balanced folds."""
    data, patient_of = Path(split).resolve().parent, {}
    if (data / "manifest.csv").exists():
        with open(data / "manifest.csv", newline="") as f:
            patient_of = {r["path"]: r["patient"] for r in csv.DictReader(f)}
    else:
        print(f"note: no {data / 'manifest.csv'}: the folds split images, not patients")
    patients = [patient_of.get(r, r) for r in (Path(p).resolve().relative_to(data).as_posix() for p in images.paths)]
    label = dict(zip(patients, images.y.tolist()))                  # a patient's class
    names = sorted(label)
    names = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
    fold = {p: i % k for i, p in enumerate(sorted(names, key=label.get))}   # a stable sort: seeded within a class
    return torch.tensor([fold[p] for p in patients])

# ---- Training and scoring

def class_weights(y, n_classes):
    """n / (C * n_c): every class weighs the same in the loss in total; an absent class gets 0."""
    n_c = torch.bincount(y, minlength=n_classes).float()
    return torch.where(n_c > 0, len(y) / (n_classes * n_c), 0.0)

def make_optimizer(model, args, total_steps, device):
    """--recipe paper: Nesterov SGD at a constant lr; default: AdamW with a cosine decay to 0."""
    if args.recipe == "paper":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=PAPER_MOMENTUM, nesterov=True)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=ADAMW_WEIGHT_DECAY, fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)

def to_input(x, device):
    """uint8 (B, 1, H, W) -> float in [0, 1] on the device; channels_last on CUDA (faster convs)."""
    x = x.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

def train_model(model, data, n_classes, args, device, val=None):
    """Train --epochs, but at least --min-steps and at most --max-steps updates -> (steps, epochs). With val:
    keep the epoch of lowest validation loss, stop --patience epochs later (early stopping, Dhawan & Nijhawan
    Sec. 4). Batch order and augmentation come from torch's global generator, which one_run seeds."""
    n, bs = len(data.y), args.batch_size
    # A 60-image set (--real-per-class 20) is one batch: --epochs alone would be a handful of updates.
    epochs = max(args.epochs, math.ceil(args.min_steps / math.ceil(n / bs)))
    total = min(epochs * math.ceil(n / bs), args.max_steps or math.inf)
    opt, schedule = make_optimizer(model, args, total, device)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()  # bf16 autocast where the GPU has it
    weights = class_weights(data.y, n_classes).to(device)
    x_all, y_all = data.x.to(device), data.y.to(device)             # X-ray sets are small: all on the device
    step, best, wait = 0, (math.inf, None), 0
    for epoch in range(1, epochs + 1):
        model.train()  # (predict() leaves it in eval mode)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0, 0
        for idx in torch.randperm(n).to(device).split(bs)[: total - step]:   # --max-steps may cut an epoch
            x, y = to_input(x_all[idx], device), y_all[idx]
            if args.augment:
                x = torch.stack([AUGMENT(image) for image in x])    # new random parameters per image
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()                                         # after opt.step()
            loss_sum, correct = loss_sum + loss.detach() * len(y), correct + (logits.argmax(1) == y).sum()
            seen, step = seen + len(y), step + 1                    # no .item() (a host sync) per step
        if not torch.isfinite(loss_sum):
            raise UserError(f"the loss became NaN or inf in epoch {epoch} — lower --lr (finished runs are kept)")
        v = -np.log(predict(model, val.x, device)[np.arange(len(val.y)), val.y] + 1e-12).mean() if val else math.nan
        print(f"  epoch {epoch}/{epochs}  step {step}  loss {loss_sum.item() / seen:.4f}  train accuracy "
              f"{correct.item() / seen:.3f}  val loss {v:.4f}  {time.perf_counter() - t0:.1f} s")
        best, wait = ((v, copy.deepcopy(model.state_dict())), 0) if v < best[0] else (best, wait + bool(val))
        if step == total or wait >= args.patience:
            break
    if best[1] is not None:
        model.load_state_dict(best[1])                              # the epoch with the lowest validation loss
    # Precise BN (Wu Y., Johnson J., "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, Sec. 3): the running
    # statistics lag the weights; on 60 phantom images a net then called all test images "normal" (0.33; now 0.80).
    torch.optim.swa_utils.update_bn((to_input(b, device) for b in x_all.split(bs)), model)
    return step, epoch

@torch.inference_mode()
def predict(model, x, device, features=False):
    """Class probabilities (N, C), or the penultimate features (N, D): float64 numpy, eval mode."""
    model.eval()
    f = model.features if features else (lambda b: F.softmax(model(b).float(), dim=1))
    return torch.cat([f(to_input(b, device)).float().cpu() for b in x.split(EVAL_BATCH)]).double().numpy()

def load_classifier(path, device):
    """A model.pt that `classify.py train` wrote -> (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError:
        raise UserError(f"the weights in {path} do not fit architecture {ckpt['arch']} with "
                        f"{len(ckpt['classes'])} classes — pass a model.pt that train wrote") from None
    return model.to(device).eval(), ckpt

# ---- The commands

def load_data(args):
    """Read --real, --fake (DIR/<class>/ or CLASS=DIR) and --test once; their classes must agree."""
    real = class_folders(args.real, "real training") if args.folds or args.val_frac or args.mode != ["fake"] else {}
    test = class_folders(args.test, "test") if args.test else {}
    fake = {}
    for spec in args.fake:
        name, flat, folder = spec.partition("=")
        if flat and not pngs(folder):
            raise UserError(f"fake folder {folder} does not exist or holds no .png images — pass the folder "
                            "--generate/--translate wrote")
        for c, files in ({name: pngs(folder)} if flat else class_folders(spec, "fake")).items():
            fake[c] = fake.get(c, []) + files
    classes = sorted(real or test)
    if real and test and set(test) != set(real):
        raise UserError(f"class names differ: test has {', '.join(sorted(test))}, --real has {', '.join(classes)} "
                        "— give both the same <class>/ folders")
    if set(fake) - set(classes):
        raise UserError(f"class names differ: fake class {', '.join(sorted(set(fake) - set(classes)))} is not "
                        f"among {', '.join(classes)} — rename its folder, or pass it as --fake CLASS=DIR")
    missing = [c for c in classes if c not in fake]
    if "fake" in args.mode and missing:
        raise UserError(f"--mode fake needs generated images of every class; missing: {', '.join(missing)} "
                        f"— add --fake {missing[0]}=DIR")
    return classes, *(load_set(files, classes, args.size) if files else None for files in (real, fake, test))

def training_set(mode, real, real_idx, fake, args, seed):
    """The images one run trains on. The subsamples depend on the seed alone, so for one seed "real" and
    "real+fake" share their real images: the modes are compared on paired runs."""
    generator, parts = torch.Generator().manual_seed(seed), []
    if mode != "fake":
        parts.append(take(real, real_idx[subsample(real.y[real_idx], args.real_per_class, generator)]))
    if mode != "real":
        parts.append(take(fake, subsample(fake.y, args.fake_per_class, generator)))
    x, y = torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])
    return Images(x, y, [path for p in parts for path in p.paths])

def one_run(args, config, run, train, test, classes, device, run_dir, val=None):
    """Train one model (run: mode, seed, fold), score it on real images, write its files -> its metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n_train = dict(zip(classes, torch.bincount(train.y, minlength=len(classes)).tolist()))
    print(f"[{run_dir.parent.name} {run_dir.name}] training on {n_train}, scoring on {len(test.y)} real images")
    torch.manual_seed(run["seed"])                                  # weights, batch order, augmentation
    model = build_model(args.arch, len(classes), args.pretrained).to(device)
    model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
    steps, epochs = train_model(model, train, len(classes), args, device, val)
    probs = predict(model, test.x, device)
    cm = torch.bincount(test.y * len(classes) + torch.from_numpy(probs.argmax(1)), minlength=len(classes) ** 2)
    m = metrics_from_confusion(cm.reshape(len(classes), -1), classes) | run | dict(n_train=n_train, steps=steps,
                                                                                  epochs=epochs)
    with open(run_dir / "predictions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "true", "predicted", *(f"p_{c}" for c in classes)]] + [
            [p, classes[y], classes[pr.argmax()], *(f"{v:.6f}" for v in pr)]
            for p, y, pr in zip(test.paths, test.y.tolist(), probs)])
    save_confusion_png(m["confusion"], run_dir / "confusion.png")
    save_atomic({"model": "classify", "weights": model.state_dict(), "arch": args.arch, "classes": classes,
                 "size": args.size, "args": config, "test_dir": args.test and str(Path(args.test).resolve()),
                 **run}, run_dir / "model.pt")
    print(f"[{run_dir.parent.name} {run_dir.name}] accuracy {m['accuracy']:.3f}, macro F1 {m['macro']['f1']:.3f}")
    return m

def run_train(args):
    if any("fake" in m for m in args.mode) != bool(args.fake):
        raise UserError("--mode fake and real+fake train on generated images — pass --fake DIR (DIR/<class>/*.png)"
                        " or --fake CLASS=DIR with them, and only with them")
    if args.folds and args.test:
        raise UserError("--folds K scores on held-out folds of --real, not on --test — drop --test or --folds")
    if args.folds and args.fake:  # a GAN trained on all of --real has seen every fold's test patients
        raise UserError("--folds with --fake leaks the test folds into the fakes — score on a --test split the "
                        "GANs never saw, or train GANs per fold (data split by prep.py) and run each fold alone")
    if args.pretrained and args.arch == "small":
        raise UserError("--pretrained needs --arch efficientnet_v2_s — the small CNN has no ImageNet weights")
    args.test = None if args.folds else args.test or str(Path(args.real).parent / "test")
    args.lr = args.lr or RECIPES[args.recipe]["lr"]
    args.batch_size = args.batch_size or RECIPES[args.recipe]["batch_size"]
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if args.pretrained:
        build_model(args.arch, 1, pretrained=True)                  # offline: fail before the data loads
    classes, real, fake, test = load_data(args)
    splits = [(None, torch.arange(len(real.y)) if real else None, test)]   # (fold, real to train on, to score)
    if args.folds:
        fold_of = patient_folds(args.real, real, args.folds, args.seed)
        splits = [(k + 1, torch.nonzero(fold_of != k).flatten(), take(real, torch.nonzero(fold_of == k).flatten()))
                  for k in range(args.folds)]
        if min(len(s[2].y) for s in splits) == 0:
            raise UserError(f"--folds {args.folds} leaves a fold without patients — use fewer folds")
    vals = [None] * len(splits)
    if args.val_frac:  # early stopping: a patient-disjoint share of the real training images, held out
        for k, (fold, real_idx, scored) in enumerate(splits):
            in_val = patient_folds(args.real, take(real, real_idx), round(1 / args.val_frac), args.seed) == 0
            splits[k], vals[k] = (fold, real_idx[~in_val], scored), take(real, real_idx[in_val])
    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k != "run"} | dict(
        classes=classes, torch=str(torch.__version__), torchvision=torchvision.__version__, device=str(device))
    scored_on = args.test or f"held-out folds of {args.real}"
    results, texts = {}, []
    for mode in args.mode:
        runs = results[mode] = []
        for seed in range(args.seed, args.seed + args.seeds):
            for (fold, real_idx, scored), val in zip(splits, vals):
                train = training_set(mode, real, real_idx, fake, args, seed)
                run_dir = out / mode / (f"seed{seed}" + (f"_fold{fold}" if fold else ""))
                runs.append(one_run(args, config, dict(mode=mode, seed=seed, fold=fold), train, scored, classes,
                                    device, run_dir, val))
                (out / "results.json").write_text(json.dumps({"config": config, "modes": results}, indent=2) + "\n")
        save_confusion_png(np.sum([r["confusion"] for r in runs], axis=0), out / mode / "confusion.png")
        how = f"{args.seeds} seed(s)" + f" x {args.folds} folds" * bool(args.folds) + f" = {len(runs)} run(s)"
        texts.append(mode_table(f"{mode}: {args.arch}, {args.recipe} recipe{', --augment' * args.augment}, "
                                f"{runs[0]['steps']} steps; {how}; scored on {scored_on}", runs, classes))
        print(f"\n{texts[-1]}\n")
    # Dhawan & Nijhawan's Table I layout: a row per training set.
    texts.append(table("overall accuracy; the rest are macro averages", first="mode", rows=[
        (mode, [r["macro"] | {"accuracy": r["accuracy"]} for r in runs]) for mode, runs in results.items()]))
    print(texts[-1])
    (out / "table.txt").write_text("\n\n".join(texts) + "\n")

def run_judge(args):
    """The share of generated images accepted as --expect (p > threshold), beside real ones; the domain FID."""
    import metrics  # for the Frechet distance only
    device = pick_device(args.device)
    model, ckpt = load_classifier(args.ckpt, device)
    classes, c = ckpt["classes"], args.expect
    if c not in classes:
        raise UserError(f"--expect {c} is not a class of this classifier ({', '.join(classes)}) — use one of them")
    if not (args.baseline or ckpt["test_dir"]):
        raise UserError("this checkpoint was trained with --folds and names no test folder — pass "
                        "--baseline DIR (DIR/<class>/*.png, e.g. data/test)")
    generated = Path(args.images) if pngs(args.images) else Path(args.images) / c   # or the AC-GAN layout
    print(f"judge: {ckpt['arch']} classifier {args.ckpt}; accepted = p({c}) > {args.threshold}\n"
          f"{'set':<15}{'N':>6}{'accepted':>10}{'mean p':>9}{'argmax=' + c:>16}  folder")
    rows, stats = {}, []
    for name, folder in (("generated", generated), ("real baseline", Path(args.baseline or ckpt["test_dir"]) / c)):
        if len(pngs(folder)) < 2:
            raise UserError(f"{folder} holds {len(pngs(folder))} .png images, fewer than 2 — pass " + (
                "the folder --generate/--translate wrote" if name == "generated" else "another --baseline"))
        x = load_images(pngs(folder), ckpt["size"])
        probs = predict(model, x, device)
        p = probs[:, classes.index(c)]
        stats += metrics.feature_statistics(predict(model, x, device, features=True))
        rows[name] = r = {"n": len(p), "accepted": float((p > args.threshold).mean()), "mean_prob": float(p.mean()),
                          "argmax_share": float((probs.argmax(1) == classes.index(c)).mean()), "folder": str(folder)}
        print(f"{name:<15}{len(p):>6}{r['accepted']:>10.3f}{r['mean_prob']:>9.3f}{r['argmax_share']:>16.3f}  {folder}")
    # Confident is not realistic: a softmax accepted 97.5 % of a 150-step AC-GAN's gray noise as viral.
    # The Frechet distance (Heusel et al.) in the classifier's features says how far the sets lie apart.
    fid, n = max(metrics.frechet_distance(*stats[2:], *stats[:2]), 0.0), min(r["n"] for r in rows.values())
    print(f"domain FID, generated vs real, in the classifier's D = {model.feature_dim} features: {fid:.4f}"
          + (f" (N = {n} < D: biased and noisy, use more images)" if n < model.feature_dim else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"expect": c, "threshold": args.threshold, **rows, "domain_fid": fid,
                                               "feature_dim": model.feature_dim}, indent=2) + "\n")

# ---- The reader study of Lugo-Torres et al. (results: Table II): three questionnaires of 100 images each,
# 80 generated and 20 real, to three respiratory care experts: real or fake, and which class (GP, BP, VP, none).


def spread(groups, n, generator):
    """n (group, file) pairs dealt in turn from the groups, each shuffled: as even as the groups' sizes allow."""
    dealt = [(turn, g, key, files[i]) for g, (key, files) in enumerate(groups.items())
             for turn, i in enumerate(torch.randperm(len(files), generator=generator).tolist())]
    if len(dealt) < n:
        raise UserError(f"only {len(dealt)} images to draw {n} from — lower --n or add images")
    return [(key, file) for _, _, key, file in sorted(dealt)[:n]]    # the first turn of every group, the second...

def study_make(args):
    """study.html (the images in a seeded random order, embedded; no answer key) and key.json."""
    real, fake = {("real", c): files for c, files in class_folders(args.real, "real").items()}, {}
    for spec in args.fake:  # DIR/<class>/*.png (model = DIR's name) or CLASS=DIR
        name, flat, folder = spec.partition("=")
        for c, files in ({name: pngs(folder)} if flat else class_folders(spec, "fake")).items():
            fake[(Path(folder if flat else spec).name, c)] = files
    g, n_fake = torch.Generator().manual_seed(args.seed), round(args.n * args.fake_share)
    picked = spread(real, args.n - n_fake, g) + spread(fake, n_fake, g)
    picked = [picked[i] for i in torch.randperm(len(picked), generator=g).tolist()]  # the order readers see
    study = hashlib.sha256(json.dumps([str(f) for _, f in picked]).encode()).hexdigest()[:12]
    classes = sorted({c for _, c in real | fake})
    items = [{"id": f"{i + 1:03d}", "truth": "real" if m == "real" else "synthetic", "model": m, "class": c,
              "file": str(f)} for i, ((m, c), f) in enumerate(picked)]
    page = {"study": study, "classes": classes, "images": [
        {"id": it["id"], "src": "data:image/png;base64," + base64.b64encode(Path(it["file"]).read_bytes()).decode()}
        for it in items]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The page: plain HTML and JavaScript, offline; answers stay in localStorage until saved. Ids and images only.
    template = Path(__file__).resolve().parent / "assets" / "study.html"
    if not template.is_file():
        raise UserError(f"{template} is missing — run classify.py from a full copy of the repository")
    (out / "study.html").write_text(template.read_text().replace("/*DATA*/null", json.dumps(page)))
    (out / "key.json").write_text(json.dumps({"study": study, "classes": classes, "items": items}, indent=1))
    print(f"study {study}: {len(items)} images ({n_fake} synthetic) in {out / 'study.html'}; the answer key is "
          f"{out / 'key.json'} — keep it from the readers")

def wilson(k, n, z=1.96):
    """The 95 % Wilson score interval of a binomial share k / n, n > 0 (Wilson E.B., JASA 1927)."""
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half

def fleiss_kappa(counts):
    """Fleiss' kappa of counts[subject, category] = raters putting the subject in the category, the
    same number of raters per subject (Fleiss J.L., Psychological Bulletin 76(5), 1971)."""
    counts = np.asarray(counts, dtype=float)
    n = counts[0].sum()
    p_i = ((counts ** 2).sum(1) - n) / (n * (n - 1))
    p_e = ((counts.sum(0) / counts.sum()) ** 2).sum()
    return (p_i.mean() - p_e) / (1 - p_e) if p_e < 1 else math.nan

def study_score(args):
    """Per reader and pooled: the shares called real, class accuracy (95 % Wilson intervals), kappa."""
    key = json.loads(Path(args.key).read_text())
    items, readers = {it["id"]: it for it in key["items"]}, {}
    for path in args.answers:
        try:
            a = json.loads(Path(path).read_text())
            answers = {x["id"]: x for x in a["answers"] if x.get("real") is not None and x.get("class")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read answers {path} ({type(e).__name__}) — pass the file study.html saved")
        if a.get("study") != key["study"]:
            raise UserError(f"{path} answers study {a.get('study')}, not {key['study']} of {args.key} — pass "
                            "the key of the study this reader saw")
        if set(answers) != set(items):
            raise UserError(f"{path} answers {len(set(answers) & set(items))} of {len(items)} images — the reader "
                            "finishes the study in the page, then saves again")
        readers[f"{a.get('reader') or Path(path).stem} ({Path(path).name})"] = answers
    rows = [(name, [(items[i], ans) for i, ans in answers.items()]) for name, answers in readers.items()]
    print(f"study {key['study']}: {len(items)} images, {len(readers)} reader(s); shares with 95 % Wilson intervals")
    for name, pairs in rows + [("pooled", [p for _, ps in rows for p in ps])] * (len(rows) > 1):
        print(f"\n{name}")
        groups = {"synthetic, all": [p for p in pairs if p[0]["truth"] == "synthetic"]}
        groups |= {f"synthetic, {m} {c}": [p for p in pairs if (p[0]["model"], p[0]["class"]) == (m, c)]
                   for m, c in sorted({(it["model"], it["class"]) for it in items.values() if it["model"] != "real"})}
        groups["real"] = [p for p in pairs if p[0]["truth"] == "real"]
        for group, ps in ((g, ps) for g, ps in groups.items() if ps):
            called, right = sum(a["real"] for _, a in ps), sum(it["class"] == a["class"] for it, a in ps)
            (lo, hi), (lo2, hi2) = wilson(called, len(ps)), wilson(right, len(ps))
            print(f"  {group:<28} N {len(ps):>4}   called real {called / len(ps):.2f} [{lo:.2f}, {hi:.2f}]"
                  f"   class right {right / len(ps):.2f} [{lo2:.2f}, {hi2:.2f}]")
    if len(rows) > 1:
        for what, cats in (("real", [True, False]), ("class", key["classes"])):
            counts = [[sum(r[i][what] == c for r in readers.values()) for c in cats] for i in sorted(items)]
            print(f"agreement between readers on {what}: Fleiss' kappa {fleiss_kappa(counts):.3f}")

def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog="classify.py", description="X-ray classifier: augmentation experiments, judge, domain FID.")
    device = Parser(add_help=False)
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sub = p.add_subparsers(dest="command", required=True)          # one parser per command, each with its flags
    t = sub.add_parser("train", parents=[device], formatter_class=fmt, help="train and score on real images", description=
                       "Class imbalance: a weighted cross-entropy loss, class c weighted by n / (C * n_c) (no resampling).")
    t.set_defaults(run=run_train)
    t.add_argument("--real", "--data", default="data/train", help="real training split: REAL/<class>/*.png")
    t.add_argument("--fake", action="append", default=[], metavar="DIR", help="DIR/<class>/*.png or CLASS=DIR; repeatable")
    t.add_argument("--test", help="real test split TEST/<class>/*.png; None: the `test` beside --real")
    t.add_argument("--mode", nargs="+", choices=MODES, default=["real"], help="training sets, a table each")
    t.add_argument("--out", default="runs/classify", help="output folder")
    t.add_argument("--arch", choices=ARCHS, default="small", help="small: ~0.29 M-parameter CNN; else torchvision's")
    t.add_argument("--pretrained", action="store_true", help="ImageNet weights via torch.hub (downloads once)")
    t.add_argument("--size", type=in_range(int, 16), default=64, help="images are resized to SIZE x SIZE")
    t.add_argument("--epochs", type=in_range(int, 1), default=15, help="epochs per run (at most, with --val-frac)")
    t.add_argument("--val-frac", type=in_range(float, 0, 0.5), default=0.0, help="real patients held out to stop early")
    t.add_argument("--patience", type=in_range(int, 1), default=5, help="epochs without a lower validation loss")
    t.add_argument("--min-steps", type=in_range(int, 0), default=150, help="but at least this many updates (small sets)")
    t.add_argument("--recipe", choices=RECIPES, default="default", help="default: AdamW; paper: Nesterov SGD")
    t.add_argument("--lr", type=in_range(float, 1e-12), help="learning rate; None: the recipe's")
    t.add_argument("--batch-size", type=in_range(int, 1), help="batch size; None: the recipe's")
    t.add_argument("--augment", action="store_true", help="small random rotation, shift, zoom, brightness, contrast")
    t.add_argument("--folds", type=in_range(int, 2), help="K folds of --real by patient, scored instead of --test; None: none")
    t.add_argument("--seed", type=in_range(int, 0), default=0, help="first seed (it also deals the folds)")
    t.add_argument("--seeds", type=in_range(int, 1), default=1, help="runs with seeds SEED..SEED+N-1: mean ± std")
    t.add_argument("--real-per-class", type=in_range(int, 1), help="keep at most N real training images per class; None: all")
    t.add_argument("--fake-per-class", type=in_range(int, 1), help="keep at most N generated images per class; None: all")
    t.add_argument("--max-steps", type=in_range(int, 0), default=0, help="stop each run after N updates (0: no limit)")
    j = sub.add_parser("judge", parents=[device], formatter_class=fmt, help="share accepted with p > threshold")
    j.set_defaults(run=run_judge)
    j.add_argument("--ckpt", required=True, help="model.pt written by `classify.py train`")
    j.add_argument("--images", required=True, help="folder of generated images (or IMAGES/<expect>/)")
    j.add_argument("--expect", required=True, help="the class the images are meant to show")
    j.add_argument("--threshold", type=in_range(float, 1e-9, 1), default=JUDGE_THRESHOLD, help="accepted when p(expect) > this")
    j.add_argument("--baseline", help="real split with BASELINE/<expect>/*.png; None: the checkpoint's test split")
    j.add_argument("--json", help="also write the numbers to this file")
    st = sub.add_parser("study", help="a reader study: the page, the scores").add_subparsers(dest="step", required=True)
    m = st.add_parser("make", formatter_class=fmt, help="write study.html and key.json")
    m.set_defaults(run=study_make)
    m.add_argument("--real", required=True, help="real images: REAL/<class>/*.png (e.g. data/test)")
    m.add_argument("--fake", action="append", required=True, metavar="DIR or CLASS=DIR", help="as train's --fake")
    m.add_argument("--n", type=in_range(int, 1), default=100, help="images in the study")
    m.add_argument("--fake-share", type=in_range(float, 0, 1.000001), default=0.8, help="share of synthetic images")
    m.add_argument("--seed", type=in_range(int, 0), default=0, help="seeds the draw and the order")
    m.add_argument("--out", default="study", help="output folder")
    sc = st.add_parser("score", formatter_class=fmt, help="score the readers' answer files")
    sc.set_defaults(run=study_score)
    sc.add_argument("--key", required=True, help="key.json written by `study make`")
    sc.add_argument("answers", nargs="+", help="answer files saved by study.html, one per reader")
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)      # kill or a job scheduler: like Ctrl-C
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished runs are in their folders and in results.json", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
