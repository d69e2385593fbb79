"""Evidence that dcgan.py learns: train a few minutes on a CPU, then measure how far the samples
moved toward the real class. A script that prints numbers, not a test (too slow for CI).

    python tests/evidence_dcgan.py                      # 4 minutes, 32 px, class normal
    python tests/evidence_dcgan.py --minutes 10 --size 64 --fid-weights pt_inception-2015-12-05-6726825d.pth

What it does
  1. Makes the synthetic phantom set with prep.py (train + test, 3 classes) in a temp folder.
  2. Trains a small CNN classifier (3 conv layers, 64 features) on the train split to tell
     normal / bacterial / viral apart, and reports its test accuracy. Its 64 pooled features
     are the "feature network" for FID/KID below: a network that knows what separates these
     images, which a random-weights Inception does not (its numbers would be meaningless).
  3. Trains dcgan.py on one class for --minutes in a subprocess, then stops it with Ctrl-C
     (SIGINT), which makes dcgan.py save checkpoints/last.pt.
  4. Compares the real train images of the class with --n-fake samples from
       the untrained generator (the same init as step 0 of the run: seed, N(0, 0.02)) and
       the trained generator (last.pt),
     by KID and FID on the small CNN's features, KID on 16x16 downsampled pixels (no network at
     all), and the share of samples the CNN assigns to the class. Two real references frame
     the numbers: real test images of the same class (about the best a generator can do with
     this N) and real train images of another class (what "wrong class" looks like).
  5. With --fid-weights (the FID Inception, pt_inception-2015-12-05), also FID/IS/KID from
     metrics.py; without, that row is left out and the output says so.

The CNN, KID (50 subsets of up to 100 images) and FID on its features: tests/evidence_common.py,
which uses metrics.py's kernel_inception_distance and frechet_distance.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dcgan  # noqa: E402
import prep  # noqa: E402
from evidence_common import fid, kid, to_float, train_classifier  # noqa: E402

CLASSES = ("normal", "bacterial", "viral")  # the classes prep.py synthetic makes
PIXEL_SIDE = 16  # pixels-only measure: images downsampled to 16 x 16 = 256 numbers


def measures(net, real, images, cls_index):
    """All offline measures of `images` (uint8) against `real` (uint8)."""
    with torch.no_grad():
        f_real = net.features(to_float(real)).double().numpy()
        f_img = net.features(to_float(images)).double().numpy()
        share = (net(to_float(images)).argmax(1) == cls_index).float().mean().item()
    small = lambda x: F.interpolate(to_float(x), size=PIXEL_SIDE, mode="area").flatten(1).double().numpy()  # noqa: E731
    k_cnn, k_cnn_sd = kid(f_real, f_img)
    k_pix, k_pix_sd = kid(small(real), small(images))
    return {"fid_cnn": fid(f_real, f_img), "kid_cnn": k_cnn, "kid_cnn_sd": k_cnn_sd,
            "kid_pix": k_pix, "kid_pix_sd": k_pix_sd, "share": share}


def load_split(root, size):
    xs, ys = [], []
    for i, cls in enumerate(CLASSES):
        x = dcgan.load_class(root, cls, size, 1, 1)
        xs.append(x)
        ys.append(torch.full((len(x),), i))
    return torch.cat(xs), torch.cat(ys)


def generator_samples(netG, n, seed):
    return dcgan.sample(netG, dcgan.fixed_z(n, "normal", seed))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="GAN training time")
    p.add_argument("--size", type=int, default=32, choices=dcgan.SIZES)
    p.add_argument("--cls", default="normal", choices=CLASSES)
    p.add_argument("--n", type=int, default=256, help="synthetic train images per class")
    p.add_argument("--n-fake", type=int, default=500, help="generated images per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 is fastest when other jobs share a 2-core machine)")
    p.add_argument("--fid-weights", help="FID Inception weights for metrics.py (optional)")
    p.add_argument("--work", help="folder for the data and the run (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="evidence_dcgan_"))
    data, run = work / "data", work / "run"

    t0 = time.time()
    if not (data / "train").exists():
        prep.make_synthetic(data, n=args.n, size=args.size, seed=args.seed, workers=2)
    train_x, train_y = load_split(data / "train", args.size)
    test_x, test_y = load_split(data / "test", args.size)
    net, acc = train_classifier(train_x, train_y, test_x, test_y, len(CLASSES), epochs=20, seed=args.seed)
    print(f"data: synthetic phantoms, {args.size} px, {len(train_x)} train / {len(test_x)} test "
          f"images; small CNN test accuracy {acc:.3f} (chance {1 / len(CLASSES):.3f}) "
          f"[{time.time() - t0:.0f} s]")

    # The untrained generator: exactly the init of step 0 of the run below (same seed, same
    # construction order as dcgan.train).
    torch.manual_seed(args.seed)
    g0 = dcgan.Generator(args.size)
    dcgan.Discriminator(args.size)  # constructed in between in dcgan.train: same RNG draws
    g0.apply(dcgan.init_weights)

    cmd = [sys.executable, str(REPO / "dcgan.py"), "--data", str(data / "train"), "--cls", args.cls,
           "--size", str(args.size), "--out", str(run), "--seed", str(args.seed), "--device", "cpu",
           "--epochs", "100000", "--log-every", "20", "--sample-every", "100", "--save-every", "100000"]
    if (run / "checkpoints" / "last.pt").exists():
        cmd.append("--resume")
    print("training:", " ".join(cmd[1:]), f"for {args.minutes} min, then Ctrl-C")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log_path = work / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60 * args.minutes
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        proc.send_signal(signal.SIGINT)  # dcgan.py finishes the step, saves last.pt, exits 130
        proc.wait(timeout=300)
    lines = log_path.read_text().splitlines()
    if proc.returncode != 130:
        sys.exit(f"training ended with code {proc.returncode}; see {log_path}")
    for line in [l for l in lines if l.startswith("[")][-3:] + [l for l in lines if "interrupted" in l]:
        print("  " + line)
    ckpt = dcgan.load_checkpoint(run / "checkpoints" / "last.pt")
    g1 = dcgan.Generator(args.size)
    g1.load_state_dict(ckpt["G"])
    print(f"trained generator: step {ckpt['step']} ({ckpt['step'] / (60 * args.minutes):.2f} steps/s)")

    ci = CLASSES.index(args.cls)
    real = train_x[train_y == ci]
    other = CLASSES[(ci + 1) % len(CLASSES)]
    rows = {
        "untrained G": generator_samples(g0, args.n_fake, args.seed + 1),
        f"trained G ({ckpt['step']} steps)": generator_samples(g1, args.n_fake, args.seed + 1),
        f"real {args.cls}, test split": test_x[test_y == ci],
        f"real {other}, train split": train_x[train_y == CLASSES.index(other)],
    }
    print(f"\nagainst the {len(real)} real {args.cls} train images "
          f"(generated: {args.n_fake} each; CNN = the small classifier's 64 features; "
          f"pixels = {PIXEL_SIDE}x{PIXEL_SIDE} area-downsampled)")
    print(f"{'images':32s} {'N':>5s} {'FID CNN':>9s} {'KID CNN':>16s} {'KID pixels':>16s} "
          f"{'as ' + args.cls:>10s}")
    for name, images in rows.items():
        m = measures(net, real, images, ci)
        print(f"{name:32s} {len(images):5d} {m['fid_cnn']:9.3f} "
              f"{m['kid_cnn']:8.4f} ± {m['kid_cnn_sd']:.4f} {m['kid_pix']:8.4f} ± {m['kid_pix_sd']:.4f}"
              f" {m['share']:10.3f}")

    if args.fid_weights:
        import metrics

        ev = metrics.Evaluator(real, weights=args.fid_weights, device="cpu")
        print(f"\nInception (metrics.py, {args.fid_weights}):")
        for name in list(rows)[:2]:
            s = ev.score(rows[name])
            print(f"{name:32s} FID {s['fid']:.2f}  IS {s['is_mean']:.3f}  KID {s['kid_mean']:.4f} "
                  f"± {s['kid_std']:.4f}  (N real {s['n_real']}, N fake {s['n_fake']}, {s['network']})")
    else:
        print("\nInception FID/IS/KID: not computed (no --fid-weights; a random-weights Inception "
              "would give meaningless numbers).")
    print(f"work folder: {work}  [{time.time() - t0:.0f} s in all]")


if __name__ == "__main__":
    main()
