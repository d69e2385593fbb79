"""Evidence on real X-rays: train a GAN of this repo on a prepared real set, then score every
checkpoint against the real test images. A script that prints numbers (not run in CI: it takes
tens of minutes on a CPU). Results are cached per checkpoint, so a rerun (or a resumed training)
only scores what is new.

    python prep.py kermany PATH/chest_xray --out data64 --size 64
    python tests/evidence_real.py dcgan --data data64 --cls normal --steps 3000 --every 500 \\
        --fid-weights pt_inception-2015-12-05-6726825d.pth --work runs/evidence/dcgan_normal
    python tests/evidence_real.py acgan --data data64 --steps 3000 --every 500 --fid-weights W --work ...
    python tests/evidence_real.py cyclegan --data data64 --src normal --dst viral --steps 6000 \\
        --every 1000 --fid-weights W --work ... -- --generator unet      # flags after -- go to the script

Per checkpoint and class it prints and appends to WORK/results.csv:
  fid, kid         of --n fakes against the real TEST images of the class (pool3 features of the
                   Inception network in --fid-weights; N is printed; FID below 2048 images is
                   biased upwards, so compare rows, and KID, which is unbiased)
  diversity        mean per-pixel std across the fakes / the same across the real test images
                   (1 = as varied as real X-rays; a collapsed generator is near 0)
  nn_ratio         median distance of a fake to its nearest TRAINING image / the same median for
                   the real test images (pool3 space). Below 1: fakes sit closer to the training
                   set than new real X-rays do, i.e. the generator copies
  copies           share of fakes nearer to a training image than the nearest real test image is
                   (0 for a generator that does not copy)
  judged           (acgan, cyclegan) share of fakes an independent small CNN, trained on the real
                   train split, calls the intended class
  cycle_l1         (cyclegan) mean |x - F(G(x))| in grey levels (0-255) on the real src test images
and a grid of 64 fakes in WORK/grids/. The first rows are the frame: "real train" (--n real
training images scored like fakes: the ceiling) and "step 0" (the untrained generator, or for
CycleGAN the untranslated src test images: the floor).
"""

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import metrics  # noqa: E402

CLASSES = ("normal", "bacterial", "viral")


def read_folder(folder, size):
    """All PNGs of a folder -> uint8 (N, 1, size, size)."""
    files = sorted(Path(folder).glob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L").resize((size, size), Image.LANCZOS)))
                        for f in files])[:, None]


class Judge(nn.Module):
    """A small CNN classifier (independent of the GANs and of classify.py) for the judged share."""

    def __init__(self, n_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):
        return self.head(self.body(x.float() / 127.5 - 1))


def train_judge(x, y, test_x, test_y, n_classes, epochs=15, seed=0):
    """-> (Judge in eval mode, test accuracy). Class-balanced loss; BatchNorm statistics recomputed
    for the final weights over the train split (the running averages of the last steps lag)."""
    torch.manual_seed(seed)
    net = Judge(n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    weight = len(y) / (n_classes * torch.bincount(y, minlength=n_classes).float())
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            shift = torch.randint(-4, 5, (2,))  # a little translation against overfitting
            opt.zero_grad()
            F.cross_entropy(net(torch.roll(x[idx], tuple(shift.tolist()), (2, 3))), y[idx], weight=weight).backward()
            opt.step()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for idx in torch.arange(len(x)).split(256):
            net(x[idx])
    net.eval()
    return net, predict(net, test_x).eq(test_y).float().mean().item()


@torch.no_grad()
def predict(net, x):
    return torch.cat([net(chunk).argmax(1) for chunk in x.split(256)])


class Scorer:
    """Pool3 features of the real train and test images of each class, computed once."""

    def __init__(self, data, classes, size, weights, n):
        self.model, self.network = metrics.load_inception(weights)
        self.size, self.n, self.real = size, n, {}
        for cls in classes:
            self.real[cls] = {}
            for split in ("train", "test"):
                images = self.real[cls][split] = read_folder(Path(data) / split / cls, size)
                cache = Path(data) / f".features_{split}_{cls}_{size}_{hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:8]}.npy"
                if not cache.exists() or len(np.load(cache)) != len(images):  # pool3 of the real images, once
                    np.save(cache, self.features(images))
                self.real[cls]["f_" + split] = np.load(cache)
            print(f"  {cls}: {len(self.real[cls]['train'])} train / {len(self.real[cls]['test'])} test images", flush=True)

    def features(self, images):
        return metrics.inception_features(self.model, images)[0].astype(np.float64)

    def score(self, cls, fakes):
        """The numbers of one set of fakes (uint8 (N, 1, S, S)) against the class's real images."""
        r, f = self.real[cls], self.features(fakes)
        fid = metrics.frechet_distance(*metrics.feature_statistics(r["f_test"]), *metrics.feature_statistics(f))
        kid, kid_std, _ = metrics.kernel_inception_distance(r["f_test"], f, subset_size=min(len(f), len(r["f_test"]), 100))
        diversity = fakes.float().std(0).mean().item() / r["test"].float().std(0).mean().item()
        d_fake = torch.cdist(torch.from_numpy(f), torch.from_numpy(r["f_train"])).min(1).values
        d_test = torch.cdist(torch.from_numpy(r["f_test"]), torch.from_numpy(r["f_train"])).min(1).values
        return {"n_fake": len(fakes), "n_real": len(r["test"]), "fid": fid, "kid": kid, "kid_std": kid_std,
                "diversity": diversity, "nn_ratio": (d_fake.median() / d_test.median()).item(),
                "copies": (d_fake < d_test.min()).float().mean().item()}


def run(cmd, log):
    print("  $ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code not in (0, 130):
        sys.exit(f"{cmd[0]} failed with code {code}; see {log}")


def grid(images, path):
    torchvision.utils.save_image(images[:64].float() / 255, path, nrow=8)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("model", choices=("dcgan", "acgan", "cyclegan"))
    p.add_argument("--data", required=True, help="a DATA folder made by prep.py (train/ and test/)")
    p.add_argument("--cls", default="normal", help="dcgan: the class")
    p.add_argument("--src", default="normal", help="cyclegan: the source class")
    p.add_argument("--dst", default="viral", help="cyclegan: the target class")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000, help="training steps in all")
    p.add_argument("--every", type=int, default=500, help="score a checkpoint every this many steps")
    p.add_argument("--n", type=int, default=500, help="fakes scored per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-weights", required=True, help="FID Inception weights (pool3) for the features")
    p.add_argument("--work", required=True, help="folder for the run, the cache and the results")
    p.add_argument("--threads", type=int, default=0, help="torch threads here (0: torch's default)")
    argv = sys.argv[1:]  # after --: flags for the GAN script
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = argv[argv.index("--") + 1:] if "--" in argv else []
    if args.threads:
        torch.set_num_threads(args.threads)
    work, run_dir = Path(args.work), Path(args.work) / "run"
    (work / "grids").mkdir(parents=True, exist_ok=True)
    classes = {"dcgan": [args.cls], "acgan": list(CLASSES), "cyclegan": [args.src, args.dst]}[args.model]
    log = work / "train.log"

    # 1. Train (resumable): one run, a checkpoint every --every steps.
    last = run_dir / "checkpoints" / "last.pt"
    done = torch.load(last, weights_only=True)["step"] if last.exists() else 0
    if done < args.steps:
        cmd = [f"{args.model}.py", "--data", Path(args.data) / "train", "--out", run_dir, "--size", args.size,
               "--seed", args.seed, "--max-steps", args.steps, "--save-every", args.every, "--sample-every",
               args.every, "--log-every", 50, *(["--cls", args.cls] if args.model == "dcgan" else []),
               *(["--src", args.src, "--dst", args.dst] if args.model == "cyclegan" else []),
               *(["--resume"] if last.exists() else []), *args.extra]
        run(cmd, log)

    # 2. The frame and every checkpoint.
    print(f"scoring ({args.n} fakes per class; features: {args.fid_weights}):", flush=True)
    scorer = Scorer(args.data, classes, args.size, args.fid_weights, args.n)
    judge = None
    if args.model in ("acgan", "cyclegan"):
        xs = [scorer.real[c]["train"] for c in classes]
        ts = [scorer.real[c]["test"] for c in classes]
        ys = [torch.full((len(x),), i) for i, x in enumerate(xs)]
        yt = [torch.full((len(x),), i) for i, x in enumerate(ts)]
        judge, acc = train_judge(torch.cat(xs), torch.cat(ys), torch.cat(ts), torch.cat(yt), len(classes), seed=args.seed)
        print(f"  judge: small CNN on real train images of {classes}, test accuracy {acc:.3f}", flush=True)
    cache_path = work / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    steps = ["real", 0] + sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    rows = []
    for step in steps:
        key = str(step)
        if key not in cache:
            cache[key] = score_step(args, step, classes, scorer, judge, run_dir, work, log)
            cache_path.write_text(json.dumps(cache, indent=1))
        rows += [{"step": key, "class": cls, **values} for cls, values in cache[key].items()]
        for cls, v in cache[key].items():
            print(f"{key:>6} {cls:>10} " + " ".join(f"{k} {v[k]:.4g}" for k in v if k not in ("n_real",)), flush=True)
    with open(work / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: (k not in ("step", "class"), k)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {work / 'results.csv'}")


def score_step(args, step, classes, scorer, judge, run_dir, work, log):
    """Make the fakes of one step (or the frame rows) and score them per class."""
    out = {}
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model == "cyclegan":
            src = scorer.real[args.src]["test"]
            if step == "real":
                fakes = scorer.real[args.dst]["train"][torch.randperm(len(scorer.real[args.dst]["train"]), generator=g)[:args.n]]
                back = None
            elif step == 0:
                fakes, back = src, src  # the untranslated inputs
            else:
                ckpt = run_dir / "checkpoints" / f"step_{step:06d}.pt"
                run(["cyclegan.py", "--translate", Path(args.data) / "test" / args.src, "--ckpt", ckpt,
                     "--out", tmp / "fwd", "--device", "cpu"], log)
                fakes = read_folder(tmp / "fwd", args.size)
                run(["cyclegan.py", "--translate", tmp / "fwd", "--ckpt", ckpt, "--direction", "dst2src",
                     "--out", tmp / "back", "--device", "cpu"], log)
                back = read_folder(tmp / "back", args.size)
            v = scorer.score(args.dst, fakes)
            v["judged"] = predict(judge, fakes).eq(classes.index(args.dst)).float().mean().item()
            if back is not None:
                v["cycle_l1"] = (back.float() - src.float()).abs().mean().item()
            grid(fakes, work / "grids" / f"step_{step}.png")
            return {f"{args.src}->{args.dst}": v}
        for i, cls in enumerate(classes):
            if step == "real":
                train = scorer.real[cls]["train"]
                fakes = train[torch.randperm(len(train), generator=g)[:args.n]]
            else:
                fakes = make_fakes(args, step, cls, run_dir, tmp, log)
            v = scorer.score(cls, fakes)
            if step == "real":  # training images are their own nearest neighbours: no memorization number
                v["nn_ratio"] = v["copies"] = float("nan")
            if judge is not None:
                v["judged"] = predict(judge, fakes).eq(i).float().mean().item()
            out[cls] = v
            grid(fakes, work / "grids" / f"step_{step}_{cls}.png")
    return out


def make_fakes(args, step, cls, run_dir, tmp, log):
    """--n fakes of one class from checkpoint step_N.pt, or from the untrained generator (step 0)."""
    if step == 0:  # the untrained generator
        torch.manual_seed(args.seed)
        if args.model == "dcgan":
            import dcgan
            G = dcgan.Generator(args.size).apply(dcgan.init_weights).eval()
            with torch.no_grad():
                z = dcgan.sample_z(args.n, "normal" if "normal" in args.extra else "uniform")  # as --noise
                return ((G(z) + 1) * 127.5).round().clamp(0, 255).byte()
        path = tmp / "untrained" / "checkpoints" / "last.pt"
        if not path.exists():  # one step: ~untrained
            run(["acgan.py", "--data", Path(args.data) / "train", "--out", tmp / "untrained", "--size", args.size,
                 "--max-steps", 1, "--sample-every", 0, "--seed", args.seed, *args.extra], log)
    else:
        path = run_dir / "checkpoints" / f"step_{step:06d}.pt"
    out = tmp / (f"{step}" if args.model == "acgan" else f"{step}_{cls}")  # AC-GAN: every class at once
    if not out.exists():
        run([f"{args.model}.py", "--generate", args.n, "--ckpt", path, "--out", out, "--seed", args.seed + 1,
             "--device", "cpu"], log)
    return read_folder(out / cls if args.model == "acgan" else out, args.size)


if __name__ == "__main__":
    main()
