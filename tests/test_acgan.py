"""Tests for acgan.py: shapes, losses against closed forms, one step, runs, exact resume,
generation, bad inputs, NaN and Ctrl-C handling, the speed switches and the eval path.

Everything runs on the CPU at 64x64 with narrow networks (--g-channels 32 --d-channels 8) and a
synthetic set of 8 images per class, so that the whole file stays well under two minutes.
"""
import csv
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import acgan  # noqa: E402
import prep  # noqa: E402

CLASSES = ["normal", "bacterial", "viral"]
N_PER_CLASS = 8        # 24 train images, batch 8 -> 3 steps per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and other test files may run beside us on a
    2-core machine (OpenMP threads then spin against each other). Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=N_PER_CLASS, size=64, seed=0)
    return out


def train_args(data, out, *extra):
    """A fast CPU run: size 64, narrow networks, batch 8, every step logged."""
    return ["--data", str(data), "--out", str(out), "--size", "64", "--g-channels", "32",
            "--d-channels", "8", "--batch-size", "8", "--device", "cpu", "--workers", "0",
            "--log-every", "1", "--sample-every", "100", "--save-every", "100", *extra]


def run_main(argv, capsys=None):
    """Call acgan.main in-process; return (exit code, stderr lines)."""
    try:
        acgan.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines() if capsys else []
    return code, err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def assert_same_state(a, b):
    """torch.equal on every tensor of two (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


# ----------------------------------------------------------------------------------------------
# Models and losses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,start", [(64, 4), (112, 7), (128, 8)])
def test_shapes_at_each_size(size, start):
    G = acgan.Generator(n_classes=3, channels=1, size=size, g_channels=32)
    D = acgan.Discriminator(n_classes=3, channels=1, size=size, d_channels=8)
    z, y = torch.randn(2, acgan.LATENT_DIM), torch.tensor([0, 2])
    x = G(z, y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1                      # tanh output
    assert G.s0 == start                                       # size / 16
    src, cls = D(x)
    assert src.shape == (2,) and cls.shape == (2, 3)


def test_paper_generator_layout_and_three_channels():
    """Paper 3.3 at 112: embedding 50 -> dense to one 7x7 map; z -> dense to 1024x7x7; 4 ConvT."""
    G = acgan.Generator(n_classes=3, channels=3, size=112)
    assert G.label_embedding.embedding_dim == 50
    assert G.label_dense.out_features == 7 * 7
    assert G.noise_dense.out_features == 1024 * 7 * 7
    convs = [m for m in G.upsample if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.in_channels for c in convs] == [1025, 512, 256, 128] and convs[-1].out_channels == 3
    norms = [m for m in G.upsample if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3
    with torch.no_grad():
        assert G(torch.randn(1, acgan.LATENT_DIM), torch.tensor([1])).shape == (1, 3, 112, 112)


def test_discriminator_returns_logits_and_sane_batchnorm():
    """No Sigmoid/Softmax before the losses, and no BatchNorm2d(C, 0.8) eps slip."""
    D = acgan.Discriminator(n_classes=3, channels=1, size=64, d_channels=8)
    kinds = {type(m) for m in D.modules()}
    assert not kinds & {torch.nn.Sigmoid, torch.nn.Softmax, torch.nn.LogSoftmax}
    assert all(m.eps == 1e-5 for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert any(isinstance(m, torch.nn.Dropout) for m in D.modules())
    with torch.no_grad():   # big weights give logits far outside [0, 1]: they are not probabilities
        for p in D.parameters():
            p.fill_(0.5)
        src, cls = D.eval()(torch.ones(1, 1, 64, 64))
    assert src.abs().max() > 1 and cls.abs().max() > 1


def test_losses_equal_hand_computed_closed_form():
    """-log sigmoid(x) = log(1 + e^-x), -log(1 - sigmoid(x)) = log(1 + e^x), and
    cross-entropy = logsumexp(l) - l[y], written out in plain floats."""
    src_real, src_fake = [2.0, -1.0], [0.5, -3.0]
    cls_real, y_real = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]], [0, 2]
    cls_fake, y_fake = [[0.0, 0.0, 0.0], [3.0, -1.0, 1.0]], [1, 0]

    def bce_real(xs):
        return sum(math.log(1 + math.exp(-x)) for x in xs) / len(xs)

    def bce_fake(xs):
        return sum(math.log(1 + math.exp(x)) for x in xs) / len(xs)

    def ce(rows, ys):
        return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, ys)) / len(rows)

    t = torch.tensor
    loss_d, d_terms = acgan.discriminator_loss(t(src_real), t(cls_real), t(y_real),
                                               t(src_fake), t(cls_fake), t(y_fake))
    assert d_terms["d_src_real"].item() == pytest.approx(bce_real(src_real), rel=1e-6)
    assert d_terms["d_src_fake"].item() == pytest.approx(bce_fake(src_fake), rel=1e-6)
    assert d_terms["d_cls_real"].item() == pytest.approx(ce(cls_real, y_real), rel=1e-6)
    assert d_terms["d_cls_fake"].item() == pytest.approx(ce(cls_fake, y_fake), rel=1e-6)
    expected_d = bce_real(src_real) + bce_fake(src_fake) + ce(cls_real, y_real) + ce(cls_fake, y_fake)
    assert loss_d.item() == pytest.approx(expected_d, rel=1e-6)
    # G: its fakes judged real (non-saturating) and of the asked class
    loss_g, g_terms = acgan.generator_loss(t(src_fake), t(cls_fake), t(y_fake))
    assert g_terms["g_src"].item() == pytest.approx(bce_real(src_fake), rel=1e-6)
    assert loss_g.item() == pytest.approx(bce_real(src_fake) + ce(cls_fake, y_fake), rel=1e-6)


def test_one_step_is_finite_and_changes_both_networks():
    torch.manual_seed(0)
    G = acgan.Generator(3, 1, 64, g_channels=32)
    D = acgan.Discriminator(3, 1, 64, d_channels=8)
    G.apply(acgan.init_weights)
    D.apply(acgan.init_weights)
    g0 = [p.detach().clone() for p in G.parameters()]
    d0 = [p.detach().clone() for p in D.parameters()]
    opt_g = acgan.make_optimizer("rmsprop", G.parameters(), acgan.RMSPROP_LR, fused=False)
    opt_d = acgan.make_optimizer("rmsprop", D.parameters(), acgan.RMSPROP_LR, fused=False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    stats = acgan.train_step(G, D, opt_g, opt_d, scaler, acgan.nullcontext(), x,
                             torch.tensor([0, 1, 2, 0]), 3, acgan.LATENT_DIM)
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    # every D layer moved (both heads included), and D is trainable again after the G step
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())


def test_balanced_order_is_balanced_and_a_function_of_seed_and_epoch():
    labels = torch.tensor([0] * 10 + [1] * 50 + [2] * 20)     # 1 : 5 : 2 imbalance
    order = acgan.balanced_order(labels, 3, steps=300, batch_size=32, seed=0, epoch=1)
    share = torch.bincount(labels[order.flatten()], minlength=3).double() / order.numel()
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.02)
    assert torch.equal(order, acgan.balanced_order(labels, 3, 300, 32, seed=0, epoch=1))
    assert not torch.equal(order, acgan.balanced_order(labels, 3, 300, 32, seed=0, epoch=2))


def test_sample_grid_is_one_row_per_class_from_the_same_noise_in_eval_mode(tmp_path):
    """Every row gets the same 8 noise vectors and only its own label; the pixels are the eval-mode
    (running BatchNorm statistics) output mapped [-1, 1] -> [0, 255]; G is back in train mode."""
    z, y = acgan.fixed_sample_inputs(3, acgan.LATENT_DIM, seed=0, device="cpu")
    per = acgan.SAMPLES_PER_CLASS
    assert torch.equal(z[:per], z[per:2 * per]) and torch.equal(z[:per], z[2 * per:])
    assert y.tolist() == [0] * per + [1] * per + [2] * per
    torch.manual_seed(0)
    G = acgan.Generator(3, 1, 64, g_channels=32)
    G(torch.randn(16, acgan.LATENT_DIM), torch.randint(3, (16,)))   # move the running statistics
    acgan.save_sample_grid(G, z, y, tmp_path / "grid.png")
    assert G.training
    with torch.no_grad():
        expected = ((G.eval()(z, y) + 1) / 2 * 255).round()            # (24, 1, 64, 64)
    with Image.open(tmp_path / "grid.png") as im:
        grid = torch.from_numpy(np.array(im)).float()                 # (H, W)
    for i in range(3 * per):                                          # padding 2 around each cell
        r, c = divmod(i, per)
        cell = grid[2 + r * 66: 2 + r * 66 + 64, 2 + c * 66: 2 + c * 66 + 64]
        assert (cell - expected[i, 0]).abs().max() <= 1


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def test_short_run_writes_all_outputs(synth, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_main(train_args(synth / "train", out, "--max-steps", "4", "--sample-every", "2",
                                  "--save-every", "2"), capsys)
    assert code == 0
    import json
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == CLASSES and config["torch"] and config["device_name"]
    assert config["class_counts"] == {c: N_PER_CLASS for c in CLASSES}
    rows = read_csv(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for key in ("loss_d", "d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake", "loss_g",
                "g_src", "g_cls", "d_x", "d_g_z", "ms_per_step"):
        assert math.isfinite(float(rows[-1][key]))
    epochs = read_csv(out / "epochs.csv")                     # 3 steps per epoch: one epoch done
    assert len(epochs) == 1 and int(epochs[0]["n_images"]) == 24
    for key in ("d_acc_real", "d_acc_fake", "cls_acc_real", "cls_acc_fake"):
        assert 0 <= float(epochs[0][key]) <= 1
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step_000002.png", "step_000004.png"]
    with Image.open(out / "samples" / "step_000004.png") as im:    # 3 rows (classes) x 8 columns
        assert im.mode == "L" and im.size == (8 * 66 + 2, 3 * 66 + 2)
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", "step_000002.pt",
                                                                "step_000004.pt"}
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["model"] == "acgan" and ckpt["step"] == 4 and ckpt["classes"] == CLASSES
    assert {"generator", "discriminator", "opt_g", "opt_d", "scaler", "rng_cpu", "args"} <= ckpt.keys()


def test_resume_equals_uninterrupted(synth, tmp_path, capsys):
    """Stop after 2 steps, resume to 5 (across an epoch boundary): same weights, optimiser states
    and logged losses as an uninterrupted 5-step run."""
    data = synth / "train"
    assert run_main(train_args(data, tmp_path / "a", "--max-steps", "5"), capsys)[0] == 0
    assert run_main(train_args(data, tmp_path / "b", "--max-steps", "2"), capsys)[0] == 0
    assert run_main(train_args(data, tmp_path / "b", "--max-steps", "5", "--resume"), capsys)[0] == 0
    a, b = load(tmp_path / "a/checkpoints/last.pt"), load(tmp_path / "b/checkpoints/last.pt")
    assert a["step"] == b["step"] == 5
    for key in ("generator", "discriminator", "opt_g", "opt_d", "rng_cpu", "epoch_sums"):
        assert_same_state(a[key], b[key])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]  # noqa: E731
    assert strip(read_csv(tmp_path / "a/log.csv")) == strip(read_csv(tmp_path / "b/log.csv"))
    assert read_csv(tmp_path / "a/epochs.csv") == read_csv(tmp_path / "b/epochs.csv")


def test_no_fast_decodes_the_same_batches_and_random_data_runs(synth, tmp_path, capsys):
    """On the CPU --fast and --no-fast differ only in the input pipeline (preloaded tensor vs PNGs
    decoded by a DataLoader each epoch), so they must end with identical weights."""
    data = synth / "train"
    assert run_main(train_args(data, tmp_path / "fast", "--max-steps", "4"), capsys)[0] == 0
    assert run_main(train_args(data, tmp_path / "slow", "--max-steps", "4", "--no-fast"), capsys)[0] == 0
    fast, slow = load(tmp_path / "fast/checkpoints/last.pt"), load(tmp_path / "slow/checkpoints/last.pt")
    assert_same_state(fast["generator"], slow["generator"])
    assert_same_state(fast["discriminator"], slow["discriminator"])
    code, _ = run_main(train_args(tmp_path / "nowhere", tmp_path / "rnd", "--max-steps", "2",
                                  "--random-data"), capsys)
    assert code == 0 and len(read_csv(tmp_path / "rnd/log.csv")) == 2


def test_fresh_run_refuses_a_folder_holding_a_run(synth, tmp_path, capsys):
    """A second run without --resume into the same --out would append to its log.csv and replace
    its checkpoints: refused, before any data is read. Rows left by a run that stopped before its
    first checkpoint are dropped, not mixed with the new run's."""
    out = tmp_path / "run"
    assert run_main(train_args(synth / "train", out, "--max-steps", "2"), capsys)[0] == 0
    code, err = run_main(train_args(synth / "train", out, "--max-steps", "2"), capsys)
    assert code == 2
    one_error_line(err, str(out), "--resume")
    assert [int(r["step"]) for r in read_csv(out / "log.csv")] == [1, 2]
    shutil.rmtree(out / "checkpoints")                         # as if it had died before saving
    assert run_main(train_args(synth / "train", out, "--max-steps", "1"), capsys)[0] == 0
    assert [int(r["step"]) for r in read_csv(out / "log.csv")] == [1]


@pytest.mark.parametrize("size", [112, 128])
def test_other_sizes_train_from_64px_pngs(size, synth, tmp_path, capsys):
    """--size 112 (the paper) and 128 run end to end; the 64 px PNGs are resized on load."""
    out = tmp_path / "run"
    code, _ = run_main(train_args(synth / "train", out, "--max-steps", "1") + ["--size", str(size)], capsys)
    assert code == 0
    assert all(math.isfinite(float(v)) for k, v in read_csv(out / "log.csv")[0].items() if k != "epoch")
    with Image.open(out / "samples" / "step_000001.png") as im:       # 3 rows x 8 columns of S x S
        assert im.size == (8 * (size + 2) + 2, 3 * (size + 2) + 2)


def test_paper_defaults_and_adam_alternative():
    """Paper 3.4: RMSprop, lr 1e-4, batch 32, 112 px; --optimizer adam is the alternative."""
    args = acgan.check_args(acgan.parse_args(["--out", "x"]))
    assert (args.optimizer, args.lr, args.batch_size, args.size) == ("rmsprop", 1e-4, 32, 112)
    assert args.classes == CLASSES and args.amp is None                # --amp unset: auto
    w = [torch.nn.Parameter(torch.zeros(2))]
    assert type(acgan.make_optimizer(args.optimizer, w, args.lr, fused=False)) is torch.optim.RMSprop
    adam = acgan.check_args(acgan.parse_args(["--out", "x", "--optimizer", "adam"]))
    opt = acgan.make_optimizer(adam.optimizer, w, adam.lr, fused=False)
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)


def test_help_states_the_class_imbalance_rule(capsys):
    with pytest.raises(SystemExit) as e:
        acgan.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "balanced sampling" in text and "no class weights" in text


def test_amp_on_cpu_is_bf16_finite_and_close_to_fp32(synth, tmp_path, capsys):
    """Explicit --amp on a CPU: bf16 autocast (no GradScaler). Losses finite and, over 3 steps from
    the same seed, within bf16 noise of the fp32 run; the checkpoint still holds fp32 weights."""
    data = synth / "train"
    assert run_main(train_args(data, tmp_path / "bf16", "--max-steps", "3", "--amp"), capsys)[0] == 0
    assert run_main(train_args(data, tmp_path / "fp32", "--max-steps", "3", "--no-amp"), capsys)[0] == 0
    import json
    assert json.loads((tmp_path / "bf16/config.json").read_text())["amp"] == "bfloat16"
    assert json.loads((tmp_path / "fp32/config.json").read_text())["amp"] == "off"
    bf16, fp32 = read_csv(tmp_path / "bf16/log.csv"), read_csv(tmp_path / "fp32/log.csv")
    assert len(bf16) == len(fp32) == 3
    for a, b in zip(bf16, fp32):
        for key in ("loss_d", "d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake", "loss_g", "d_x", "d_g_z"):
            assert math.isfinite(float(a[key]))
            assert float(a[key]) == pytest.approx(float(b[key]), rel=0.05, abs=0.02), key
    ckpt = load(tmp_path / "bf16/checkpoints/last.pt")
    for net in ("generator", "discriminator"):
        assert all(v.dtype == torch.float32 for v in ckpt[net].values() if v.is_floating_point())
    assert (tmp_path / "bf16/samples/step_000003.png").exists()
    # the auto default is fp32 on the CPU, and so is --no-fast (asking it for --amp is an error)
    assert run_main(train_args(data, tmp_path / "auto", "--max-steps", "1"), capsys)[0] == 0
    assert json.loads((tmp_path / "auto/config.json").read_text())["amp"] == "off"
    assert run_main(train_args(data, tmp_path / "plain", "--max-steps", "1", "--no-fast"), capsys)[0] == 0
    assert json.loads((tmp_path / "plain/config.json").read_text())["amp"] == "off"


def test_preload_falls_back_to_disk_when_host_memory_is_short(synth, tmp_path, capsys, monkeypatch):
    """Issue 8: a preload needing more than half the free host memory is replaced by the disk
    (DataLoader) path, with one note; the run completes with the weights of a preloaded run.
    The first log row holds the first --log-every steps (tests/bench.py times rows[1:])."""
    data = synth / "train"
    assert acgan.free_host_memory_bytes() > 0                      # this machine can tell
    acgan.main(train_args(data, tmp_path / "pre", "--max-steps", "4", "--log-every", "2"))
    assert "note: preloading" not in capsys.readouterr().out
    monkeypatch.setattr(acgan, "free_host_memory_bytes", lambda: 100_000)   # < 2 x 24 x 64 x 64 bytes
    acgan.main(train_args(data, tmp_path / "disk", "--max-steps", "4", "--log-every", "2"))
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: preloading")]
    assert len(notes) == 1 and "reading PNGs from disk" in notes[0]
    import json
    assert json.loads((tmp_path / "disk/config.json").read_text())["preloaded"] is False
    assert [int(r["step"]) for r in read_csv(tmp_path / "disk/log.csv")] == [2, 4]
    pre, disk = load(tmp_path / "pre/checkpoints/last.pt"), load(tmp_path / "disk/checkpoints/last.pt")
    assert_same_state(pre["generator"], disk["generator"])
    monkeypatch.setattr(acgan, "free_host_memory_bytes", lambda: None)      # unknown: assume it fits
    assert acgan.preload_fits(10 ** 15)


def test_train_step_makes_no_host_sync(monkeypatch):
    """Issue 8: no .item(), bool(tensor), float(tensor), .tolist() or nonzero in the hot step; the
    loop reads its results only at log steps. Only calls made from acgan.py itself count (torch's
    optimisers read their CPU step counters, which is no device sync)."""
    calls = []
    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == acgan.__file__:
                calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    torch.manual_seed(0)
    G, D = acgan.Generator(3, 1, 64, g_channels=32), acgan.Discriminator(3, 1, 64, d_channels=8)
    opt_g = acgan.make_optimizer("rmsprop", G.parameters(), acgan.RMSPROP_LR, fused=False)
    opt_d = acgan.make_optimizer("adam", D.parameters(), acgan.ADAM_LR, fused=False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = acgan.to_model_input(torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8), 1, False)
    acgan.train_step(G, D, opt_g, opt_d, scaler, acgan.nullcontext(), x, torch.tensor([0, 1, 2, 0]),
                     3, acgan.LATENT_DIM)
    assert calls == []
    torch.ones(()).item()                                          # the spy itself works ...
    acgan.epoch_accuracies(3, 3, torch.ones(5))                    # ... and sees acgan.py's calls
    assert calls == ["tolist"]


def test_generate_writes_n_one_channel_pngs_per_class(synth, tmp_path, capsys):
    assert run_main(train_args(synth / "train", tmp_path / "run", "--max-steps", "1"), capsys)[0] == 0
    ckpt = tmp_path / "run/checkpoints/last.pt"
    code, _ = run_main(["--generate", "3", "--ckpt", str(ckpt), "--out", str(tmp_path / "fake"),
                        "--device", "cpu"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == sorted(CLASSES)
    for c in CLASSES:
        files = sorted((tmp_path / "fake" / c).glob("*.png"))
        assert len(files) == 3
        for f in files:
            with Image.open(f) as im:
                im.load()
                assert im.mode == "L" and im.size == (64, 64)
    # a subset of the classes, into a fresh folder
    code, _ = run_main(["--generate", "2", "--ckpt", str(ckpt), "--out", str(tmp_path / "sub"),
                        "--classes", "viral", "--device", "cpu"], capsys)
    assert code == 0 and [p.name for p in (tmp_path / "sub").iterdir()] == ["viral"]
    assert len(list((tmp_path / "sub/viral").glob("*.png"))) == 2
    # a --channels 3 model (the gray channel repeated) still writes one-channel PNGs
    assert run_main(train_args(synth / "train", tmp_path / "rgb", "--max-steps", "1", "--channels", "3"),
                    capsys)[0] == 0
    code, _ = run_main(["--generate", "1", "--ckpt", str(tmp_path / "rgb/checkpoints/last.pt"),
                        "--out", str(tmp_path / "fake3"), "--device", "cpu"], capsys)
    assert code == 0
    with Image.open(tmp_path / "fake3/normal/normal_00000.png") as im:
        assert im.mode == "L" and im.size == (64, 64)


# ----------------------------------------------------------------------------------------------
# Mistakes: one `error:` line, exit code 2
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(synth, tmp_path_factory):
    """Data folders with an empty class, a garbage PNG, a truncated PNG; a wrong checkpoint."""
    root = tmp_path_factory.mktemp("broken")
    empty = root / "empty"
    shutil.copytree(synth / "train", empty)
    for f in (empty / "viral").iterdir():
        f.unlink()
    garbage = root / "garbage"
    shutil.copytree(synth / "train", garbage)
    (garbage / "viral" / "viral_train_00000.png").write_bytes(b"this is not a png")
    truncated = root / "truncated"
    shutil.copytree(synth / "train", truncated)
    victim = next((truncated / "bacterial").iterdir())
    victim.write_bytes(victim.read_bytes()[: 200])
    torch.save({"model": "dcgan", "step": 1}, root / "dcgan.pt")
    (root / "text.pt").write_text("not a checkpoint")
    return root


def one_error_line(err, *words):
    assert len(err) == 1 and err[0].startswith("error: ") and " — " in err[0], err
    for w in words:
        assert w in err[0], err


@pytest.mark.parametrize("case", ["missing folder", "unknown class", "duplicate class",
                                  "single class", "unsupported size", "empty class", "garbage png",
                                  "truncated png", "garbage png no-fast", "bad flag", "no-fast amp",
                                  "resume dcgan checkpoint", "resume text file", "generate no ckpt",
                                  "lr nan", "lr negative", "negative workers", "negative eval-every",
                                  "out is a file", "generate out is a file"])
def test_user_mistakes_are_one_line_and_exit_2(case, synth, broken, tmp_path, capsys):
    data, out = synth / "train", tmp_path / "run"
    argv, words = {
        "missing folder": (train_args(tmp_path / "nope", out), ["prep.py kermany", "prep.py synthetic"]),
        "unknown class": (train_args(data, out, "--classes", "normal,fungal"), ["fungal"]),
        "duplicate class": (train_args(data, out, "--classes", "normal,viral,normal"), ["normal"]),
        "single class": (train_args(data, out, "--classes", "viral"), ["two classes"]),
        "unsupported size": (train_args(data, out) + ["--size", "100"], ["--size 100", "112"]),
        "empty class": (train_args(broken / "empty", out), ["viral", "no PNG"]),
        "garbage png": (train_args(broken / "garbage", out), ["viral_train_00000.png"]),
        "truncated png": (train_args(broken / "truncated", out), ["bacterial"]),
        "garbage png no-fast": (train_args(broken / "garbage", out, "--no-fast"), ["viral_train_00000.png"]),
        "bad flag": (train_args(data, out, "--size", "big"), ["--size"]),
        "no-fast amp": (train_args(data, out, "--no-fast", "--amp"), ["--amp", "--no-fast"]),
        "resume dcgan checkpoint": (train_args(data, out, "--resume", str(broken / "dcgan.pt")), ["dcgan"]),
        "resume text file": (train_args(data, out, "--resume", str(broken / "text.pt")), ["not a readable"]),
        "generate no ckpt": (["--generate", "3", "--ckpt", str(tmp_path / "none.pt"), "--out",
                              str(tmp_path / "f"), "--device", "cpu"], ["not found"]),
        "lr nan": (train_args(data, out, "--lr", "nan"), ["--lr nan"]),
        "lr negative": (train_args(data, out, "--lr", "-1e-4"), ["--lr"]),
        "negative workers": (train_args(data, out, "--no-fast", "--workers", "-1"), ["--workers -1"]),
        "negative eval-every": (train_args(data, out, "--eval-every", "-1"), ["--eval-every -1"]),
        "out is a file": (train_args(data, broken / "text.pt"), ["is a file"]),
        "generate out is a file": (["--generate", "3", "--ckpt", str(broken / "dcgan.pt"), "--out",
                                    str(broken / "text.pt"), "--device", "cpu"], ["is a file"]),
    }[case]
    code, err = run_main(argv, capsys)
    assert code == 2
    one_error_line(err, *words)


def test_resume_with_other_size_or_classes_names_the_mismatch(synth, tmp_path, capsys):
    data, out = synth / "train", tmp_path / "run"
    assert run_main(train_args(data, out, "--max-steps", "1"), capsys)[0] == 0
    last = str(out / "checkpoints/last.pt")
    code, err = run_main(train_args(data, out, "--size", "128", "--resume", last), capsys)
    assert code == 2
    one_error_line(err, "--size 64", "128")
    code, err = run_main(train_args(data, out, "--classes", "normal,viral", "--resume", last), capsys)
    assert code == 2
    one_error_line(err, "--classes")
    code, err = run_main(["--generate", "2", "--ckpt", last, "--out", str(tmp_path / "f"),
                          "--classes", "covid", "--device", "cpu"], capsys)
    assert code == 2
    one_error_line(err, "covid")


def test_missing_data_as_a_subprocess(tmp_path):
    """The real command line: exit code 2 and a single stderr line, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "acgan.py", "--data", str(tmp_path / "nope"), "--device", "cpu",
                        "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# NaN and Ctrl-C
# ----------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(synth, tmp_path, capsys, monkeypatch):
    calls = []
    real_loss = acgan.generator_loss

    def nan_from_step_3(*a):
        calls.append(1)
        loss, terms = real_loss(*a)
        return (loss * float("nan") if len(calls) >= 3 else loss), terms

    monkeypatch.setattr(acgan, "generator_loss", nan_from_step_3)
    out = tmp_path / "run"
    code, err = run_main(train_args(synth / "train", out, "--max-steps", "6", "--save-every", "2"), capsys)
    assert code == 1
    assert len(err) == 1 and "non-finite loss at step 3" in err[0] and "last.pt" in err[0]
    ckpt = load(out / "checkpoints/last.pt")
    assert ckpt["step"] == 2                                   # nothing saved from the NaN state
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values() if v.is_floating_point())
    assert not (out / "checkpoints/step_000004.pt").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_last_and_exits_130(sig, synth, tmp_path, capsys, monkeypatch):
    calls = []
    real_loss = acgan.generator_loss

    def interrupt_at_step_2(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)                          # as if the user pressed Ctrl-C (or `kill`)
        return real_loss(*a)

    monkeypatch.setattr(acgan, "generator_loss", interrupt_at_step_2)
    before = signal.getsignal(sig)
    out = tmp_path / "run"
    code, err = run_main(train_args(synth / "train", out, "--max-steps", "6"), capsys)
    assert code == 130 and "--resume" in err[-1]
    assert load(out / "checkpoints/last.pt")["step"] == 2      # the step in flight was finished
    assert signal.getsignal(sig) is before           # the old handler is back


# ----------------------------------------------------------------------------------------------
# Evaluation during training (metrics.py, offline with a random-weights Inception)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    import metrics
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(metrics.FIDInceptionV3().state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore:FID from N_real")
def test_eval_every_writes_fid_is_kid_per_class(synth, fid_weights, tmp_path, capsys):
    """8 real and 4 generated images per class: 12 Inception passes per class. Two classes only:
    each FID costs an eigendecomposition of a 2048x2048 matrix (seconds on this CPU)."""
    out = tmp_path / "run"
    code, _ = run_main(train_args(synth / "train", out, "--classes", "normal,viral", "--max-steps", "2",
                                  "--eval-every", "2", "--eval-n", "4", "--fid-weights", str(fid_weights)),
                       capsys)
    assert code == 0
    rows = read_csv(out / "metrics.csv")
    assert [r["class"] for r in rows] == ["normal", "viral"] and {r["step"] for r in rows} == {"2"}
    for r in rows:
        assert int(r["n_real"]) == N_PER_CLASS and int(r["n_fake"]) == 4
        # metrics.py names the feature network; a file that is not the release one is "custom"
        assert r["network"] == "pt_inception-2015-12-05" or r["network"].startswith("custom weights")
        for key in ("fid", "is_mean", "kid_mean"):
            assert math.isfinite(float(r[key]))


def test_missing_fid_weights_fail_before_training(synth, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(train_args(synth / "train", out, "--eval-every", "2",
                                    "--fid-weights", str(tmp_path / "missing.pth")), capsys)
    assert code == 2
    one_error_line(err, "missing.pth")
    assert not (out / "log.csv").exists() and not (out / "checkpoints").exists()
