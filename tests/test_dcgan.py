"""Tests for dcgan.py. CPU only, no downloads; small images (32 px), tiny batches, few steps.

The parameter counts and per-layer shapes are checked against the paper's Tables 1-2, the
losses against their closed forms, and resume against an uninterrupted run (torch.equal).
"""

import csv
import json
import os
import re
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

import dcgan  # noqa: E402

SIZE = 32  # the smallest supported size keeps every CPU step short
N_TRAIN = 8  # images per class; with batch 4 that is 2 iterations per epoch
# Flags shared by the training runs: 32 px, batch 4, in-process decoding.
FAST = ["--size", str(SIZE), "--batch-size", "4", "--workers", "0", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second thread gains little, and with other test processes on
    the same 2 cores OpenMP's waiting threads made a step 3-30x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic phantom set from prep.py: train/{normal,bacterial,viral}/*.png at 32 px."""
    import prep

    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=N_TRAIN, size=SIZE, seed=0)
    return out


@pytest.fixture(scope="module")
def short_run(synth, tmp_path_factory):
    """One 4-step run (2 epochs of 2 steps) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "run"
    dcgan.main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out), *FAST,
                "--epochs", "2", "--log-every", "1", "--sample-every", "2", "--save-every", "2"])
    return out


def run_main(argv):
    """main(argv) -> the SystemExit code (0 when it returns normally)."""
    try:
        dcgan.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def error_line(capsys):
    """The stderr of a failed run, checked to be exactly one `error:` line; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="ckpt"):
    """Recursive exact equality of checkpoint contents (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------------
# Models


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_papers_tables():
    G, D = dcgan.Generator(64, 1), dcgan.Discriminator(64, 1)
    assert count(G) == 3_574_656  # Table 1, "Total params"
    assert count(D) == 2_763_520  # Table 2, "Total params"
    # Layer by layer, the "Param #" column of each table (ReLU, LeakyReLU, Dropout, Tanh: none).
    table1 = [819_200, 1_024, 2_097_152, 512, 524_288, 256, 131_072, 128, 1_024]
    table2 = [1_024, 131_072, 256, 524_288, 512, 2_097_152, 1_024, 8_192]
    per_layer = lambda net: [count(m) for m in net.net if count(m) > 0]  # noqa: E731
    assert per_layer(G) == table1
    assert per_layer(D) == table2
    # Dropout after the first, third and fourth blocks only (Table 2); no bias anywhere.
    kinds = [type(m).__name__ for m in D.net]
    assert kinds == ["Conv2d", "LeakyReLU", "Dropout", "Conv2d", "BatchNorm2d", "LeakyReLU",
                     "Conv2d", "BatchNorm2d", "LeakyReLU", "Dropout", "Conv2d", "BatchNorm2d",
                     "LeakyReLU", "Dropout", "Conv2d"]
    assert all(m.bias is None for m in [*G.net, *D.net] if isinstance(m, torch.nn.modules.conv._ConvNd))


def test_defaults_are_the_papers_values():
    """Sec. 3.3.1: batch 32, Adam lr 0.0002, betas (0.5, 0.999), leak 0.2, z of 100, 64 px.
    Table 2 gives no dropout rate; nn.Dropout's default 0.5 is the value its printout implies."""
    args = dcgan.parse_args(["--cls", "normal"])
    assert (args.batch_size, args.lr, args.dropout, args.size) == (32, 0.0002, 0.5, None)
    dcgan.check_args(args)
    assert args.size == 64 and args.channels == 1
    D = dcgan.Discriminator(64)
    assert [m.p for m in D.net if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5, 0.5]
    assert [m.negative_slope for m in D.net if isinstance(m, torch.nn.LeakyReLU)] == [0.2] * 4
    assert dcgan.Generator(64).net[0].in_channels == 100
    opt = dcgan.make_adam(D.parameters(), args.lr, torch.device("cpu"), True)
    assert opt.defaults["betas"] == (0.5, 0.999) and opt.defaults["lr"] == 0.0002


@pytest.mark.parametrize("size", dcgan.SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_at_every_size(size, channels):
    with torch.device("meta"):  # shapes only: no memory, no compute
        G, D = dcgan.Generator(size, channels), dcgan.Discriminator(size, channels)
        fake = G(torch.empty(3, dcgan.NZ, 1, 1))
        assert fake.shape == (3, channels, size, size)
        assert D(fake).shape == (3,)
    # Each block doubles the side, so the block count follows log2(size).
    assert len(dcgan.block_widths(size, dcgan.NGF)) == int(np.log2(size)) - 2


def test_real_forward_is_in_tanh_range():
    torch.manual_seed(0)
    G, D = dcgan.Generator(64), dcgan.Discriminator(64)
    fake = G(torch.randn(2, dcgan.NZ, 1, 1))
    assert fake.shape == (2, 1, 64, 64) and fake.abs().max() <= 1
    assert torch.isfinite(D(fake)).all()


@pytest.mark.parametrize("size", [16, 48, 100, 512])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="not supported"):
        dcgan.Generator(size)
    with pytest.raises(ValueError, match="not supported"):
        dcgan.Discriminator(size)


def test_init_follows_radford():
    torch.manual_seed(0)
    G = dcgan.Generator(64)
    G.apply(dcgan.init_weights)
    conv = G.net[3].weight  # 512 x 256 x 4 x 4 values
    bn = torch.cat([m.weight for m in G.net if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert abs(bn.mean().item() - 1) < 5e-3 and abs(bn.std().item() - 0.02) < 5e-3
    assert all((m.bias == 0).all() for m in G.net if isinstance(m, torch.nn.BatchNorm2d))


def test_losses_match_closed_forms():
    x = torch.tensor([-2.0, 0.0, 3.0])
    sig = torch.sigmoid(x)
    real, fake = dcgan.discriminator_loss(x, x)
    torch.testing.assert_close(real, -torch.log(sig).mean())
    torch.testing.assert_close(fake, -torch.log(1 - sig).mean())
    # one-sided smoothing: real target 0.9
    real_s, _ = dcgan.discriminator_loss(x, x, real_target=0.9)
    torch.testing.assert_close(real_s, -(0.9 * torch.log(sig) + 0.1 * torch.log(1 - sig)).mean())
    # non-saturating generator loss: -log D(G(z))
    torch.testing.assert_close(dcgan.generator_loss(x), -torch.log(sig).mean())
    # a logit of 0 is D = 1/2: each term is log 2
    r0, f0 = dcgan.discriminator_loss(torch.zeros(4), torch.zeros(4))
    assert abs(r0.item() - np.log(2)) < 1e-6 and abs(f0.item() - np.log(2)) < 1e-6


def test_one_step_gives_finite_losses_and_changes_both_networks():
    torch.manual_seed(0)
    G, D = dcgan.Generator(SIZE), dcgan.Discriminator(SIZE)
    G.apply(dcgan.init_weights)
    D.apply(dcgan.init_weights)
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    cpu = torch.device("cpu")
    optG, optD = dcgan.make_adam(G.parameters(), 2e-4, cpu, True), dcgan.make_adam(D.parameters(), 2e-4, cpu, True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    real = torch.rand(4, 1, SIZE, SIZE) * 2 - 1
    z = torch.randn(4, dcgan.NZ, 1, 1)
    stats = dcgan.train_step(G, D, optG, optD, scaler, real, z, 1.0, torch.autocast("cpu", enabled=False))
    assert stats.shape == (len(dcgan.STAT_NAMES),) and torch.isfinite(stats).all()
    s = dict(zip(dcgan.STAT_NAMES, stats.tolist()))
    assert abs(s["loss_d"] - (s["loss_d_real"] + s["loss_d_fake"])) < 1e-5
    for name in ("d_x", "d_g_z1", "d_g_z2"):
        assert 0 < s[name] < 1
    after = [*G.parameters(), *D.parameters()]
    n_g = len(list(G.parameters()))
    assert all(not torch.equal(b, a) for b, a in zip(before[:n_g], after[:n_g])), "G unchanged"
    assert all(not torch.equal(b, a) for b, a in zip(before[n_g:], after[n_g:])), "D unchanged"


def test_sampling_is_eval_mode_without_grad_and_restores_train_mode():
    torch.manual_seed(0)
    G = dcgan.Generator(SIZE)
    z = torch.randn(4, dcgan.NZ, 1, 1)
    images = dcgan.sample(G, z)
    assert images.dtype == torch.uint8 and images.shape == (4, 1, SIZE, SIZE)
    assert G.training  # back in train mode (a bug here once trained G in eval mode)
    G.eval()
    with torch.no_grad():
        expected = dcgan.to_uint8(G(z))
    assert torch.equal(images, expected)
    # the conversion is the one metrics.py expects: -1 -> 0, 0 -> 128 (127.5 rounds to even), 1 -> 255
    assert dcgan.to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = dcgan.epoch_batches(10, 3, seed=0, epoch=1)
    assert a.shape == (3, 3) and len(set(a.flatten().tolist())) == 9  # incomplete batch dropped
    assert torch.equal(a, dcgan.epoch_batches(10, 3, seed=0, epoch=1))
    assert not torch.equal(a, dcgan.epoch_batches(10, 3, seed=0, epoch=2))


def test_noise_depends_on_neither_n_nor_batch_size():
    """Vector i of a seed is the same for any N and batch size, and is N(0, 1) or U(-1, 1)."""
    whole = lambda n, b, kind="normal": torch.cat(list(dcgan.noise_batches(n, 100, kind, 7, b)))  # noqa: E731
    ref = whole(10, 10)
    assert ref.shape == (10, 100, 1, 1)
    assert torch.equal(whole(10, 3), ref) and torch.equal(whole(4, 4), ref[:4])
    assert torch.equal(whole(10, 3, "uniform"), whole(10, 10, "uniform"))
    big, uni = whole(400, 64), whole(400, 64, "uniform")
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    assert uni.min() >= -1 and uni.max() <= 1 and abs(uni.std() - 1 / 3 ** 0.5) < 0.01


def test_image_grid_keeps_one_channel():
    imgs = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 3, 3)
    grid = dcgan.image_grid(imgs, rows=2, pad=1)
    assert grid.shape == (1, 8, 8)
    assert grid[0, 0, 0] == 0 and grid[0, 0, 4] == 1 and grid[0, 4, 0] == 2 and grid[0, 4, 4] == 3
    assert grid[0, 3, 0] == 0  # a padding row


# ------------------------------------------------------------------------------------------------
# Training runs


def test_the_last_step_always_gets_a_sample_grid(synth, tmp_path):
    out = tmp_path / "run"
    assert run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out), *FAST,
                     "--max-steps", "3", "--sample-every", "2"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_000000.png", "step_000002.png", "step_000003.png"]


def test_short_run_writes_every_output(short_run, capsys):
    out = short_run
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["cls"] == "normal" and config["args"]["size"] == SIZE
    assert {"python", "torch", "torchvision"} <= config["versions"].keys()
    assert config["device"] == "cpu" and config["iters_per_epoch"] == 2

    rows = read_rows(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    assert set(rows[0]) == {"step", "epoch", "iter", "loss_d", "loss_d_real", "loss_d_fake",
                            "loss_g", "d_x", "d_g_z1", "d_g_z2", "ms_per_step"}
    for r in rows:
        assert all(np.isfinite(float(v)) for v in r.values()) and float(r["ms_per_step"]) > 0

    grid_side = dcgan.GRID * (SIZE + 2)
    for step in (0, 2, 4):
        with Image.open(out / "samples" / f"step_{step:06d}.png") as im:
            assert im.mode == "L" and im.size == (grid_side, grid_side)
    with Image.open(out / "loss_curve.png") as im:  # both curves are drawn, in their colours
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {(200, 40, 40), (40, 70, 200)} <= colours
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.pt", "step_000002.pt", "step_000004.pt"]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["model"] == "dcgan" and ckpt["step"] == 4 and ckpt["size"] == SIZE
    assert {"netG", "netD", "optG", "optD", "scaler", "rng_cpu", "args"} <= ckpt.keys()
    assert not (out / "metrics.csv").exists()


def test_log_line_has_the_papers_format(synth, tmp_path, capsys):
    run_main(["--data", str(synth / "train"), "--cls", "viral", "--out", str(tmp_path / "r"),
              *FAST, "--epochs", "1", "--log-every", "1", "--sample-every", "0"])
    out = capsys.readouterr().out
    pattern = (r"\[1/1\]\[1/2\] Loss_D: (\d+\.\d{4}) Loss_G: (\d+\.\d{4}) D\(x\): (0\.\d{4}) "
               r"D\(G\(z\)\): (0\.\d{4}) / (0\.\d{4})  (\d+\.\d) ms/step")
    match = re.search(pattern, out)
    assert match, out
    assert "device: cpu" in out and "warning: training on the CPU" in out
    assert "--size 32 (now 32)" not in out  # no smaller size to suggest at 32 px
    # the printed values are log.csv's last row, rounded
    row = read_rows(tmp_path / "r" / "log.csv")[-1]
    keys = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "ms_per_step")
    for key, printed in zip(keys, match.groups()):
        assert abs(float(row[key]) - float(printed)) <= 0.5 * 10 ** -len(printed.split(".")[1]) + 1e-6, key


def test_resume_is_exact(synth, tmp_path):
    """4 steps + resume to 5 (crossing an epoch boundary mid-way) == 5 steps in one go."""
    common = ["--data", str(synth / "train"), "--cls", "bacterial", *FAST, "--epochs", "3",
              "--log-every", "1", "--sample-every", "0", "--save-every", "100"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main([*common, "--out", str(whole), "--max-steps", "5"]) == 0
    assert run_main([*common, "--out", str(split), "--max-steps", "3"]) == 0
    assert load(split / "checkpoints" / "last.pt")["step"] == 3
    assert run_main([*common, "--out", str(split), "--max-steps", "5", "--resume"]) == 0
    a, b = load(whole / "checkpoints" / "last.pt"), load(split / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5
    for key in ("netG", "netD", "optG", "optD", "scaler", "rng_cpu"):
        assert_same(a[key], b[key], key)
    # the logs agree too (all but the timing)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]  # noqa: E731
    assert strip(read_rows(whole / "log.csv")) == strip(read_rows(split / "log.csv"))


def test_fast_and_plain_pipelines_feed_the_same_batches(synth, tmp_path):
    """--no-fast decodes PNGs through a DataLoader each epoch; --fast preloads a uint8 tensor.
    Same seed, same order: the first step's losses (computed before any update) are equal."""
    rows = {}
    for flag in ("--fast", "--no-fast"):
        out = tmp_path / flag
        assert run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out),
                         *FAST, "--max-steps", "1", "--sample-every", "0", flag]) == 0
        rows[flag] = read_rows(out / "log.csv")[0]
    for key in ("loss_d", "loss_d_real", "loss_d_fake", "loss_g", "d_x", "d_g_z1"):
        assert rows["--fast"][key] == rows["--no-fast"][key], key


def test_amp_on_cpu_is_bf16_autocast_close_to_fp32(synth, tmp_path):
    """--amp on a CPU turns on bf16 autocast (issue 8): finite losses, fp32 weights in the
    checkpoint, and the first step's losses (before any update) within bf16 rounding of fp32."""
    rows, configs = {}, {}
    for flag in ("--amp", "--no-amp"):
        out = tmp_path / flag
        assert run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out),
                         *FAST, "--max-steps", "2", "--log-every", "1", "--sample-every", "2",
                         flag]) == 0
        rows[flag] = read_rows(out / "log.csv")
        configs[flag] = json.loads((out / "config.json").read_text())["amp"]
    assert configs == {"--amp": "bfloat16", "--no-amp": "off"}
    assert all(np.isfinite(float(v)) for r in rows["--amp"] for v in r.values())
    for key in ("loss_d", "loss_g", "d_x", "d_g_z1"):  # seed 0 vs seed 1 differ by 0.1 to 1 here
        assert abs(float(rows["--amp"][0][key]) - float(rows["--no-amp"][0][key])) < 0.05, key
    ckpt = load(tmp_path / "--amp" / "checkpoints" / "last.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["netG"].values() if t.is_floating_point())
    with Image.open(tmp_path / "--amp" / "samples" / "step_000002.png") as im:
        assert im.mode == "L"


def test_amp_default_is_off_on_cpu(short_run):
    assert json.loads((short_run / "config.json").read_text())["amp"] == "off"


def test_preload_falls_back_to_disk_when_host_memory_is_short(synth, tmp_path, monkeypatch,
                                                              capsys):
    """Issue 8: when the uint8 set needs more than half of the free host memory, --fast reads
    PNGs from disk instead (one note line), and --eval-every gives metrics.py the class folder."""
    assert dcgan.free_host_memory_bytes() > 0  # readable on this machine
    monkeypatch.setattr(dcgan, "free_host_memory_bytes", lambda: 1000)  # 1 kB free
    def no_preload(*args):
        raise AssertionError("the images were preloaded")
    monkeypatch.setattr(dcgan, "load_images", no_preload)
    seen = {}

    class StubEvaluator:  # the real metrics.py path is tested below and in the eval test
        def score(self, fake):
            return dict(fid=1.0, is_mean=1.0, is_std=0.0, kid_mean=0.0, kid_std=0.0,
                        n_real=N_TRAIN, n_fake=len(fake), network="stub")

    def record(real, args, device):
        seen["real"] = real
        return StubEvaluator()

    monkeypatch.setattr(dcgan, "build_evaluator", record)
    out = tmp_path / "disk"
    assert run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out), *FAST,
                     "--max-steps", "3", "--log-every", "1", "--sample-every", "0",
                     "--eval-every", "3", "--eval-n", "2"]) == 0
    stdout = capsys.readouterr().out
    notes = [ln for ln in stdout.splitlines() if ln.startswith("note: preloading")]
    assert len(notes) == 1 and "reading PNGs from disk each epoch" in notes[0], stdout
    assert seen["real"] == synth / "train" / "normal"
    rows = read_rows(out / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(np.isfinite(float(v)) for r in rows for v in r.values())
    assert load(out / "checkpoints" / "last.pt")["step"] == 3
    assert read_rows(out / "metrics.csv")[0]["network"] == "stub"
    # unknown free memory: assume it fits, and say nothing
    monkeypatch.setattr(dcgan, "free_host_memory_bytes", lambda: None)
    assert dcgan.preload_fits(10 ** 12) and capsys.readouterr().out == ""


def test_random_data_needs_no_data_folder(tmp_path):
    out = tmp_path / "r"
    assert run_main(["--data", str(tmp_path / "nowhere"), "--cls", "normal", "--out", str(out),
                     *FAST, "--random-data", "--max-steps", "2", "--log-every", "1",
                     "--sample-every", "0"]) == 0
    rows = read_rows(out / "log.csv")
    assert len(rows) == 2 and float(rows[-1]["ms_per_step"]) > 0
    assert (out / "checkpoints" / "last.pt").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_generator_loss = dcgan.generator_loss

    def nan_from_step_3(logits):
        calls["n"] += 1
        loss = real_generator_loss(logits)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(dcgan, "generator_loss", nan_from_step_3)
    out = tmp_path / "nan"
    code = run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out), *FAST,
                     "--epochs", "5", "--log-every", "2", "--save-every", "2", "--sample-every", "0"])
    assert code == 1
    line = error_line(capsys)
    assert "non-finite loss at step 4" in line and "after step 2" in line
    assert str(out / "checkpoints" / "last.pt") in line
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["netG"].values() if t.is_floating_point())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [2]  # no NaN row


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_and_says_how_to_resume(sig, synth, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_generator_loss = dcgan.generator_loss

    def interrupt_at_step_2(logits):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(sig)  # as if the user pressed Ctrl-C (or `kill`) mid-step
        return real_generator_loss(logits)

    monkeypatch.setattr(dcgan, "generator_loss", interrupt_at_step_2)
    handler_before = signal.getsignal(sig)
    out = tmp_path / "int"
    code = run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(out), *FAST,
                     "--epochs", "5", "--log-every", "10", "--sample-every", "0"])
    assert code == 130
    assert signal.getsignal(sig) is handler_before
    assert load(out / "checkpoints" / "last.pt")["step"] == 2  # the step in flight was finished
    assert "--resume" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Evaluation during training (metrics.py with a random-weights Inception: offline, numbers
# meaningless, the path exercised)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    import metrics

    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.manual_seed(0)
    torch.save(metrics.FIDInceptionV3().state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore:FID from N_real")  # expected: N is tiny here
def test_eval_every_writes_metrics_csv(synth, fid_weights, tmp_path, capsys):
    # Slow spot: FID's 2048 x 2048 eigh in metrics.py runs on numpy's BLAS threads, which the
    # one_thread fixture does not limit (about 3 s alone, 25 s on a 2-core box shared with others).
    out = tmp_path / "eval"
    assert run_main(["--data", str(synth / "train"), "--cls", "viral", "--out", str(out), *FAST,
                     "--max-steps", "2", "--eval-every", "2", "--eval-n", "4",
                     "--fid-weights", str(fid_weights), "--sample-every", "0"]) == 0
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert int(rows[0]["n_real"]) == N_TRAIN and int(rows[0]["n_fake"]) == 4  # N is stated
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"):
        assert np.isfinite(float(rows[0][key])), key
    assert rows[0]["network"]
    assert "eval: FID" in capsys.readouterr().out


def test_evaluator_reads_a_class_folder(synth, fid_weights, tmp_path):
    """The fallback's real side: metrics.Evaluator on a folder of one-channel PNGs (two of them,
    as the Inception costs about 0.7 s an image here)."""
    import metrics

    for src in sorted((synth / "train" / "normal").glob("*.png"))[:2]:
        (tmp_path / src.name).write_bytes(src.read_bytes())
    assert metrics.Evaluator(tmp_path, weights=str(fid_weights)).n_real == 2


def test_missing_fid_weights_fail_before_training(synth, tmp_path, capsys):
    out = tmp_path / "noweights"
    assert run_main(["--data", str(synth / "train"), "--cls", "viral", "--out", str(out), *FAST,
                     "--max-steps", "2", "--eval-every", "2", "--eval-n", "4",
                     "--fid-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in error_line(capsys)
    assert not (out / "log.csv").exists() and not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# Generate


def test_generate_writes_n_one_channel_pngs(short_run, tmp_path, capsys):
    ckpt = short_run / "checkpoints" / "last.pt"
    folders = {}
    # b: the same seed with another batch size gives the same images
    for name, seed, batch in (("a", "1", "2"), ("b", "1", "3"), ("c", "2", "2")):
        folders[name] = tmp_path / name
        assert run_main(["--generate", "5", "--ckpt", str(ckpt), "--out", str(folders[name]),
                         "--seed", seed, "--batch-size", batch, "--device", "cpu"]) == 0
    files = sorted(folders["a"].glob("*.png"))
    assert len(files) == 5
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
    read = lambda folder: [np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["b"])))
    assert not all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["c"])))
    assert "wrote 5 PNGs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Bad inputs: one `error:` line, exit code 2


@pytest.fixture(scope="module")
def bad_data(synth, tmp_path_factory):
    """A data folder with an empty class and a class holding one corrupt PNG."""
    root = tmp_path_factory.mktemp("bad")
    (root / "viral").mkdir()  # empty
    (root / "normal").mkdir()
    for i, src in enumerate(sorted((synth / "train" / "normal").glob("*.png"))):
        (root / "normal" / f"{i}.png").write_bytes(src.read_bytes())
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return root


@pytest.mark.parametrize("case, argv, expected", [
    ("missing data", ["--data", "{tmp}/nowhere", "--cls", "normal"], "prep.py synthetic"),
    ("missing class", ["--data", "{synth}/train", "--cls", "covid"], "prep.py kermany"),
    ("unknown class", ["--data", "{synth}/train", "--cls", "pneumonia"], "invalid choice"),
    ("no class", ["--data", "{synth}/train"], "--cls"),
    ("empty class", ["--data", "{bad}", "--cls", "viral"], "no PNG images"),
    ("corrupt png", ["--data", "{bad}", "--cls", "normal"], "broken.png"),
    ("corrupt png, plain", ["--data", "{bad}", "--cls", "normal", "--no-fast"], "broken.png"),
    ("unsupported size", ["--data", "{synth}/train", "--cls", "normal", "--size", "48"],
     "invalid choice: 48"),
    ("batch too big", ["--data", "{synth}/train", "--cls", "normal", "--batch-size", "64"],
     "lower --batch-size"),
    ("ckpt without generate", ["--cls", "normal", "--ckpt", "x.pt"], "--generate"),
    ("generate without ckpt", ["--generate", "3", "--out", "{tmp}/g"], "--ckpt"),
    ("missing checkpoint", ["--generate", "3", "--ckpt", "{tmp}/none.pt", "--out", "{tmp}/g"],
     "not found"),
    ("no cuda", ["--data", "{synth}/train", "--cls", "normal", "--device", "cuda:7"], "--device"),
    ("amp without fast", ["--data", "{synth}/train", "--cls", "normal", "--no-fast", "--amp"],
     "--amp needs --fast"),
    ("lr nan", ["--data", "{synth}/train", "--cls", "normal", "--lr", "nan"], "--lr must be positive"),
    ("negative workers", ["--data", "{synth}/train", "--cls", "normal", "--no-fast",
                          "--workers", "-1"], "--workers must be 0 or more"),
    ("negative eval-every", ["--data", "{synth}/train", "--cls", "normal", "--eval-every", "-5"],
     "--eval-every must be 0 or more"),
    ("out is a file", ["--data", "{synth}/train", "--cls", "normal", "--out", "{file}"],
     "is a file"),
    ("generate into a file", ["--generate", "3", "--ckpt", "x.pt", "--out", "{file}"], "is a file"),
])
def test_bad_inputs_give_one_line(case, argv, expected, synth, bad_data, tmp_path, capsys):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(tmp=tmp_path, synth=synth, bad=bad_data, file=a_file) for a in argv]
    # --workers 0, --device cpu and --batch-size 4 where the case does not set them itself
    extra = ([] if "--workers" in argv else ["--workers", "0"])
    extra += [] if "--device" in argv else ["--device", "cpu"]
    extra += [] if "--batch-size" in argv else ["--batch-size", "4"]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert run_main([*argv, *extra, *out, "--max-steps", "1"]
                    if "--generate" not in argv else [*argv, "--device", "cpu"]) == 2, case
    assert expected in error_line(capsys), case


def test_wrong_checkpoints_are_refused(short_run, synth, tmp_path, capsys):
    ckpt = str(short_run / "checkpoints" / "last.pt")  # a 32 px, 1 channel, normal checkpoint
    gen = ["--ckpt", ckpt, "--out", str(tmp_path / "g"), "--device", "cpu"]
    assert run_main(["--generate", "2", "--size", "64", *gen]) == 2
    assert "--size 32, not 64" in error_line(capsys)
    assert run_main(["--generate", "2", "--channels", "3", *gen]) == 2
    assert "--channels 1, not 3" in error_line(capsys)
    # resuming a training run from another size's or another class's checkpoint
    train = ["--data", str(synth / "train"), "--out", str(tmp_path / "t"), *FAST[2:]]
    assert run_main(["--cls", "normal", "--size", "64", "--resume", ckpt, *train]) == 2
    assert "--size 32, not 64" in error_line(capsys)
    assert run_main(["--cls", "viral", "--size", "32", "--resume", ckpt, *train]) == 2
    assert "--cls normal, not viral" in error_line(capsys)
    # files that are not dcgan.py checkpoints
    other = tmp_path / "other.pt"
    torch.save({"model": "acgan", "netG": {}}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    for path, expected in ((other, "not a dcgan.py checkpoint"), (garbage, "cannot read")):
        assert run_main(["--generate", "2", "--ckpt", str(path), "--out", str(tmp_path / "g"),
                         "--device", "cpu"]) == 2
        assert expected in error_line(capsys)


def test_fresh_run_refuses_to_overwrite_a_run(short_run, synth, capsys):
    assert run_main(["--data", str(synth / "train"), "--cls", "normal", "--out", str(short_run),
                     *FAST]) == 2
    assert "--resume" in error_line(capsys)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "dcgan.py", "--data", str(tmp_path / "nowhere"),
                             "--cls", "normal", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder"), result.stderr
    assert "python prep.py kermany PATH" in lines[0] and "python prep.py synthetic" in lines[0]
