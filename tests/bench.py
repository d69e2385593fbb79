"""Training-speed benchmark: images/s, ms/step and peak memory of every model.

    python tests/bench.py                                   # every model, on CUDA if present
    python tests/bench.py --device cpu --models dcgan,fid   # a subset
    python tests/bench.py --device cuda --steps 50 --warmup 10

For each model at its paper size (DCGAN 64, AC-GAN 112, CycleGAN 256 with the ResNet and the
U-Net generator) it trains on a synthetic phantom set that it writes, each run in a fresh process:
  default   the script's defaults: on CUDA autocast (bf16, else fp16), channels_last, fused Adam,
            cudnn.benchmark; on a CPU fp32
  fp32      --no-amp: the plain fp32 baseline (on a CPU the same as default)
  bf16      --amp on a CPU only: bf16 autocast there
and prints ms/step and images/s (the mean over the timed steps after `--warmup` steps; the
scripts synchronise the device before reading the clock), peak memory (CUDA: the largest
allocation by PyTorch; CPU: the process's peak resident set) and the default/fp32 ratio. The
input pipeline is one indexing op on preloaded uint8 images, so it is not timed apart. For FID it
compares feature-extraction images/s of metrics.py with pytorch-fid on the same images
(tests/bench_fid.py). CycleGAN's images/s counts one src and one dst image as one.

`--amp-check` answers a different question: does autocast change the results beyond noise? For
each model it trains three short runs from the same start, logging every step: fp32 (--no-amp),
autocast (--amp; bf16 on a CPU, the script's own choice on CUDA), and fp32 with another seed. It
prints the mean |difference| of every logged loss between autocast and fp32, next to the same
number between the two fp32 seeds (the noise a GAN run has anyway), and their ratio.

A benchmark prints numbers; it asserts nothing, so it never flakes in CI.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (script, paper size, paper batch size, flags)
MODELS = {
    "dcgan": ("dcgan", 64, 32, ["--cls", "normal"]),
    "acgan": ("acgan", 112, 32, ["--classes", "normal,bacterial,viral"]),
    "cyclegan-resnet": ("cyclegan", 256, 1, ["--src", "normal", "--dst", "viral", "--generator", "resnet"]),
    "cyclegan-unet": ("cyclegan", 256, 1, ["--src", "normal", "--dst", "viral", "--generator", "unet"]),
}
VARIANTS = {"default": [], "fp32": ["--no-amp"], "bf16": ["--amp"]}
AMP_VARIANTS = {"fp32": ["--no-amp"], "amp": ["--amp"], "fp32-seed1": ["--no-amp", "--seed", "1"]}
NOT_LOSSES = {"step", "epoch", "iter", "lr", "ms_per_step"}  # log.csv columns that are not losses


def child(spec):
    """Run one training in this process and print one JSON line with its numbers."""
    import importlib

    import torch
    module = importlib.import_module(spec["script"])
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        module.main(spec["argv"])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    wall = time.perf_counter() - t0
    with open(Path(spec["out"]) / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [float(r["ms_per_step"]) for r in rows[1:]]  # row 0 holds the warm-up steps
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({"ms_per_step": sum(timed) / max(len(timed), 1), "timed_rows": len(timed),
                                 "peak_mb": peak_mb, "wall_s": wall, "log": rows}), flush=True)


def run_variant(name, variant, device, data, steps, warmup, workdir, flags=None):
    script, size, batch, extra = MODELS[name]
    out = Path(workdir) / f"{name}-{variant}"
    argv = [*extra, "--data", str(data), "--out", str(out), "--size", str(size),
            "--batch-size", str(batch), "--device", device, "--seed", "0",
            "--max-steps", str(warmup + steps), "--log-every", str(warmup),
            "--sample-every", "1000000", "--save-every", "1000000", "--epochs", "1000000",
            *(VARIANTS[variant] if flags is None else flags)]  # a later --seed wins
    spec = {"script": script, "argv": argv, "device": device, "out": str(out)}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO,
                       capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    res = json.loads(line[len("BENCH "):])
    res["images_per_s"] = batch * 1000.0 / res["ms_per_step"]
    return res


def loss_gap(rows_a, rows_b):
    """Mean |a - b| over every step and every logged loss column the two logs share."""
    cols = [c for c in rows_a[0] if c not in NOT_LOSSES and c in rows_b[0]]
    diffs = [abs(float(ra[c]) - float(rb[c])) for ra, rb in zip(rows_a, rows_b) for c in cols
             if ra[c] not in ("", None) and rb[c] not in ("", None)]
    return sum(diffs) / max(len(diffs), 1), cols


def amp_check(names, device, steps, workdir):
    """Autocast vs fp32 on the same seed, against fp32 seed 0 vs seed 1 (see the docstring)."""
    print(f"\n{'model':<16}{'steps':>6}{'|amp - fp32|':>14}{'|seed1 - seed0|':>17}{'ratio':>8}")
    out = {}
    for name in names:
        _, size, batch, _ = MODELS[name]
        data = make_data(size, batch * (steps + 1), workdir)
        logs = {}
        for variant, flags in AMP_VARIANTS.items():
            r = run_variant(name, "amp-" + variant, device, data, steps - 1, 1, workdir, flags)
            if "error" in r:
                print(f"{name:<16} {variant} failed: {r['error']}")
                break
            logs[variant] = r["log"]
        else:
            gap_amp, cols = loss_gap(logs["amp"], logs["fp32"])
            gap_seed, _ = loss_gap(logs["fp32-seed1"], logs["fp32"])
            out[name] = {"steps": steps, "amp_vs_fp32": gap_amp, "seed1_vs_seed0": gap_seed,
                         "ratio": gap_amp / gap_seed if gap_seed else float("nan"), "columns": cols}
            print(f"{name:<16}{steps:>6}{gap_amp:>14.4f}{gap_seed:>17.4f}{out[name]['ratio']:>8.2f}", flush=True)
    return out


def make_data(size, n, workdir):
    """A phantom set with n train images per class (an epoch longer than the run)."""
    import prep
    out = Path(workdir) / f"data{size}_{n}"
    if not (out / "manifest.csv").exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # prep's summary and progress line are not results
            prep.make_synthetic(out, n=n, size=size, seed=0, workers=min(4, os.cpu_count() or 1))
    return out / "train"


def device_name(device):
    import torch
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--models", default="dcgan,acgan,cyclegan-resnet,cyclegan-unet,fid",
                   help="comma-separated subset of " + ",".join([*MODELS, "fid"]))
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 40 CUDA, 6 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--n", type=int, default=None,
                   help="phantom images per class (default: enough that no run crosses an epoch)")
    p.add_argument("--fid-n", type=int, default=None, help="images for the FID benchmark (default: 500 CUDA, 16 CPU)")
    p.add_argument("--amp-check", action="store_true",
                   help="instead of timing: autocast vs fp32 losses, step by step, against seed noise")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    steps = args.steps or (40 if cuda else 6)
    warmup = args.warmup or (10 if cuda else 2)
    steps = -(-steps // warmup) * warmup  # a multiple of warmup: log rows are warmup steps long
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS and m != "fid"]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {[*MODELS, 'fid']}")

    if args.amp_check:
        print(f"device: {device} ({device_name(device)}); torch {torch.__version__}; autocast check, "
              f"{steps} steps logged one by one")
        with tempfile.TemporaryDirectory() as work:
            res = amp_check([n for n in names if n != "fid"], device, steps, work)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}; "
          f"{steps} timed steps after {warmup} warm-up steps")
    header = f"{'model':<16}{'size':>5}{'batch':>6}  {'variant':<7}{'ms/step':>10}{'img/s':>9}{'peak MB':>10}"
    results = {"device": device, "device_name": device_name(device), "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            if name == "fid":
                continue
            _, size, batch, _ = MODELS[name]
            data = make_data(size, args.n or batch * (warmup + steps + 1), work)
            print("\n" + header)
            res = {}
            for variant in [v for v in VARIANTS if v != ("bf16" if cuda else "fp32")]:  # fp32 is default on a CPU
                r = res[variant] = run_variant(name, variant, device, data, steps, warmup, work)
                r.pop("log", None)
                if "error" in r:
                    print(f"{name:<16}{size:>5}{batch:>6}  {variant:<7}  failed: {r['error']}")
                    continue
                print(f"{name:<16}{size:>5}{batch:>6}  {variant:<7}{r['ms_per_step']:>10.1f}"
                      f"{r['images_per_s']:>9.3g}{r['peak_mb']:>10.0f}", flush=True)
            other = "fp32" if cuda else "bf16"
            if all("error" not in r for r in res.values()):
                speedup = res[other]["ms_per_step"] / res["default"]["ms_per_step"]
                res[f"speedup_default_over_{other}"] = speedup
                print(f"{'':<16}default / {other}: {speedup:.2f}x images/s")
            results["models"][name] = res
    if "fid" in names:
        import bench_fid
        fid_n = args.fid_n or (500 if cuda else 16)
        print(f"\nFID features ({fid_n} images, 299 px):")
        r = bench_fid.run(device, fid_n, 50 if cuda else 8)
        results["models"]["fid"] = r
        print("  " + json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
