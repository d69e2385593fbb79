"""tests/bench_fid.py: Inception feature extraction, metrics.py against pytorch-fid, on the same
images and the same device; prints images/s and how far the features are apart.

    python tests/bench_fid.py --device cpu --n 64 --batch-size 8
    python tests/bench_fid.py --device cuda --n 2000 --batch-size 50
    python tests/bench_fid.py --frechet          # also: Frechet distance vs pytorch-fid's sqrtm

From Python (tests/bench.py does this): `bench_fid.run(device, n, batch_size) -> dict`.

Both networks get the same weights: random but well-scaled ones by default (speed does not depend
on the values; no download), or the release file with --weights. Without pytorch-fid installed it
times metrics.py alone (pytorch-fid is a test-only dependency). Both get the same uint8 images
(1 x 128 x 128, resized to 299 inside), pytorch-fid as its loader hands them over (float [0, 1],
three channels). The variants run in turns, best of --repeats passes after a warm-up batch, so a
busy machine disturbs them alike. On CUDA both run with TF32 off (metrics.py always does; without
it pytorch-fid's features would differ by ~1e-3 for that reason alone).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import metrics  # noqa: E402

IMAGE_SIZE = 128   # generated X-rays are 64..256 px; every image is resized to 299 anyway


def random_inception_state(seed=0):
    """A state dict in the release file's layout with values that keep activations sane
    (conv ~ N(0, 2/fan_in), BN around identity but not exactly, so eps and stats matter).
    tests/test_metrics.py loads the same weights into metrics.py and pytorch-fid."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, v in metrics.FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(v)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.1 * torch.randn(v.shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(v.shape, generator=g)
        elif key == "fc.weight":
            state[key] = torch.randn(v.shape, generator=g) / 2048 ** 0.5
        else:  # fc.bias
            state[key] = 0.1 * torch.randn(v.shape, generator=g)
    return state


def pytorch_fid_model(state, device):
    """pytorch-fid's InceptionV3 (pool3 block), its weight download answered with `state`;
    None when pytorch-fid is not installed."""
    try:
        import pytorch_fid.inception as pfi
    except ImportError:
        return None
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        return pfi.InceptionV3([3]).eval().to(device)
    finally:
        pfi.load_state_dict_from_url = original


def pytorch_fid_features(model, images, batch_size, device):
    """What pytorch-fid's get_activations does once its DataLoader has made float [0, 1] RGB."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].float().div(255).expand(-1, 3, -1, -1).to(device)
            out.append(model(batch)[0].squeeze(3).squeeze(2).cpu())
    return torch.cat(out).numpy()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def run(device="cpu", n=64, batch_size=50, weights=None, repeats=2, seed=0):
    """-> dict: images/s per variant, speed-ups, max |feature difference| against pytorch-fid, and
    the relative FID difference (first half of the images against the second half). Without
    pytorch-fid: metrics.py's images/s only, and "pytorch_fid": "not installed"."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)
    kind = "given" if weights else "random"
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        state = random_inception_state(seed)
    reference = pytorch_fid_model(state, device)
    with tempfile.TemporaryDirectory() as tmp:  # metrics.py reads weights from a file, as users do
        if kind == "random":
            weights = str(Path(tmp) / "random_inception.pth")
            torch.save(state, weights)
        model, network = metrics.load_inception(weights, device)
    variants = {}
    if reference is not None:
        variants["pytorch_fid"] = lambda imgs: pytorch_fid_features(reference, imgs, batch_size, device)
    variants["metrics"] = lambda imgs: metrics.inception_features(model, imgs, batch_size)[0]

    seconds = {name: [] for name in variants}
    features = {}
    with metrics.tf32_off():
        for name, fn in variants.items():      # warm-up: allocations, cuDNN autotuning, caches
            fn(images[:batch_size])
        for _ in range(repeats):
            for name, fn in variants.items():
                t, features[name] = timed(lambda: fn(images), device)
                seconds[name].append(t)

    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu, {torch.get_num_threads()} threads", "n": n, "batch_size": batch_size,
              "image_size": IMAGE_SIZE, "weights": kind,
              "images_per_s": {k: n / min(v) for k, v in seconds.items()},
              "images_per_s_median": {k: n / statistics.median(v) for k, v in seconds.items()},
              "network": network}
    if reference is None:
        result["pytorch_fid"] = "not installed"
        return result
    base, ours, half = features["pytorch_fid"], features["metrics"], n // 2
    result.update(max_abs_feature=float(np.abs(base).max()), max_abs_diff=float(np.abs(ours - base).max()),
                  speedup=result["images_per_s"]["metrics"] / result["images_per_s"]["pytorch_fid"])
    if half >= 2:  # the FID of the first half of the images against the second, from either's features
        fid_ref, fid = (metrics.frechet_distance(*metrics.feature_statistics(f[:half]),
                                                 *metrics.feature_statistics(f[half:])) for f in (base, ours))
        result["fid_rel_diff"] = abs(fid - fid_ref) / fid_ref
    return result


def frechet_timing(d=2048, sizes=(1000, 4096), seed=0):
    """Seconds for metrics.frechet_distance and pytorch-fid's calculate_frechet_distance (SciPy
    sqrtm) on statistics of synthetic d-dim features, N < d (singular) and N > d; and the values."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    g = np.random.default_rng(seed)
    mix = g.standard_normal((d, d)) * 0.05
    out = []
    for n in sizes:
        s1 = metrics.feature_statistics(np.abs(g.standard_normal((n, d)) @ mix))
        s2 = metrics.feature_statistics(np.abs(g.standard_normal((n, d))) * 1.1)
        t0 = time.perf_counter()
        ours = metrics.frechet_distance(*s1, *s2)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SciPy: sqrtm's `disp` is deprecated
            theirs = float(calculate_frechet_distance(*s1, *s2))
        t2 = time.perf_counter()
        out.append({"n": n, "d": d, "metrics_s": t1 - t0, "pytorch_fid_sqrtm_s": t2 - t1,
                    "fid": ours, "pytorch_fid": theirs, "rel_diff": abs(ours - theirs) / abs(theirs)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--n", type=int, default=64, help="images per pass")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per variant (the best counts)")
    p.add_argument("--weights", help="Inception weights file (default: random well-scaled weights)")
    p.add_argument("--frechet", action="store_true", help="also time the Frechet distance against SciPy sqrtm")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    r = run(args.device, args.n, args.batch_size, args.weights, args.repeats)
    print(f"feature extraction, {r['n']} images of {IMAGE_SIZE}x{IMAGE_SIZE} -> 299, batch {r['batch_size']}, "
          f"{r['device_name']} ({r['weights']} weights):")
    for name, ips in r["images_per_s"].items():
        line = f"  {name:<12} {ips:7.2f} images/s (median {r['images_per_s_median'][name]:.2f})"
        if name == "metrics" and "speedup" in r:
            line += (f"  x{r['speedup']:.2f}  max |diff| {r['max_abs_diff']:.2e} (features up to "
                     f"{r['max_abs_feature']:.2f})  FID rel diff {r.get('fid_rel_diff', float('nan')):.1e}")
        print(line)
    if "pytorch_fid" not in r["images_per_s"]:
        print("  (pytorch-fid is not installed: `pip install pytorch-fid==0.3.0` to compare with it)")
    if args.frechet:
        r["frechet"] = frechet_timing()
        for f in r["frechet"]:
            print(f"  Frechet distance, N={f['n']}, d={f['d']}: metrics.py {f['metrics_s']:.2f} s, "
                  f"pytorch-fid sqrtm {f['pytorch_fid_sqrtm_s']:.2f} s, FID {f['fid']:.6f} vs "
                  f"{f['pytorch_fid']:.6f} (rel {f['rel_diff']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
