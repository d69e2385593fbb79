"""Evidence (a script, not a test): after a short CPU run on the synthetic set, do the images
acgan.py generates carry the class they were asked for?

    python tests/evidence_acgan.py                     # 1200 steps: 3.3 min measured on a quiet 2-core CPU
    python tests/evidence_acgan.py --steps 2400        # about twice that; the class shows more clearly
    python tests/evidence_acgan.py --steps 300 --n 100 # a quicker, weaker look

With --work DIR a second call with more --steps resumes the run kept in DIR.

It (1) makes the synthetic phantom set with prep.py, (2) trains acgan.py on it at 64x64 on the
CPU, (3) trains a tiny independent CNN classifier on the REAL synthetic train set (written here,
not classify.py) and checks it on the real test set, then prints
  - that classifier's accuracy on generated images, per asked-for class, against chance (1/K),
    for the trained generator and, as a control, for the same generator before training;
  - the discriminator's class-head accuracy on real test images and on generated images.
It also prints how diverse the fakes of one class are (per-pixel std across images) next to the
real images', since a generator can carry the class and still ignore z (partial mode collapse).
The independent classifier is the stronger evidence: the discriminator's class head is trained on
fakes too, so it can learn the generator's own code for a class even if it looks nothing like it.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import acgan  # noqa: E402
import prep  # noqa: E402

CLASSES = ["normal", "bacterial", "viral"]


class TinyCNN(nn.Module):
    """A small X-ray classifier: three stride-2 conv blocks and a linear layer."""

    def __init__(self, n_classes, size):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),     # (B, 16, S/2, S/2)
            nn.Conv2d(16, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),    # (B, 32, S/4, S/4)
            nn.Conv2d(32, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),    # (B, 64, S/8, S/8)
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(64 * (size // 8) ** 2, n_classes))                 # (B, K) logits

    def forward(self, x):
        return self.net(x)


def load_split(folder, size):
    return acgan.load_images(folder, CLASSES, size, channels=1)


def as_input(u8):
    return u8.float() / 127.5 - 1


def train_classifier(x_u8, y, size, epochs, seed):
    torch.manual_seed(seed)
    model = TinyCNN(len(CLASSES), size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(model(as_input(x_u8[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, x_u8):
    return torch.cat([model(as_input(b)).argmax(1) for b in x_u8.split(256)])


@torch.no_grad()
def d_class_predictions(D, x_u8):
    return torch.cat([D(as_input(b))[1].argmax(1) for b in x_u8.split(256)])


def per_class(pred, y):
    """Accuracy for each asked-for class, and the confusion matrix (rows: asked, cols: predicted)."""
    k = len(CLASSES)
    conf = torch.zeros(k, k, dtype=torch.long)
    for t, p in zip(y.tolist(), pred.tolist()):
        conf[t, p] += 1
    acc = {c: conf[i, i].item() / max(1, conf[i].sum().item()) for i, c in enumerate(CLASSES)}
    return acc, (pred == y).float().mean().item(), conf.tolist()


def fakes(G, n, seed):
    """n images of each class (eval mode), each from its own z."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(n)
    return acgan.sample(G, acgan.fixed_z(n * len(CLASSES), seed), labels), labels


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="AC-GAN training steps")
    p.add_argument("--n", type=int, default=200, help="synthetic train images per class")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--g-channels", type=int, default=128)
    p.add_argument("--d-channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-fake", type=int, default=200, help="generated images per class to judge")
    p.add_argument("--clf-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--work", default=None, help="folder for data and the run (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="evidence_acgan_"))
    t0 = time.time()

    data = work / "synth"
    if not (data / "train").is_dir():
        prep.make_synthetic(data, n=args.n, size=args.size, seed=0)
    run = work / "run"
    argv = ["--data", str(data / "train"), "--out", str(run), "--size", str(args.size),
            "--g-channels", str(args.g_channels), "--d-channels", str(args.d_channels),
            "--batch-size", str(args.batch_size), "--epochs", "100000", "--max-steps", str(args.steps),
            "--log-every", "100", "--sample-every", str(args.steps), "--save-every", str(args.steps),
            "--device", "cpu"]
    if (run / "checkpoints/last.pt").exists():
        argv.append("--resume")
    t_gan = time.time()
    acgan.main(argv)
    t_gan = time.time() - t_gan

    x_train, y_train = load_split(data / "train", args.size)
    x_test, y_test = load_split(data / "test", args.size)
    clf = train_classifier(x_train, y_train, args.size, args.clf_epochs, seed=0)
    _, clf_real_acc, _ = per_class(predict(clf, x_test), y_test)

    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    G = acgan.Generator(len(CLASSES), 1, args.size, args.g_channels)
    G.load_state_dict(ckpt["G"])
    D = acgan.Discriminator(len(CLASSES), 1, args.size, args.d_channels)
    D.load_state_dict(ckpt["D"])
    D.eval()
    torch.manual_seed(0)                      # an untrained generator, initialised as acgan.py does
    G0 = acgan.Generator(len(CLASSES), 1, args.size, args.g_channels)
    G0.apply(acgan.init_weights)

    x_fake, y_fake = fakes(G, args.n_fake, seed=123)
    x_fake0, y_fake0 = fakes(G0, args.n_fake, seed=123)
    clf_fake, clf_fake_all, clf_conf = per_class(predict(clf, x_fake), y_fake)
    clf_fake0, clf_fake0_all, clf_conf0 = per_class(predict(clf, x_fake0), y_fake0)
    d_real, d_real_all, _ = per_class(d_class_predictions(D, x_test), y_test)
    d_fake, d_fake_all, _ = per_class(d_class_predictions(D, x_fake), y_fake)

    # diversity: per-pixel standard deviation across images of one class, fakes vs real
    # (a generator that ignores z draws the same image for every z: std near 0)
    spread = lambda x: (x.float() / 127.5 - 1).std(0).mean().item()  # noqa: E731
    std_fake = {c: spread(x_fake[y_fake == k]) for k, c in enumerate(CLASSES)}
    std_real = {c: spread(x_train[y_train == k]) for k, c in enumerate(CLASSES)}
    chance = 1 / len(CLASSES)
    print()
    print(f"AC-GAN evidence: {args.steps} steps at {args.size}x{args.size} on {args.n} synthetic "
          f"images/class (g-channels {args.g_channels}, d-channels {args.d_channels}, batch "
          f"{args.batch_size}), {t_gan / 60:.1f} min of CPU training in this call; chance = {chance:.3f}")
    print(f"independent CNN on the real synthetic test set ({len(y_test)} images): {clf_real_acc:.3f}")
    print(f"{'judge':<42}{'all':>7}" + "".join(f"{c:>11}" for c in CLASSES))
    for name, overall, accs in [
        (f"CNN on fakes, trained G ({args.n_fake}/class)", clf_fake_all, clf_fake),
        ("CNN on fakes, untrained G (control)", clf_fake0_all, clf_fake0),
        ("D class head on real test images", d_real_all, d_real),
        ("D class head on fakes, trained G", d_fake_all, d_fake),
    ]:
        print(f"{name:<42}{overall:>7.3f}" + "".join(f"{accs[c]:>11.3f}" for c in CLASSES))
    print("per-pixel std across images (diversity), fakes vs real: " + ", ".join(
        f"{c} {std_fake[c]:.3f} vs {std_real[c]:.3f}" for c in CLASSES))
    print(f"CNN confusion on fakes, trained G (rows asked {CLASSES}, cols predicted): {clf_conf}")
    print(f"CNN confusion on fakes, untrained G: {clf_conf0}")
    header, *rows = (run / "log.csv").read_text().strip().splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    print(f"D's class head accuracy over the last logged steps of training (log.csv, step {last['step']}): "
          f"{last['cls_acc_real']} on real, {last['cls_acc_fake']} on fake images")
    result = {"steps": args.steps, "size": args.size, "n": args.n, "g_channels": args.g_channels,
              "d_channels": args.d_channels, "minutes_training": t_gan / 60, "chance": chance,
              "clf_real_test": clf_real_acc, "clf_fake": clf_fake, "clf_fake_all": clf_fake_all,
              "clf_fake_untrained": clf_fake0, "d_cls_real_test": d_real, "d_cls_fake": d_fake,
              "clf_confusion_fake": clf_conf, "std_fake": std_fake, "std_real": std_real}
    (work / "evidence_acgan.json").write_text(json.dumps(result, indent=2))
    print(f"numbers in {work / 'evidence_acgan.json'}, samples in {run / 'samples'} "
          f"({(time.time() - t0) / 60:.1f} min in all)")


if __name__ == "__main__":
    main()
