"""Tests for metrics.py: against pytorch-fid and torch-fidelity (independent reference code) and
against closed forms, never against metrics.py's own earlier output.

The Inception runs at about 5 images/s at 299 px on a 2-core CPU, so the network sees a handful
of images, and pure structure checks feed 75x75 inputs with no resize (the smallest size the
network accepts). Random but well-scaled weights stand in for the 95 MB release file (no
network here): they are loaded into both metrics.py and pytorch-fid (whose download is
monkeypatched to return them).
"""
import shutil
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from bench_fid import random_inception_state  # random well-scaled weights in the release layout

REPO = Path(__file__).resolve().parents[1]
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
from pytorch_fid import fid_score as pytorch_fid_score  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Fixtures: random well-scaled weights (bench_fid.random_inception_state: conv ~ N(0, 2/fan_in), BN
# around identity but not exactly, so eps and the statistics matter), pytorch-fid's network with
# them, small image folders
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state():
    return random_inception_state()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def pfid(state):
    """pytorch-fid's own network (resize and 2x-1 inside) holding the same random weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        return pytorch_fid_inception.InceptionV3([3]).eval()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """prep.py's phantom set: train/{normal,bacterial,viral}/ 8 images of 64x64 each."""
    import prep
    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=8, size=64, seed=0)
    return out


@pytest.fixture
def small_inception(monkeypatch):
    """Plumbing tests (API, CLI, labels, memorization) resize to 75 px, the smallest input the
    network takes, instead of 299: ~16x cheaper. Everything else is unchanged; the numbers
    themselves are checked against pytorch-fid at 299 px above."""
    monkeypatch.setattr(metrics, "INCEPTION_SIZE", 75)


def write_pngs(folder, arrays):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    return folder


def pytorch_fid_features(files, model):
    """pytorch-fid's own loading (convert RGB, ToTensor) and extraction, one image per batch
    (its DataLoader cannot batch images of different sizes)."""
    return pytorch_fid_score.get_activations([str(f) for f in files], model, batch_size=1, dims=2048,
                                             device="cpu", num_workers=0)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ---------------------------------------------------------------------------------------------
# The network and the preprocessing against pytorch-fid
# ---------------------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_are_pytorch_fids(state):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        reference = pytorch_fid_inception.fid_inception_v3().state_dict()
    ours = metrics.FIDInceptionV3().state_dict()
    assert len(ours) == 566 and list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_release_layouts_load_strictly(state, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(state, full)                      # 566 keys
    model, source, network = metrics.load_fid_inception(str(full))
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert "NOT the pytorch-fid release file" in source  # random weights: the hash says so
    assert network == f"custom weights full.pth sha256:{metrics.sha256_of(full)[:8]}"   # and so does the label
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) == 472             # torch-fidelity's converter writes this
    torch.save(no_counters, tmp_path / "472.pth")
    model, _, _ = metrics.load_fid_inception(str(tmp_path / "472.pth"))
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_pool3_and_logits_match_pytorch_fid_without_resize(state, pfid):
    """Structure: 75x75 inputs straight into the blocks (pytorch-fid with resize_input=False)."""
    x = torch.rand(3, 3, 75, 75, generator=torch.Generator().manual_seed(0))
    model = metrics.FIDInceptionV3().eval()
    model.load_state_dict(state)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        reference_net = pytorch_fid_inception.InceptionV3([3], resize_input=False).eval()
    with torch.no_grad():
        reference = reference_net(x)[0].flatten(1)   # it applies 2x - 1 itself
        pool3, logits = model(2 * x - 1)
    assert (pool3 - reference).abs().max().item() <= 1e-5
    assert reference.abs().mean() > 0.05         # the random weights give non-trivial features
    torch.testing.assert_close(logits, reference @ state["fc.weight"].T, rtol=1e-5, atol=1e-5)


def test_preprocessing_is_pytorch_fids(tmp_path):
    """uint8 -> /255 -> bilinear 299 (align_corners=False, no antialias) -> 2x-1, gray -> RGB."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 1, 40, 56), dtype=np.uint8)
    ours = metrics.preprocess(torch.from_numpy(gray))
    x = torch.from_numpy(gray).float().div(255).repeat(1, 3, 1, 1)
    expected = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert ours.shape == (2, 3, 299, 299) and torch.equal(ours, expected)
    # From files: pytorch-fid's loader (Image.convert("RGB") + ToTensor) vs ours, for L, RGB, P, RGBA.
    paths = []
    for mode in ("L", "RGB", "P", "RGBA"):
        img = Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).convert(mode)
        paths.append(tmp_path / f"{mode}.png")
        img.save(paths[-1])
    dataset = pytorch_fid_score.ImagePathDataset(paths, transforms=pytorch_fid_score.TF.ToTensor())
    for i, path in enumerate(paths):
        theirs = 2 * torch.nn.functional.interpolate(dataset[i][None], size=(299, 299), mode="bilinear",
                                                     align_corners=False) - 1
        assert torch.equal(metrics.preprocess([metrics.read_image(path)]), theirs), path


def test_folder_features_and_fid_match_pytorch_fid_end_to_end(weights, pfid, tmp_path):
    """Files of mixed sizes and modes at 299 px through both programs: same pool3 features, and
    the same FID between two sets of them (images 0-1 vs 1-2: a small FID, ~1.6, so sensitive to
    every feature; an FID against a far-away set would hide the differences). Without
    channels_last the features are pytorch-fid's bit for bit; with it (the default, ~1.6x
    faster) they differ by ~5e-6, which moves this tiny FID by ~2e-6 relative (tests/bench_fid.py:
    ~5e-7 at 8 vs 8 images)."""
    rng = np.random.default_rng(1)
    folder = write_pngs(tmp_path / "imgs", [rng.integers(0, 256, (64, 64), dtype=np.uint8),
                                            rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
                                            rng.integers(0, 256, (64, 64), dtype=np.uint8)])
    files = metrics.list_images(folder)
    reference = pytorch_fid_features(files, pfid)
    exact, _ = metrics.InceptionFeatures(weights, "cpu", batch_size=2, channels_last=False)(files)
    fast, _ = metrics.InceptionFeatures(weights, "cpu", batch_size=2, channels_last=True)(files)
    assert np.abs(exact - reference).max() <= 1e-5
    assert np.abs(fast - reference).max() <= 1e-5
    def fid(features):   # frechet_distance itself is checked against pytorch-fid's below
        return metrics.frechet_distance(*metrics.feature_statistics(features[:2]),
                                        *metrics.feature_statistics(features[1:]))
    assert fid(reference) > 0.1
    assert rel(fid(exact), fid(reference)) <= 1e-6
    assert rel(fid(fast), fid(reference)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# FID, IS, KID, precision/recall: references and closed forms
# ---------------------------------------------------------------------------------------------

def random_stats(n, d, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)) @ g.standard_normal((d, d)) * 0.3 + g.standard_normal(d)
    return metrics.feature_statistics(x)


@pytest.mark.parametrize("n", [300, 20])  # N > d (full rank) and N < d (singular covariances)
def test_frechet_distance_matches_pytorch_fid(n):
    mu1, s1 = random_stats(n, 64, 0)
    mu2, s2 = random_stats(n, 64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # SciPy's deprecation of sqrtm(disp=...)
        reference = pytorch_fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert rel(metrics.frechet_distance(mu1, s1, mu2, s2), reference) <= 1e-6


def test_frechet_distance_closed_forms():
    mu1, s1 = random_stats(100, 32, 3)
    mu2 = mu1 + np.linspace(-1, 1, 32)
    # Equal covariances: Tr(S + S - 2 (S S)^(1/2)) = 0, so FID is the squared mean difference.
    assert metrics.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * np.trace(s1)   # FID(x, x) = 0
    # Commuting covariances: diagonal ones give sum (sqrt(a) - sqrt(b))^2.
    a, b = np.arange(1.0, 9.0), np.arange(8.0, 0.0, -1)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(expected)
    # Singular covariances (N < d), exactly: Tr((S1 S2)^(1/2)) is the nuclear norm of X1 X2^T / (N - 1)
    # for centred features X (S1 S2 = X1^T (X1 X2^T) X2 / (N - 1)^2 shares its eigenvalues with C C^T).
    g = np.random.default_rng(4)
    x1, x2 = g.standard_normal((10, 256)), 1.2 * g.standard_normal((10, 256)) + 0.1
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    (m1, s1), (m2, s2) = metrics.feature_statistics(x1), metrics.feature_statistics(x2)
    nuclear = np.linalg.svd(c1 @ c2.T / 9, compute_uv=False).sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)
    # One image per set (zero covariance): only the mean term and Tr(S2) remain.
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
    # Confident predictions spread evenly over K classes: KL = log K in every split -> IS = K.
    # (Classes cycle 0..K-1 in file order, so without the shuffle every split holds each class twice.)
    logits = np.zeros((k * per_class, 1008))
    logits[np.arange(k * per_class), np.arange(k * per_class) % k] = confident
    mean, std = metrics.inception_score(logits, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    # Identical predictions: p(y|x) = p(y), KL = 0 -> IS = 1.
    same = np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1))
    assert metrics.inception_score(same) == pytest.approx((1.0, 0.0), abs=1e-12)
    # IS = exp(mutual information) <= images per split: 3 perfectly confident, distinct images give 3.
    distinct = np.zeros((30, 1008))
    distinct[np.arange(30), np.arange(30)] = confident
    assert metrics.inception_score(distinct, shuffle=False)[0] == pytest.approx(3.0, rel=1e-6)
    spread = np.random.default_rng(1).standard_normal((30, 1008)) * 20
    assert metrics.inception_score(spread)[0] <= 3.0 + 1e-9


def test_kid_matches_torch_fidelity():
    """Same subsets (same seed, same draw order). torch-fidelity computes in the features' dtype:
    fed float64 it must agree to rounding; fed float32 (its usual input) the kernel sums lose
    ~1e-5 of the MMD to cancellation, so that comparison is looser."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(130, 256, generator=g).abs()
    fake = torch.randn(110, 256, generator=g).abs() * 1.05
    mean, std, m = metrics.kernel_inception_distance(real.numpy(), fake.numpy(), subsets=30)  # m capped at 110
    assert m == 110
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        reference = kid_features_to_metric(real.to(dtype), fake.to(dtype), kid_subsets=30, kid_subset_size=110,
                                           rng_seed=2020, verbose=False)
        assert rel(mean, reference["kernel_inception_distance_mean"]) <= tolerance
        assert rel(std, reference["kernel_inception_distance_std"]) <= tolerance


def test_precision_recall_matches_torch_fidelity_and_closed_forms():
    g = np.random.default_rng(0)
    real = g.standard_normal((200, 16))
    collapsed = real[:10] + 0.01 * g.standard_normal((10, 16))   # a mode-collapsed "GAN"
    fake = np.vstack([collapsed] * 20)
    p, r = metrics.precision_recall(real, fake)
    reference = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                       verbose=False)
    assert (p, r) == pytest.approx((reference["precision"], reference["recall"]), abs=1e-12)
    assert p == 1.0 and r < 0.2                  # realistic but not diverse: what FID hides
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_memorization_flags_planted_copies_in_feature_arrays():
    g = np.random.default_rng(0)
    train, held = g.standard_normal((300, 32)), g.standard_normal((100, 32))
    fresh = g.standard_normal((40, 32))
    copies = train[[5, 17, 99]] + 1e-3 * g.standard_normal((3, 32))
    for reference in (held, None):               # held-out, and leave-one-out on train
        r = metrics.memorization(train, np.vstack([fresh, copies]), reference)
        assert r["copies"][40:].all() and list(r["index"][40:]) == [5, 17, 99]
        assert r["copies"][:40].mean() <= 0.1    # about 1% by chance


# ---------------------------------------------------------------------------------------------
# The API the model scripts call, and the command line
# ---------------------------------------------------------------------------------------------

def test_evaluator_scores_tensors_and_caches_real_features(weights, synth, small_inception):
    real_files = metrics.list_images(synth / "train" / "viral")[:5]
    real = torch.stack([metrics.read_image(f) for f in real_files])           # (5, 1, 64, 64) uint8
    ev = metrics.Evaluator(real, weights=weights, device="cpu", batch_size=4)
    calls = []
    extract = ev.features
    ev.features = lambda images: calls.append(len(images)) or extract(images)
    with pytest.warns(UserWarning, match="2048"):
        scores = ev.score(real)                  # the real set against itself
    assert set(scores) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "n_real", "n_fake", "network"}
    label = f"custom weights w.pth sha256:{metrics.sha256_of(weights)[:8]}"   # not the release file's name
    assert scores["n_real"] == scores["n_fake"] == 5 and scores["network"] == label
    assert abs(scores["fid"]) < 1e-6 * np.trace(ev.sigma)
    assert all(isinstance(scores[k], float) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert calls == [5]                          # only the fakes went through the network
    # The small-N warning looks at both sides: here only the 5 real images are below the limit.
    ev._warned = False
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="N_real=5, N_fake=6"):
        mp.setattr(metrics, "FID_MIN_N", 6)
        ev.score(torch.cat([real, real[:1]]))
    # A folder and a .npz give the same real statistics; KID needs features, so NaN from a .npz.
    from_folder = metrics.Evaluator(synth / "train" / "viral", weights=weights)
    assert from_folder.n_real == 8
    stats = synth / "viral.npz"
    metrics.save_stats(stats, from_folder.mu, from_folder.sigma, from_folder.n_real, from_folder.network)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # same network on both sides: no warning
        from_stats = metrics.Evaluator(str(stats), weights=weights)
    np.testing.assert_array_equal(from_stats.sigma, from_folder.sigma)
    assert from_stats.network == label
    # Statistics of another network (here: labelled as the release file) against these weights.
    metrics.save_stats(synth / "official.npz", from_folder.mu, from_folder.sigma, 8, metrics.NETWORK)
    with pytest.warns(UserWarning, match="different feature networks") as record:
        mixed = metrics.Evaluator(str(synth / "official.npz"), weights=weights)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert mixed.network == f"{metrics.NETWORK} (REAL) vs {label} (FAKE)"
    fake = torch.stack([metrics.read_image(f) for f in real_files[:3]]).expand(-1, 3, -1, -1).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = from_stats.score(fake)               # 3-channel fakes work too
    assert np.isnan(s["kid_mean"]) and np.isfinite(s["fid"]) and s["n_real"] == 8
    with pytest.raises(ValueError, match="uint8"):
        ev.score(real.float())


def test_offline_download_is_a_one_line_error_naming_url_and_flag(monkeypatch, tmp_path, capsys, synth):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # an empty hub cache
    monkeypatch.delenv("FID_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(metrics.WeightsError) as e:
        metrics.Evaluator(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    message = str(e.value)
    assert metrics.FID_WEIGHTS_URL in message and "\n" not in message
    assert all(name in message for name in ("--weights", "--fid-weights", "FID_WEIGHTS=PATH"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        metrics.main(["is", str(synth / "train" / "viral"), "--json"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""   # no "Downloading ..." line in front of --json output
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot download") and metrics.FID_WEIGHTS_URL in err


def test_weights_from_the_environment_variable(monkeypatch, weights, tmp_path, capsys, synth):
    monkeypatch.setenv("FID_WEIGHTS", weights)
    model, source, network = metrics.load_fid_inception()
    assert weights in source and network.startswith("custom weights w.pth")
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "missing.pth"))
    expect_user_error(capsys, ["is", str(synth / "train" / "viral")], "missing.pth (from $FID_WEIGHTS) not found")


def test_download_goes_to_the_hub_cache_and_is_hash_checked(monkeypatch, tmp_path, weights, state):
    """The first-use download, offline: a stand-in download_url_to_file copies our weights file.
    The URL is renamed so that its hash suffix is that file's SHA-256 prefix."""
    prefix = metrics.sha256_of(weights)[:8]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    monkeypatch.setattr(metrics, "FID_WEIGHTS_URL", f"https://example.invalid/pt_inception-2015-12-05-{prefix}.pth")
    monkeypatch.setattr(metrics, "FID_WEIGHTS_SHA256_PREFIX", prefix)
    downloads = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, *args, **kwargs: downloads.append(url) or shutil.copy(weights, dst))
    model, source, network = metrics.load_fid_inception()
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / f"pt_inception-2015-12-05-{prefix}.pth"
    assert cached.is_file() and str(cached) in source and len(downloads) == 1
    assert network == metrics.NETWORK            # the hash matches the release's: the official name
    assert torch.equal(model.fc.weight, state["fc.weight"])
    metrics.load_fid_inception()
    assert len(downloads) == 1                   # the second time it comes from the cache
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")   # damage the cached file
    with pytest.raises(metrics.WeightsError, match="damaged"):
        metrics.load_fid_inception()


def expect_user_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        metrics.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert lines[-1].startswith("error: ") and " — " in lines[-1], lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_cli_bad_inputs_exit_2_with_one_line(weights, synth, tmp_path, capsys):
    viral = str(synth / "train" / "viral")
    w = ["--weights", weights]
    expect_user_error(capsys, ["fid", str(tmp_path / "missing"), viral] + w, "does not exist", "prep.py synthetic")
    (tmp_path / "empty").mkdir()
    expect_user_error(capsys, ["is", str(tmp_path / "empty")] + w, "no images")
    expect_user_error(capsys, ["fid", str(synth / "train"), viral] + w, "subfolders", "--recursive")
    broken = tmp_path / "broken"
    shutil.copytree(viral, broken)
    (broken / "zz_bad.png").write_bytes(b"this is not a png")
    expect_user_error(capsys, ["is", str(broken)] + w, "cannot read image", "zz_bad.png")
    expect_user_error(capsys, ["kid", str(tmp_path / "x.npz"), viral] + w, "statistics file")
    expect_user_error(capsys, ["is", viral, "--weights", str(tmp_path / "nope.pth")], "not found", "--weights")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "wrong.pth")
    expect_user_error(capsys, ["is", viral, "--weights", str(tmp_path / "wrong.pth")], "not the FID Inception")
    expect_user_error(capsys, ["fid", viral] + w, "--save-stats")
    (tmp_path / "notes.txt").write_text("not a weights file")
    expect_user_error(capsys, ["is", viral, "--weights", str(tmp_path / "notes.txt")], "cannot read", "--weights")
    with pytest.raises(metrics.WeightsError) as e:   # torch.load's advice to set weights_only=False is cut off
        metrics.load_fid_inception(str(tmp_path / "notes.txt"))
    assert "weights_only" not in str(e.value)
    for argv, flag in ((["is", viral, "--splits", "0"], "--splits 0"), (["kid", viral, viral, "--subset-size", "1"],
                       "--subset-size 1"), (["kid", viral, viral, "--subsets", "0"], "--subsets 0"),
                       (["pr", viral, viral, "--k", "0"], "--k 0"), (["nn", viral, viral, "--workers", "0"],
                       "--workers 0"), (["fid", viral, viral, "--batch-size", "0"], "--batch-size 0")):
        expect_user_error(capsys, argv + w, flag, "too small")


def test_cli_error_as_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "metrics.py", "fid", str(tmp_path / "nope"), str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_stats_files_round_trip_with_pytorch_fid(weights, state, synth, tmp_path, capsys):
    """Our --save-stats file is read by pytorch-fid, and pytorch-fid's is read by us."""
    viral = synth / "train" / "viral"
    ours = tmp_path / "ours.npz"
    r = metrics.main(["fid", str(viral), "--save-stats", str(ours), "--weights", weights, "--json"])
    mu, sigma = pytorch_fid_score.compute_statistics_of_path(str(ours), None, 1, 2048, "cpu")
    assert r["n_real"] == 8 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    label = f"custom weights w.pth sha256:{metrics.sha256_of(weights)[:8]}"
    assert r["network"] == label and metrics.load_stats(ours)[3] == label   # the file says which network
    theirs = tmp_path / "theirs.npz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        pytorch_fid_score.save_fid_stats([str(viral), str(theirs)], 8, "cpu", 2048, num_workers=0)
    mu_t, sigma_t, n, network = metrics.load_stats(theirs)
    assert n is None and network is None          # pytorch-fid stores neither N nor the network
    np.testing.assert_allclose(mu, mu_t, atol=1e-5)   # same images, same weights
    np.testing.assert_allclose(sigma, sigma_t, atol=1e-5)
    capsys.readouterr()
    r = metrics.main(["fid", str(theirs), str(ours), "--weights", weights, "--json"])
    assert abs(r["fid"]) < 1e-4 and r["n_fake"] == 8
    err = capsys.readouterr().err
    assert "unknown" in err                       # N of a pytorch-fid file is reported as unknown
    # A pytorch-fid file is assumed to hold the release network's statistics, so against our
    # random-weights file the FID is flagged (here the weights happen to be the same).
    mismatch = [line for line in err.splitlines() if "different feature networks" in line]
    assert len(mismatch) == 1 and mismatch[0].startswith("warning: ") and label in mismatch[0]
    assert r["network"] == f"{metrics.NETWORK} (assumed: the statistics file names no network) (REAL) vs {label} (FAKE)"
    r = metrics.main(["fid", str(ours), str(ours), "--weights", weights, "--json"])
    assert r["fid"] == pytest.approx(0, abs=1e-6) and r["network"] == label
    assert "different feature networks" not in capsys.readouterr().err


def test_compare_networks_labels_and_warnings():
    official, custom = metrics.NETWORK, "custom weights w.pth sha256:0123abcd"
    assert metrics.compare_networks(official, official) == (official, None)
    assert metrics.compare_networks(custom, custom) == (custom, None)
    assert metrics.compare_networks(None, official) == (official, None)    # pytorch-fid file + release weights
    for real, fake in ((official, custom), (None, custom), (custom, None)):
        label, warning = metrics.compare_networks(real, fake)
        assert "(REAL) vs" in label and "different feature networks" in warning and "\n" not in warning


def test_cli_is_kid_pr_json_name_the_weights(weights, tmp_path, capsys, small_inception):
    """The other three commands end to end on 4 tiny images, with the network's honest label."""
    rng = np.random.default_rng(3)
    folder = write_pngs(tmp_path / "imgs", [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(4)])
    label = f"custom weights w.pth sha256:{metrics.sha256_of(weights)[:8]}"
    w = ["--weights", weights, "--json", "--batch-size", "4"]
    r = metrics.main(["is", str(folder)] + w)
    assert r["network"] == label and r["n_fake"] == 4 and r["splits"] == 4
    assert r["is_mean"] == pytest.approx(1.0) and r["is_std"] == pytest.approx(0.0)   # one image per split
    r = metrics.main(["kid", str(folder), str(folder), "--subsets", "5"] + w)
    assert r["network"] == label and r["subset_size"] == 4 and r["kid_std"] < 1e-12   # every subset: all 4
    r = metrics.main(["pr", str(folder), str(folder)] + w)
    assert r["network"] == label and (r["precision"], r["recall"]) == (1.0, 1.0)
    out, err = capsys.readouterr()
    assert out.count('"network": "custom weights w.pth') == 3 and "NOT the pytorch-fid release file" in err
    assert "warning: IS from N=4 in 4 splits of about 1 images: IS cannot exceed" in err   # honest about N


def test_memorization_cli_finds_planted_copies(weights, synth, tmp_path, capsys, small_inception):
    """Fakes = 3 training images with +-1 grey-level noise and 3 new phantoms: the copies are
    flagged in both spaces, matched to their sources, and head the grid."""
    import prep
    train = metrics.list_images(synth / "train" / "viral")
    new = tmp_path / "new"
    prep.make_synthetic(new, n=4, size=64, seed=1)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    g = np.random.default_rng(0)
    for i in (1, 4, 6):
        a = np.asarray(Image.open(train[i]), dtype=np.int16) + g.integers(-1, 2, (64, 64))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(fake_dir / f"copy_{i}.png")
    for f in metrics.list_images(new / "train" / "viral")[:3]:
        shutil.copy(f, fake_dir / f"new_{f.name}")
    grid = tmp_path / "pairs.png"
    r = metrics.main(["nn", str(synth / "train" / "viral"), str(fake_dir), "--held-out",
                      str(new / "train" / "viral"), "--grid", str(grid), "--weights", weights, "--json"])
    pairs = r["closest_pairs"]
    assert {Path(p["fake"]).name for p in pairs[:3]} == {"copy_1.png", "copy_4.png", "copy_6.png"}
    for p in pairs[:3]:
        source = train[int(Path(p["fake"]).stem.split("_")[1])]
        assert p["near_copy"] and p["train_feature"] == p["train_pixel"] == str(source)
        assert p["pixel_rms"] < 1 / 255
    assert r["near_copies_both"] >= 3 and r["feature"]["near_copies"] >= 3
    assert Image.open(grid).size[0] == 3 * metrics.GRID_CELL + 4 * 4       # fake | by features | by pixels


def test_tf32_is_switched_off_and_restored():
    """The CUDA path, checked on the flags alone (no GPU here)."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with metrics.tf32_off(torch.device("cuda")):
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert conv.fp32_precision == before
