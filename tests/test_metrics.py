"""Tests for metrics.py: against pytorch-fid and torch-fidelity (independent reference code, installed
as test oracles) and against closed forms, never against metrics.py's own earlier output.

The Inception runs at about 5 images/s at 299 px on a 2-core CPU, so the network sees a handful of
images, and plumbing tests resize to 75 px (the smallest input it takes). Random but well-scaled
weights stand in for the 95 MB release file (no network here); pytorch-fid gets the same ones
(its download is monkeypatched to return them).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import metrics
from bench_fid import random_inception_state  # conv ~ N(0, 2/fan_in), BN near identity (not exactly)

REPO = Path(__file__).resolve().parents[1]
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
from pytorch_fid import fid_score as pytorch_fid_score  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: E402


@pytest.fixture(scope="module")
def state():
    return random_inception_state()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def label(weights):
    """What every result must call these random weights: not the release file's name."""
    return f"custom weights w.pth sha256:{hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:8]}"


def pytorch_fid_net(state, resize_input=True):
    """pytorch-fid's own network (2x - 1, and the resize unless told not to) with these weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        return pytorch_fid_inception.InceptionV3([3], resize_input=resize_input).eval()


def write_pngs(folder, arrays):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    return folder


def smooth_images(n, seed, size=64):
    """n grayscale uint8 images with X-ray-like smooth structure: 8x8 noise upsampled bicubically."""
    g = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).resize((size, size), Image.BICUBIC))
            for _ in range(n)]


@pytest.fixture(scope="module")
def viral(tmp_path_factory):
    """A class folder of 8 one-channel 64 x 64 PNGs."""
    return str(write_pngs(tmp_path_factory.mktemp("data") / "viral", smooth_images(8, seed=0)))


@pytest.fixture
def small_inception(monkeypatch):
    """Resize to 75 px instead of 299 (~16x cheaper) in plumbing tests; the numbers themselves are
    checked against pytorch-fid at 299 px."""
    monkeypatch.setattr(metrics, "INCEPTION_SIZE", 75)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def expect_user_error(capsys, argv, *fragments):
    """metrics.main(argv) ends with one `error: <what> — <fix>` line and exit code 2."""
    with pytest.raises(SystemExit) as e:
        metrics.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[-1].startswith("error: ") and " — " in lines[-1], lines
    assert all(f in lines[-1] for f in fragments), lines[-1]
    return lines[-1]


# --- The network, its weights and the preprocessing, against pytorch-fid ------------------------

def test_state_dict_keys_and_shapes_are_pytorch_fids(state):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        reference = pytorch_fid_inception.fid_inception_v3().state_dict()
    ours = metrics.FIDInceptionV3().state_dict()
    assert len(ours) == 566 and list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_weights_files_load_strictly_and_are_labelled(state, weights, label, tmp_path):
    model, network = metrics.load_inception(weights)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert network == label                     # random weights are never called the release network
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) == 472              # torch-fidelity's converter writes this layout
    torch.save(no_counters, tmp_path / "472.pth")
    assert torch.equal(metrics.load_inception(str(tmp_path / "472.pth"))[0].fc.weight, state["fc.weight"])
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "wrong.pth")
    (tmp_path / "notes.txt").write_text("not a weights file")
    for path in ("wrong.pth", "notes.txt", "missing.pth"):
        with pytest.raises(metrics.UserError) as e:
            metrics.load_inception(str(tmp_path / path))
        message = str(e.value)
        assert path in message and "--weights" in message and "\n" not in message
        assert "weights_only" not in message    # torch.load's advice to load unsafely is cut off


def test_pool3_and_logits_match_pytorch_fid_without_resize(state):
    """Structure: 75 x 75 inputs straight into the blocks (pytorch-fid with resize_input=False)."""
    x = torch.rand(3, 3, 75, 75, generator=torch.Generator().manual_seed(0))
    model = metrics.FIDInceptionV3().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        reference = pytorch_fid_net(state, resize_input=False)(x)[0].flatten(1)  # it applies 2x - 1
        pool3, logits = model(2 * x - 1)
    assert (pool3 - reference).abs().max().item() <= 1e-5
    assert reference.abs().mean() > 0.05        # the random weights give non-trivial features
    torch.testing.assert_close(logits, reference @ state["fc.weight"].T, rtol=1e-5, atol=1e-5)


def test_preprocessing_is_pytorch_fids(tmp_path):
    """uint8 -> RGB -> /255 -> bilinear 299 (align_corners=False, no antialias) -> 2x - 1, bit for bit;
    from files, pytorch-fid's loader (Image.convert("RGB") + ToTensor) for L, RGB, P and RGBA."""
    rng = np.random.default_rng(0)
    gray = torch.from_numpy(rng.integers(0, 256, (2, 1, 40, 56), dtype=np.uint8))
    expected = 2 * F.interpolate(gray.float().div(255).repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear",
                                 align_corners=False) - 1
    assert torch.equal(metrics.preprocess(gray), expected)
    for mode in ("L", "RGB", "P", "RGBA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).convert(mode).save(path)
        theirs = pytorch_fid_score.ImagePathDataset([path], transforms=pytorch_fid_score.TF.ToTensor())[0]
        theirs = 2 * F.interpolate(theirs[None], size=(299, 299), mode="bilinear", align_corners=False) - 1
        assert torch.equal(metrics.preprocess(metrics.read_image(path)[None]), theirs), mode


def test_real_xray_jpegs_are_read_as_pytorch_fid_reads_them():
    """The folder reader on real X-rays (Kermany JPEGs, COVID collection JPEG/PNG), skipped without
    the sample: the same network input as pytorch-fid's loader, bit for bit."""
    sample = Path(os.environ.get("XRAY_SAMPLE") or "XRAY_SAMPLE is not set")
    if not (sample / "chest_xray").is_dir():
        pytest.skip("set XRAY_SAMPLE to a folder holding chest_xray/ and covid/ to run this")
    files = metrics.list_images(sample / "chest_xray" / "test" / "NORMAL")[:2] + metrics.list_images(
        sample / "covid" / "images")[:2]
    theirs = pytorch_fid_score.ImagePathDataset(files, transforms=pytorch_fid_score.TF.ToTensor())
    for i, path in enumerate(files):
        expected = 2 * F.interpolate(theirs[i][None], size=(299, 299), mode="bilinear", align_corners=False) - 1
        assert torch.equal(metrics.preprocess(metrics.read_image(path)[None]), expected), path


def test_folder_features_and_fid_match_pytorch_fid_end_to_end(state, weights, tmp_path):
    """Files of mixed sizes and modes at 299 px through both programs: the same pool3 features, and
    the same FID between two sets of them (images 0-1 vs 1-2: a small FID, sensitive to every
    feature). channels_last (~1.6x faster) moves the features by ~5e-6 and this FID by ~1e-6."""
    rng = np.random.default_rng(1)
    folder = write_pngs(tmp_path / "imgs", [rng.integers(0, 256, (64, 64), dtype=np.uint8),
                                            rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
                                            rng.integers(0, 256, (64, 64), dtype=np.uint8)])
    files = metrics.list_images(folder)
    reference = pytorch_fid_score.get_activations([str(f) for f in files], pytorch_fid_net(state), batch_size=1,
                                                  dims=2048, device="cpu", num_workers=0)
    ours, _ = metrics.inception_features(metrics.load_inception(weights)[0], files, batch_size=2)
    assert np.abs(ours - reference).max() <= 1e-5

    def fid(features):  # frechet_distance itself is checked against pytorch-fid's below
        return metrics.frechet_distance(*metrics.feature_statistics(features[:2]),
                                        *metrics.feature_statistics(features[1:]))
    assert fid(reference) > 0.1 and rel(fid(ours), fid(reference)) <= 1e-5


# --- FID, IS, KID, precision/recall, memorization: references and closed forms ------------------

def random_stats(n, d, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)) @ g.standard_normal((d, d)) * 0.3 + g.standard_normal(d)
    return metrics.feature_statistics(x)


@pytest.mark.parametrize("n", [300, 20])  # N > d (full rank) and N < d (singular covariances)
def test_frechet_distance_matches_pytorch_fid(n):
    (mu1, s1), (mu2, s2) = random_stats(n, 64, 0), random_stats(n, 64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # SciPy's deprecation of sqrtm(disp=...)
        reference = pytorch_fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert rel(metrics.frechet_distance(mu1, s1, mu2, s2), reference) <= 1e-6
    assert rel(metrics.frechet_distance(mu2, s2, mu1, s1), reference) <= 1e-6   # symmetric


def test_frechet_distance_closed_forms():
    mu1, s1 = random_stats(100, 32, 3)
    mu2 = mu1 + np.linspace(-1, 1, 32)
    # Equal covariances: Tr(S + S - 2 (S S)^(1/2)) = 0, so FID is the squared mean difference.
    assert metrics.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * np.trace(s1)   # FID(x, x) = 0
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.arange(1.0, 9.0), np.arange(8.0, 0.0, -1)
    assert metrics.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    # Singular covariances (N < d), exactly: Tr((S1 S2)^(1/2)) is the nuclear norm of X1 X2^T / (N - 1)
    # for centred features X (S1 S2 = X1^T (X1 X2^T) X2 / (N - 1)^2 shares its eigenvalues with C C^T).
    g = np.random.default_rng(4)
    x1, x2 = g.standard_normal((10, 256)), 1.2 * g.standard_normal((10, 256)) + 0.1
    (m1, s1), (m2, s2) = metrics.feature_statistics(x1), metrics.feature_statistics(x2)
    nuclear = np.linalg.svd((x1 - m1) @ (x2 - m2).T / 9, compute_uv=False).sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)
    # Zero covariance (a single image): only the mean term and Tr(S2) remain.
    assert metrics.frechet_distance(m1, np.zeros_like(s1), m2, s2) == pytest.approx(
        np.sum((m1 - m2) ** 2) + np.trace(s2), rel=1e-12)
    with pytest.raises(ValueError):
        metrics.frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(503, 1008, generator=torch.Generator().manual_seed(0)) * 3
    for shuffle in (True, False):
        mean, std = metrics.inception_score(logits.numpy(), shuffle=shuffle)
        reference = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
        assert rel(mean, reference["inception_score_mean"]) <= 1e-9
        assert rel(std, reference["inception_score_std"]) <= 1e-6


def test_inception_score_closed_forms():
    k, per_class, confident = 10, 20, 60.0
    # Confident predictions spread evenly over K classes: KL = log K in every split -> IS = K
    # (classes cycle 0..K-1 in file order, so unshuffled every split holds each class twice).
    logits = np.zeros((k * per_class, 1008))
    logits[np.arange(k * per_class), np.arange(k * per_class) % k] = confident
    mean, std = metrics.inception_score(logits, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1))    # p(y|x) = p(y): IS = 1
    assert metrics.inception_score(same) == pytest.approx((1.0, 0.0), abs=1e-12)
    # IS = exp(mutual information) <= images per split: 3 confident, distinct images per split give 3.
    distinct = np.zeros((30, 1008))
    distinct[np.arange(30), np.arange(30)] = confident
    assert metrics.inception_score(distinct, shuffle=False)[0] == pytest.approx(3.0, rel=1e-6)
    assert metrics.inception_score(np.random.default_rng(1).standard_normal((30, 1008)) * 20)[0] <= 3.0 + 1e-9


def test_kid_matches_torch_fidelity():
    """Same subsets (same seed and draw order). torch-fidelity computes in the features' dtype: in
    float64 it must agree to rounding; in float32 its kernel sums lose ~1e-5 to cancellation."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(130, 256, generator=g).abs(), torch.randn(110, 256, generator=g).abs() * 1.05
    mean, std, m = metrics.kernel_inception_distance(real.numpy(), fake.numpy(), subsets=30)
    assert m == 110                             # capped at the smaller set
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        reference = kid_features_to_metric(real.to(dtype), fake.to(dtype), kid_subsets=30, kid_subset_size=110,
                                           rng_seed=2020, verbose=False)
        assert rel(mean, reference["kernel_inception_distance_mean"]) <= tolerance
        assert rel(std, reference["kernel_inception_distance_std"]) <= tolerance


def test_precision_recall_matches_torch_fidelity_and_closed_forms():
    g = np.random.default_rng(0)
    real = g.standard_normal((200, 16))
    fake = np.vstack([real[:10] + 0.01 * g.standard_normal((10, 16))] * 20)   # a mode-collapsed "GAN"
    p, r = metrics.precision_recall(real, fake)
    reference = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                       verbose=False)
    assert (p, r) == pytest.approx((reference["precision"], reference["recall"]), abs=1e-12)
    assert p == 1.0 and r < 0.2                 # realistic but not diverse: what FID hides
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_memorization_flags_planted_copies_in_feature_arrays():
    g = np.random.default_rng(0)
    train, held, fresh = g.standard_normal((300, 32)), g.standard_normal((100, 32)), g.standard_normal((40, 32))
    copies = train[[5, 17, 99]] + 1e-3 * g.standard_normal((3, 32))
    for reference in (held, None):              # held-out images, and leave-one-out on train
        r = metrics.memorization(train, np.vstack([fresh, copies]), reference)
        assert r["copies"][40:].all() and list(r["index"][40:]) == [5, 17, 99]
        assert r["copies"][:40].mean() <= 0.1   # about 1% by chance


# --- The API the model scripts call, and the command line --------------------------------------

def test_evaluator_scores_tensors_and_caches_real_features(weights, label, viral, small_inception, monkeypatch):
    real = torch.stack([metrics.read_image(f) for f in metrics.list_images(viral)[:5]])   # (5, 1, 64, 64)
    ev = metrics.Evaluator(real, weights=weights, device="cpu", batch_size=4)
    calls, extract = [], metrics.inception_features
    monkeypatch.setattr(metrics, "inception_features", lambda m, x, b: calls.append(len(x)) or extract(m, x, b))
    with pytest.warns(UserWarning, match="N_real=5, N_fake=5"):
        scores = ev.score(real)                 # the real set against itself
    assert set(scores) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "n_real", "n_fake", "network"}
    assert scores["n_real"] == scores["n_fake"] == 5 and scores["network"] == label
    assert abs(scores["fid"]) < 1e-6 * np.trace(ev.sigma)     # FID(x, x) = 0
    assert all(isinstance(scores[k], float) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert calls == [5]                         # only the fakes went through the network
    with pytest.warns(UserWarning, match="N_real=5, N_fake=6"):
        ev.score(torch.cat([real, real[:1]]).expand(-1, 3, -1, -1).contiguous())   # RGB fakes too
    with pytest.raises(ValueError, match="uint8"):
        ev.score(real.float())
    assert metrics.Evaluator(viral, weights=weights).n_real == 8          # a folder of images


def test_offline_download_is_a_one_line_error_naming_url_and_flag(monkeypatch, tmp_path, capsys, viral):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))     # an empty hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(metrics.UserError) as e:
        metrics.Evaluator(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert metrics.FID_WEIGHTS_URL in str(e.value) and "--weights" in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    line = expect_user_error(capsys, ["is", viral, "--json"], "cannot load", "URLError", metrics.FID_WEIGHTS_URL)
    assert "--fid-weights" in line
    assert capsys.readouterr().out == ""        # torch.hub's "Downloading" line is not in front of --json output


def test_download_goes_to_the_hub_cache_and_is_hash_checked(monkeypatch, tmp_path, weights, state):
    """The first-use download, offline: a stand-in download_url_to_file copies our weights file, and
    the URL is renamed so that its hash suffix is that file's SHA-256 prefix."""
    prefix = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:8]
    name = f"pt_inception-2015-12-05-{prefix}.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(metrics, "FID_WEIGHTS_URL", f"https://example.invalid/{name}")
    monkeypatch.setattr(metrics, "RELEASE_SHA256", prefix)
    downloads = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, *args, **kwargs: downloads.append(url) or shutil.copy(weights, dst))
    model, network = metrics.load_inception()
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    assert cached.is_file() and len(downloads) == 1
    assert network == metrics.NETWORK           # the hash is the release's: the official name
    assert torch.equal(model.fc.weight, state["fc.weight"])
    metrics.load_inception()
    assert len(downloads) == 1                  # the second time it comes from the cache
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")   # damage the cached file
    with pytest.raises(metrics.UserError, match="damaged"):
        metrics.load_inception()


def test_cli_bad_inputs_exit_2_with_one_line(weights, viral, tmp_path, capsys):
    w = ["--weights", weights]
    expect_user_error(capsys, ["fid", str(tmp_path / "missing"), viral] + w, "is not a folder", "prep.py synthetic")
    (tmp_path / "empty").mkdir()
    expect_user_error(capsys, ["is", str(tmp_path / "empty")] + w, "no images")
    expect_user_error(capsys, ["fid", str(Path(viral).parent), viral] + w, "subfolders: viral")
    broken = tmp_path / "broken"
    shutil.copytree(viral, broken)
    (broken / "zz_bad.png").write_bytes(b"this is not a png")
    expect_user_error(capsys, ["is", str(broken)] + w, "cannot read image", "zz_bad.png")
    expect_user_error(capsys, ["fid", str(tmp_path / "x.npz"), viral] + w, "cannot read statistics", "x.npz")
    expect_user_error(capsys, ["kid", str(tmp_path / "x.npz"), viral] + w, "is not a folder")
    expect_user_error(capsys, ["is", viral, "--weights", str(tmp_path / "nope.pth")], "nope.pth", "--weights")
    expect_user_error(capsys, ["fid", viral] + w, "--save-stats")
    expect_user_error(capsys, ["nn", viral, viral] + w, "--out")
    for argv in (["is", viral, "--splits", "0"], ["kid", viral, viral, "--subset-size", "1"],
                 ["kid", viral, viral, "--subsets", "0"], ["fid", viral, viral, "--batch-size", "0"]):
        expect_user_error(capsys, argv + w, argv[-2], "is not in [")
    expect_user_error(capsys, ["pr", viral, viral, "--k", "x"] + w, "--k", "invalid number value")


def test_cli_error_as_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "metrics.py", "fid", str(tmp_path / "nope"), str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_stats_files_round_trip_with_pytorch_fid(weights, label, state, viral, tmp_path, capsys):
    """Our --save-stats file is read by pytorch-fid, and pytorch-fid's by us."""
    ours = tmp_path / "ours.npz"
    r = metrics.main(["fid", viral, "--save-stats", str(ours), "--weights", weights, "--json"])
    mu, sigma = pytorch_fid_score.compute_statistics_of_path(str(ours), None, 1, 2048, "cpu")
    assert r["n_real"] == 8 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert r["network"] == label and metrics.load_stats(ours)[3] == label       # the file names its network
    theirs = tmp_path / "theirs.npz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        pytorch_fid_score.save_fid_stats([viral, str(theirs)], 8, "cpu", 2048, num_workers=0)
    mu_t, sigma_t, n, network = metrics.load_stats(theirs)
    assert n is None and network is None        # pytorch-fid stores neither N nor the network
    np.testing.assert_allclose(mu, mu_t, atol=1e-5)   # same images, same weights
    np.testing.assert_allclose(sigma, sigma_t, atol=1e-5)
    capsys.readouterr()
    r = metrics.main(["fid", str(theirs), str(ours), "--json"])   # two .npz files: no network needed
    assert abs(r["fid"]) < 1e-4 and r["n_fake"] == 8
    err = capsys.readouterr().err
    assert "N_real=unknown" in err              # N of a pytorch-fid file is reported as unknown
    # A pytorch-fid file is taken to hold the release network's statistics, so against our
    # random-weights file the FID is flagged (here the weights happen to be the same).
    mismatch = [line for line in err.splitlines() if "different feature networks" in line]
    assert len(mismatch) == 1 and mismatch[0].startswith("warning: ") and label in mismatch[0]
    assert r["network"] == f"{metrics.NETWORK} (REAL) vs {label} (FAKE)"
    r = metrics.main(["fid", str(ours), str(ours), "--json"])
    assert r["fid"] == pytest.approx(0, abs=1e-6) and r["network"] == label
    assert "different feature networks" not in capsys.readouterr().err


def test_cli_is_kid_pr_json_name_the_weights(weights, label, tmp_path, capsys, small_inception):
    """The other three commands end to end on 4 tiny images, with the network's honest label."""
    folder = str(write_pngs(tmp_path / "imgs", smooth_images(4, seed=3, size=32)))
    w = ["--weights", weights, "--json", "--batch-size", "4"]
    r = metrics.main(["is", folder] + w)
    assert r["network"] == label and r["n_fake"] == 4 and r["splits"] == 4
    assert r["is_mean"] == pytest.approx(1.0) and r["is_std"] == pytest.approx(0.0)   # one image per split
    r = metrics.main(["kid", folder, folder, "--subsets", "5"] + w)
    assert r["network"] == label and r["subset_size"] == 4 and r["kid_std"] < 1e-12   # every subset: all 4
    r = metrics.main(["pr", folder, folder] + w)
    assert r["network"] == label and (r["precision"], r["recall"]) == (1.0, 1.0)
    out, err = capsys.readouterr()
    assert out.count(f'"network": "{label}"') == 3
    assert "warning: IS from N=4 in 4 splits" in err   # honest about N


def test_memorization_cli_finds_planted_copies(weights, viral, tmp_path, capsys, small_inception, monkeypatch):
    """Fakes = 3 training images with +-1 grey-level noise and 3 new images: the copies are flagged
    in both spaces, matched to their sources and head the picture, which lands in --out."""
    train = metrics.list_images(viral)
    g = np.random.default_rng(0)
    fakes = [np.clip(np.asarray(Image.open(train[i]), np.int16) + g.integers(-1, 2, (64, 64)), 0, 255).astype(np.uint8)
             for i in (1, 4, 6)] + smooth_images(3, seed=1)
    fake_dir = write_pngs(tmp_path / "fake", fakes)   # img_000..002 copy train[1], train[4], train[6]
    held = write_pngs(tmp_path / "held", smooth_images(4, seed=2))
    monkeypatch.chdir(tmp_path)
    r = metrics.main(["nn", viral, str(fake_dir), "--held-out", str(held), "--out", str(tmp_path / "nn"),
                      "--weights", weights, "--json"])
    pairs = r["closest_pairs"]
    assert {Path(p["fake"]).name for p in pairs[:3]} == {"img_000.png", "img_001.png", "img_002.png"}
    for p in pairs[:3]:
        source = train[(1, 4, 6)[int(Path(p["fake"]).stem[-1])]]
        assert p["near_copy"] and p["train_feature"] == p["train_pixel"] == str(source) and p["pixel_rms"] < 1 / 255
    assert r["near_copies_both"] >= 3 and r["feature"]["near_copies"] >= 3
    assert Image.open(tmp_path / "nn" / "nn_pairs.png").size[0] == 3 * metrics.GRID_CELL + 4 * 4
    assert not list(tmp_path.glob("*.png"))     # nothing in the current folder


def test_tf32_is_switched_off_and_restored():
    """The CUDA path, checked on the flags alone (it runs the same on a CPU)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with metrics.tf32_off():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 == before[0] and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[1]
