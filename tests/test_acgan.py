"""Tests for acgan.py. CPU only, no downloads; 64 px phantoms, narrow networks, batch 8, a few steps.

Parameter counts are checked against the paper's layers (Sec. 3.3) counted by hand, the losses
against their closed forms, and resume against an uninterrupted run (torch.equal).
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import acgan  # noqa: E402

SIZE, N_TRAIN = 64, 8  # 8 images per class, 3 classes, batch 8: 3 steps per epoch
CLASSES = ["normal", "bacterial", "viral"]
FAST = ["--size", str(SIZE), "--g-channels", "32", "--d-channels", "8", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only fights the other test processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    import prep

    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=N_TRAIN, size=SIZE, seed=0)
    return out


def train_argv(synth, out, *extra):
    return ["--data", str(synth / "train"), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def short_run(synth, tmp_path_factory):
    """One 5-step run (an epoch boundary after step 3), shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "run"
    acgan.main(train_argv(synth, out, "--epochs", "2", "--max-steps", "5", "--log-every", "1",
                          "--sample-every", "2", "--save-every", "2"))
    return out


def run_main(argv):
    """main(argv) -> its exit code (0 when it returns; a SystemExit message counts as 1)."""
    try:
        acgan.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def error_line(capsys):
    """stderr, checked to be exactly one `error: <what> — <fix>` line without a traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0] and "Traceback" not in err, err
    return lines[0]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def narrow_nets(seed=0, n_classes=3):
    torch.manual_seed(seed)
    return (acgan.Generator(n_classes, 1, SIZE, g_channels=32).apply(acgan.init_weights),
            acgan.Discriminator(n_classes, 1, SIZE, d_channels=8).apply(acgan.init_weights))


# -- Models ----------------------------------------------------------------------------------------

def test_parameter_counts_follow_the_papers_layers():
    """At 112 px, 3 classes, 1 channel, the default widths (Sec. 3.3), counted by hand per layer."""
    with torch.device("meta"):  # counts only: no memory
        G, D = acgan.Generator(3), acgan.Discriminator(3)
    g_layers = [3 * 50,                    # Embedding(3, 50)
                50 * 49 + 49,              # Linear(50, 7 * 7), the label's map
                100 * 1024 * 49 + 1024 * 49,  # Linear(100, 1024 * 7 * 7), the noise's maps
                1025 * 512 * 16, 2 * 512,  # ConvTranspose2d(1025, 512, 4) without bias, BatchNorm
                512 * 256 * 16, 2 * 256, 256 * 128 * 16, 2 * 128,
                128 * 1 * 16 + 1]          # the output layer keeps its bias (no BatchNorm after it)
    d_layers = [1 * 32 * 16, 2 * 32, 32 * 64 * 16, 2 * 64, 64 * 128 * 16, 2 * 128, 128 * 256 * 16, 2 * 256,
                256 * 49 + 1, 256 * 49 * 3 + 3]  # source head, class head on (256, 7, 7) features
    assert [n_params(m) for m in [G.label_embedding, G.label_dense, G.noise_dense, *G.upsample] if n_params(m)] == g_layers
    assert [n_params(m) for m in [*D.features, D.source_head, D.class_head] if n_params(m)] == d_layers
    assert n_params(G) == 16_092_506 and n_params(D) == 739_780
    assert [type(m).__name__ for m in G.upsample] == ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 3 + [
        "ConvTranspose2d", "Tanh"]
    assert [type(m).__name__ for m in D.features] == ["Conv2d", "BatchNorm2d", "LeakyReLU", "Dropout"] * 4 + ["Flatten"]
    assert [m.negative_slope for m in D.features if isinstance(m, torch.nn.LeakyReLU)] == [0.2] * 4
    assert [m.p for m in D.features if isinstance(m, torch.nn.Dropout)] == [0.5] * 4
    assert all(m.eps == 1e-5 for m in [*G.upsample, *D.features] if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("size, start", [(64, 4), (112, 7), (128, 8)])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_at_every_size(size, start, channels):
    with torch.device("meta"):  # shapes only: no memory, no compute
        G, D = acgan.Generator(3, channels, size, g_channels=32), acgan.Discriminator(3, channels, size, d_channels=8)
        fake = G(torch.empty(2, acgan.NZ), torch.tensor([0, 2]))
        src, cls = D(fake)
    assert G.s0 == start and fake.shape == (2, channels, size, size) and src.shape == (2,) and cls.shape == (2, 3)


def test_forward_is_in_tanh_range_init_follows_radford_and_d_returns_logits():
    G, D = narrow_nets()
    fake = G(torch.randn(4, acgan.NZ), torch.tensor([0, 1, 2, 0]))
    assert fake.shape == (4, 1, SIZE, SIZE) and fake.abs().max() <= 1
    w = G.noise_dense.weight  # 100 x 512 values
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 1e-3 and (G.noise_dense.bias == 0).all()
    assert not {type(m) for m in D.modules()} & {torch.nn.Sigmoid, torch.nn.Softmax, torch.nn.LogSoftmax}
    with torch.no_grad():  # big weights give outputs far outside [0, 1]: logits, not probabilities
        for p in D.parameters():
            p.fill_(0.5)
        src, cls = D.eval()(torch.ones(1, 1, SIZE, SIZE))
    assert src.abs().max() > 1 and cls.abs().max() > 1


def make_step_parts(seed=0):
    G, D = narrow_nets(seed)
    opts = [torch.optim.RMSprop(net.parameters(), acgan.LR, alpha=acgan.RMSPROP_ALPHA, eps=acgan.RMSPROP_EPS)
            for net in (G, D)]
    return G, D, *opts, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)


def step_inputs():
    torch.manual_seed(1)
    return (torch.rand(6, 1, SIZE, SIZE) * 2 - 1, torch.tensor([0, 1, 2, 2, 1, 0]), torch.randn(6, acgan.NZ),
            torch.tensor([2, 2, 0, 1, 0, 1]))


def test_train_step_losses_match_closed_forms():
    """With G and D in eval mode (no dropout, fixed BatchNorm) every stat has a closed form (Odena et
    al. Sec. 3, G's source term non-saturating): -log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x),
    cross-entropy = logsumexp(l) - l[y]; D' is D after its update, judging the same fakes."""
    G, D, opt_g, opt_d, scaler, autocast = make_step_parts()
    G.eval(), D.eval()
    real, y_real, z, y_fake = step_inputs()
    with torch.no_grad():
        fake = G(z, y_fake)
        (src_real, cls_real), (src_fake, cls_fake) = D(real), D(fake)
    stats = dict(zip(acgan.STATS, acgan.train_step(G, D, opt_g, opt_d, scaler, autocast, real, y_real, z, y_fake).tolist()))
    with torch.no_grad():
        src_after, cls_after = D(fake)
    ce = lambda logits, y: (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()  # noqa: E731
    expected = {"d_src_real": F.softplus(-src_real).mean(), "d_src_fake": F.softplus(src_fake).mean(),
                "d_cls_real": ce(cls_real, y_real), "d_cls_fake": ce(cls_fake, y_fake),
                "g_src": F.softplus(-src_after).mean(), "g_cls": ce(cls_after, y_fake),
                "d_x": torch.sigmoid(src_real).mean(), "d_g_z1": torch.sigmoid(src_fake).mean(),
                "d_g_z2": torch.sigmoid(src_after).mean(),
                "cls_acc_real": (cls_real.argmax(1) == y_real).float().mean(),
                "cls_acc_fake": (cls_fake.argmax(1) == y_fake).float().mean()}
    for key, value in expected.items():
        assert abs(stats[key] - value.item()) < 1e-5, key
    assert abs(stats["loss_d"] - sum(stats[k] for k in ("d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake"))) < 1e-5
    assert abs(stats["loss_g"] - stats["g_src"] - stats["g_cls"]) < 1e-5


def test_one_step_changes_both_networks_and_leaves_d_trainable():
    G, D, *rest = make_step_parts()
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    stats = acgan.train_step(G, D, *rest, *step_inputs())
    assert stats.shape == (len(acgan.STATS),) and torch.isfinite(stats).all()
    assert all(not torch.equal(b, a) for b, a in zip(before, [*G.parameters(), *D.parameters()]))  # both heads too
    assert all(p.requires_grad for p in D.parameters())


def test_train_step_makes_no_host_sync(monkeypatch):
    """No .item(), bool(tensor), float(tensor), .tolist() or nonzero in the step: the loop reads its
    results at log steps only. Only calls made from acgan.py count (optimizers read CPU counters)."""
    calls = []
    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == acgan.__file__:
                calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    acgan.train_step(*make_step_parts(), *step_inputs())
    assert calls == []


def test_balanced_draws_are_balanced_and_a_function_of_seed_and_epoch():
    labels = torch.tensor([0] * 10 + [1] * 50 + [2] * 20)  # 1 : 5 : 2
    order = acgan.batch_indices(labels, 8, seed=0, epoch=1)
    assert order.shape == (10, 8)  # 80 images, batch 8
    many = torch.cat([acgan.batch_indices(labels, 8, seed=0, epoch=e) for e in range(40)]).flatten()
    share = torch.bincount(labels[many], minlength=3).double() / len(many)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.03)
    assert torch.equal(order, acgan.batch_indices(labels, 8, seed=0, epoch=1))
    assert not torch.equal(order, acgan.batch_indices(labels, 8, seed=0, epoch=2))


def test_fixed_noise_depends_on_neither_n_nor_batch_size():
    ref = acgan.fixed_z(10, 7)
    assert ref.shape == (10, acgan.NZ) and torch.equal(acgan.fixed_z(4, 7), ref[:4])
    big = acgan.fixed_z(400, 1)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def test_sample_grid_is_one_row_per_class_from_the_same_z_in_eval_mode(tmp_path):
    """Cell (k, j) is the eval-mode (running BatchNorm statistics) G(z_j, k) mapped [-1, 1] -> [0, 255],
    z_j the same in every row; G is back in train mode afterwards."""
    G, _ = narrow_nets()
    G(torch.randn(16, acgan.NZ), torch.randint(3, (16,)))  # move the running statistics
    acgan.save_grid(G, 3, 7, tmp_path / "grid.png")
    assert G.training
    z, y = acgan.fixed_z(acgan.GRID, 7).repeat(3, 1), torch.tensor([0, 1, 2]).repeat_interleave(acgan.GRID)
    with torch.no_grad():
        expected = ((G.eval()(z, y) + 1) / 2 * 255).round()
    with Image.open(tmp_path / "grid.png") as im:
        assert im.mode == "L"
        grid = torch.from_numpy(np.array(im)).float()
    for i in range(len(y)):  # make_grid's 2-pixel padding around each cell
        r, c = divmod(i, acgan.GRID)
        cell = grid[2 + r * (SIZE + 2): 2 + r * (SIZE + 2) + SIZE, 2 + c * (SIZE + 2): 2 + c * (SIZE + 2) + SIZE]
        assert (cell - expected[i, 0]).abs().max() <= 1


# -- Training runs ---------------------------------------------------------------------------------

def test_short_run_writes_every_output(short_run):
    config = json.loads((short_run / "config.json").read_text())
    args = config["args"]  # the paper's values by default (Sec. 3.4)
    assert (args["lr"], args["classes"], acgan.BATCH_SIZE) == (1e-4, ",".join(CLASSES), 32)
    assert config["device"] == "cpu" and config["amp"] == "off" and config["class_counts"] == dict.fromkeys(CLASSES, 8)
    rows = read_rows(short_run / "log.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert list(rows[0]) == ["step", "epoch", *acgan.STATS, "ms_per_step"]
    assert all(np.isfinite(float(v)) for r in rows for v in r.values())
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("d_x", "cls_acc_real", "cls_acc_fake"))
    for step in (0, 2, 4, 5):  # step 0 is the untrained G; the last step always gets a grid
        with Image.open(short_run / "samples" / f"step_{step:06d}.png") as im:  # 3 rows of 8
            assert im.mode == "L" and im.size == (8 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    with Image.open(short_run / "loss_curve.png") as im:  # both curves, in their colours
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {(255, 0, 0), (0, 0, 255)} <= colours
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == [
        "last.pt", "step_000002.pt", "step_000004.pt"]
    ckpt = load(short_run / "checkpoints" / "last.pt")
    assert ckpt["model"] == "acgan" and ckpt["step"] == 5 and ckpt["args"]["size"] == SIZE
    assert {"G", "D", "opt_g", "opt_d", "scaler", "rng_cpu"} <= ckpt.keys()
    group = ckpt["opt_g"]["param_groups"][0]  # Keras' RMSprop, as the paper's TensorFlow
    assert (group["lr"], group["alpha"], group["eps"]) == (1e-4, 0.9, 1e-7)
    assert not (short_run / "metrics.csv").exists()


def test_log_line_matches_log_csv_and_zero_turns_grids_off(synth, tmp_path, capsys):
    assert run_main(train_argv(synth, tmp_path / "r", "--max-steps", "3", "--log-every", "3", "--sample-every", "0")) == 0
    out = capsys.readouterr().out
    match = re.search(r"\[1/200\]\[2/3\] Loss_D: (\d+\.\d{4}) Loss_G: (\d+\.\d{4}) D\(x\): (0\.\d{4}) D\(G\(z\)\): "
                      r"(0\.\d{4}) / (0\.\d{4}) class acc real/fake: (\d\.\d{3}) / (\d\.\d{3})  \d+ ms/step", out)
    assert match and "device: cpu" in out and "warning: training on a CPU" in out, out
    row = read_rows(tmp_path / "r" / "log.csv")[-1]
    for key, printed in zip(("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "cls_acc_real", "cls_acc_fake"),
                            match.groups()):
        assert abs(float(row[key]) - float(printed)) <= 5e-4 + 1e-4 * float(printed), key
    assert [p.name for p in (tmp_path / "r" / "samples").iterdir()] == ["step_000000.png"]


@pytest.mark.parametrize("size, channels", [(112, 1), (128, 3)])
def test_other_sizes_and_three_channels_train_and_generate_one_channel_pngs(size, channels, synth, tmp_path):
    """--size 112 (the paper) and 128 from the 64 px PNGs (resized on load); --channels 3 repeats
    the gray, and --generate still writes one-channel PNGs."""
    out = tmp_path / "run"
    assert run_main(train_argv(synth, out, "--max-steps", "1", "--size", str(size), "--channels", str(channels))) == 0
    assert all(np.isfinite(float(v)) for v in read_rows(out / "log.csv")[0].values())
    with Image.open(out / "samples" / "step_000001.png") as im:
        assert im.size == (8 * (size + 2) + 2, 3 * (size + 2) + 2)
    assert run_main(["--generate", "1", "--ckpt", str(out / "checkpoints/last.pt"), "--out", str(tmp_path / "g"),
                     "--device", "cpu"]) == 0
    with Image.open(tmp_path / "g" / "viral" / "acgan_viral_000000.png") as im:
        assert im.mode == "L" and im.size == (size, size)


def test_resume_is_exact_after_ctrl_c_and_after_kill_9(synth, tmp_path):
    """7 steps in one go == 4 steps + --resume (Ctrl-C saves last.pt) == 5 steps, then --resume
    from step_000002.pt (kill -9 after the step-2 save: the log rows of steps 3-5 are rewritten).
    Both cross an epoch boundary (3 steps per epoch). Weights, optimizers, RNG and log agree."""
    common = ["--epochs", "3", "--log-every", "1", "--sample-every", "0", "--save-every", "2"]
    whole, split, killed = tmp_path / "whole", tmp_path / "split", tmp_path / "killed"
    assert run_main(train_argv(synth, whole, *common, "--max-steps", "7")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "4")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "7", "--resume")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "5")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "7", "--resume",
                               str(killed / "checkpoints/step_000002.pt"))) == 0
    a = load(whole / "checkpoints" / "last.pt")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]  # noqa: E731
    for other in (split, killed):
        b = load(other / "checkpoints" / "last.pt")
        assert a["step"] == b["step"] == 7
        for key in ("G", "D", "opt_g", "opt_d", "rng_cpu"):
            ta, tb = list(tensors(a[key])), list(tensors(b[key]))
            assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), (other, key)
        assert strip(read_rows(whole / "log.csv")) == strip(read_rows(other / "log.csv"))


def tensors(obj):
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors(x)


def test_fresh_run_refuses_a_folder_holding_a_run(short_run, synth, tmp_path, capsys):
    """A second run without --resume would append to log.csv and replace the checkpoints: refused.
    The rows of a run that stopped before its first checkpoint are dropped, not mixed in."""
    assert run_main(train_argv(synth, short_run)) == 2
    assert "--resume" in error_line(capsys)
    out = tmp_path / "run"
    assert run_main(train_argv(synth, out, "--max-steps", "2", "--log-every", "1")) == 0
    shutil.rmtree(out / "checkpoints")  # as if it had died before saving
    assert run_main(train_argv(synth, out, "--max-steps", "1", "--log-every", "1")) == 0
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [1]


def test_amp_on_cpu_is_bf16_autocast_close_to_fp32(synth, tmp_path):
    """--amp on a CPU is bf16 autocast: finite losses, fp32 weights in the checkpoint, and the first
    step's losses (before any update) within bf16 rounding of fp32."""
    rows = {}
    for flag in ("--amp", "--no-amp"):
        assert run_main(train_argv(synth, tmp_path / flag, "--max-steps", "2", "--log-every", "1",
                                   "--sample-every", "0", flag)) == 0
        rows[flag] = read_rows(tmp_path / flag / "log.csv")
    assert json.loads((tmp_path / "--amp" / "config.json").read_text())["amp"] == "torch.bfloat16"
    assert all(np.isfinite(float(v)) for r in rows["--amp"] for v in r.values())
    for key in ("loss_d", "d_src_real", "d_src_fake", "d_cls_real", "d_cls_fake", "loss_g", "d_x", "d_g_z1"):
        assert abs(float(rows["--amp"][0][key]) - float(rows["--no-amp"][0][key])) < 0.05, key
    ckpt = load(tmp_path / "--amp" / "checkpoints" / "last.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["G"].values() if t.is_floating_point())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch):
    real_step, calls = acgan.train_step, []

    def nan_from_step_3(*args):
        calls.append(1)
        stats = real_step(*args)
        return stats * float("nan") if len(calls) >= 3 else stats

    monkeypatch.setattr(acgan, "train_step", nan_from_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        acgan.main(train_argv(synth, out, "--epochs", "5", "--log-every", "2", "--save-every", "2",
                              "--sample-every", "0"))
    message = str(e.value.code)
    assert message.startswith("error: non-finite loss at step 4 (after step 2)") and "\n" not in message
    assert str(out / "checkpoints" / "last.pt") in message
    assert load(out / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [2]  # no NaN row


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_finish_the_step_save_and_say_how_to_resume(sig, synth, tmp_path, monkeypatch, capsys):
    real_step, calls = acgan.train_step, []

    def interrupt_in_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)  # as if the user pressed Ctrl-C (or `kill` ran) mid-step
        return real_step(*args)

    monkeypatch.setattr(acgan, "train_step", interrupt_in_step_2)
    handler_before = signal.getsignal(sig)
    out = tmp_path / "int"
    assert run_main(train_argv(synth, out, "--epochs", "5", "--log-every", "10", "--sample-every", "0")) == 130
    assert signal.getsignal(sig) is handler_before
    assert load(out / "checkpoints" / "last.pt")["step"] == 2  # the step in flight was finished
    assert "--resume" in capsys.readouterr().out


# -- Evaluation during training (a random-weights Inception: offline, the path exercised) ----------

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    import metrics

    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.manual_seed(0)
    torch.save(metrics.FIDInceptionV3().state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore")  # FID of 4 images warns, as it should
def test_eval_every_writes_fid_is_kid_per_class(synth, fid_weights, tmp_path, capsys):
    """Two classes only: each FID costs an eigendecomposition of a 2048 x 2048 matrix."""
    out = tmp_path / "eval"
    assert run_main(train_argv(synth, out, "--classes", "normal,viral", "--max-steps", "2", "--eval-every", "2",
                               "--eval-n", "4", "--fid-weights", str(fid_weights), "--sample-every", "0")) == 0
    rows = read_rows(out / "metrics.csv")
    assert [(r["step"], r["class"]) for r in rows] == [("2", "normal"), ("2", "viral")]
    for r in rows:
        assert int(r["n_real"]) == N_TRAIN and int(r["n_fake"]) == 4 and r["network"]  # N and network stated
        assert all(np.isfinite(float(r[k])) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert "eval viral: FID" in capsys.readouterr().out


def test_missing_fid_weights_fail_before_training(synth, tmp_path, capsys):
    out = tmp_path / "noweights"
    assert run_main(train_argv(synth, out, "--max-steps", "2", "--eval-every", "2",
                               "--fid-weights", str(tmp_path / "missing.pth"))) == 2
    assert "missing.pth" in error_line(capsys)
    assert not (out / "log.csv").exists() and not (out / "checkpoints").exists()


# -- Generate --------------------------------------------------------------------------------------

def test_generate_writes_n_one_channel_pngs_per_class(short_run, tmp_path, capsys):
    """After 5 steps the BatchNorm running statistics are still near their start (variance 1, ~100
    times the activations'), so eval-mode images are flat gray: recalibrate them first (cumulative
    averages over a batch of 60) so that z shows in the pixels."""
    ckpt, G = load(short_run / "checkpoints" / "last.pt"), acgan.Generator(3, 1, SIZE, g_channels=32)
    G.load_state_dict(ckpt["G"])
    for m in G.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats(), setattr(m, "momentum", None)
    with torch.no_grad():
        G(torch.randn(60, acgan.NZ), torch.arange(3).repeat(20))
    torch.save({**ckpt, "G": G.state_dict()}, tmp_path / "calibrated.pt")
    ckpt = str(tmp_path / "calibrated.pt")
    folders = {}
    for name, seed, batch in (("a", "1", "2"), ("b", "1", "3"), ("c", "2", "2")):  # b: another batch size
        folders[name] = tmp_path / name
        assert run_main(["--generate", "3", "--ckpt", ckpt, "--out", str(folders[name]), "--seed", seed,
                         "--batch-size", batch, "--device", "cpu"]) == 0
    read = lambda f: [np.asarray(Image.open(p)) for p in sorted(f.glob("*/*.png"))]  # noqa: E731
    assert sorted(p.name for p in folders["a"].iterdir()) == sorted(CLASSES)
    for cls in CLASSES:
        files = sorted((folders["a"] / cls).glob("*.png"))
        assert len(files) == 3 and all(Image.open(f).mode == "L" and Image.open(f).size == (SIZE, SIZE) for f in files)
    assert all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["b"])))
    assert not all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["c"])))
    assert "wrote 3 PNGs per class" in capsys.readouterr().out


# -- Bad inputs: one `error:` line, exit code 2 ----------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(synth, tmp_path_factory):
    """Data folders with an empty class, a garbage PNG and a truncated PNG."""
    root = tmp_path_factory.mktemp("bad")
    for case in ("empty", "garbage", "truncated"):
        shutil.copytree(synth / "train", root / case)
    for f in (root / "empty" / "viral").iterdir():
        f.unlink()
    (root / "garbage" / "viral" / "viral_train_00000.png").write_bytes(b"this is not a png")
    victim = sorted((root / "truncated" / "bacterial").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    return root


@pytest.mark.parametrize("case, argv, expected", [
    ("missing data", ["--data", "{tmp}/nowhere"], "prep.py synthetic"),
    ("missing class", ["--classes", "normal,covid"], "prep.py kermany"),
    ("unknown class", ["--classes", "normal,fungal"], "'normal,fungal' is not 2+ of normal, bacterial"),
    ("duplicate class", ["--classes", "normal,viral,normal"], "'normal,viral,normal'"),
    ("single class", ["--classes", "viral"], "dcgan.py"),
    ("empty class", ["--data", "{bad}/empty"], "has 0 PNG images"),
    ("garbage png", ["--data", "{bad}/garbage"], "viral_train_00000.png"),
    ("truncated png", ["--data", "{bad}/truncated"], "bacterial"),
    ("unsupported size", ["--size", "100"], "invalid choice: 100"),
    ("size text", ["--size", "big"], "--size"),
    ("batch zero", ["--batch-size", "0"], "--batch-size"),
    ("g-channels 4", ["--g-channels", "4"], "--g-channels"),
    ("lr nan", ["--lr", "nan"], "--lr"),
    ("lr negative", ["--lr", "-1e-4"], "--lr"),
    ("lr text", ["--lr", "fast"], "--lr"),
    ("negative sample-every", ["--sample-every", "-1"], "--sample-every"),
    ("negative eval-every", ["--eval-every", "-5"], "--eval-every"),
    ("no cuda", ["--device", "cuda:7"], "--device"),
    ("bad device", ["--device", "tpu"], "--device"),
    ("out is a file", ["--out", "{file}"], "is a file"),
    ("ckpt without generate", ["--ckpt", "x.pt"], "--generate"),
    ("generate without ckpt", ["--generate", "3", "--out", "{tmp}/g"], "--ckpt"),
    ("generate into a file", ["--generate", "3", "--ckpt", "x.pt", "--out", "{file}"], "a folder"),
    ("missing checkpoint", ["--generate", "3", "--ckpt", "{tmp}/none.pt", "--out", "{tmp}/g"], "NotFound"),
])
def test_bad_inputs_give_one_line(case, argv, expected, synth, bad_data, tmp_path, capsys):
    if case == "no cuda" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(tmp=tmp_path, bad=bad_data, file=a_file) for a in argv]  # a later flag wins over FAST's
    argv = [*argv, "--device", "cpu"] if "--generate" in argv else train_argv(synth, tmp_path / "run", "--max-steps", "1", *argv)
    assert run_main(argv) == 2, case
    assert expected in error_line(capsys), case


def test_wrong_checkpoints_are_refused(short_run, synth, tmp_path, capsys):
    ckpt = str(short_run / "checkpoints" / "last.pt")  # 64 px, g-channels 32, the three classes
    assert run_main(train_argv(synth, tmp_path / "t", "--size", "128", "--resume", ckpt)) == 2
    assert "--size 64, not 128" in error_line(capsys)
    assert run_main(train_argv(synth, tmp_path / "t", "--classes", "normal,viral", "--resume", ckpt)) == 2
    assert "--classes normal,bacterial,viral, not normal,viral" in error_line(capsys)
    other, garbage = tmp_path / "other.pt", tmp_path / "garbage.pt"
    torch.save({"model": "dcgan", "G": {}}, other)
    garbage.write_bytes(b"this is not a checkpoint")
    for path, expected in ((other, "not a acgan.py checkpoint"), (garbage, "cannot read")):
        assert run_main(train_argv(synth, tmp_path / "r", "--resume", str(path))) == 2
        assert expected in error_line(capsys)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "acgan.py", "--data", str(tmp_path / "nowhere"), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder"), result.stderr
    assert "python prep.py kermany PATH" in lines[0] and "python prep.py synthetic" in lines[0]


def test_the_evidence_script_still_fits_acgan(monkeypatch, capsys):
    """tests/evidence_acgan.py (minutes, not a test) imports acgan's names: it must at least start."""
    sys.path.insert(0, str(REPO / "tests"))
    import evidence_acgan

    monkeypatch.setattr(sys, "argv", ["evidence_acgan.py", "--help"])
    with pytest.raises(SystemExit) as e:
        evidence_acgan.main()
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out
    assert all(hasattr(acgan, name) for name in ("load_images", "sample", "fixed_z", "Generator", "init_weights"))


def test_help_states_the_class_imbalance_rule(capsys):
    assert run_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "balanced sampling" in text and "no class weights" in text


def test_diffaug_augments_real_and_fake_alike_and_is_off_by_default(synth, tmp_path):
    """The real batch, the detached fakes and the fakes of G's step all go through the same
    augmentation (the function is dcgan.py's, tested there), and G learns through it."""
    G, D, *rest = make_step_parts()
    calls = []

    def recorder(x):
        calls.append(x.requires_grad)
        return acgan.diff_augment(x)

    before = [p.detach().clone() for p in G.parameters()]
    assert torch.isfinite(acgan.train_step(G, D, *rest, *step_inputs(), recorder)).all()
    assert calls == [False, False, True] and all(not torch.equal(b, p) for b, p in zip(before, G.parameters()))
    for flags in ([], ["--diffaug"]):
        out = tmp_path / f"run{len(flags)}"
        assert run_main(train_argv(synth, out, "--max-steps", "1", "--sample-every", "0", *flags)) == 0
        assert json.loads((out / "config.json").read_text())["args"]["diffaug"] == bool(flags)
