"""Tests for classify.py: the metric formulas against hand-worked confusion matrices, short trainings
on the phantom set (prep.py synthetic), patient-disjoint folds, which images each --mode trains on,
the judge on a network whose outputs are known in closed form, the domain FID against pytorch-fid,
and the one-line errors. About half a minute on a 2-core CPU: 32 px images, small sets, few steps.
The test on real X-rays reads the sample folder from $XRAY_SAMPLE and skips without it.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
from argparse import Namespace
from collections import Counter
from fractions import Fraction as Fr
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import classify  # noqa: E402
import prep  # noqa: E402

SIZE = 32                 # px: the phantom classes are still told apart at 32 px
N_TRAIN, N_TEST = 48, 12  # images per class in the phantom train / test split
CLASSES = ["bacterial", "normal", "viral"]   # sorted by name, as classify.py orders them
CPU = torch.device("cpu")
KEYS = ("accuracy", "precision", "recall", "specificity", "f1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: on a shared 2-core machine two threads fighting other processes were 10x
    slower; no test compares runs made under different settings."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The phantom set at 32 px: DATA/{train,test}/<class>/*.png and DATA/manifest.csv."""
    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=N_TRAIN, size=SIZE, seed=0)
    return out


def run_main(argv, capsys):
    """classify.main in-process -> (exit code, stdout, stderr)."""
    try:
        classify.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(argv, capsys, *fragments):
    """Exit code 2 and exactly one stderr line `error: ...` holding every fragment."""
    code, _, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def train_args(synth, out, *extra):
    """A one-step training run on the phantom set (its test folder is found beside --real)."""
    return ["train", "--real", synth / "train", "--size", SIZE, "--epochs", 1, "--min-steps", 0,
            "--max-steps", 1, "--out", out, *extra]


def write_pngs(folder, values, size=SIZE):
    """Uniform gray 8-bit one-channel PNGs, one per value."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(values):
        Image.fromarray(np.full((size, size), v, dtype=np.uint8), mode="L").save(folder / f"{i:03d}.png")
    return folder


def copy_class(src, dst, n=None):
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


# ---- Metrics against hand-worked confusion matrices (the independent reference)

def test_metrics_match_hand_computed_confusion_matrix():
    cm = [[5, 1, 0],      # rows = true, columns = predicted; 16 images
          [2, 3, 1],
          [0, 0, 4]]
    m = classify.metrics_from_confusion(cm, ["a", "b", "c"])
    # class  TP FN FP TN
    # a       5  1  2  8
    # b       3  3  1  9
    # c       4  0  1 11
    expect = {  # accuracy, precision, recall, specificity, F1
        "a": dict(zip(KEYS, (Fr(13, 16), Fr(5, 7), Fr(5, 6), Fr(8, 10), Fr(10, 13)))),
        "b": dict(zip(KEYS, (Fr(12, 16), Fr(3, 4), Fr(1, 2), Fr(9, 10), Fr(3, 5)))),
        "c": dict(zip(KEYS, (Fr(15, 16), Fr(4, 5), Fr(1), Fr(11, 12), Fr(8, 9))))}
    assert m["accuracy"] == pytest.approx(12 / 16) and m["n"] == 16 and m["confusion"] == cm
    for c, values in expect.items():
        for k, v in values.items():
            assert m["per_class"][c][k] == pytest.approx(float(v)), (c, k)
    assert m["per_class"]["b"]["support"] == 6
    for k in expect["a"]:
        assert m["macro"][k] == pytest.approx(float(sum(expect[c][k] for c in expect) / 3)), k


def test_class_never_predicted_has_precision_zero():
    # "b" is never predicted: precision 0/0 := 0 (scikit-learn's zero_division=0)
    m = classify.metrics_from_confusion([[3, 0], [2, 0]], ["a", "b"])
    assert m["per_class"]["b"] == pytest.approx(dict(accuracy=0.6, precision=0.0, recall=0.0, specificity=1.0,
                                                     f1=0.0, support=2))
    assert m["per_class"]["a"] == pytest.approx(dict(accuracy=0.6, precision=0.6, recall=1.0, specificity=0.0,
                                                     f1=0.75, support=3))
    assert m["macro"]["precision"] == pytest.approx(0.3) and all(map(math.isfinite, m["macro"].values()))


def test_class_absent_from_the_evaluation_set_has_recall_zero():
    # A held-out fold may lack a class: recall 0/0 := 0; the one image predicted as it is an FP.
    m = classify.metrics_from_confusion([[2, 0, 1], [0, 3, 0], [0, 0, 0]], ["a", "b", "c"])
    assert m["per_class"]["c"] == pytest.approx(dict(accuracy=5 / 6, precision=0.0, recall=0.0,
                                                     specificity=5 / 6, f1=0.0, support=0))
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_four_classes_with_one_never_predicted_down_to_the_table():
    # The contract's four classes; covid (2 test images) is never predicted. F1 = 2TP / (2TP + FP + FN).
    classes = ["normal", "bacterial", "viral", "covid"]
    cm = [[4, 1, 1, 0],
          [0, 3, 2, 0],
          [1, 1, 2, 0],
          [0, 2, 0, 0]]
    m = classify.metrics_from_confusion(cm, classes)
    #            TP FN FP TN   (N = 17)
    # normal      4  2  1 10
    # bacterial   3  2  4  8
    # viral       2  2  3 10
    # covid       0  2  0 15   precision 0/0 := 0, F1 0/4 = 0
    expect = {  # accuracy, precision, recall, specificity, F1
        "normal": dict(zip(KEYS, (Fr(14, 17), Fr(4, 5), Fr(4, 6), Fr(10, 11), Fr(8, 11)))),
        "bacterial": dict(zip(KEYS, (Fr(11, 17), Fr(3, 7), Fr(3, 5), Fr(8, 12), Fr(6, 12)))),
        "viral": dict(zip(KEYS, (Fr(12, 17), Fr(2, 5), Fr(2, 4), Fr(10, 13), Fr(4, 9)))),
        "covid": dict(zip(KEYS, (Fr(15, 17), Fr(0), Fr(0), Fr(1), Fr(0))))}
    assert m["accuracy"] == pytest.approx(9 / 17) and m["n"] == 17
    for c, values in expect.items():
        for k, v in values.items():
            assert m["per_class"][c][k] == pytest.approx(float(v)), (c, k)
    assert [m["per_class"][c]["support"] for c in classes] == [6, 5, 4, 2]
    macro = {k: sum(expect[c][k] for c in classes) / 4 for k in expect["normal"]}
    assert macro["precision"] == Fr(57, 140)  # (4/5 + 3/7 + 2/5 + 0) / 4: the never-predicted 0 counts
    for k, v in macro.items():
        assert m["macro"][k] == pytest.approx(float(v)), k
    lines = classify.mode_table("t", [m], classes).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:7]}
    assert lines[1].split() == ["class", "Accuracy", "Precision", "Sensitivity", "Specificity", "F1"]
    assert rows["normal"] == ["0.824", "0.800", "0.667", "0.909", "0.727"]
    assert rows["covid"] == ["0.882", "0.000", "0.000", "1.000", "0.000"]
    assert rows["macro"][1] == f"{57 / 140:.3f}"
    assert lines[7] == "overall accuracy 0.529"
    assert [line.split() for line in lines[9:]] == [[c, *map(str, row)] for c, row in zip(classes, cm)]


def test_mean_and_sample_std_over_runs():
    assert classify.cell([0.75]) == "0.750"                                   # one run: no ±
    assert classify.cell([1.0, 0.75]) == f"0.875 ± {math.sqrt(2 * 0.125 ** 2):.3f}"   # ddof=1: 0.177


def test_class_weights_balance_the_classes():
    # n / (C * n_c) = 4 / (3 * 3) and 4 / (3 * 1); an absent class gets 0
    assert classify.class_weights(torch.tensor([0, 0, 0, 1]), 3).tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


# ---- Models: sizes, one input channel, ImageNet weights, the paper recipe, checkpoints

def test_small_cnn_has_0_1_to_1_million_parameters():
    model = classify.build_model("small", 3)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 3)


def test_efficientnet_reads_one_channel(arch="efficientnet_v2_s", dim=1280):
    model = classify.build_model(arch, 3).eval()
    assert next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 1
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert model(x).shape == (2, 3) and model.features(x).shape == (2, dim) == (2, model.feature_dim)


def hub_download(monkeypatch, tmp_path, action):
    """torch.hub runs for real against an empty cache in tmp_path; only its HTTP download is replaced."""
    urls = []

    def download(url, dst, *args, **kwargs):
        urls.append(url)
        action(dst)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return urls


def test_error_pretrained_offline_before_any_data(synth, tmp_path, capsys, monkeypatch, arch="efficientnet_v2_s"):
    # It must be our stand-in that failed: the test neither uses the network nor passes merely
    # because this machine happens to be offline.
    def offline(dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    urls = hub_download(monkeypatch, tmp_path, offline)
    line = assert_user_error(train_args(synth, tmp_path / "run", "--arch", arch, "--pretrained"), capsys,
                             "ImageNet weights", arch, "URLError", str(tmp_path / "hub" / "checkpoints"),
                             "drop --pretrained")
    assert len(urls) == 1 and urls[0] in line and urls[0].startswith("https://download.pytorch.org/")
    assert not (tmp_path / "run").exists()  # it failed before loading data or writing anything


def test_pretrained_sums_the_rgb_filters_and_loads_once(synth, tmp_path, capsys, monkeypatch):
    # The "download" writes known weights (a random EfficientNetV2-S) where torch.hub caches its files.
    imagenet = torchvision.models.efficientnet_v2_s().state_dict()
    urls = hub_download(monkeypatch, tmp_path, lambda dst: torch.save(imagenet, dst))
    model = classify.build_model("efficientnet_v2_s", 3, pretrained=True).eval()
    body, first = model.body.state_dict(), "features.0.0.weight"
    assert torch.equal(body[first], imagenet[first].sum(1, keepdim=True))
    assert all(torch.equal(body[k], imagenet[k]) for k in imagenet if k != first and not k.startswith("classifier"))
    assert model.mean.item() == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    # summing is exact: the one-channel conv on a gray image = the RGB conv on that image copied 3 times
    x, rgb = torch.rand(2, 1, 16, 16), torch.nn.functional.conv2d
    with torch.no_grad():
        assert torch.allclose(model.body.features[0][0](x), rgb(x.repeat(1, 3, 1, 1), imagenet[first], stride=2,
                                                                padding=1), atol=1e-5)
    code, _, err = run_main(train_args(synth, tmp_path / "run", "--arch", "efficientnet_v2_s", "--pretrained"), capsys)
    assert code == 0, err
    assert len(urls) == 1                  # downloaded once, then read from torch.hub's cache
    loaded, ckpt = classify.load_classifier(tmp_path / "run" / "real" / "seed0" / "model.pt", CPU)
    assert ckpt["arch"] == "efficientnet_v2_s" and len(urls) == 1   # loading needs no download
    assert loaded.mean.item() == pytest.approx((0.485 + 0.456 + 0.406) / 3)


def test_help_says_how_class_imbalance_is_handled(capsys):
    with pytest.raises(SystemExit) as e:
        classify.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "weighted cross-entropy loss" in out and "n / (C * n_c)" in out


def test_paper_recipe_is_nesterov_sgd_lr_0_01_batch_256(synth, tmp_path, capsys):
    code, _, err = run_main(train_args(synth, tmp_path / "run", "--recipe", "paper"), capsys)
    assert code == 0, err
    config = results(tmp_path / "run")["config"]
    assert (config["batch_size"], config["lr"]) == (256, 0.01)
    opt, _ = classify.make_optimizer(classify.build_model("small", 3), Namespace(recipe="paper", lr=0.01), 10, CPU)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.01, 0.9, True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    classify.save_atomic({"w": torch.ones(3)}, path)

    def crash_mid_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError):
        classify.save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # the old one is intact


def test_checkpoint_is_loaded_weights_only(tmp_path, capsys):
    # A checkpoint holding an arbitrary Python object is refused (weights_only=True never unpickles
    # code), with a one-line error instead of running it.
    images = write_pngs(tmp_path / "images", [1, 2])
    evil = tmp_path / "evil.pt"
    torch.save({"model": "classify", "arch": "small", "classes": ["normal", "viral"], "size": SIZE,
                "test_dir": None, "weights": classify.build_model("small", 2).state_dict(),
                "args": Namespace(a=1)}, evil)
    assert_user_error(["judge", "--ckpt", evil, "--images", images, "--expect", "viral"], capsys,
                      "cannot read checkpoint", "UnpicklingError")


# ---- Data: patient folds, augmentation, reading images

def test_folds_are_disjoint_patient_aware_and_stratified(synth):
    classes = sorted(classify.class_folders(synth / "train", "train"))
    real = classify.load_set(classify.class_folders(synth / "train", "train"), classes, SIZE)
    fold_of = classify.patient_folds(synth / "train", real, 4, seed=0).numpy()
    manifest = {r["path"]: r["patient"] for r in csv.DictReader(open(synth / "manifest.csv"))}
    patients = [manifest[Path(p).relative_to(synth).as_posix()] for p in real.paths]
    assert len(set(patients)) < len(patients)    # the phantom set has several images per patient
    for p in set(patients):                       # every patient sits in exactly one fold
        assert len({fold_of[i] for i, q in enumerate(patients) if q == p}) == 1
    labels = real.y.numpy()
    counts = np.array([[np.sum((fold_of == f) & (labels == c)) for c in range(3)] for f in range(4)])
    assert counts.sum() == len(patients) and counts.max() - counts.min() <= 2   # a patient is 2 images
    assert np.array_equal(fold_of, classify.patient_folds(synth / "train", real, 4, seed=0).numpy())
    assert not np.array_equal(fold_of, classify.patient_folds(synth / "train", real, 4, seed=1).numpy())


def test_folds_without_manifest_split_images_and_say_so(synth, tmp_path, capsys):
    split = copy_class(synth / "train" / "normal", tmp_path / "data" / "train" / "normal", 4).parent
    images = classify.load_set(classify.class_folders(split, "train"), ["normal"], SIZE)
    assert sorted(classify.patient_folds(split, images, 4, seed=0).tolist()) == [0, 1, 2, 3]
    assert "split images, not patients" in capsys.readouterr().out


def test_train_with_folds_scores_disjoint_held_out_patients(synth, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(["train", "--real", synth / "train", "--folds", 2, "--size", SIZE, "--epochs", 1,
                             "--min-steps", 0, "--max-steps", 1, "--out", out], capsys)
    assert code == 0, err
    manifest = {r["path"]: r["patient"] for r in csv.DictReader(open(synth / "manifest.csv"))}
    held = [{Path(r["path"]).relative_to(synth).as_posix()
             for r in csv.DictReader(open(out / "real" / f"seed0_fold{k}" / "predictions.csv"))} for k in (1, 2)]
    assert not held[0] & held[1] and len(held[0] | held[1]) == 3 * N_TRAIN   # together: all of train
    assert not {manifest[p] for p in held[0]} & {manifest[p] for p in held[1]}
    runs = results(out)["modes"]["real"]
    assert [r["fold"] for r in runs] == [1, 2]
    assert [sum(r["n_train"].values()) for r in runs] == [len(held[1]), len(held[0])]
    assert "held-out folds" in (out / "table.txt").read_text()
    assert torch.load(out / "real" / "seed0_fold1" / "model.pt", weights_only=True)["test_dir"] is None


def test_augment_keeps_range_and_shape_and_is_seeded():
    x = torch.rand(4, 1, SIZE, SIZE)
    a, b = [(torch.manual_seed(1), torch.stack([classify.AUGMENT(im) for im in x]))[1] for _ in range(2)]
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1


def test_images_are_resized_and_corrupt_ones_are_one_line_errors(synth, tmp_path, capsys):
    x = classify.load_images(classify.pngs(write_pngs(tmp_path / "big", [200], size=2 * SIZE)), SIZE)
    assert x.shape == (1, 1, SIZE, SIZE) and x.dtype == torch.uint8 and int(x.float().mean()) == 200
    shutil.copytree(synth / "test", tmp_path / "data" / "test")
    (tmp_path / "data" / "test" / "viral" / "broken.png").write_bytes(b"not a png")
    assert_user_error(["train", "--real", synth / "train", "--test", tmp_path / "data" / "test"], capsys,
                      "cannot read image", "broken.png")


# ---- Short trainings on the phantom set

@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """One run of the default small CNN on the phantom set, batch 16 for enough steps (~10 s)."""
    out = tmp_path_factory.mktemp("trained")
    classify.main(["train", "--real", str(synth / "train"), "--size", str(SIZE), "--epochs", "10",
                   "--min-steps", "0", "--batch-size", "16", "--out", str(out)])
    return out


def test_short_training_reaches_high_accuracy_and_writes_its_outputs(trained, synth):
    run = results(trained)["modes"]["real"][0]
    assert run["n"] == 3 * N_TEST and run["n_train"] == {c: N_TRAIN for c in CLASSES}
    assert run["accuracy"] >= 0.8, run["confusion"]  # chance is 0.33
    run_dir = trained / "real" / "seed0"
    assert Image.open(run_dir / "confusion.png").size[0] > 100 and (trained / "real" / "confusion.png").is_file()
    # the confusion matrix counts rows = true, columns = predicted: rebuilt from predictions.csv
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    pairs = Counter((CLASSES.index(r["true"]), CLASSES.index(r["predicted"])) for r in rows)
    assert run["confusion"] == [[pairs[i, j] for j in range(3)] for i in range(3)]
    assert all(r["predicted"] == max(CLASSES, key=lambda c: float(r[f"p_{c}"])) for r in rows)
    assert not list(trained.rglob("*.tmp"))
    ckpt = torch.load(run_dir / "model.pt", weights_only=True, map_location="cpu")
    assert (ckpt["model"], ckpt["arch"], ckpt["size"], ckpt["classes"]) == ("classify", "small", SIZE, CLASSES)
    assert ckpt["test_dir"] == str((synth / "test").resolve())     # found beside --real
    table = (trained / "table.txt").read_text()
    assert "Sensitivity" in table and "Specificity" in table and "1 run(s)" in table and "±" not in table


def test_small_training_sets_get_at_least_min_steps(synth, tmp_path, capsys):
    # 2 images per class = one batch per epoch: --epochs 1 alone would be a single update
    code, _, err = run_main(train_args(synth, tmp_path / "run", "--real-per-class", 2, "--min-steps", 5,
                                       "--max-steps", 0), capsys)
    assert code == 0, err
    run = results(tmp_path / "run")["modes"]["real"][0]
    assert run["n_train"] == {c: 2 for c in CLASSES} and (run["steps"], run["epochs"]) == (5, 5)


def test_batchnorm_statistics_are_those_of_the_final_weights(synth, tmp_path, capsys):
    # One batch of all 144 training images (batch 256): after training, the first BatchNorm's running
    # mean and variance must be that batch's statistics under the saved weights, computed here with
    # F.conv2d (a moving average after 2 steps would still be ~80 % its initial value).
    code, _, err = run_main(train_args(synth, tmp_path / "run", "--batch-size", 256, "--max-steps", 2), capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "real" / "seed0" / "model.pt", weights_only=True)["weights"]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted((synth / "train").glob("*/*.png"))])
    h = torch.nn.functional.conv2d((x[:, None].float() / 255 - 0.5) / 0.5, state["body.0.weight"], padding=1)
    assert torch.allclose(state["body.1.running_mean"], h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert torch.allclose(state["body.1.running_var"], h.var((0, 2, 3)), rtol=1e-4, atol=1e-7)


def test_training_is_deterministic_on_cpu(synth, tmp_path, capsys):
    weights = []
    for name in ("a", "b"):
        code, _, err = run_main(train_args(synth, tmp_path / name, "--max-steps", 3, "--epochs", 2,
                                           "--batch-size", 16, "--augment"), capsys)
        assert code == 0, err
        weights.append(torch.load(tmp_path / name / "real" / "seed0" / "model.pt", weights_only=True)["weights"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_modes_read_the_right_folders(synth, tmp_path, capsys):
    # Fakes in both layouts: FAKE/<class>/ (AC-GAN) for normal and bacterial, and a flat folder given
    # as viral=DIR (DCGAN / CycleGAN). Counts differ from the real ones so we can tell them apart.
    fake = tmp_path / "fake"
    copy_class(synth / "train" / "normal", fake / "normal", 5)
    copy_class(synth / "train" / "bacterial", fake / "bacterial", 8)
    flat = copy_class(synth / "train" / "viral", tmp_path / "dcgan_viral", 7)
    out = tmp_path / "run"
    code, _, err = run_main(train_args(synth, out, "--fake", fake, "--fake", f"viral={flat}", "--mode", "real",
                                       "fake", "real+fake", "--real-per-class", 10, "--fake-per-class", 6,
                                       "--seeds", 2), capsys)
    assert code == 0, err
    modes = results(out)["modes"]
    real_n, fake_n = {c: 10 for c in CLASSES}, {"normal": 5, "bacterial": 6, "viral": 6}
    for mode, expect in (("real", real_n), ("fake", fake_n), ("real+fake", {c: 10 + fake_n[c] for c in CLASSES})):
        runs = modes[mode]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["mode"] == mode for r in runs)
        assert all(r["n_train"] == expect for r in runs), (mode, runs[0]["n_train"])
        assert all(r["n"] == 3 * N_TEST for r in runs)  # always scored on the real test set
        assert (out / mode / "seed1" / "model.pt").is_file()
    table = (out / "table.txt").read_text()
    assert "2 seed(s) = 2 run(s)" in table and "real+fake" in table and "±" in table
    # the matrix in the table is the sum over the two seeds
    summed = np.sum([r["confusion"] for r in modes["fake"]], axis=0)
    block = table.split("fake:")[1].split("predicted):")[1].strip().splitlines()[:3]
    assert [[int(v) for v in line.split()[1:]] for line in block] == summed.tolist()


def test_ctrl_c_keeps_the_finished_runs(synth, tmp_path, capsys, monkeypatch):
    one_run = classify.one_run

    def interrupted_second(args, config, run, *rest):
        if run["seed"] == 1:
            raise KeyboardInterrupt
        return one_run(args, config, run, *rest)
    monkeypatch.setattr(classify, "one_run", interrupted_second)
    code, _, err = run_main(train_args(synth, tmp_path / "run", "--seeds", 2), capsys)
    assert code == 130 and "interrupted" in err
    assert [r["seed"] for r in results(tmp_path / "run")["modes"]["real"]] == [0]
    assert (tmp_path / "run" / "real" / "seed0" / "model.pt").is_file()


# ---- Judge: a network whose probabilities are known in closed form

JUDGE_K, JUDGE_B = 10.0, -5.0  # logit of "viral" = K * 2x + B for a uniform image of gray x * 255


def controlled_checkpoint(path, test_dir, classes=("bacterial", "normal", "viral")):
    """A small CNN that passes 2x (x = gray / 255) through channel 0 of every layer, so the logits
    are (0, 0, 2Kx + B) and p(viral) = e^z / (e^z + 2) for a uniform image."""
    model = classify.build_model("small", len(classes))
    with torch.no_grad():
        first_bn = True
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.weight[0, 0, 1, 1] = 1.0                          # identity on channel 0
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)                    # so BN divides by exactly 1
                m.weight.fill_(1.0)
                m.bias.fill_(1.0 if first_bn else 0.0)              # (2x - 1) + 1 = 2x >= 0
                first_bn = False
        head = model.head[1]
        head.weight.zero_()
        head.bias.zero_()
        head.weight[classes.index("viral"), 0] = JUDGE_K
        head.bias[classes.index("viral")] = JUDGE_B
    torch.save({"model": "classify", "arch": "small", "classes": list(classes), "size": SIZE,
                "weights": model.state_dict(), "test_dir": str(test_dir)}, path)
    return path


def p_viral(gray):
    z = JUDGE_K * 2 * gray / 255 + JUDGE_B
    return math.exp(z) / (math.exp(z) + 2)


def test_judge_numbers_match_closed_form(tmp_path, capsys):
    gen_levels, base_levels = [0, 100, 130, 200, 255], [255, 250, 50]
    gen = write_pngs(tmp_path / "generated", gen_levels)
    write_pngs(tmp_path / "test" / "viral", base_levels)
    ckpt = controlled_checkpoint(tmp_path / "model.pt", tmp_path / "test")
    code, out, err = run_main(["judge", "--ckpt", ckpt, "--images", gen, "--expect", "viral",
                               "--json", tmp_path / "j.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "j.json").read_text())
    # p > 0.98  <=>  z > ln(98)  <=>  gray > 122.2: 130, 200 and 255 of the generated images
    assert r["generated"]["n"] == 5 and r["generated"]["accepted"] == pytest.approx(3 / 5)
    assert r["generated"]["argmax_share"] == pytest.approx(4 / 5)     # z > 0 <=> gray > 63.75
    assert r["generated"]["mean_prob"] == pytest.approx(np.mean([p_viral(g) for g in gen_levels]), abs=1e-6)
    assert r["real baseline"]["n"] == 3 and r["real baseline"]["accepted"] == pytest.approx(2 / 3)
    assert r["real baseline"]["mean_prob"] == pytest.approx(np.mean([p_viral(g) for g in base_levels]), abs=1e-6)
    assert "accepted" in out and "real baseline" in out and "domain FID" in out
    # a stricter threshold, the AC-GAN layout (IMAGES/<class>/) and an explicit --baseline
    shutil.copytree(gen, tmp_path / "acgan" / "viral")
    other = write_pngs(tmp_path / "other" / "viral", [0, 10]).parent
    code, _, err = run_main(["judge", "--ckpt", ckpt, "--images", tmp_path / "acgan", "--expect", "viral",
                             "--threshold", 0.9999, "--baseline", other, "--json", tmp_path / "j2.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "j2.json").read_text())
    assert r["generated"]["accepted"] == pytest.approx(np.mean([p_viral(g) > 0.9999 for g in gen_levels])) == 0.4
    assert r["real baseline"]["n"] == 2 and r["real baseline"]["accepted"] == 0.0


def test_judge_uses_the_checkpoints_test_folder(trained, synth, tmp_path, capsys):
    code, _, err = run_main(["judge", "--ckpt", trained / "real" / "seed0" / "model.pt", "--images",
                             synth / "test" / "viral", "--expect", "viral", "--json", tmp_path / "j.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "j.json").read_text())
    # judged on the very images of the baseline, the two rows agree
    assert r["generated"] == {**r["real baseline"], "folder": str(synth / "test" / "viral")}
    assert r["real baseline"]["folder"] == str((synth / "test" / "viral").resolve())


# ---- The judge's domain FID, in the classifier's penultimate features

def test_domain_fid_of_a_folder_with_itself_is_zero(trained, synth, tmp_path, capsys):
    ckpt = trained / "real" / "seed0" / "model.pt"
    judge = ["judge", "--ckpt", ckpt, "--baseline", synth / "test", "--expect", "viral", "--json"]
    code, out, _ = run_main([*judge, tmp_path / "s.json", "--images", synth / "test" / "viral"], capsys)
    assert code == 0
    same = json.loads((tmp_path / "s.json").read_text())
    assert (same["generated"]["n"], same["feature_dim"]) == (N_TEST, 128)
    assert "D = 128 features" in out and "N = 12 < D" in out  # 12 images < 128 features: said, still computed
    code, _, _ = run_main([*judge, tmp_path / "d.json", "--images", synth / "test" / "normal"], capsys)
    diff = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and diff["domain_fid"] > 1e-3 and abs(same["domain_fid"]) < 1e-6 * diff["domain_fid"]


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # inside pytorch-fid
def test_domain_fid_matches_pytorch_fid(trained, tmp_path, capsys):
    """Two full-rank sets (140 images > 128 features): our number against pytorch-fid's Frechet
    distance of the same penultimate features."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    for seed in (1, 2):
        prep.make_synthetic(tmp_path / f"s{seed}", n=140, size=SIZE, seed=seed)  # new phantom patients
    ckpt = trained / "real" / "seed0" / "model.pt"
    code, _, err = run_main(["judge", "--ckpt", ckpt, "--images", tmp_path / "s1" / "train" / "viral", "--baseline",
                             tmp_path / "s2" / "train", "--expect", "viral", "--json", tmp_path / "f.json"], capsys)
    assert code == 0, err
    model, _ = classify.load_classifier(ckpt, CPU)
    stats = []
    for folder in (tmp_path / "s1" / "train" / "viral", tmp_path / "s2" / "train" / "viral"):
        feats = classify.predict(model, classify.load_images(sorted(folder.glob("*.png")), SIZE), CPU, features=True)
        stats += [feats.mean(0), np.cov(feats, rowvar=False)]
    assert json.loads((tmp_path / "f.json").read_text())["domain_fid"] == pytest.approx(
        calculate_frechet_distance(*stats), rel=1e-6)


# ---- One-line errors, exit code 2

def test_error_missing_or_empty_folders(synth, tmp_path, capsys):
    assert_user_error(["train", "--real", tmp_path / "nope", "--test", synth / "test"], capsys,
                      "does not exist", "prep.py synthetic", "prep.py kermany")
    assert_user_error(["train", "--real", synth / "train", "--test", tmp_path / "nope"], capsys, "test folder")
    run = tmp_path / "run"
    assert_user_error(train_args(synth, run, "--mode", "fake", "--fake", tmp_path / "nope"), capsys, "fake folder")
    assert_user_error(train_args(synth, run, "--mode", "real+fake", "--fake", f"viral={tmp_path / 'nope'}"), capsys,
                      "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(train_args(synth, run, "--mode", "real+fake", "--fake", f"viral={tmp_path / 'empty'}"), capsys,
                      "holds no .png")
    assert_user_error(train_args(synth, run, "--mode", "real+fake", "--fake", tmp_path / "empty"), capsys,
                      "no <class>/ subfolders", "CLASS=DIR")
    (tmp_path / "fake" / "viral").mkdir(parents=True)
    assert_user_error(train_args(synth, run, "--mode", "real+fake", "--fake", tmp_path / "fake"), capsys,
                      "holds no .png")


def test_error_class_names_differ(synth, tmp_path, capsys):
    shutil.copytree(synth / "test", tmp_path / "test")
    write_pngs(tmp_path / "test" / "covid", [10, 20])
    assert_user_error(["train", "--real", synth / "train", "--test", tmp_path / "test"], capsys,
                      "class names differ", "covid")
    write_pngs(tmp_path / "fake" / "pneumonia", [10, 20])
    run = tmp_path / "run"
    assert_user_error(train_args(synth, run, "--mode", "real+fake", "--fake", tmp_path / "fake"), capsys,
                      "class names differ", "pneumonia")
    # --mode fake needs every class among the fakes, and says which to add
    only_viral = f"viral={synth / 'train' / 'viral'}"
    assert_user_error(train_args(synth, run, "--mode", "fake", "--fake", only_viral), capsys,
                      "missing: bacterial, normal", "--fake bacterial=DIR")
    # a flat --test folder: CLASS=DIR is a --fake form, so it is not suggested for --test
    line = assert_user_error(["train", "--real", synth / "train", "--test", synth / "test" / "viral"], capsys,
                             "test folder", "no <class>/ subfolders")
    assert "CLASS=DIR" not in line


def test_error_bad_flags(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert_user_error(train_args(synth, run, "--mode", "real+fake"), capsys, "--fake")
    assert_user_error(train_args(synth, run, "--fake", synth / "train"), capsys, "--mode")
    assert_user_error(train_args(synth, run, "--folds", 4, "--test", synth / "test"), capsys, "--folds", "--test")
    assert_user_error(train_args(synth, run, "--mode", "synthetic"), capsys, "--mode", "invalid choice")
    assert_user_error(train_args(synth, run, "--pretrained"), capsys, "--pretrained")
    for flag, value in (("--folds", 1), ("--epochs", 0), ("--size", 8), ("--lr", "nan"), ("--seeds", "two")):
        assert_user_error(train_args(synth, run, flag, value), capsys, flag, repr(str(value)))
    assert_user_error(["judge", "--ckpt", "x.pt", "--images", "x", "--expect", "viral", "--threshold", 1], capsys,
                      "--threshold", "is not in [")
    assert not run.exists()


def test_error_checkpoints(tmp_path, capsys):
    images = write_pngs(tmp_path / "images", [1, 2])
    wrong = tmp_path / "efficientnet_as_small.pt"
    torch.save({"model": "classify", "arch": "small", "classes": ["normal", "viral"], "size": SIZE, "test_dir": None,
                "weights": classify.build_model("efficientnet_v2_s", 2).state_dict()}, wrong)
    assert_user_error(["judge", "--ckpt", wrong, "--images", images, "--expect", "viral"], capsys,
                      "do not fit architecture small")
    gan = tmp_path / "dcgan.pt"
    torch.save({"G": {"w": torch.zeros(1)}, "D": {"w": torch.zeros(1)}, "step": 3}, gan)
    assert_user_error(["judge", "--ckpt", gan, "--images", images, "--expect", "viral"], capsys,
                      "not a classify.py checkpoint")
    assert_user_error(["judge", "--ckpt", tmp_path / "none.pt", "--images", images, "--expect", "viral"], capsys,
                      "cannot read checkpoint", "FileNotFoundError")


def test_error_judge_and_fid_inputs(tmp_path, capsys):
    ckpt = controlled_checkpoint(tmp_path / "model.pt", tmp_path / "test")
    images = write_pngs(tmp_path / "images", [1, 2])
    assert_user_error(["judge", "--ckpt", ckpt, "--images", images, "--expect", "covid"], capsys,
                      "not a class of this classifier")
    assert_user_error(["judge", "--ckpt", ckpt, "--images", tmp_path / "nope", "--expect", "viral"], capsys,
                      "holds 0 .png images")
    # the checkpoint's test folder is gone: say how to pass another
    assert_user_error(["judge", "--ckpt", ckpt, "--images", images, "--expect", "viral"], capsys, "--baseline")
    assert_user_error(["judge", "--ckpt", ckpt, "--images", write_pngs(tmp_path / "one", [3]), "--expect", "viral",
                       "--baseline", tmp_path], capsys, "holds 1 .png images", "fewer than 2")


def test_error_non_finite_loss_keeps_no_model(synth, tmp_path, capsys):
    assert_user_error(train_args(synth, tmp_path / "run", "--lr", 1e30, "--max-steps", 3), capsys,
                      "NaN or inf", "lower --lr")
    assert not (tmp_path / "run" / "real" / "seed0" / "model.pt").exists()


def test_error_as_subprocess_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "classify.py", "train", "--real", str(tmp_path / "nope")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr


# ---- Real X-rays (skipped without $XRAY_SAMPLE)

@pytest.mark.skipif(not (Path(os.environ.get("XRAY_SAMPLE", "/nonexistent")) / "chest_xray").is_dir(),
                    reason="set XRAY_SAMPLE to the folder holding chest_xray/ to run this test")
def test_real_xrays_normal_against_pneumonia(tmp_path, capsys):
    """A few dozen real Kermany X-rays at 32 px (centre-cropped to squares here, as prep.py does): the
    small CNN must tell normal from pneumonia above chance, and in its features the domain FID of
    normal against pneumonia must be clearly above that of normal against itself (0)."""
    sample = Path(os.environ["XRAY_SAMPLE"]) / "chest_xray"
    for split, n in (("train", 60), ("test", 30)):
        for cls in ("NORMAL", "PNEUMONIA"):
            dst = tmp_path / "data" / split / cls.lower()
            dst.mkdir(parents=True)
            for p in sorted((sample / split / cls).glob("*.jpeg"))[:n]:
                ImageOps.fit(Image.open(p).convert("L"), (SIZE, SIZE)).save(dst / f"{p.stem}.png")
    out = tmp_path / "run"
    code, _, err = run_main(["train", "--real", tmp_path / "data" / "train", "--size", SIZE, "--epochs", 1,
                             "--min-steps", 40, "--batch-size", 32, "--out", out], capsys)
    assert code == 0, err
    assert results(out)["modes"]["real"][0]["accuracy"] >= 0.75  # chance: 0.5; 0.92 here (30 test images per class)
    ckpt = out / "real" / "seed0" / "model.pt"
    test = tmp_path / "data" / "test"
    for name, images in (("same", test / "normal"), ("diff", test / "pneumonia")):
        assert run_main(["judge", "--ckpt", ckpt, "--images", images, "--expect", "normal", "--json",
                         tmp_path / f"{name}.json"], capsys)[0] == 0
    fid = {name: json.loads((tmp_path / f"{name}.json").read_text())["domain_fid"] for name in ("same", "diff")}
    assert fid["diff"] > 1e-3 > abs(fid["same"])


# ---- The reader study: the scoring against hand-worked numbers, the page in a real browser

def test_fleiss_kappa_matches_the_worked_example():
    """Fleiss (1971)'s method on the example of Wikipedia's "Fleiss' kappa" article: 10 subjects,
    14 raters, 5 categories, P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210."""
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert abs(classify.fleiss_kappa(counts) - 0.20993) < 1e-4
    assert abs(classify.fleiss_kappa([[2, 0], [0, 2], [2, 0]]) - 1) < 1e-12      # perfect agreement
    # two raters, always opposite: P_i = 0, p = (1/2, 1/2), P_e = 1/2, kappa = -1
    assert abs(classify.fleiss_kappa([[1, 1]] * 4) + 1) < 1e-12


def test_wilson_interval_matches_the_closed_form():
    lo, hi = classify.wilson(8, 10)          # 0.8: Wilson (1927) gives [0.490, 0.943]
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    lo, hi = classify.wilson(0, 5)
    assert lo == 0 and abs(hi - 0.4345) < 1e-3


def make_study(synth, tmp_path, seed=3, n=20):
    out = tmp_path / f"study{seed}"
    code = classify.main(["study", "make", "--real", str(synth / "test"), "--fake", str(synth / "train"),
                          "--n", str(n), "--seed", str(seed), "--out", str(out)])
    assert code is None
    return out, json.loads((out / "key.json").read_text())


def test_study_order_is_fixed_by_the_seed_and_the_key_stays_out_of_the_page(synth, tmp_path):
    a, key_a = make_study(synth, tmp_path / "a")
    b, key_b = make_study(synth, tmp_path / "b")
    _, key_c = make_study(synth, tmp_path / "c", seed=4)
    assert key_a == key_b and [i["file"] for i in key_a["items"]] != [i["file"] for i in key_c["items"]]
    items = key_a["items"]
    assert len(items) == 20 and sum(i["truth"] == "synthetic" for i in items) == 16     # --fake-share 0.8
    assert sorted(Counter(i["class"] for i in items if i["truth"] == "real").values()) == [1, 1, 2]  # spread
    assert sorted(Counter(i["class"] for i in items if i["truth"] == "synthetic").values()) == [5, 5, 6]
    page = (a / "study.html").read_text()
    data = json.loads(page.split("const D = ", 1)[1].split(", N = ", 1)[0])
    assert set(data) == {"study", "classes", "images"} and [im["id"] for im in data["images"]] == [i["id"] for i in items]
    assert all(set(im) == {"id", "src"} for im in data["images"])
    for i in items:   # neither the truth, the model, nor a file name reaches the page
        assert Path(i["file"]).name not in page and Path(i["file"]).parent.name + "/" not in page
    assert "synthetic\"" not in page.split("<script>")[1].split("const D")[1] and "truth\":" not in page
    import base64
    first = base64.b64decode(data["images"][0]["src"].split(",", 1)[1])
    assert first == Path(items[0]["file"]).read_bytes()   # the image itself, embedded


def write_answers(path, key, reader, calls):
    """calls: {id: (called real, class)}."""
    path.write_text(json.dumps({"study": key["study"], "reader": reader, "answers": [
        {"id": i, "real": r, "class": c} for i, (r, c) in calls.items()]}))
    return path


def test_study_score_matches_a_hand_worked_example(synth, tmp_path, capsys):
    out, key = make_study(synth, tmp_path)
    items = key["items"]
    truth = {i["id"]: i for i in items}
    # Reader A calls everything real and always says "normal"; reader B is always right.
    a = write_answers(tmp_path / "a.json", key, "A", {i: (True, "normal") for i in truth})
    b = write_answers(tmp_path / "b.json", key, "B", {i: (t["truth"] == "real", t["class"]) for i, t in truth.items()})
    capsys.readouterr()
    classify.main(["study", "score", "--key", str(out / "key.json"), str(a), str(b)])
    text = " ".join(capsys.readouterr().out.split())  # one space between words: the columns' widths do not matter
    n_normal_fake = sum(t["class"] == "normal" and t["truth"] == "synthetic" for t in items)
    lo, hi = classify.wilson(16, 16)
    assert (f"synthetic, all N 16 called real 1.00 [{lo:.2f}, {hi:.2f}] class right {n_normal_fake / 16:.2f}"
            in text.split("B (b.json)")[0])
    b_part = text.split("B (b.json)")[1].split("pooled")[0]
    assert "synthetic, all N 16 called real 0.00" in b_part and "real N 4 called real 1.00" in b_part
    assert "class right 1.00" in b_part and "class right 0." not in b_part
    assert "synthetic, all N 32 called real 0.50" in text.split("pooled")[1]
    # kappa on real/synthetic: 16 subjects split 1-1, 4 agreed 2-0: P-bar = 4/20, p = (24/40, 16/40)
    p_e = 0.6 ** 2 + 0.4 ** 2
    assert f"on real: Fleiss' kappa {(0.2 - p_e) / (1 - p_e):.3f}" in text


def test_study_score_refuses_a_foreign_or_incomplete_answer_file(synth, tmp_path, capsys):
    out, key = make_study(synth, tmp_path)
    ids = [i["id"] for i in key["items"]]
    foreign = write_answers(tmp_path / "f.json", {**key, "study": "0123456789ab"}, "A", {i: (True, "normal") for i in ids})
    short = write_answers(tmp_path / "s.json", key, "A", {i: (True, "normal") for i in ids[:-3]})
    assert_user_error(["study", "score", "--key", out / "key.json", foreign], capsys, "0123456789ab", "key")
    assert_user_error(["study", "score", "--key", out / "key.json", short], capsys, "17 of 20", "finishes")
    (tmp_path / "bad.json").write_text("{not json")
    assert_user_error(["study", "score", "--key", out / "key.json", tmp_path / "bad.json"], capsys, "cannot read")


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and chromedriver (Debian: chromium, "
                    "chromium-driver)")
def test_study_page_in_a_real_browser(synth, tmp_path, capsys):
    """Headless Chromium: the reader types a name, answers every image with keys (after a reload
    midway: the answers survive), goes back and changes one answer with the mouse, saves the file;
    `study score` reads it back."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    out, key = make_study(synth, tmp_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.get((out / "study.html").as_uri())
        driver.find_element(By.ID, "reader").send_keys("R. Reader")
        driver.find_element(By.ID, "go").click()
        classes = key["classes"]
        for n, item in enumerate(key["items"]):
            if n == 10:
                driver.save_screenshot(str(tmp_path / "mid_study.png"))
                driver.refresh()
            count = driver.find_element(By.ID, "count").text
            assert count == f"image {n + 1} of 20, {n} answered", count
            body = driver.find_element(By.TAG_NAME, "body")
            body.send_keys("s" if item["truth"] == "synthetic" else "r")
            body.send_keys(str(classes.index(item["class"]) + 1))
        assert driver.find_element(By.ID, "end").is_displayed()
        driver.find_element(By.ID, "review").click()                  # back to the last image: call it real
        driver.find_element(By.XPATH, "//button[text()='Real (R)']").click()
        driver.find_element(By.ID, "save").click()
        for _ in range(100):  # the download lands a moment after the click
            files = list(downloads.glob("*.json"))
            if files:
                break
            time.sleep(0.05)
        assert len(files) == 1 and files[0].name == f"answers_{key['study']}_R._Reader.json"
    finally:
        driver.quit()
    with Image.open(tmp_path / "mid_study.png") as im:
        assert im.size[0] >= 1000
    saved = json.loads(files[0].read_text())
    assert saved["reader"] == "R. Reader" and len(saved["answers"]) == 20
    last = key["items"][-1]["id"]
    assert all(a["real"] == (t["truth"] == "real" or t["id"] == last) and a["class"] == t["class"]
               for a, t in zip(saved["answers"], key["items"]))
    capsys.readouterr()
    classify.main(["study", "score", "--key", str(out / "key.json"), str(files[0])])
    text = " ".join(capsys.readouterr().out.split())
    changed = key["items"][-1]["truth"] == "synthetic"      # the one synthetic image called real, if it was one
    assert "real N 4 called real 1.00" in text and f"synthetic, all N 16 called real {changed / 16:.2f}" in text


def test_early_stopping_keeps_the_best_epoch_and_holds_out_whole_patients(synth, tmp_path, capsys, monkeypatch):
    """--val-frac holds out a patient-disjoint share of the real training images; training keeps the
    weights of the epoch with the lowest validation loss and stops --patience epochs after it."""
    seen = {}
    real_train = classify.train_model

    def spy(model, data, n_classes, args, device, val=None):
        seen["train"], seen["val"], seen["val_x"] = set(data.paths), set(val.paths), val.x
        return real_train(model, data, n_classes, args, device, val)

    monkeypatch.setattr(classify, "train_model", spy)
    losses = iter([0.9, 0.5, 0.7, 0.8, 0.6, 0.1])  # the best epoch is the 2nd; patience 3 stops after the 5th
    states = []
    real_predict = classify.predict

    def fake_val_loss(model, x, device, features=False):
        if x is seen["val_x"]:  # the validation pass: a chosen loss
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            probs = np.full((len(x), 3), 1e-9)
            probs[:, :] = math.exp(-next(losses))
            return probs
        return real_predict(model, x, device, features)

    monkeypatch.setattr(classify, "predict", fake_val_loss)
    code, out, err = run_main(train_args(synth, tmp_path / "run", "--val-frac", 0.25, "--patience", 3, "--epochs", 20,
                                         "--max-steps", 0), capsys)
    assert code == 0, err
    assert not seen["train"] & seen["val"] and len(seen["val"]) > 0
    with open(synth / "manifest.csv", newline="") as f:
        patient = {str((synth / r["path"]).resolve()): r["patient"] for r in csv.DictReader(f)}
    assert not ({patient[str(Path(p).resolve())] for p in seen["train"]}
                & {patient[str(Path(p).resolve())] for p in seen["val"]})
    assert results(tmp_path / "run")["modes"]["real"][0]["epochs"] == 5 and len(states) == 5
    saved = torch.load(tmp_path / "run" / "real" / "seed0" / "model.pt", weights_only=True)["weights"]
    conv = next(k for k in saved if k.endswith("weight") and saved[k].dim() == 4)
    assert torch.equal(saved[conv], states[1][conv])  # the 2nd epoch's weights (BatchNorm recomputed after)
