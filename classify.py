"""classify.py: do synthetic chest X-rays help a classifier, and do they look real to one?

One small, fast X-ray classifier and the three experiments the papers build on it:

1. Augmentation (DCGAN paper, Davoodi & Lo Giudice, Tables 4a/4b; AC-GAN paper, Dhawan &
   Nijhawan, Table I): train on real images, on generated ("fake") images, or on both, and
   measure accuracy, precision, sensitivity (recall), specificity and F1 on REAL test images.
2. Realism judge (pneumonia CycleGAN paper, Lugo-Torres et al., "Evaluation of ViT on the
   generated images"): the share of generated images the classifier assigns to the intended
   class with probability above 0.98, next to the same share for real test images. It measures
   confidence, not realism: a classifier also accepts noise that looks like no X-ray at all.
3. Domain FID: the Frechet distance computed in this classifier's penultimate features instead
   of ImageNet-Inception features (the CycleGAN paper finds Inception FID does not track X-ray
   realism).

Exact commands (the synthetic set needs no download):

    python prep.py synthetic --out data/synthetic --n 200 --size 64
    # real only, 3 seeds, the default small CNN (about 2 minutes per run on a 2-core CPU)
    python classify.py train --real data/synthetic/train --test data/synthetic/test \
        --seeds 3 --out runs/classify_real
    # the AC-GAN paper's Table I in one go: real, fake, real+fake. --fake DIR reads
    # DIR/<class>/*.png, which is what `acgan.py --generate 500 ... --out fake/acgan` writes
    python classify.py train --real data/synthetic/train --test data/synthetic/test \
        --fake fake/acgan --mode real,fake,real+fake --seeds 3 --out runs/classify_acgan
    # flat folders (dcgan.py --generate, cyclegan.py --translate: one class each): CLASS=DIR
    python classify.py train --real data/synthetic/train --test data/synthetic/test \
        --mode real,real+fake --fake viral=fake_viral --fake bacterial=fakes/bacterial
    # scarcity: 20 real images per class, with at most 100 generated ones per class
    python classify.py train --real data/synthetic/train --test data/synthetic/test \
        --fake fake/acgan --mode real,real+fake --real-per-class 20 --fake-per-class 100 --seeds 5
    # classic augmentation, to compare against GAN augmentation
    python classify.py train --real data/synthetic/train --test data/synthetic/test \
        --real-per-class 20 --augment --seeds 5 --out runs/classify_classic_aug
    # the DCGAN paper's protocol: 4 patient-aware folds of --real, its SGD recipe
    python classify.py train --real data/synthetic/train --folds 4 --recipe paper
    # realism judge (baseline: the checkpoint's test folder) and domain FID
    python classify.py judge --ckpt runs/classify_real/real/seed0/model.pt \
        --images fake_viral --expect viral
    python classify.py fid --ckpt runs/classify_real/real/seed0/model.pt data/synthetic/test/viral fake_viral

Decisions a reader should know (README "classify.py" says the same):
- Class imbalance: the cross-entropy loss weights class c by n / (C * n_c), computed on the
  actual training set of each run (after subsampling and after adding fakes), so every class
  contributes the same total weight. Batches are plain shuffles.
- A metric whose denominator is 0 (precision of a class that is never predicted, recall of a
  class absent from the evaluation set) is 0, as scikit-learn's zero_division=0: a classifier
  that never predicts a class gets no credit for it, and macro averages stay finite.
- No model selection on the test set: every run trains for --epochs (but at least --min-steps
  optimizer steps, so that a 60-image training set is not judged after a handful of updates) and
  the final weights are evaluated once.
- After the last step, BatchNorm's running statistics are recomputed on the (un-augmented)
  training images with the final weights ("precise BN"): the moving averages lag behind the
  weights, and on a 60-image training set that alone could turn a perfect fit into a model that
  predicts one class on the test set.
- Images are read as 8-bit grayscale and resized to --size with LANCZOS when their size differs.
"""
import argparse
import concurrent.futures
import csv
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# The class names of the data contract, in the order used for tables and logits. Other folder
# names are allowed and sort after these, alphabetically.
CLASS_ORDER = ("normal", "bacterial", "viral", "covid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MODES = ("real", "fake", "real+fake")
ARCHS = ("small", "resnet18", "efficientnet_v2_s")
MAKE_DATA_HINT = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"

# Two optimisation recipes. "paper" is the DCGAN paper's classifier, section 3.3.2: SGD with a
# "high learning rate (lr = 0.01)", Nesterov momentum 0.9, batch 256, no schedule mentioned.
# "default" is AdamW with a cosine decay, which trains the small CNN reliably in few epochs.
RECIPES = {
    "default": dict(optimizer="adamw", lr=1e-3, batch_size=64, weight_decay=1e-4, cosine=True),
    "paper": dict(optimizer="sgd", lr=0.01, batch_size=256, weight_decay=0.0, cosine=False),
}
PAPER_MOMENTUM = 0.9

# Small CNN: channel widths of its four stages; the last width is the feature dimension D.
SMALL_WIDTHS = (16, 32, 64, 128)

# Classic augmentation (--augment): mild geometry and exposure changes that keep an X-ray an
# X-ray. No horizontal flip: the heart is on the patient's left, a flipped film is not a
# plausible chest X-ray.
AUG_MAX_ROTATION_DEG = 10.0
AUG_MIN_ZOOM = 0.85        # a random crop covering 85-100 % of the side, resized back
AUG_BRIGHTNESS = 0.10      # multiply by 1 +- 0.10
AUG_CONTRAST = 0.10        # stretch around the image mean by 1 +- 0.10

# Input normalisation. A network trained from scratch sees [-1, 1]; an ImageNet-pretrained one
# sees the ImageNet statistics averaged over R, G, B (its first conv now reads one channel).
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.5
IMAGENET_GRAY_MEAN = (0.485 + 0.456 + 0.406) / 3
IMAGENET_GRAY_STD = (0.229 + 0.224 + 0.225) / 3
EFFICIENTNET_DROPOUT = 0.2  # torchvision's own head for efficientnet_v2_s

JUDGE_THRESHOLD = 0.98      # CycleGAN-ViT paper: "a probability ... above 0.98" counts as accepted
CHECKPOINT_KIND = "classify"


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf: main() prints it as one line and exits with code 1."""


# ---------------------------------------------------------------------------------------------
# Models. Each one maps a (B, 1, H, W) float image in [0, 1] to logits, and exposes
# features(x) -> (B, D), the penultimate activations used by the domain FID.
# ---------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Four stages of [conv3x3-BN-ReLU] x 2 + 2x2 max-pool, global average pooling, one linear
    layer: a VGG-style network of about 0.29 M parameters with widths (16, 32, 64, 128).

    Two convolutions at full resolution matter on X-rays: the fine, patchy texture that tells
    viral from normal lungs lives there (a single conv before the first pool scored ~15 points
    lower on the synthetic set). It trains in minutes on a CPU at 64-128 px.
    """

    def __init__(self, n_classes, widths=SMALL_WIDTHS, in_channels=1):
        super().__init__()
        layers, c_in = [], in_channels
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),   # bias is redundant before BN
                nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),                                    # (B, c_out, H/2, W/2)
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)                          # (B, D, H/16, W/16)
        self.pool = nn.AdaptiveAvgPool2d(1)                         # (B, D, 1, 1): any input size
        self.feature_dim = widths[-1]
        self.head = nn.Linear(widths[-1], n_classes)                # logits, no softmax
        self.register_buffer("mean", torch.tensor(SCRATCH_MEAN))
        self.register_buffer("std", torch.tensor(SCRATCH_STD))

    def features(self, x):
        x = (x - self.mean) / self.std
        return self.pool(self.body(x)).flatten(1)                   # (B, D)

    def forward(self, x):
        return self.head(self.features(x))                          # (B, n_classes)


class TorchvisionNet(nn.Module):
    """resnet18 or efficientnet_v2_s from torchvision with a one-channel first convolution.

    The AC-GAN paper classifies with EfficientNetV2. With --pretrained the ImageNet weights are
    loaded first and the first conv's RGB filters are then SUMMED into one: on a gray image
    copied into R, G and B the network computes exactly the same thing, so the pretrained
    BatchNorm statistics after that conv stay valid (averaging would scale them by 1/3).
    """

    def __init__(self, arch, n_classes, pretrained=False):
        super().__init__()
        import torchvision  # here, not at the top: importing it costs seconds and only these archs need it
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            net.load_state_dict(download_imagenet_weights(arch))
        if arch == "resnet18":
            net.conv1 = one_channel_conv(net.conv1)
            self.feature_dim = net.fc.in_features                   # 512
            net.fc = nn.Identity()
            dropout = 0.0
        else:
            net.features[0][0] = one_channel_conv(net.features[0][0])
            self.feature_dim = net.classifier[1].in_features        # 1280
            net.classifier = nn.Identity()
            dropout = EFFICIENTNET_DROPOUT
        self.body = net                                             # (B, D) after global pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, n_classes)
        mean, std = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if pretrained else (SCRATCH_MEAN, SCRATCH_STD)
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def features(self, x):
        return self.body((x - self.mean) / self.std)                # (B, D)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))            # (B, n_classes)


def one_channel_conv(conv):
    """A copy of `conv` that reads one channel; its weights are the sum over the RGB filters."""
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))      # (out, 3, k, k) -> (out, 1, k, k)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def download_imagenet_weights(arch):
    """ImageNet weights from torchvision's cache or the internet, or a one-line UserError."""
    import torchvision
    weights = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               "efficientnet_v2_s": torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1}[arch]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, timeouts, a corrupt cache file: all mean "no weights"
        raise UserError(f"cannot get the ImageNet weights for {arch} from {weights.url} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) — go online "
                        f"once (they are cached in {Path(torch.hub.get_dir()) / 'checkpoints'}, where "
                        f"a copied file works too) or drop --pretrained")


def build_model(arch, n_classes, pretrained=False):
    if arch == "small":
        if pretrained:
            raise UserError("--pretrained needs --arch resnet18 or efficientnet_v2_s — the small "
                            "CNN has no ImageNet weights")
        return SmallCNN(n_classes)
    return TorchvisionNet(arch, n_classes, pretrained)


# ---------------------------------------------------------------------------------------------
# Metrics: everything is computed from the confusion matrix cm[true, predicted].
# ---------------------------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred, n_classes):
    """cm[i, j] = number of images of true class i predicted as class j."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def safe_div(num, den):
    """num / den, and 0.0 when den is 0 (see the module docstring: zero_division=0)."""
    return float(num) / float(den) if den else 0.0


def metrics_from_confusion(cm, classes):
    """Overall accuracy, one-vs-rest metrics per class, and their unweighted (macro) means.

    For class c: TP = cm[c, c], FN = rest of row c, FP = rest of column c, TN = everything else.
    "accuracy" per class is one-vs-rest, (TP + TN) / N, as in the DCGAN paper's Table 4.
    Sensitivity is recall; the AC-GAN paper's Table I reports the macro precision/recall/F1.
    """
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    per_class = {}
    for c, name in enumerate(classes):
        tp = int(cm[c, c])
        fn = int(cm[c, :].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = total - tp - fn - fp
        precision, recall = safe_div(tp, tp + fp), safe_div(tp, tp + fn)
        per_class[name] = {
            "accuracy": safe_div(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "specificity": safe_div(tn, tn + fp),
            "f1": safe_div(2 * precision * recall, precision + recall),
            "support": tp + fn,
        }
    names = ("accuracy", "precision", "recall", "specificity", "f1")
    macro = {k: float(np.mean([per_class[c][k] for c in classes])) for k in names}
    return {"accuracy": safe_div(np.trace(cm), total), "per_class": per_class, "macro": macro,
            "confusion": cm.tolist(), "n": total}


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for a single run)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else 0.0)


def aggregate(runs, classes):
    """Mean and std over runs of every metric, and the confusion matrices summed over runs."""
    keys = ("accuracy", "precision", "recall", "specificity", "f1")
    out = {"n_runs": len(runs),
           "accuracy": mean_std([r["accuracy"] for r in runs]),
           "per_class": {c: {k: mean_std([r["per_class"][c][k] for r in runs]) for k in keys}
                         for c in classes},
           "macro": {k: mean_std([r["macro"][k] for r in runs]) for k in keys},
           "confusion_sum": np.sum([r["confusion"] for r in runs], axis=0).tolist()}
    return out


def show(ms, n_runs, scale=1.0, digits=3):
    """'0.912 ± 0.021' for several runs, '0.912' for one (a std of one run means nothing)."""
    mean, std = ms
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n_runs > 1 else "")


def format_class_table(title, agg, classes):
    """The DCGAN paper's Table 4 layout: one row per class, then the macro row and the matrix."""
    cols = ("accuracy", "precision", "recall", "specificity", "f1")
    heads = ("Accuracy", "Precision", "Sensitivity", "Specificity", "F1")
    n = agg["n_runs"]
    width = 15 if n > 1 else 13
    lines = [title, f"{'class':<12}" + "".join(f"{h:>{width}}" for h in heads)]
    for c in classes:
        lines.append(f"{c:<12}" + "".join(f"{show(agg['per_class'][c][k], n):>{width}}" for k in cols))
    lines.append(f"{'macro':<12}" + "".join(f"{show(agg['macro'][k], n):>{width}}" for k in cols))
    lines.append(f"overall accuracy {show(agg['accuracy'], n)}"
                 + (f" (mean ± sample std over {n} runs)" if n > 1 else " (1 run)"))
    lines.append("confusion matrix, rows = true class, columns = predicted"
                 + (f", summed over {n} runs:" if n > 1 else ":"))
    w = max(9, max(len(c) for c in classes) + 1)
    lines.append(f"{'':<12}" + "".join(f"{c:>{w}}" for c in classes))
    for c, row in zip(classes, agg["confusion_sum"]):
        lines.append(f"{c:<12}" + "".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


def format_mode_table(aggs):
    """The AC-GAN paper's Table I layout: one row per training set, macro precision/recall/F1."""
    lines = [f"{'Dataset':<12}{'Runs':>5}{'Accuracy %':>17}{'Precision':>16}{'Recall':>16}{'F1':>16}"]
    for mode, agg in aggs.items():
        n = agg["n_runs"]
        lines.append(f"{mode:<12}{n:>5}{show(agg['accuracy'], n, scale=100, digits=1):>17}"
                     + "".join(f"{show(agg['macro'][k], n):>16}" for k in ("precision", "recall", "f1")))
    lines.append("(precision, recall and F1 are macro averages over classes; ± is the sample std over runs)")
    return "\n".join(lines)


def save_confusion_png(cm, classes, path, title):
    """A confusion-matrix picture with Pillow: cells shaded by the row share, counts written in."""
    cell, left, top = 64, 90, 40
    n = len(classes)
    img = Image.new("RGB", (max(left + n * cell + 10, 230), top + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((5, 5), title, fill="black", font=font)
    draw.text((5, top + n * cell + 10), "rows: true class, columns: predicted", fill="black", font=font)
    cm = np.asarray(cm)
    for i in range(n):
        draw.text((5, top + i * cell + cell // 2 - 5), classes[i][:12], fill="black", font=font)
        draw.text((left + i * cell + 4, top - 14), classes[i][:10], fill="black", font=font)
        row_total = max(int(cm[i].sum()), 1)
        for j in range(n):
            share = cm[i, j] / row_total
            shade = int(255 * (1 - 0.8 * share))                    # white (0 %) to dark blue (100 %)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 6, box[1] + cell // 2 - 5), str(int(cm[i, j])),
                      fill="white" if share > 0.5 else "black", font=font)
    tmp = str(path) + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Data: folders of PNGs, read once into a uint8 tensor (N, 1, S, S).
# ---------------------------------------------------------------------------------------------

class ImageSet:
    """Images as uint8 (N, 1, S, S), labels as int64 (N,), and the file each came from."""

    def __init__(self, x, y, paths):
        self.x, self.y, self.paths = x, y, list(paths)

    def __len__(self):
        return len(self.paths)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.x[idx], self.y[idx], [self.paths[i] for i in idx.tolist()])

    @staticmethod
    def concat(a, b):
        return ImageSet(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), a.paths + b.paths)

    def counts(self, classes):
        return {c: int((self.y == i).sum()) for i, c in enumerate(classes)}


def sort_classes(names):
    """Contract classes in CLASS_ORDER first, any other names after them alphabetically."""
    return sorted(names, key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER), c))


def list_images(folder):
    """The image files directly inside folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(split_dir, what):
    """{class: [image paths]} from split_dir/<class>/*.png, or a UserError naming the fix."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{what} folder {split_dir} does not exist — {MAKE_DATA_HINT}")
    found = {}
    for sub in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(sub)
        if not images:
            raise UserError(f"{what} class folder {sub} holds no images (.png) — remove it or "
                            f"fill it")
        found[sub.name] = images
    if not found:
        hint = (" (it holds images directly: pass CLASS=DIR for a flat folder)"
                if what == "fake" and list_images(split_dir) else "")
        raise UserError(f"{what} folder {split_dir} has no <class>/ subfolders with images{hint} "
                        f"— {MAKE_DATA_HINT}")
    return found


def parse_fake_specs(specs):
    """--fake DIR (DIR/<class>/*.png) and --fake CLASS=DIR (a flat folder), repeatable."""
    found = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if sep and name and "/" not in name and os.sep not in name:
            folder = Path(folder)
            if not folder.is_dir():
                raise UserError(f"fake folder {folder} (from --fake {spec}) does not exist — pass "
                                f"the folder written by --generate/--translate")
            images = list_images(folder)
            if not images:
                raise UserError(f"fake folder {folder} (from --fake {spec}) holds no .png images — "
                                f"generate some first, or check the path")
            parts = {name: images}
        else:
            parts = class_folders(spec, "fake")
        for c, images in parts.items():
            found.setdefault(c, []).extend(images)
    return found


def read_image(path, size):
    """One image as uint8 (size, size): 8-bit gray, LANCZOS-resized when its size differs."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise UserError(f"cannot read image {path} ({e}) — delete or re-create it") from None


def load_images(paths, size, workers):
    """Decode in parallel threads (PIL releases the GIL while decoding) -> uint8 (N, 1, S, S)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        arrays = list(pool.map(lambda p: read_image(p, size), paths))
    if not arrays:
        return torch.zeros(0, 1, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def load_set(files_by_class, classes, size, workers):
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = files_by_class.get(c, [])
        paths += [str(p) for p in files]
        labels += [i] * len(files)
    return ImageSet(load_images(paths, size, workers), torch.tensor(labels, dtype=torch.long), paths)


def read_patients(split_dir, paths):
    """Patient id per image from DATA/manifest.csv (split_dir is DATA/<split>).

    Returns (patients, note). Images missing from the manifest, or all of them when there is no
    manifest, count as their own patient, and the note says so.
    """
    data_dir = Path(split_dir).resolve().parent
    manifest = data_dir / "manifest.csv"
    by_path = {}
    if manifest.exists():
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                by_path[row["path"]] = row["patient"]
    patients, missing = [], 0
    for p in paths:
        rel = Path(p).resolve().relative_to(data_dir).as_posix()
        if rel in by_path:
            patients.append(by_path[rel])
        else:
            patients.append("image:" + rel)
            missing += 1
    if not manifest.exists():
        note = f"no {manifest}: folds split images, not patients"
    elif missing:
        note = f"{missing} images are not in {manifest}: each counts as its own patient"
    else:
        note = f"folds are patient-aware ({len(set(patients))} patients from {manifest})"
    return patients, note


def make_folds(labels, patients, k, seed):
    """Fold id (0..k-1) per image. All images of a patient share a fold (no patient is both in
    training and evaluation), and every fold gets about the same number of images per class.

    Patients are visited in a seeded random order, largest first, and each goes to the fold that
    has the fewest images of the patient's main class so far (ties: fewest images overall).
    """
    labels = np.asarray(labels)
    groups = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    names = sorted(groups)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    names = sorted((names[i] for i in order), key=lambda p: -len(groups[p]))  # stable sort
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    per_class = np.zeros((k, n_classes), dtype=np.int64)
    fold_of = np.zeros(len(labels), dtype=np.int64)
    for p in names:
        idx = groups[p]
        main_class = np.bincount(labels[idx], minlength=n_classes).argmax()
        f = min(range(k), key=lambda f: (per_class[f, main_class], per_class[f].sum(), f))
        fold_of[idx] = f
        np.add.at(per_class[f], labels[idx], 1)
    return fold_of


def subsample_per_class(labels, n, generator):
    """Indices of at most n random images per class (all of a class that has fewer)."""
    labels = torch.as_tensor(labels)
    keep = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)][:n]
        keep.append(idx)
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Training and inference
# ---------------------------------------------------------------------------------------------

def augment_batch(x, generator):
    """Classic augmentation on a float batch (B, 1, H, W) in [0, 1], on x's device.

    One random affine per image (rotation up to AUG_MAX_ROTATION_DEG, a zoom-in crop of
    AUG_MIN_ZOOM..1 of the side at a random position inside the image), then brightness and
    contrast. The random numbers come from a CPU generator, so a run is reproducible.
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator).to(x.device)
    angle = (u[:, 0] * 2 - 1) * math.radians(AUG_MAX_ROTATION_DEG)
    zoom = AUG_MIN_ZOOM + (1 - AUG_MIN_ZOOM) * u[:, 1]            # share of the side that is kept
    shift = (u[:, 2:4] * 2 - 1) * (1 - zoom)[:, None]              # keep the crop inside the image
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)          # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    v = torch.rand(b, 2, generator=generator).to(x.device)
    brightness = 1 + AUG_BRIGHTNESS * (v[:, 0] * 2 - 1)
    contrast = 1 + AUG_CONTRAST * (v[:, 1] * 2 - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean
    return (x * brightness[:, None, None, None]).clamp(0, 1)


def class_weights(y, n_classes):
    """n / (C * n_c): every class gets the same total weight in the loss (0 for an absent class)."""
    counts = torch.bincount(y, minlength=n_classes).double()
    w = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def make_optimizer(model, recipe, lr, device):
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=PAPER_MOMENTUM, nesterov=True,
                               weight_decay=recipe["weight_decay"])
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe["weight_decay"],
                             fused=fused, foreach=None if fused else True)


def autocast_settings(device, amp):
    """(enabled, dtype, use GradScaler): bf16 where the GPU supports it, else fp16 with a scaler."""
    if not (amp and device.type == "cuda"):
        return False, torch.float32, False
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, False
    return True, torch.float16, True


def to_input(x_uint8, device):
    """uint8 (B, 1, H, W) -> float in [0, 1] on the device (the model normalises itself)."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_model(model, train_set, n_classes, cfg, seed, device, log_path):
    """Train for cfg.epochs, at least cfg.min_steps steps, at most cfg.max_steps; return
    (model, steps, epochs, optimizer).

    Data order is a pure function of (seed, epoch), so a CPU run is repeatable bit for bit.
    """
    recipe = cfg.recipe_dict
    optimizer = make_optimizer(model, recipe, cfg.lr, device)
    n = len(train_set)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    # A small training set (--real-per-class 20: 60 images, one batch) would get only --epochs
    # updates, and BatchNorm's running statistics would still be mostly their initial values:
    # the model predicts one class, and "real+fake" wins for the wrong reason. So every run
    # makes at least --min-steps updates, taking more epochs when it has fewer images.
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total_steps = epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # Cosine decay to 0 over the whole run (default recipe); the paper recipe keeps lr constant.
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
                 if recipe["cosine"] else None)
    use_amp, amp_dtype, use_scaler = autocast_settings(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    weights = class_weights(train_set.y, n_classes).to(device)
    aug_gen = torch.Generator().manual_seed(seed * 100003 + 7)
    # Keep the whole training set on the GPU when there is one: X-ray sets at 64-128 px are small.
    x_all, y_all = train_set.x.to(device), train_set.y.to(device)
    step = 0
    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["epoch", "step", "loss", "train_accuracy", "lr", "seconds"])
        for epoch in range(epochs):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            finite = torch.ones((), device=device, dtype=torch.bool)
            seen = 0
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size].to(device)
                x, y = to_input(x_all[idx], device), y_all[idx]
                if cfg.augment:
                    x = augment_batch(x, aug_gen)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, weight=weights)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()                                # after optimizer.step()
                # Accumulate on the device; no .item() (host sync) inside the loop.
                finite &= torch.isfinite(loss.detach())
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == y).sum()
                seen += len(idx)
                step += 1
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if not bool(finite):
                raise NonFiniteLoss(f"non-finite loss in epoch {epoch + 1} (steps up to {step}) — "
                                    f"lower --lr or use --recipe default; no model was saved for "
                                    f"this run")
            loss_mean, acc = loss_sum.item() / seen, correct.item() / seen
            lr_now = optimizer.param_groups[0]["lr"]
            log.writerow([epoch + 1, step, f"{loss_mean:.5f}", f"{acc:.4f}", f"{lr_now:.3g}", f"{seconds:.2f}"])
            log_file.flush()
            if not cfg.quiet:
                print(f"  epoch {epoch + 1:>3}/{epochs}  loss {loss_mean:.4f}  "
                      f"train acc {acc:.3f}  ({seconds:.1f} s)")
            if cfg.max_steps and step >= cfg.max_steps:
                break
    # Recompute BatchNorm's running statistics for the final weights ("precise BN", Wu & Johnson
    # 2021, "Rethinking 'Batch' in BatchNorm"): the running averages lag behind the weights, and
    # a net that fits its training batches exactly can flip to one class in eval mode. On the
    # phantom set with --real-per-class 20 (one batch per epoch), seed 1 scored 0.33 on the test
    # set, every image "normal", with 1.00 on its training batches; recomputed, it scored 0.80.
    # One pass over the un-augmented training images at the training batch size, no gradients.
    torch.optim.swa_utils.update_bn((to_input(x_all[i:i + cfg.batch_size], device)
                                     for i in range(0, n, cfg.batch_size)), model)
    return model, step, epoch + 1, optimizer


@torch.inference_mode()
def predict(model, x_uint8, device, batch_size=256):
    """Class probabilities (N, C) as float64 numpy, eval mode, no augmentation."""
    model.eval()
    out = [F.softmax(model(to_input(x_uint8[i:i + batch_size], device)).float(), dim=1).cpu()
           for i in range(0, len(x_uint8), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


@torch.inference_mode()
def extract_features(model, x_uint8, device, batch_size=256):
    """Penultimate activations (N, D) as float64 numpy, eval mode, fp32."""
    model.eval()
    out = [model.features(to_input(x_uint8[i:i + batch_size], device)).float().cpu()
           for i in range(0, len(x_uint8), batch_size)]
    return torch.cat(out).double().numpy()


def save_checkpoint(path, state):
    """Write PATH.tmp, then rename it over PATH (atomic): a crash or a full disk never leaves a
    half-written model.pt, and an older one stays intact. Load with weights_only=True."""
    tmp = str(path) + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):                                     # only after a failed save
            os.remove(tmp)


def load_checkpoint(path, device):
    """A classify.py checkpoint -> (model in eval mode, checkpoint dict), or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist — train one with `python classify.py "
                        f"train ...` (it writes OUT/<mode>/seed<S>/model.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}) — pass a model.pt "
                        f"written by `classify.py train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        keys = ", ".join(sorted(map(str, ckpt)))[:80] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a classify.py checkpoint (it holds: {keys}) — pass a "
                        f"model.pt written by `classify.py train`")
    arch, classes = ckpt["arch"], ckpt["classes"]
    if arch not in ARCHS:
        raise UserError(f"{path} names an unknown architecture {arch!r} — it was written by "
                        f"another version of classify.py; retrain")
    model = build_model(arch, len(classes))
    try:
        # The ImageNet normalisation buffers are part of the state dict, so --pretrained models
        # load correctly without downloading anything.
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"the weights in {path} do not fit architecture {arch} with "
                        f"{len(classes)} classes ({detail[:120]}) — the file was written for "
                        f"another architecture; use the matching checkpoint") from None
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------
# The experiments (train), the judge and the domain FID
# ---------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but CUDA is not available — use --device cpu")
        torch.backends.cudnn.benchmark = True
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    return device


def check_train_args(args):
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode {args.mode}: unknown mode {', '.join(bad) or '(empty)'} — use "
                        f"real, fake, real+fake or a comma list such as real,fake,real+fake")
    uses_fake = any("fake" in m for m in modes)
    if uses_fake and not args.fake:
        raise UserError(f"--mode {args.mode} needs generated images — pass --fake DIR "
                        f"(DIR/<class>/*.png) or --fake CLASS=DIR")
    if args.fake and not uses_fake:
        raise UserError("--fake is only used by --mode fake or real+fake — add one of them, "
                        "e.g. --mode real,real+fake")
    if args.folds and args.test:
        raise UserError("--folds K evaluates on the held-out folds of --real, so --test is not "
                        "used — drop --test or --folds")
    if args.folds == 1 or args.folds < 0:
        raise UserError(f"--folds {args.folds}: cross-validation needs at least 2 folds — use "
                        f"--folds 4 (the DCGAN paper) or leave it out")
    if not args.folds and not args.test:
        raise UserError("nothing to evaluate on — pass --test DIR (a split folder, e.g. "
                        "data/test) or --folds K")
    for flag in ("epochs", "seeds", "size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} is too small — use 1 or more")
    if args.size < 16:
        raise UserError(f"--size {args.size} is too small — use 16 or more (the small CNN pools four times)")
    if args.min_steps < 0 or args.max_steps < 0:
        raise UserError("--min-steps and --max-steps cannot be negative — use 0 or more (0: no limit)")
    for flag in ("real_per_class", "fake_per_class", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} is too small — use 1 or more")
    return modes


def load_experiment_data(args, modes):
    """Read --real, --fake and --test once; check that their class names agree."""
    needs_real = any(m != "fake" for m in modes) or args.folds
    real_files = class_folders(args.real, "real training") if needs_real else {}
    fake_files = parse_fake_specs(args.fake) if args.fake else {}
    test_files = class_folders(args.test, "test") if args.test else {}

    # The classes come from --real; with --mode fake alone, from the real test set it is scored on.
    classes = sort_classes(real_files or test_files)
    if real_files and test_files and set(test_files) != set(classes):
        raise UserError(f"class names differ: test has {', '.join(sort_classes(test_files))}, "
                        f"--real has {', '.join(classes)} — give both the same <class>/ folders")
    extra = sorted(set(fake_files) - set(classes))
    if extra:
        raise UserError(f"class names differ: fake class {', '.join(extra)} is not among the real "
                        f"classes {', '.join(classes)} — rename the fake folder or use CLASS=DIR "
                        f"with one of {', '.join(classes)}")
    missing = [c for c in classes if c not in fake_files]
    if "fake" in modes and missing:
        raise UserError(f"--mode fake needs generated images of every class; missing: "
                        f"{', '.join(missing)} — add --fake {missing[0]}=DIR")
    if fake_files and missing:
        print(f"note: real+fake adds generated images to {', '.join(c for c in classes if c in fake_files)} "
              f"only ({', '.join(missing)} stay real-only)")

    size, workers = args.size, args.workers
    real = load_set(real_files, classes, size, workers) if real_files else None
    fake = load_set(fake_files, classes, size, workers) if fake_files else None
    test = load_set(test_files, classes, size, workers) if test_files else None
    return classes, real, fake, test


def evaluation_splits(args, real, classes):
    """[(fold name or None, training indices into real, evaluation ImageSet or None)]."""
    if not args.folds:
        return [(None, torch.arange(len(real)) if real is not None else None, None)]
    patients, note = read_patients(args.real, real.paths)
    print(f"folds: {args.folds}; {note}")
    fold_of = torch.from_numpy(make_folds(real.y.numpy(), patients, args.folds, args.seed))
    splits = []
    for k in range(args.folds):
        held_out = torch.nonzero(fold_of == k).flatten()
        if len(held_out) == 0:
            raise UserError(f"fold {k + 1} of {args.folds} is empty — use fewer --folds for "
                            f"{len(set(patients))} patients")
        splits.append((k + 1, torch.nonzero(fold_of != k).flatten(), real.subset(held_out)))
    return splits


def training_set(mode, real, real_idx, fake, args, seed, classes):
    """The images one run trains on: the real part (this fold, subsampled) and/or the fakes.

    Which images a subsample keeps depends on the seed only, so for one seed "real" and
    "real+fake" train on the same real images: the modes are compared on paired runs.
    """
    gen = torch.Generator().manual_seed(seed)
    parts = []
    if mode in ("real", "real+fake"):
        part = real.subset(real_idx)
        if args.real_per_class:
            part = part.subset(subsample_per_class(part.y, args.real_per_class, gen))
        parts.append(part)
    if mode in ("fake", "real+fake"):
        part = fake
        if args.fake_per_class:
            part = part.subset(subsample_per_class(part.y, args.fake_per_class, gen))
        parts.append(part)
    train = parts[0] if len(parts) == 1 else ImageSet.concat(*parts)
    absent = [c for c, n in train.counts(classes).items() if n == 0]
    if absent:
        raise UserError(f"the {mode} training set has no images of {', '.join(absent)} — add "
                        f"them to --real or --fake")
    return train


def span(values):
    """'12' when all values are 12, '12-40' otherwise (for table titles)."""
    values = sorted(set(values))
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def write_predictions(path, eval_set, probs, classes):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted"] + [f"p_{c}" for c in classes])
        for p, y, pr in zip(eval_set.paths, eval_set.y.tolist(), probs):
            w.writerow([p, classes[y], classes[int(pr.argmax())]] + [f"{v:.6f}" for v in pr])


def one_run(args, mode, name, seed, fold, train, eval_set, classes, config, device, run_dir):
    """Train one model, score it on eval_set, and write model.pt, predictions.csv, confusion.png."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{mode} {name}] training on {len(train)} images {train.counts(classes)}, "
          f"evaluating on {len(eval_set)}")
    torch.manual_seed(seed)                                         # weight init and dropout
    model = build_model(args.arch, len(classes), args.pretrained).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    model, step, epochs, optimizer = train_model(model, train, len(classes), args, seed, device,
                                                 run_dir / "log.csv")
    seconds = time.perf_counter() - t0
    probs = predict(model, eval_set.x, device)
    cm = confusion_matrix(eval_set.y.numpy(), probs.argmax(1), len(classes))
    m = metrics_from_confusion(cm, classes)
    m.update(seed=seed, fold=fold, n_train=train.counts(classes), train_seconds=round(seconds, 2),
             steps=step, epochs=epochs)
    write_predictions(run_dir / "predictions.csv", eval_set, probs, classes)
    save_confusion_png(cm, classes, run_dir / "confusion.png",
                       f"{mode} {name}: accuracy {m['accuracy']:.3f}")
    save_checkpoint(run_dir / "model.pt", {
        "kind": CHECKPOINT_KIND, "arch": args.arch, "classes": classes, "size": args.size,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "epoch": epochs, "mode": mode, "seed": seed, "fold": fold, "args": config,
        # the judge's default baseline: the real test images this model was scored on
        "test_dir": str(Path(args.test).resolve()) if args.test else None,
        "metrics": {"accuracy": m["accuracy"], "macro": m["macro"]}})
    print(f"[{mode} {name}] accuracy {m['accuracy']:.3f}, macro F1 {m['macro']['f1']:.3f} "
          f"({epochs} epochs, {step} steps, {seconds:.1f} s, {seconds / epochs:.2f} s/epoch)")
    return m


def run_train(args):
    modes = check_train_args(args)
    device = pick_device(args.device)
    recipe = dict(RECIPES[args.recipe])
    args.lr = args.lr if args.lr is not None else recipe["lr"]
    args.batch_size = args.batch_size if args.batch_size is not None else recipe["batch_size"]
    args.recipe_dict = recipe
    if args.pretrained:
        # Fail before minutes of image loading, not after: no ImageNet weights offline, and none
        # for --arch small. Later runs read the weights from torch's cache.
        build_model(args.arch, n_classes=1, pretrained=True)
    if device.type == "cpu":
        slower = f"; --arch {args.arch} is much slower than --arch small" if args.arch != "small" else ""
        smaller = "; --size 64 is 4x faster" if args.size > 64 else ""
        print(f"warning: training on CPU: expect seconds to minutes per epoch{slower}{smaller}")
    t0 = time.perf_counter()
    classes, real, fake, test = load_experiment_data(args, modes)
    print(f"classes: {', '.join(classes)}; loaded "
          + "; ".join(f"{name} {s.counts(classes)}" for name, s in
                      (("real", real), ("fake", fake), ("test", test)) if s is not None)
          + f" at {args.size} px in {time.perf_counter() - t0:.1f} s")
    splits = evaluation_splits(args, real, classes)
    seeds = [args.seed + i for i in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "recipe_dict"}
    config.update(recipe=args.recipe, recipe_settings=recipe, classes=classes,
                  versions={"python": platform.python_version(), "torch": str(torch.__version__),
                            "torchvision": importlib.metadata.version("torchvision")},
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    results = {"config": config, "classes": classes, "modes": {}}
    aggs, texts = {}, []
    for mode in modes:
        runs = []
        for seed in seeds:
            for fold, real_idx, held_out in splits:
                eval_set = held_out if held_out is not None else test
                train = training_set(mode, real, real_idx, fake, args, seed, classes)
                name = f"seed{seed}" + (f"_fold{fold}" if fold else "")
                runs.append(one_run(args, mode, name, seed, fold, train, eval_set, classes, config,
                                    device, out / mode / name))
        agg = aggregate(runs, classes)
        aggs[mode] = agg
        what = (f"{args.folds} held-out folds of {args.real}" if args.folds
                else f"{args.test} ({len(test)} images)")
        runs_text = (f"{len(seeds)} seed{'s' * (len(seeds) > 1)}"
                     + (f" x {args.folds} folds" if args.folds else "")
                     + f" = {len(runs)} run{'s' * (len(runs) > 1)}")
        title = (f"{mode}: {args.arch}, {span(r['epochs'] for r in runs)} epochs "
                 f"({span(r['steps'] for r in runs)} steps), {args.recipe} recipe"
                 f"{', --augment' if args.augment else ''}; {runs_text}; evaluated on {what}")
        texts.append(format_class_table(title, agg, classes))
        save_confusion_png(agg["confusion_sum"], classes, out / mode / "confusion.png",
                           f"{mode}: summed over {len(runs)} runs")
        results["modes"][mode] = {"runs": runs, "summary": agg}
        print("\n" + texts[-1] + "\n")
    texts.append(format_mode_table(aggs))
    print(texts[-1])
    (out / "table.txt").write_text("\n\n".join(texts) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}/table.txt, results.json and <mode>/seed<S>/"
          f"{{model.pt,predictions.csv,confusion.png,log.csv}}")
    return results


def judge_images(folder, expect):
    """A flat folder of generated images, or folder/<expect>/ (AC-GAN --generate layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist — pass the folder written by "
                        f"--generate/--translate")
    images = list_images(folder)
    if not images and (folder / expect).is_dir():
        images = list_images(folder / expect)
    if not images:
        raise UserError(f"{folder} holds no images (.png), directly or in {expect}/ — generate "
                        f"some first, or check the path")
    return images


def judge_numbers(probs, class_index, threshold):
    """Share accepted (p > threshold), mean probability, and share whose argmax is the class."""
    p = probs[:, class_index]
    return {"n": int(len(p)), "accepted": float((p > threshold).mean()), "mean_prob": float(p.mean()),
            "argmax_share": float((probs.argmax(1) == class_index).mean())}


def run_judge(args):
    device = pick_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device)
    classes, size = ckpt["classes"], ckpt["size"]
    if args.expect not in classes:
        raise UserError(f"--expect {args.expect} is not a class of this classifier "
                        f"({', '.join(classes)}) — use one of them")
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold} is not between 0 and 1 — e.g. --threshold 0.98 (the paper)")
    c = classes.index(args.expect)
    rows = {}
    files = judge_images(args.images, args.expect)
    rows["generated"] = judge_numbers(predict(model, load_images(files, size, args.workers), device),
                                      c, args.threshold)
    rows["generated"]["folder"] = str(args.images)
    # The baseline: real test images of the same class. By default the test folder the
    # classifier was evaluated on (stored in the checkpoint); --baseline DIR overrides it.
    baseline = args.baseline or ckpt.get("test_dir")
    if baseline is None:
        raise UserError("this checkpoint was trained with --folds and stores no test folder — pass "
                        "--baseline DIR (a split folder with DIR/<class>/, e.g. data/test)")
    base_dir = Path(baseline) / args.expect
    if not base_dir.is_dir() or not list_images(base_dir):
        raise UserError(f"no real baseline images in {base_dir} — pass --baseline DIR with "
                        f"DIR/{args.expect}/*.png ({MAKE_DATA_HINT})")
    base_files = list_images(base_dir)
    rows["real baseline"] = judge_numbers(predict(model, load_images(base_files, size, args.workers),
                                                  device), c, args.threshold)
    rows["real baseline"]["folder"] = str(base_dir)
    print(f"judge: {ckpt['arch']} classifier {args.ckpt} (classes {', '.join(classes)}, "
          f"{size} px); expected class {args.expect}; accepted = p({args.expect}) > {args.threshold}")
    print(f"{'set':<15}{'N':>6}{'accepted':>10}{'mean p':>9}{'argmax=' + args.expect:>16}  folder")
    for name, r in rows.items():
        print(f"{name:<15}{r['n']:>6}{r['accepted']:>10.3f}{r['mean_prob']:>9.3f}"
              f"{r['argmax_share']:>16.3f}  {r['folder']}")
    # A softmax classifier has no "none of these" answer: in our run it accepted 97.5 % of a
    # 150-step AC-GAN's gray-noise images as viral (real viral: 10 %); the domain FID was 247.
    print("note: confident is not realistic: images unlike any X-ray can score high here; check "
          "`classify.py fid` on the same folders too")
    result = {"ckpt": str(args.ckpt), "expect": args.expect, "threshold": args.threshold, **rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_fid(args):
    import metrics  # lazily: only this subcommand needs it
    device = pick_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device)
    stats, counts = [], []
    for folder in (args.real_dir, args.fake_dir):
        if not Path(folder).is_dir():
            raise UserError(f"image folder {folder} does not exist — {MAKE_DATA_HINT}, or pass "
                            f"the folder written by --generate/--translate")
        # Images directly in the folder (DCGAN / CycleGAN output, data/test/viral), else those
        # one level down (data/test/<class>/, AC-GAN output). Not deeper: CycleGAN --grid puts
        # its three-image panels in OUT/panels/, which are not samples.
        files = list_images(folder) or sorted(p for sub in sorted(Path(folder).iterdir())
                                              if sub.is_dir() for p in list_images(sub))
        if len(files) < 2:
            raise UserError(f"{folder} holds {len(files)} images (directly or in its subfolders); "
                            f"a covariance needs at least 2 — point at a folder with more images")
        feats = extract_features(model, load_images(files, ckpt["size"], args.workers), device)
        stats.append((feats.mean(axis=0), np.cov(feats, rowvar=False)))
        counts.append(len(files))
    dim = model.feature_dim
    if min(counts) < dim:
        print(f"warning: N = {min(counts)} images is below the feature dimension D = {dim}: the "
              f"covariance is rank-deficient and the distance is biased and noisy; use more "
              f"than {dim} images per folder", file=sys.stderr)
    fid = metrics.frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    shown = 0.0 if abs(fid) < 5e-5 else fid  # rounding can leave -1e-12 for identical sets
    print(f"domain FID ({ckpt['arch']} classifier penultimate features, D = {dim}, "
          f"{ckpt['size']} px): {shown:.4f}   N_real = {counts[0]}, N_fake = {counts[1]}")
    result = {"fid": float(fid), "n_real": counts[0], "n_fake": counts[1], "feature_dim": dim,
              "network": f"classify:{ckpt['arch']}", "ckpt": str(args.ckpt)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="X-ray classifier: augmentation experiments, realism "
                                "judge, domain FID.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        q.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                       help="threads that decode PNGs when the images are loaded")

    t = sub.add_parser("train", formatter_class=fmt,
                       help="train on real / fake / real+fake, evaluate on real images")
    t.add_argument("--real", "--data", dest="real", default="data/train",
                   help="real training split folder: REAL/<class>/*.png")
    t.add_argument("--fake", action="append", default=[], metavar="DIR or CLASS=DIR",
                   help="generated images: DIR/<class>/*.png (AC-GAN --generate), or CLASS=DIR for "
                        "a flat folder (DCGAN --generate, CycleGAN --translate); repeatable")
    t.add_argument("--test", default=None,
                   help="real test split folder TEST/<class>/*.png (e.g. data/test); not with --folds")
    t.add_argument("--mode", default="real",
                   help="training set: real, fake, real+fake, or a comma list (one table row each)")
    t.add_argument("--out", default=None, help="run folder (None: runs/classify_<arch>_<size>)")
    t.add_argument("--arch", choices=ARCHS, default="small",
                   help="small: ~0.29 M-parameter CNN; or torchvision models with a 1-channel input")
    t.add_argument("--pretrained", action="store_true",
                   help="ImageNet weights for resnet18/efficientnet_v2_s (downloads once)")
    t.add_argument("--size", type=int, default=64, help="images are resized to SIZE x SIZE")
    t.add_argument("--epochs", type=int, default=15, help="epochs per run (no early stopping)")
    t.add_argument("--min-steps", type=int, default=150,
                   help="but at least this many optimizer steps: small training sets get more "
                        "epochs, so every training set gets a fair number of updates")
    t.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="default: AdamW lr 1e-3, wd 1e-4, batch 64, cosine decay; paper: SGD lr "
                        "0.01, Nesterov momentum 0.9, batch 256 (DCGAN paper 3.3.2)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (None: the recipe's)")
    t.add_argument("--batch-size", type=int, default=None, help="batch size (None: the recipe's)")
    t.add_argument("--augment", action="store_true",
                   help=f"classic augmentation: rotation +-{AUG_MAX_ROTATION_DEG:g} deg, random "
                        f"crop {AUG_MIN_ZOOM:g}-1, brightness/contrast +-{AUG_BRIGHTNESS:g} (no flips)")
    t.add_argument("--folds", type=int, default=0,
                   help="K-fold cross-validation on --real instead of --test; patient-aware with "
                        "DATA/manifest.csv (0: no folds)")
    t.add_argument("--seed", type=int, default=0, help="first seed (also draws the folds)")
    t.add_argument("--seeds", type=int, default=1, help="runs with seeds SEED..SEED+N-1; mean ± std")
    t.add_argument("--real-per-class", type=int, default=None,
                   help="keep at most N real training images per class (scarcity; None: all)")
    t.add_argument("--fake-per-class", type=int, default=None,
                   help="keep at most N generated images per class (None: all)")
    t.add_argument("--max-steps", type=int, default=0, help="stop each run after N steps (0: no limit)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="autocast on CUDA (bf16, else fp16 with a GradScaler); ignored on CPU")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    common(t)
    t.epilog = ("Class imbalance: a weighted cross-entropy loss (no resampling): each class is "
                "weighted by n / (C * n_c) of the run's training set. Outputs: OUT/table.txt, "
                "OUT/results.json, OUT/<mode>/confusion.png, "
                "OUT/<mode>/seed<S>[_fold<K>]/{model.pt,predictions.csv,confusion.png,log.csv}.")

    j = sub.add_parser("judge", formatter_class=fmt,
                       help="share of images accepted as CLASS with probability > threshold "
                            "(confidence, not realism: read it next to `fid`)")
    j.add_argument("--ckpt", required=True, help="model.pt written by `classify.py train`")
    j.add_argument("--images", required=True, help="folder of generated images (or IMAGES/<expect>/)")
    j.add_argument("--expect", required=True, help="the class the images are meant to show")
    j.add_argument("--threshold", type=float, default=JUDGE_THRESHOLD,
                   help="accepted when p(expect) is above this (CycleGAN-ViT paper: 0.98)")
    j.add_argument("--baseline", default=None,
                   help="real split folder with BASELINE/<expect>/ (None: the checkpoint's --test)")
    j.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    common(j)

    f = sub.add_parser("fid", formatter_class=fmt,
                       help="Frechet distance in the classifier's penultimate features")
    f.add_argument("--ckpt", required=True, help="model.pt written by `classify.py train`")
    f.add_argument("real_dir", metavar="REAL", help="folder of real images: REAL/*.png, else REAL/*/*.png")
    f.add_argument("fake_dir", metavar="FAKE", help="folder of generated images: FAKE/*.png, else FAKE/*/*.png")
    f.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    common(f)
    args = p.parse_args(argv)
    if args.command == "train" and args.out is None:
        args.out = f"runs/classify_{args.arch}_{args.size}"
    return args


def main(argv=None):
    args = parse_args(argv)
    run = {"train": run_train, "judge": run_judge, "fid": run_fid}[args.command]
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are in their run folders; run the command again "
              "(a run takes minutes, so there is no resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
