"""Evidence that cyclegan.py translates: train a few minutes on a CPU, then measure whether
G_src2dst moves src test images toward the dst class. A script that prints numbers, not a test.

    python tests/evidence_cyclegan.py                  # about 7 minutes: 64 px, narrow nets, normal -> viral
    python tests/evidence_cyclegan.py --minutes 15 --ngf 32 --dst bacterial

What it does
  1. Makes the synthetic phantom set with prep.py (--n train and n/4 test images per class) in a
     temp folder, drawn at 2 x --size and shrunk on loading, as real X-rays are (see main).
  2. Trains a small CNN to tell src from dst on the train split and reports its test accuracy.
  3. Trains cyclegan.py for --minutes in a subprocess (constant learning rate, narrow nets so
     that a CPU gets through some epochs), then stops it with Ctrl-C (SIGINT), which makes
     cyclegan.py save checkpoints/last.pt.
  4. Translates the src test images (never seen in training) with
       nothing (the images themselves: where a translation starts),
       the untrained G_src2dst (the run's initialisation: same seed, same construction), and
       the trained G_src2dst (last.pt),
     and compares each set with the real dst train images: the share the CNN calls dst, KID on
     the CNN's 64 pooled features, KID on 16x16 area-downsampled pixels (no network at all), the
     mean position on the line from the mean src to the mean dst train image (0 and 1), and the
     mean absolute change |G(x) - x| in grey levels (0..255). Real dst test images frame the
     numbers from the other side (about the best a translation can do with this N), once as
     they are and once cropped as cyclegan.py's training jitter crops them (what D_dst sees; a
     check that the CNN recognises dst images at that scale too). The trained row also gives the
     cycle error |G_dst2src(G_src2dst(x)) - x|.
  --minutes 0 --work DIR measures a run made before, without training.

The CNN and KID (50 subsets of up to 100 images, metrics.py's kernel_inception_distance):
tests/evidence_common.py.

Measured (idle 2-core CPU, defaults, seed 0): 1,903 steps (9.5 epochs) in 6 minutes; the CNN
calls 37 of 50 translations viral (0 of the untranslated), KID on its features falls from 1.81
(untranslated) to 0.37 (real viral test: 0.00; jittered as in training: 0.62), the axis
position moves from 0.36 to 1.55 (real viral test: 1.08), 15.7 grey levels changed on average.
With the phantoms drawn at 64 px instead (before PHANTOM_SCALE), the same flags gave 0 of 50
after 1,600 and after 5,416 steps: the jitter's 64 -> 72 px enlargement blurred away the viral
texture in everything D_dst saw (the CNN called only 26% of real viral test images, so
jittered, viral).
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

import cyclegan  # noqa: E402
import prep  # noqa: E402
from evidence_common import kid, to_float, train_classifier  # noqa: E402

PIXEL_SIDE = 16      # the pixels-only measure: 16 x 16 = 256 numbers per image
PHANTOM_SCALE = 2    # phantoms drawn at 2 x --size, then downsampled (see main)


def measures(net, real, images, real_src, start=None):
    """The measures of `images` (uint8) against `real` (uint8, dst); `real_src`: the src train images;
    `start`: the untranslated inputs."""
    with torch.no_grad():
        f_real = net.features(to_float(real)).double().numpy()
        f_img = net.features(to_float(images)).double().numpy()
        share = (net(to_float(images)).argmax(1) == 1).float().mean().item()
    small = lambda x: F.interpolate(to_float(x), size=PIXEL_SIDE, mode="area").flatten(1).double().numpy()  # noqa: E731
    change = float("nan") if start is None else (images.float() - start.float()).abs().mean().item()
    # Where the images lie on the line from the mean src image (0) to the mean dst image (1), in
    # the downsampled pixels: a class-sensitive pixel statistic (KID on pixels barely tells the
    # classes apart), but a noisy one: single images scatter by about +-1.
    mean_src, mean_dst = torch.from_numpy(small(real_src).mean(0)), torch.from_numpy(small(real).mean(0))
    axis = mean_dst - mean_src
    position = ((torch.from_numpy(small(images)) - mean_src) @ axis / (axis @ axis)).mean().item()
    return {"share": share, "kid_cnn": kid(f_real, f_img), "kid_pix": kid(small(real), small(images)),
            "position": position, "change": change}


def jittered(folder, cls, size, seed):
    """The images of one class as cyclegan.py's training sees them: decoded at round(size * 286/256)
    and cropped back to size at a random offset (cyclegan.jitter). The CNN should call real dst
    images so jittered dst too, or it could not recognise what D_dst teaches G_src2dst to draw."""
    load_size = round(size * cyclegan.JITTER)
    images = load(folder, cls, load_size)
    rows = cyclegan.epoch_plan(len(images), len(images), len(images), load_size - size, False, seed, 0)[0, :4]
    return ((cyclegan.jitter(images, rows, size) + 1) * 127.5).round().byte()


def load(folder, cls, size):
    return cyclegan.load_class(folder, cls, size, 1, 1)


def translate(G, x):
    return cyclegan.translate_images(G, x)


def train(args, data, run, work, resume):
    """cyclegan.py in a subprocess for args.minutes, stopped by Ctrl-C (it saves last.pt and exits 130)."""
    cmd = [sys.executable, str(REPO / "cyclegan.py"), "--src", args.src, "--dst", args.dst,
           "--data", str(data / "train"), "--size", str(args.size), "--generator", args.generator,
           "--ngf", str(args.ngf), "--ndf", str(args.ndf), "--out", str(run), "--seed", str(args.seed),
           "--device", "cpu", "--epochs", "100000", "--decay-epochs", "0",
           "--log-every", "50", "--sample-every", "500", "--save-every", "100000"] + ["--resume"] * resume
    print("training: python", " ".join(cmd[1:]), f"for {args.minutes} min, then Ctrl-C")
    log_path = work / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60 * args.minutes
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    lines = log_path.read_text().splitlines()
    if proc.returncode != 130:
        sys.exit(f"training ended with code {proc.returncode}; see {log_path}")
    for line in [line for line in lines if line.startswith("[")][-2:]:
        print("  " + line)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0,
                   help="CycleGAN training time (0: measure the run already in --work)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--src", default="normal", choices=("normal", "bacterial", "viral"))
    p.add_argument("--dst", default="viral", choices=("normal", "bacterial", "viral"))
    p.add_argument("--generator", default="resnet", choices=("resnet", "unet"))
    p.add_argument("--ngf", type=int, default=16, help="generator width (cyclegan.py's default is 64)")
    p.add_argument("--ndf", type=int, default=16, help="discriminator width (cyclegan.py's default is 64)")
    p.add_argument("--n", type=int, default=200, help="synthetic train images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 is fastest when other jobs share a 2-core machine)")
    p.add_argument("--work", help="folder for the data and the run (default: a temp folder)")
    args = p.parse_args()
    if args.src == args.dst:
        sys.exit("error: --src and --dst are the same class — pick two")
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="evidence_cyclegan_"))
    data, run = work / "data", work / "run"

    t0 = time.time()
    # The phantoms are drawn at PHANTOM_SCALE x the model size and shrunk on loading, as real
    # X-rays are: drawn at the model size, cyclegan.py's jitter (resize to 286/256 x size, crop)
    # would enlarge them and blur the one-pixel viral texture that the CNN keys on (then only 26%
    # of real viral test images, jittered so, are called viral), while the test images stay sharp.
    prep.make_synthetic(data, n=args.n, size=PHANTOM_SCALE * args.size, seed=args.seed, workers=2)
    split = {s: [load(data / s, c, args.size) for c in (args.src, args.dst)] for s in ("train", "test")}
    xy = lambda s: (torch.cat(split[s]), torch.cat([torch.full((len(x),), i) for i, x in enumerate(split[s])]))  # noqa: E731
    net, acc = train_classifier(*xy("train"), *xy("test"), n_classes=2, epochs=15, seed=args.seed)
    src_test, real_dst, dst_test = split["test"][0], split["train"][1], split["test"][1]
    print(f"data: synthetic phantoms, {args.size} px, {args.n} train / {len(src_test)} test images per "
          f"class; small CNN {args.src} vs {args.dst} test accuracy {acc:.3f} [{time.time() - t0:.0f} s]")

    # The untrained generator: the run's initialisation (train() seeds, then builds the model;
    # nothing in between draws from the global RNG).
    torch.manual_seed(args.seed)
    model0 = cyclegan.CycleGAN(args.generator, 1, args.size, args.ngf, args.ndf)

    last = run / "checkpoints" / "last.pt"
    if args.minutes > 0:
        train(args, data, run, work, resume=last.exists())
    elif not last.exists():
        sys.exit(f"--minutes 0 measures an existing run, and {last} does not exist")
    ckpt = cyclegan.load_checkpoint(last)
    model1 = cyclegan.CycleGAN(args.generator, 1, args.size, args.ngf, args.ndf)
    model1.load_state_dict(ckpt["nets"])
    steps = ckpt["step"]
    print(f"trained: step {steps}, {steps / max(len(x) for x in split['train']):.1f} epochs")

    fake1 = translate(model1.G_src2dst, src_test)
    rows = {f"{args.src} test, untranslated": src_test,
            "untrained G_src2dst": translate(model0.G_src2dst, src_test),
            f"trained G_src2dst ({steps} steps)": fake1,
            f"real {args.dst}, test split": dst_test,
            f"real {args.dst} test, train jitter": jittered(data / "test", args.dst, args.size, args.seed)}
    print(f"\nagainst the {len(real_dst)} real {args.dst} train images (CNN = the small classifier; "
          f"pixels = {PIXEL_SIDE}x{PIXEL_SIDE} area-downsampled; axis = mean position from the mean "
          f"{args.src} (0) to the mean {args.dst} (1) train image; change = mean |G(x) - x| in grey levels)")
    print(f"{'images':34s} {'N':>4s} {'as ' + args.dst:>9s} {'KID CNN':>17s} {'KID pixels':>17s} "
          f"{'axis':>6s} {'change':>7s}")
    for name, images in rows.items():
        m = measures(net, real_dst, images, split["train"][0], None if name.startswith("real") else src_test)
        print(f"{name:34s} {len(images):4d} {m['share']:9.3f} {m['kid_cnn'][0]:8.4g} ± {m['kid_cnn'][1]:<6.2g} "
              f"{m['kid_pix'][0]:8.4g} ± {m['kid_pix'][1]:<6.2g} {m['position']:6.2f} {m['change']:7.2f}")
    rec = translate(model1.G_dst2src, fake1)
    print(f"cycle error |G_dst2src(G_src2dst(x)) - x| of the trained pair: "
          f"{(rec.float() - src_test.float()).abs().mean().item():.2f} grey levels")
    print(f"samples: {run / 'samples'}; work folder: {work}  [{time.time() - t0:.0f} s in all]")


if __name__ == "__main__":
    main()
