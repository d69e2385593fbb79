"""Tests for classify.py: metric formulas against hand calculations, a short training on the
synthetic set, patient-aware folds, which folders each --mode reads, the judge on a network whose
outputs are known in closed form, the domain FID, and the one-line errors.

Runs in about a minute on a 2-core CPU: 32-64 px images, tiny sets, few steps.
"""
import csv
import json
import math
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import classify  # noqa: E402
import prep  # noqa: E402

SIZE = 32                # px: the phantom classes are still told apart at 32 px
N_TRAIN, N_TEST = 48, 12  # images per class in the phantom train / test split
TRAIN_EPOCHS = 10         # ~10 s of training; reaches ~0.9 on the phantom test split
CLASSES = ["normal", "bacterial", "viral"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train with one CPU thread. On a shared 2-core machine two OpenMP threads fighting other
    processes were 10x slower than one; results do not depend on it (tests compare runs made
    under the same setting)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The lead's phantom set (prep.py synthetic), 32 px, with manifest.csv."""
    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=N_TRAIN, size=SIZE, seed=0)
    return out


def run_main(argv, capsys):
    """classify.main in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        classify.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(argv, capsys, *fragments):
    code, out, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_pngs(folder, values, size=SIZE):
    """Uniform gray images, one per value, as 8-bit 1-channel PNGs."""
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


# ------------------------------------------------------------------------------------------
# Metrics against hand calculations
# ------------------------------------------------------------------------------------------

def test_metrics_match_hand_computed_confusion_matrix():
    # rows = true, columns = predicted; 16 images
    cm = [[5, 1, 0],
          [2, 3, 1],
          [0, 0, 4]]
    m = classify.metrics_from_confusion(cm, ["a", "b", "c"])
    # Worked by hand:  class  TP FN FP TN
    #                  a       5  1  2  8
    #                  b       3  3  1  9
    #                  c       4  0  1 11
    expect = {
        "a": dict(accuracy=Fraction(13, 16), precision=Fraction(5, 7), recall=Fraction(5, 6),
                  specificity=Fraction(8, 10), f1=Fraction(10, 13)),
        "b": dict(accuracy=Fraction(12, 16), precision=Fraction(3, 4), recall=Fraction(1, 2),
                  specificity=Fraction(9, 10), f1=Fraction(3, 5)),
        "c": dict(accuracy=Fraction(15, 16), precision=Fraction(4, 5), recall=Fraction(1, 1),
                  specificity=Fraction(11, 12), f1=Fraction(8, 9)),
    }
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["n"] == 16
    for c, values in expect.items():
        for k, v in values.items():
            assert m["per_class"][c][k] == pytest.approx(float(v)), (c, k)
    assert m["per_class"]["b"]["support"] == 6
    for k in ("precision", "recall", "specificity", "f1", "accuracy"):
        assert m["macro"][k] == pytest.approx(float(sum(expect[c][k] for c in expect) / 3)), k


def test_class_never_predicted_has_precision_zero():
    # Class "b" is never predicted: precision 0/0 is defined as 0 (scikit-learn's zero_division=0).
    cm = [[3, 0],
          [2, 0]]
    m = classify.metrics_from_confusion(cm, ["a", "b"])
    assert m["per_class"]["b"] == pytest.approx(dict(accuracy=0.6, precision=0.0, recall=0.0,
                                                     specificity=1.0, f1=0.0, support=2))
    assert m["per_class"]["a"] == pytest.approx(dict(accuracy=0.6, precision=0.6, recall=1.0,
                                                     specificity=0.0, f1=0.75, support=3))
    assert m["macro"]["precision"] == pytest.approx(0.3)
    assert all(math.isfinite(v) for v in m["macro"].values())


def test_four_classes_with_one_never_predicted_from_labels_to_table():
    # The contract's four classes; covid (2 test images) is never predicted. Labels -> matrix ->
    # metrics -> the printed Table-4 row, each value worked by hand, F1 as 2TP / (2TP + FP + FN).
    classes = ["normal", "bacterial", "viral", "covid"]
    cm = [[4, 1, 1, 0],
          [0, 3, 2, 0],
          [1, 1, 2, 0],
          [0, 2, 0, 0]]
    y_true = [i for i, row in enumerate(cm) for j, n in enumerate(row) for _ in range(n)]
    y_pred = [j for i, row in enumerate(cm) for j, n in enumerate(row) for _ in range(n)]
    m = classify.metrics_from_confusion(classify.confusion_matrix(y_true, y_pred, 4), classes)
    #            TP FN FP TN   (N = 17)
    # normal      4  2  1 10
    # bacterial   3  2  4  8
    # viral       2  2  3 10
    # covid       0  2  0 15   precision 0/0 := 0, F1 0/4 = 0
    F = Fraction
    expect = {
        "normal": dict(accuracy=F(14, 17), precision=F(4, 5), recall=F(4, 6), specificity=F(10, 11), f1=F(8, 11)),
        "bacterial": dict(accuracy=F(11, 17), precision=F(3, 7), recall=F(3, 5), specificity=F(8, 12), f1=F(6, 12)),
        "viral": dict(accuracy=F(12, 17), precision=F(2, 5), recall=F(2, 4), specificity=F(10, 13), f1=F(4, 9)),
        "covid": dict(accuracy=F(15, 17), precision=F(0), recall=F(0), specificity=F(1), f1=F(0)),
    }
    assert m["accuracy"] == pytest.approx(9 / 17) and m["n"] == 17 and m["confusion"] == cm
    for c, values in expect.items():
        for k, v in values.items():
            assert m["per_class"][c][k] == pytest.approx(float(v)), (c, k)
    assert [m["per_class"][c]["support"] for c in classes] == [6, 5, 4, 2]
    macro = {k: sum(expect[c][k] for c in classes) / 4 for k in expect["normal"]}
    assert macro["precision"] == F(57, 140)  # (4/5 + 3/7 + 2/5 + 0) / 4, the never-predicted 0 included
    for k, v in macro.items():
        assert m["macro"][k] == pytest.approx(float(v)), k
    table = classify.format_class_table("t", classify.aggregate([m], classes), classes)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:7]}
    #                       Accuracy Precision Sensitivity Specificity F1
    assert rows["normal"] == ["0.824", "0.800", "0.667", "0.909", "0.727"]
    assert rows["covid"] == ["0.882", "0.000", "0.000", "1.000", "0.000"]
    assert rows["macro"][1] == f"{57 / 140:.3f}"
    assert "overall accuracy 0.529 (1 run)" in table


def test_class_absent_from_the_evaluation_set_has_recall_zero():
    # A held-out fold may lack a class: recall 0/0 := 0; the one image predicted as it is an FP.
    m = classify.metrics_from_confusion([[2, 0, 1], [0, 3, 0], [0, 0, 0]], ["a", "b", "c"])
    assert m["per_class"]["c"] == pytest.approx(dict(accuracy=5 / 6, precision=0.0, recall=0.0,
                                                     specificity=5 / 6, f1=0.0, support=0))
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_confusion_matrix_counts_true_rows_predicted_columns():
    cm = classify.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_aggregate_mean_and_sample_std():
    runs = [classify.metrics_from_confusion(cm, ["a", "b"]) for cm in ([[2, 0], [0, 2]], [[1, 1], [0, 2]])]
    agg = classify.aggregate(runs, ["a", "b"])
    assert agg["n_runs"] == 2
    assert agg["accuracy"] == pytest.approx((0.875, math.sqrt(2 * 0.125 ** 2)))  # ddof=1
    assert agg["confusion_sum"] == [[3, 1], [0, 4]]


def test_class_weights_balance_the_classes():
    w = classify.class_weights(torch.tensor([0, 0, 0, 1]), 3)
    # n / (C * n_c) = 4 / (3 * 3) and 4 / (3 * 1); an absent class gets 0
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


# ------------------------------------------------------------------------------------------
# Models: sizes, one input channel, the paper recipe, imbalance in --help, checkpoints
# ------------------------------------------------------------------------------------------

def test_small_cnn_has_0_1_to_1_million_parameters():
    model = classify.SmallCNN(3)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000, n_params
    assert model(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 3)


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("efficientnet_v2_s", 1280)])
def test_torchvision_archs_read_one_channel(arch, dim):
    model = classify.build_model(arch, 3).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert model(x).shape == (2, 3) and model.features(x).shape == (2, dim) == (2, model.feature_dim)


def test_one_channel_conv_equals_rgb_conv_on_a_gray_image():
    # Summing the RGB filters is exact for a gray image copied into R, G and B (--pretrained).
    torch.manual_seed(0)
    rgb = torch.nn.Conv2d(3, 8, 3, padding=1)
    gray = classify.one_channel_conv(rgb)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_help_says_how_class_imbalance_is_handled(capsys):
    with pytest.raises(SystemExit) as e:
        classify.main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "weighted cross-entropy loss" in out and "n / (C * n_c)" in out


def test_paper_recipe_is_nesterov_sgd_lr_0_01_batch_256(synth, tmp_path, capsys):
    code, _, err = run_main(train_args(synth, tmp_path, "--recipe", "paper"), capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["batch_size"], config["lr"]) == (256, 0.01)
    ckpt = torch.load(tmp_path / "run" / "real" / "seed0" / "model.pt", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.01, 0.9, True)
    assert "exp_avg" not in next(iter(ckpt["optimizer"]["state"].values()))  # SGD, not Adam


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    classify.save_checkpoint(path, {"w": torch.ones(3)})
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError):
        classify.save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]                  # no .tmp left


def test_checkpoint_is_loaded_weights_only(tmp_path, capsys):
    # A checkpoint holding an arbitrary Python object is refused (weights_only=True never
    # unpickles code), with a one-line error instead of running it.
    import argparse
    images = write_pngs(tmp_path / "images", [1, 2])
    evil = tmp_path / "evil.pt"
    torch.save({"kind": classify.CHECKPOINT_KIND, "arch": "small", "classes": ["normal", "viral"],
                "size": SIZE, "test_dir": None, "model": classify.SmallCNN(2).state_dict(),
                "args": argparse.Namespace(a=1)}, evil)
    assert_user_error(["judge", "--ckpt", evil, "--images", images, "--expect", "viral"], capsys,
                      "cannot read checkpoint")


# ------------------------------------------------------------------------------------------
# Data helpers: folds, augmentation
# ------------------------------------------------------------------------------------------

def test_folds_are_disjoint_patient_aware_and_stratified(synth):
    files = classify.class_folders(synth / "train", "train")
    classes = classify.sort_classes(files)
    paths = [str(p) for c in classes for p in files[c]]
    labels = np.array([i for i, c in enumerate(classes) for _ in files[c]])
    patients, note = classify.read_patients(synth / "train", paths)
    assert "patient-aware" in note
    assert len(set(patients)) < len(paths)  # the phantom set has several images per patient
    fold_of = classify.make_folds(labels, patients, 4, seed=0)
    assert sorted(set(fold_of.tolist())) == [0, 1, 2, 3]
    for p in set(patients):  # every patient sits in exactly one fold
        assert len({fold_of[i] for i, q in enumerate(patients) if q == p}) == 1
    counts = np.array([[np.sum((fold_of == f) & (labels == c)) for c in range(3)] for f in range(4)])
    assert counts.sum() == len(paths) and (counts > 0).all()
    assert counts.max() - counts.min() <= 4  # a patient is at most a few images
    assert np.array_equal(fold_of, classify.make_folds(labels, patients, 4, seed=0))


def test_folds_without_manifest_split_images_and_say_so(synth, tmp_path):
    split = copy_class(synth / "train" / "normal", tmp_path / "data" / "train" / "normal", 4).parent
    paths = [str(p) for p in sorted((split / "normal").glob("*.png"))]
    patients, note = classify.read_patients(split, paths)
    assert len(set(patients)) == 4 and "folds split images, not patients" in note


def test_train_with_folds_evaluates_on_disjoint_held_out_patients(synth, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_main(["train", "--real", synth / "train", "--folds", 2, "--size", SIZE,
                                "--epochs", 1, "--max-steps", 1, "--quiet", "--out", out], capsys)
    assert code == 0
    manifest = {r["path"]: r["patient"] for r in csv.DictReader(open(synth / "manifest.csv"))}
    held = []
    for k in (1, 2):
        rows = list(csv.DictReader(open(out / "real" / f"seed0_fold{k}" / "predictions.csv")))
        held.append({Path(r["path"]).resolve().relative_to(synth.resolve()).as_posix() for r in rows})
    assert not held[0] & held[1]
    assert len(held[0] | held[1]) == 3 * N_TRAIN  # together the two held-out folds are all of train
    assert not {manifest[p] for p in held[0]} & {manifest[p] for p in held[1]}
    results = json.loads((out / "results.json").read_text())
    runs = results["modes"]["real"]["runs"]
    assert [r["fold"] for r in runs] == [1, 2]
    assert [sum(r["n_train"].values()) for r in runs] == [len(held[1]), len(held[0])]
    assert "2 held-out folds" in (out / "table.txt").read_text()


def test_augment_keeps_range_shape_and_is_seeded():
    x = torch.rand(4, 1, SIZE, SIZE)
    a = classify.augment_batch(x, torch.Generator().manual_seed(1))
    b = classify.augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


# ------------------------------------------------------------------------------------------
# A short training on the synthetic set; its checkpoint feeds the judge and FID tests
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """One run of the default small CNN on the phantom set, batch 16 for enough steps."""
    out = tmp_path_factory.mktemp("trained")
    classify.main(["train", "--real", str(synth / "train"), "--test", str(synth / "test"),
                   "--size", str(SIZE), "--epochs", str(TRAIN_EPOCHS), "--min-steps", "0",
                   "--batch-size", "16", "--quiet", "--out", str(out)])
    return out


def test_short_training_reaches_high_accuracy(trained, synth):
    results = json.loads((trained / "results.json").read_text())
    run = results["modes"]["real"]["runs"][0]
    assert results["classes"] == CLASSES
    assert run["n"] == 3 * N_TEST and run["n_train"] == {c: N_TRAIN for c in CLASSES}
    assert run["accuracy"] >= 0.8, run["confusion"]  # chance is 0.33
    run_dir = trained / "real" / "seed0"
    for name in ("model.pt", "predictions.csv", "confusion.png", "log.csv"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    assert len(rows) == 3 * N_TEST and {r["true"] for r in rows} == set(CLASSES)
    assert Image.open(run_dir / "confusion.png").size[0] > 100
    assert not list(trained.rglob("*.tmp*"))  # checkpoints and PNGs were moved into place
    ckpt = torch.load(run_dir / "model.pt", weights_only=True, map_location="cpu")
    assert ckpt["kind"] == "classify" and ckpt["arch"] == "small" and ckpt["size"] == SIZE
    assert ckpt["test_dir"] == str((synth / "test").resolve())
    table = (trained / "table.txt").read_text()
    assert "Sensitivity" in table and "Specificity" in table and "1 run" in table


def test_small_training_sets_get_at_least_min_steps(synth, tmp_path, capsys):
    # 2 images per class = one batch per epoch: --epochs 1 alone would be a single update
    code, _, _ = run_main(train_args(synth, tmp_path, "--real-per-class", 2, "--min-steps", 5,
                                     "--max-steps", 0), capsys)
    assert code == 0
    run = json.loads((tmp_path / "run" / "results.json").read_text())["modes"]["real"]["runs"][0]
    assert run["n_train"] == {c: 2 for c in CLASSES}
    assert (run["steps"], run["epochs"]) == (5, 5)
    log = list(csv.DictReader(open(tmp_path / "run" / "real" / "seed0" / "log.csv")))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5]


def test_batchnorm_statistics_are_those_of_the_final_weights(synth, tmp_path, capsys):
    # One batch of all 144 training images (batch 256): after training, the first BatchNorm's
    # running mean and variance must be that batch's statistics under the saved weights, computed
    # here independently with F.conv2d (a moving average after 2 steps would be ~80 % its init).
    code, _, err = run_main(train_args(synth, tmp_path, "--batch-size", 256, "--max-steps", 2), capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "real" / "seed0" / "model.pt", weights_only=True)["model"]
    files = sorted((synth / "train").glob("*/*.png"))
    x = classify.load_images(files, SIZE, 1).float() / 255
    h = torch.nn.functional.conv2d((x - 0.5) / 0.5, state["body.0.weight"], padding=1)
    assert torch.allclose(state["body.1.running_mean"], h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert torch.allclose(state["body.1.running_var"], h.var((0, 2, 3)), rtol=1e-4, atol=1e-7)


def test_training_is_deterministic_on_cpu(synth, tmp_path, capsys):
    weights = []
    for name in ("a", "b"):
        code, _, _ = run_main(["train", "--real", synth / "train", "--test", synth / "test",
                               "--size", SIZE, "--epochs", 2, "--max-steps", 3, "--batch-size", 16,
                               "--augment", "--quiet", "--out", tmp_path / name], capsys)
        assert code == 0
        weights.append(torch.load(tmp_path / name / "real" / "seed0" / "model.pt",
                                  weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ------------------------------------------------------------------------------------------
# --mode, --fake, --seeds, subsampling: which images each run trains on
# ------------------------------------------------------------------------------------------

def test_modes_read_the_right_folders(synth, tmp_path, capsys):
    # Fakes in both layouts: FAKE/<class>/ (AC-GAN) for normal and bacterial, and a flat folder
    # given as viral=DIR (DCGAN / CycleGAN). Counts differ from the real set so we can tell.
    fake = tmp_path / "fake"
    copy_class(synth / "train" / "normal", fake / "normal", 5)
    copy_class(synth / "train" / "bacterial", fake / "bacterial", 6)
    flat = copy_class(synth / "train" / "viral", tmp_path / "dcgan_viral", 7)
    out = tmp_path / "run"
    code, stdout, _ = run_main(["train", "--real", synth / "train", "--test", synth / "test",
                                "--fake", fake, "--fake", f"viral={flat}", "--mode", "real,fake,real+fake",
                                "--real-per-class", 10, "--seeds", 2, "--size", SIZE, "--epochs", 1,
                                "--max-steps", 1, "--quiet", "--out", out], capsys)
    assert code == 0
    modes = json.loads((out / "results.json").read_text())["modes"]
    real_n = {"normal": 10, "bacterial": 10, "viral": 10}
    fake_n = {"normal": 5, "bacterial": 6, "viral": 7}
    for mode, expect in (("real", real_n), ("fake", fake_n),
                         ("real+fake", {c: real_n[c] + fake_n[c] for c in real_n})):
        runs = modes[mode]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["n_train"] == expect for r in runs), (mode, runs[0]["n_train"])
        assert all(r["n"] == 3 * N_TEST for r in runs)  # always evaluated on the real test set
        assert (out / mode / "seed1" / "model.pt").is_file()
    table = (out / "table.txt").read_text()
    assert "2 seeds = 2 runs" in table and "real+fake" in table and "±" in table
    # the subsample depends on the seed: seed 0 and seed 1 trained on different real images
    p0 = torch.load(out / "real" / "seed0" / "model.pt", weights_only=True)
    assert p0["mode"] == "real" and p0["seed"] == 0


def test_fake_per_class_limits_the_fakes(synth, tmp_path, capsys):
    fake = tmp_path / "fake"
    for c in ("normal", "bacterial", "viral"):
        copy_class(synth / "train" / c, fake / c, 8)
    code, _, _ = run_main(["train", "--real", synth / "train", "--test", synth / "test", "--fake", fake,
                           "--mode", "fake", "--fake-per-class", 3, "--size", SIZE, "--epochs", 1,
                           "--max-steps", 1, "--quiet", "--out", tmp_path / "run"], capsys)
    assert code == 0
    run = json.loads((tmp_path / "run" / "results.json").read_text())["modes"]["fake"]["runs"][0]
    assert run["n_train"] == {"normal": 3, "bacterial": 3, "viral": 3}


# ------------------------------------------------------------------------------------------
# Judge: a network whose probabilities are known in closed form
# ------------------------------------------------------------------------------------------

JUDGE_K, JUDGE_B = 10.0, -5.0  # logit of "viral" = K * 2x + B for a uniform image of gray x/255


def controlled_checkpoint(path, test_dir, classes=("normal", "bacterial", "viral")):
    """A SmallCNN that passes 2x (x = gray level / 255) through channel 0 of every layer, so the
    logits are (0, 0, 2Kx + B) and p(viral) = e^z / (e^z + 2) for a uniform image."""
    model = classify.SmallCNN(len(classes))
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
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[classes.index("viral"), 0] = JUDGE_K
        model.head.bias[classes.index("viral")] = JUDGE_B
    torch.save({"kind": classify.CHECKPOINT_KIND, "arch": "small", "classes": list(classes),
                "size": SIZE, "model": model.state_dict(), "test_dir": str(test_dir)}, path)
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
    # p > 0.98  <=>  z > ln(98)  <=>  gray > 122.2: 130, 200, 255 of the generated images
    assert r["generated"]["n"] == 5
    assert r["generated"]["accepted"] == pytest.approx(3 / 5)
    assert r["generated"]["argmax_share"] == pytest.approx(4 / 5)     # z > 0 <=> gray > 63.75
    assert r["generated"]["mean_prob"] == pytest.approx(np.mean([p_viral(g) for g in gen_levels]), abs=1e-6)
    assert r["real baseline"]["n"] == 3
    assert r["real baseline"]["accepted"] == pytest.approx(2 / 3)
    assert r["real baseline"]["mean_prob"] == pytest.approx(np.mean([p_viral(g) for g in base_levels]), abs=1e-6)
    assert "accepted" in out and "real baseline" in out and "classify.py fid" in out

    # A stricter threshold, the AC-GAN layout (IMAGES/<class>/) and an explicit --baseline
    acgan = tmp_path / "acgan"
    shutil.copytree(gen, acgan / "viral")
    other = write_pngs(tmp_path / "other" / "viral", [0])
    code, out, err = run_main(["judge", "--ckpt", ckpt, "--images", acgan, "--expect", "viral",
                               "--threshold", 0.9999, "--baseline", other.parent,
                               "--json", tmp_path / "j2.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "j2.json").read_text())
    expect = np.mean([p_viral(g) > 0.9999 for g in gen_levels])        # 200 and 255
    assert r["generated"]["accepted"] == pytest.approx(expect) == pytest.approx(2 / 5)
    assert r["real baseline"]["n"] == 1 and r["real baseline"]["accepted"] == 0.0


def test_judge_uses_the_checkpoints_test_folder(trained, synth, tmp_path, capsys):
    ckpt = trained / "real" / "seed0" / "model.pt"
    code, out, err = run_main(["judge", "--ckpt", ckpt, "--images", synth / "test" / "viral",
                               "--expect", "viral", "--json", tmp_path / "j.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "j.json").read_text())
    # judged on the very images of the baseline, the two rows agree
    assert r["generated"] == {**r["real baseline"], "folder": str(synth / "test" / "viral")}
    assert r["real baseline"]["folder"] == str((synth / "test" / "viral").resolve())


# ------------------------------------------------------------------------------------------
# One-line errors, exit code 2
# ------------------------------------------------------------------------------------------

def train_args(synth, tmp_path, *extra):
    return ["train", "--real", synth / "train", "--test", synth / "test", "--size", SIZE,
            "--epochs", 1, "--max-steps", 1, "--quiet", "--out", tmp_path / "run", *extra]


def test_error_missing_folders(synth, tmp_path, capsys):
    assert_user_error(["train", "--real", tmp_path / "nope", "--test", synth / "test"], capsys,
                      "does not exist", "prep.py synthetic", "prep.py kermany")
    assert_user_error(["train", "--real", synth / "train", "--test", tmp_path / "nope"], capsys,
                      "test folder")
    assert_user_error(train_args(synth, tmp_path, "--mode", "fake", "--fake", tmp_path / "nope"),
                      capsys, "fake folder")
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake", "--fake",
                                 f"viral={tmp_path / 'nope'}"), capsys, "does not exist")


def test_error_class_names_differ(synth, tmp_path, capsys):
    test = tmp_path / "test"
    shutil.copytree(synth / "test", test)
    write_pngs(test / "covid", [10, 20])
    assert_user_error(["train", "--real", synth / "train", "--test", test], capsys,
                      "class names differ", "covid")
    fake = tmp_path / "fake"
    write_pngs(fake / "pneumonia", [10, 20])
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake", "--fake", fake), capsys,
                      "class names differ", "pneumonia")
    # --mode fake needs every class of the test set among the fakes, and says which to add
    assert_user_error(train_args(synth, tmp_path, "--mode", "fake", "--fake",
                                 f"viral={synth / 'train' / 'viral'}"), capsys,
                      "missing: normal, bacterial", "--fake normal=DIR")
    # a flat --test folder: CLASS=DIR is a --fake form, so it is not suggested for --test
    line = assert_user_error(["train", "--real", synth / "train", "--test", synth / "test" / "viral"],
                             capsys, "test folder", "no <class>/ subfolders")
    assert "CLASS=DIR" not in line


def test_error_empty_fake_folder(synth, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake", "--fake",
                                 f"viral={tmp_path / 'empty'}"), capsys, "holds no .png")
    (tmp_path / "fake" / "viral").mkdir(parents=True)
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake", "--fake", tmp_path / "fake"),
                      capsys, "holds no images")
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake", "--fake", tmp_path / "empty"),
                      capsys, "no <class>/ subfolders")


def test_error_bad_flag_combinations(synth, tmp_path, capsys):
    assert_user_error(train_args(synth, tmp_path, "--mode", "real+fake"), capsys, "--fake")
    assert_user_error(train_args(synth, tmp_path, "--fake", synth / "train"), capsys, "--mode")
    assert_user_error(train_args(synth, tmp_path, "--folds", 4), capsys, "--folds")
    assert_user_error(train_args(synth, tmp_path, "--mode", "synthetic"), capsys, "unknown mode")
    assert_user_error(train_args(synth, tmp_path, "--pretrained"), capsys, "--pretrained")


def test_error_checkpoint_of_another_architecture(tmp_path, capsys):
    images = write_pngs(tmp_path / "images", [1, 2])
    wrong = tmp_path / "resnet_as_small.pt"
    torch.save({"kind": classify.CHECKPOINT_KIND, "arch": "small", "classes": ["normal", "viral"],
                "size": SIZE, "test_dir": None,
                "model": classify.build_model("resnet18", 2).state_dict()}, wrong)
    assert_user_error(["judge", "--ckpt", wrong, "--images", images, "--expect", "viral"], capsys,
                      "do not fit architecture small")
    gan = tmp_path / "dcgan.pt"
    torch.save({"G": {"w": torch.zeros(1)}, "D": {"w": torch.zeros(1)}, "step": 3}, gan)
    assert_user_error(["judge", "--ckpt", gan, "--images", images, "--expect", "viral"], capsys,
                      "not a classify.py checkpoint")
    assert_user_error(["fid", "--ckpt", gan, images, images], capsys, "not a classify.py checkpoint")
    assert_user_error(["judge", "--ckpt", tmp_path / "none.pt", "--images", images,
                       "--expect", "viral"], capsys, "does not exist")


def test_error_judge_inputs(tmp_path, capsys):
    ckpt = controlled_checkpoint(tmp_path / "model.pt", tmp_path / "test")
    images = write_pngs(tmp_path / "images", [1, 2])
    assert_user_error(["judge", "--ckpt", ckpt, "--images", images, "--expect", "covid"], capsys,
                      "not a class of this classifier")
    assert_user_error(["judge", "--ckpt", ckpt, "--images", tmp_path / "nope", "--expect", "viral"],
                      capsys, "does not exist")
    # the checkpoint's test folder is gone: say how to pass one
    assert_user_error(["judge", "--ckpt", ckpt, "--images", images, "--expect", "viral"], capsys,
                      "--baseline")


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_v2_s"])
def test_error_pretrained_offline(arch, synth, tmp_path, capsys, monkeypatch):
    # torchvision and torch.hub run for real against an empty cache; only the HTTP download is
    # replaced by one that fails as it does offline. It must be our stand-in that failed, so the
    # test neither uses the network nor passes merely because this machine is offline.
    import urllib.error
    urls = []

    def offline(url, dst, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    line = assert_user_error(train_args(synth, tmp_path, "--arch", arch, "--pretrained"), capsys,
                             "ImageNet weights", arch, "URLError", str(tmp_path / "hub" / "checkpoints"),
                             "drop --pretrained")
    assert len(urls) == 1 and urls[0] in line and urls[0].startswith("https://download.pytorch.org/")
    assert not (tmp_path / "run").exists()  # it failed before loading data or writing anything


def test_pretrained_loads_downloaded_weights_and_sums_rgb_filters(synth, tmp_path, capsys, monkeypatch):
    # The "download" writes known weights (a random resnet18) where torch.hub caches files.
    import torchvision
    imagenet = torchvision.models.resnet18().state_dict()
    urls = []

    def download(url, dst, *args, **kwargs):
        urls.append(url)
        torch.save(imagenet, dst)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = classify.build_model("resnet18", 3, pretrained=True)
    body = model.body.state_dict()
    assert torch.equal(body["conv1.weight"], imagenet["conv1.weight"].sum(1, keepdim=True))
    assert all(torch.equal(body[k], imagenet[k]) for k in imagenet if not k.startswith(("conv1", "fc")))
    assert model.mean.item() == pytest.approx(classify.IMAGENET_GRAY_MEAN)
    code, _, err = run_main(train_args(synth, tmp_path, "--arch", "resnet18", "--pretrained"), capsys)
    assert code == 0, err
    assert len(urls) == 1                  # downloaded once, then read from the cache
    # the checkpoint carries everything: loading it needs no download (urls stays at 1)
    loaded, ckpt = classify.load_checkpoint(tmp_path / "run" / "real" / "seed0" / "model.pt",
                                            torch.device("cpu"))
    assert ckpt["arch"] == "resnet18" and len(urls) == 1
    assert loaded.mean.item() == pytest.approx(classify.IMAGENET_GRAY_MEAN)


def test_error_as_subprocess_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "classify.py", "train", "--real", str(tmp_path / "nope"),
                        "--test", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_non_finite_loss_stops_with_one_line_and_no_model(synth, tmp_path, capsys):
    code, _, err = run_main(train_args(synth, tmp_path, "--lr", 1e30, "--max-steps", 3), capsys)
    assert code == 1
    assert err.strip().startswith("error: non-finite loss") and err.strip().count("\n") == 0
    assert not (tmp_path / "run" / "real" / "seed0" / "model.pt").exists()


# ------------------------------------------------------------------------------------------
# Domain FID in the classifier's penultimate features
# ------------------------------------------------------------------------------------------

def test_domain_fid_of_a_folder_with_itself_is_zero(trained, synth, tmp_path, capsys):
    ckpt = trained / "real" / "seed0" / "model.pt"
    code, out, err = run_main(["fid", "--ckpt", ckpt, synth / "test", synth / "test",
                               "--json", tmp_path / "self.json"], capsys)
    assert code == 0, err
    same = json.loads((tmp_path / "self.json").read_text())
    assert (same["n_real"], same["n_fake"], same["feature_dim"]) == (3 * N_TEST, 3 * N_TEST, 128)
    assert "N_real = 36" in out and "D = 128" in out
    assert "below the feature dimension" in err  # 36 images < 128 features: warned, still computed
    code, _, err = run_main(["fid", "--ckpt", ckpt, synth / "test" / "normal", synth / "test" / "viral",
                             "--json", tmp_path / "diff.json"], capsys)
    assert code == 0, err
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert diff["fid"] > 1e-3 and abs(same["fid"]) < 1e-6 * diff["fid"]


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # inside pytorch-fid
def test_domain_fid_matches_pytorch_fid_formula(trained, synth, tmp_path, capsys):
    """Two full-rank sets (144 images > 128 features): our number against pytorch-fid's own
    Frechet distance on the same penultimate features."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    other = tmp_path / "other"
    prep.make_synthetic(other, n=N_TRAIN, size=SIZE, seed=1)  # new phantom patients
    ckpt = trained / "real" / "seed0" / "model.pt"
    code, _, err = run_main(["fid", "--ckpt", ckpt, synth / "train", other / "train",
                             "--json", tmp_path / "f.json"], capsys)
    assert code == 0, err
    assert "below the feature dimension" not in err
    ours = json.loads((tmp_path / "f.json").read_text())["fid"]
    model, _ = classify.load_checkpoint(ckpt, torch.device("cpu"))
    stats = []
    for folder in (synth / "train", other / "train"):
        files = sorted(folder.glob("*/*.png"))
        feats = classify.extract_features(model, classify.load_images(files, SIZE, 1), torch.device("cpu"))
        stats += [feats.mean(0), np.cov(feats, rowvar=False)]
    assert ours == pytest.approx(calculate_frechet_distance(*stats), rel=1e-6)


def test_images_are_resized_and_corrupt_ones_are_one_line_errors(synth, tmp_path, capsys):
    write_pngs(tmp_path / "big", [200], size=2 * SIZE)
    x = classify.load_images(sorted((tmp_path / "big").glob("*.png")), SIZE, workers=2)
    assert x.shape == (1, 1, SIZE, SIZE) and x.dtype == torch.uint8 and int(x.float().mean()) == 200
    test = tmp_path / "test"
    shutil.copytree(synth / "test", test)
    (test / "viral" / "broken.png").write_bytes(b"not a png")
    assert_user_error(["train", "--real", synth / "train", "--test", test, "--size", SIZE], capsys,
                      "cannot read image", "broken.png")
