"""Tests for dcgan.py. CPU only, no downloads; 32 px phantoms, batch 4, a few steps per run.

Parameter counts and layer shapes are checked against the paper's Tables 1-2, the losses against
their closed forms, and resume against an uninterrupted run (torch.equal).
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

SIZE, N_TRAIN = 32, 8  # 8 images per class, batch 4: 2 steps per epoch
FAST = ["--size", str(SIZE), "--batch-size", "4", "--device", "cpu"]


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


def train_argv(synth, out, *extra, cls="normal"):
    return ["--data", str(synth / "train"), "--cls", cls, "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def short_run(synth, tmp_path_factory):
    """One 4-step run (2 epochs of 2 steps), shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "run"
    dcgan.main(train_argv(synth, out, "--epochs", "2", "--log-every", "1", "--sample-every", "2",
                          "--save-every", "2"))
    return out


def run_main(argv):
    """main(argv) -> its exit code (0 when it returns; a SystemExit message counts as 1)."""
    try:
        dcgan.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def error_line(capsys):
    """stderr, checked to be exactly one `error:` line without a traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# -- Models ----------------------------------------------------------------------------------------

def test_parameter_counts_match_the_papers_tables():
    G, D = dcgan.Generator(64, 1), dcgan.Discriminator(64, 1)
    assert n_params(G) == 3_574_656 and n_params(D) == 2_763_520  # Tables 1 and 2, "Total params"
    table1 = [819_200, 1_024, 2_097_152, 512, 524_288, 256, 131_072, 128, 1_024]  # "Param #" column
    table2 = [1_024, 131_072, 256, 524_288, 512, 2_097_152, 1_024, 8_192]
    assert [n_params(m) for m in G if n_params(m)] == table1
    assert [n_params(m) for m in D.net if n_params(m)] == table2
    # Dropout after the first, third and fourth blocks only (Table 2); no bias anywhere.
    assert [type(m).__name__ for m in D.net] == [
        "Conv2d", "LeakyReLU", "Dropout", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d",
        "LeakyReLU", "Dropout", "Conv2d", "BatchNorm2d", "LeakyReLU", "Dropout", "Conv2d"]
    assert all(m.bias is None for m in [*G, *D.net] if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert [m.p for m in D.net if isinstance(m, torch.nn.Dropout)] == [dcgan.DROPOUT] * 3
    assert [m.p for m in dcgan.Discriminator(dropout=0.5).net if isinstance(m, torch.nn.Dropout)] == [0.5] * 3
    assert [m.negative_slope for m in D.net if isinstance(m, torch.nn.LeakyReLU)] == [0.2] * 4
    assert G[0].in_channels == 100


@pytest.mark.parametrize("size", dcgan.SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_at_every_size(size, channels):
    with torch.device("meta"):  # shapes only: no memory, no compute
        G, D = dcgan.Generator(size, channels), dcgan.Discriminator(size, channels)
        fake = G(torch.empty(3, dcgan.NZ, 1, 1))
        assert fake.shape == (3, channels, size, size) and D(fake).shape == (3,)
    assert len(dcgan.block_widths(size, dcgan.NGF)) == int(np.log2(size)) - 2


def test_forward_is_in_tanh_range_and_init_follows_radford():
    torch.manual_seed(0)
    G = dcgan.Generator(64).apply(dcgan.init_weights)
    fake = G(torch.randn(2, dcgan.NZ, 1, 1))
    assert fake.shape == (2, 1, 64, 64) and fake.abs().max() <= 1
    assert torch.isfinite(dcgan.Discriminator(64)(fake)).all()
    conv = G[3].weight  # 512 x 256 x 4 x 4 values
    bn = torch.cat([m.weight for m in G if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert abs(bn.mean().item() - 1) < 5e-3 and abs(bn.std().item() - 0.02) < 5e-3
    assert all((m.bias == 0).all() for m in G if isinstance(m, torch.nn.BatchNorm2d))


def make_step_parts(seed=0):
    torch.manual_seed(seed)
    G = dcgan.Generator(SIZE).apply(dcgan.init_weights)
    D = dcgan.Discriminator(SIZE).apply(dcgan.init_weights)
    opts = [torch.optim.Adam(net.parameters(), 2e-4, dcgan.BETAS) for net in (G, D)]
    return G, D, *opts, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)


def test_train_step_losses_match_closed_forms():
    """With G and D in eval mode (no dropout, fixed BatchNorm) every stat has a closed form:
    Loss_D = -mean log s(D(x)) - mean log(1 - s(D(G(z)))), Loss_G = -mean log s(D'(G(z))), where
    s is the sigmoid and D' is D after its update; D(x), D(G(z)) are mean sigmoids."""
    G, D, opt_g, opt_d, scaler, autocast = make_step_parts()
    G.eval(), D.eval()
    real, z = torch.rand(4, 1, SIZE, SIZE) * 2 - 1, torch.randn(4, dcgan.NZ, 1, 1)
    with torch.no_grad():
        fake, real_logits = G(z), D(real)
        fake_logits = D(fake)
    stats = dict(zip(dcgan.STATS, dcgan.train_step(G, D, opt_g, opt_d, scaler, autocast, real, z).tolist()))
    with torch.no_grad():
        after_logits = D(fake)  # D' on the fakes of the G before its update
    s = torch.sigmoid
    expected = {"loss_d_real": -s(real_logits).log().mean(), "loss_d_fake": -(1 - s(fake_logits)).log().mean(),
                "loss_g": -s(after_logits).log().mean(), "d_x": s(real_logits).mean(),
                "d_g_z1": s(fake_logits).mean(), "d_g_z2": s(after_logits).mean()}
    for key, value in expected.items():
        assert abs(stats[key] - value.item()) < 1e-5, key
    assert abs(stats["loss_d"] - stats["loss_d_real"] - stats["loss_d_fake"]) < 1e-5


def test_one_step_changes_both_networks():
    G, D, *rest = make_step_parts()
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    stats = dcgan.train_step(G, D, *rest, torch.rand(4, 1, SIZE, SIZE) * 2 - 1, torch.randn(4, dcgan.NZ, 1, 1))
    assert stats.shape == (len(dcgan.STATS),) and torch.isfinite(stats).all()
    assert all(not torch.equal(b, a) for b, a in zip(before, [*G.parameters(), *D.parameters()]))


def test_sampling_is_eval_mode_without_grad_and_restores_train_mode():
    torch.manual_seed(0)
    G, z = dcgan.Generator(SIZE), torch.randn(4, dcgan.NZ, 1, 1)
    images = dcgan.sample(G, z)
    assert images.dtype == torch.uint8 and images.shape == (4, 1, SIZE, SIZE) and G.training
    G.eval()
    with torch.no_grad():  # -1 -> 0, 0 -> 128 (127.5 rounds to even), 1 -> 255, as metrics.py expects
        assert torch.equal(images, ((G(z) + 1) * 127.5).round().clamp(0, 255).byte())


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = dcgan.batch_indices(10, 3, seed=0, epoch=1)
    assert a.shape == (3, 3) and len(set(a.flatten().tolist())) == 9  # the incomplete batch dropped
    assert torch.equal(a, dcgan.batch_indices(10, 3, seed=0, epoch=1))
    assert not torch.equal(a, dcgan.batch_indices(10, 3, seed=0, epoch=2))


def test_fixed_noise_depends_on_neither_n_nor_batch_size():
    ref = dcgan.fixed_z(10, "normal", 7)
    assert ref.shape == (10, 100, 1, 1) and torch.equal(dcgan.fixed_z(4, "normal", 7), ref[:4])
    big, uni = dcgan.fixed_z(400, "normal", 1), dcgan.fixed_z(400, "uniform", 1)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    assert uni.min() >= -1 and uni.max() <= 1 and abs(uni.std() - 1 / 3 ** 0.5) < 0.01


# -- Training runs ---------------------------------------------------------------------------------

def test_short_run_writes_every_output(short_run):
    config = json.loads((short_run / "config.json").read_text())
    args = config["args"]  # the paper's values by default (Sec. 3.3.1)
    assert (args["batch_size"], args["lr"], args["epochs"], args["cls"]) == (4, 2e-4, 2, "normal")
    assert config["device"] == "cpu" and config["amp"] == "off"  # --amp is off on a CPU by default
    assert args["dropout"] == dcgan.DROPOUT == 0 and args["noise"] == "uniform"  # measured on Kermany; Sec. 3.1
    rows = read_rows(short_run / "log.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert list(rows[0]) == ["step", "epoch", *dcgan.STATS, "ms_per_step"]
    assert all(np.isfinite(float(v)) for r in rows for v in r.values())
    side = dcgan.GRID * (SIZE + 2) + 2  # make_grid's 2-pixel padding
    for step in (0, 2, 4):
        with Image.open(short_run / "samples" / f"step_{step:06d}.png") as im:
            assert im.mode == "L" and im.size == (side, side)
    with Image.open(short_run / "loss_curve.png") as im:  # both curves, in their colours
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {(255, 0, 0), (0, 0, 255)} <= colours
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == [
        "last.pt", "step_000002.pt", "step_000004.pt"]
    ckpt = load(short_run / "checkpoints" / "last.pt")
    assert ckpt["model"] == "dcgan" and ckpt["step"] == 4 and ckpt["args"]["size"] == SIZE
    assert {"G", "D", "opt_g", "opt_d", "scaler", "rng_cpu"} <= ckpt.keys()
    assert not (short_run / "metrics.csv").exists()


def test_log_line_has_the_papers_format_and_matches_log_csv(synth, tmp_path, capsys):
    run_main(train_argv(synth, tmp_path / "r", "--epochs", "1", "--log-every", "1", "--sample-every", "0",
                        cls="viral"))
    out = capsys.readouterr().out
    match = re.search(r"\[1/1\]\[1/2\] Loss_D: (\d+\.\d{4}) Loss_G: (\d+\.\d{4}) D\(x\): (0\.\d{4}) "
                      r"D\(G\(z\)\): (0\.\d{4}) / (0\.\d{4})  \d+ ms/step", out)
    assert match and "device: cpu" in out and "warning: training on a CPU" in out, out
    row = read_rows(tmp_path / "r" / "log.csv")[-1]
    for key, printed in zip(("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2"), match.groups()):
        assert abs(float(row[key]) - float(printed)) <= 5e-5 + 1e-4 * float(printed), key


def test_the_last_step_always_gets_a_sample_grid_and_zero_turns_grids_off(synth, tmp_path):
    assert run_main(train_argv(synth, tmp_path / "a", "--max-steps", "3", "--sample-every", "2")) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == [
        "step_000000.png", "step_000002.png", "step_000003.png"]
    assert run_main(train_argv(synth, tmp_path / "b", "--max-steps", "2", "--sample-every", "0")) == 0
    assert [p.name for p in (tmp_path / "b" / "samples").iterdir()] == ["step_000000.png"]


def test_resume_is_exact_after_ctrl_c_and_after_kill_9(synth, tmp_path):
    """5 steps in one go == 3 steps + --resume (Ctrl-C saves last.pt) == 4 steps, then --resume
    from step_000002.pt (kill -9 after the step-2 save: the log rows of steps 3-4 are rewritten).
    Both cross an epoch boundary (2 steps per epoch). Weights, optimizers, RNG and log agree."""
    common = ["--epochs", "3", "--log-every", "1", "--sample-every", "0", "--save-every", "2"]
    whole, split, killed = tmp_path / "whole", tmp_path / "split", tmp_path / "killed"
    assert run_main(train_argv(synth, whole, *common, "--max-steps", "5", cls="bacterial")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "3", cls="bacterial")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "5", "--resume", cls="bacterial")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "4", cls="bacterial")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "5", "--resume",
                               str(killed / "checkpoints/step_000002.pt"), cls="bacterial")) == 0
    a = load(whole / "checkpoints" / "last.pt")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]  # noqa: E731
    for other in (split, killed):
        b = load(other / "checkpoints" / "last.pt")
        assert a["step"] == b["step"] == 5
        for key in ("G", "D", "opt_g", "opt_d", "rng_cpu"):
            ta, tb = list(tensors(a[key])), list(tensors(b[key]))
            assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), (other, key)
    assert strip(read_rows(whole / "log.csv")) == strip(read_rows(killed / "log.csv"))


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


def test_amp_on_cpu_is_bf16_autocast_close_to_fp32(synth, tmp_path):
    """--amp on a CPU is bf16 autocast: finite losses, fp32 weights in the checkpoint, and the
    first step's losses (before any update) within bf16 rounding of fp32 (another seed moves them
    by 0.1 to 1)."""
    rows = {}
    for flag in ("--amp", "--no-amp"):
        assert run_main(train_argv(synth, tmp_path / flag, "--max-steps", "2", "--log-every", "1",
                                   "--sample-every", "0", flag)) == 0
        rows[flag] = read_rows(tmp_path / flag / "log.csv")
    assert json.loads((tmp_path / "--amp" / "config.json").read_text())["amp"] == "torch.bfloat16"
    assert all(np.isfinite(float(v)) for r in rows["--amp"] for v in r.values())
    for key in ("loss_d", "loss_g", "d_x", "d_g_z1"):
        assert abs(float(rows["--amp"][0][key]) - float(rows["--no-amp"][0][key])) < 0.05, key
    ckpt = load(tmp_path / "--amp" / "checkpoints" / "last.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["G"].values() if t.is_floating_point())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch, capsys):
    real_step, calls = dcgan.train_step, []

    def nan_from_step_3(*args):
        calls.append(1)
        stats = real_step(*args)
        return stats * float("nan") if len(calls) >= 3 else stats

    monkeypatch.setattr(dcgan, "train_step", nan_from_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        dcgan.main(train_argv(synth, out, "--epochs", "5", "--log-every", "2", "--save-every", "2",
                              "--sample-every", "0"))
    message = str(e.value.code)
    assert message.startswith("error: non-finite loss at step 4 (after step 2)") and "\n" not in message
    assert str(out / "checkpoints" / "last.pt") in message
    assert load(out / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [2]  # no NaN row


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_finish_the_step_save_and_say_how_to_resume(sig, synth, tmp_path, monkeypatch,
                                                                      capsys):
    real_step, calls = dcgan.train_step, []

    def interrupt_in_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)  # as if the user pressed Ctrl-C (or `kill` ran) mid-step
        return real_step(*args)

    monkeypatch.setattr(dcgan, "train_step", interrupt_in_step_2)
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
def test_eval_every_writes_metrics_csv(synth, fid_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_main(train_argv(synth, out, "--max-steps", "2", "--eval-every", "2", "--eval-n", "4",
                               "--fid-weights", str(fid_weights), "--sample-every", "0", cls="viral")) == 0
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert int(rows[0]["n_real"]) == N_TRAIN and int(rows[0]["n_fake"]) == 4  # N is stated
    assert all(np.isfinite(float(rows[0][k])) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert rows[0]["network"] and "eval: FID" in capsys.readouterr().out


def test_missing_fid_weights_fail_before_training(synth, tmp_path, capsys):
    out = tmp_path / "noweights"
    assert run_main(train_argv(synth, out, "--max-steps", "2", "--eval-every", "2",
                               "--fid-weights", str(tmp_path / "missing.pth"))) == 2
    assert "missing.pth" in error_line(capsys)
    assert not (out / "log.csv").exists() and not (out / "checkpoints").exists()


# -- Generate --------------------------------------------------------------------------------------

def test_generate_writes_n_one_channel_pngs(short_run, tmp_path, capsys):
    folders = {}
    for name, seed, batch in (("a", "1", "2"), ("b", "1", "3"), ("c", "2", "2")):  # b: another batch size
        folders[name] = tmp_path / name
        assert run_main(["--generate", "5", "--ckpt", str(short_run / "checkpoints" / "last.pt"),
                         "--out", str(folders[name]), "--seed", seed, "--batch-size", batch, "--device", "cpu"]) == 0
    read = lambda f: [np.asarray(Image.open(p)) for p in sorted(f.glob("*.png"))]  # noqa: E731
    files = sorted(folders["a"].glob("*.png"))
    assert len(files) == 5 and all(Image.open(f).mode == "L" and Image.open(f).size == (SIZE, SIZE) for f in files)
    assert all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["b"])))
    assert not all(np.array_equal(x, y) for x, y in zip(read(folders["a"]), read(folders["c"])))
    assert "wrote 5 PNGs" in capsys.readouterr().out


# -- Bad inputs: one `error:` line, exit code 2 ----------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(synth, tmp_path_factory):
    """A data folder with an empty class and a class holding one corrupt PNG."""
    root = tmp_path_factory.mktemp("bad")
    (root / "viral").mkdir()
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
    ("empty class", ["--data", "{bad}", "--cls", "viral"], "has 0 PNG images"),
    ("corrupt png", ["--data", "{bad}", "--cls", "normal"], "broken.png"),
    ("unsupported size", ["--data", "{synth}/train", "--cls", "normal", "--size", "48"], "invalid choice: 48"),
    ("batch too big", ["--data", "{synth}/train", "--cls", "normal", "--batch-size", "64"], "lower --batch-size"),
    ("batch zero", ["--data", "{synth}/train", "--cls", "normal", "--batch-size", "0"], "--batch-size"),
    ("ckpt without generate", ["--cls", "normal", "--ckpt", "x.pt"], "--generate"),
    ("generate without ckpt", ["--generate", "3", "--out", "{tmp}/g"], "--ckpt"),
    ("missing checkpoint", ["--generate", "3", "--ckpt", "{tmp}/none.pt", "--out", "{tmp}/g"], "NotFound"),
    ("no cuda", ["--data", "{synth}/train", "--cls", "normal", "--device", "cuda:7"], "--device"),
    ("bad device", ["--data", "{synth}/train", "--cls", "normal", "--device", "tpu"], "--device"),
    ("lr nan", ["--data", "{synth}/train", "--cls", "normal", "--lr", "nan"], "--lr"),
    ("lr text", ["--data", "{synth}/train", "--cls", "normal", "--lr", "fast"], "--lr"),
    ("dropout 1", ["--data", "{synth}/train", "--cls", "normal", "--dropout", "1"], "--dropout"),
    ("negative eval-every", ["--data", "{synth}/train", "--cls", "normal", "--eval-every", "-5"], "--eval-every"),
    ("out is a file", ["--data", "{synth}/train", "--cls", "normal", "--out", "{file}"], "is a file"),
    ("generate into a file", ["--generate", "3", "--ckpt", "x.pt", "--out", "{file}"], "a folder"),
])
def test_bad_inputs_give_one_line(case, argv, expected, synth, bad_data, tmp_path, capsys):
    if case == "no cuda" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(tmp=tmp_path, synth=synth, bad=bad_data, file=a_file) for a in argv]
    extra = [] if "--device" in argv else ["--device", "cpu"]
    if "--generate" not in argv:
        extra += ([] if "--batch-size" in argv else ["--batch-size", "4"]) + ["--max-steps", "1"]
        extra += [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert run_main([*argv, *extra]) == 2, case
    assert expected in error_line(capsys), case


def test_wrong_checkpoints_are_refused(short_run, synth, tmp_path, capsys):
    ckpt = str(short_run / "checkpoints" / "last.pt")  # 32 px, 1 channel, class normal
    argv = ["--data", str(synth / "train"), "--out", str(tmp_path / "t"), "--batch-size", "4", "--device", "cpu"]
    assert run_main([*argv, "--cls", "normal", "--size", "64", "--resume", ckpt]) == 2
    assert "--size 32, not 64" in error_line(capsys)
    assert run_main([*argv, "--cls", "viral", "--size", "32", "--resume", ckpt]) == 2
    assert "--cls normal, not viral" in error_line(capsys)
    other, garbage = tmp_path / "other.pt", tmp_path / "garbage.pt"
    torch.save({"model": "acgan", "G": {}}, other)
    garbage.write_bytes(b"this is not a checkpoint")
    for path, expected in ((other, "not a dcgan.py checkpoint"), (garbage, "cannot read")):
        assert run_main(["--generate", "2", "--ckpt", str(path), "--out", str(tmp_path / "g"), "--device", "cpu"]) == 2
        assert expected in error_line(capsys)


def test_fresh_run_refuses_to_overwrite_a_run(short_run, synth, capsys):
    assert run_main(train_argv(synth, short_run)) == 2
    assert "--resume" in error_line(capsys)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "dcgan.py", "--data", str(tmp_path / "nowhere"), "--cls", "normal",
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder"), result.stderr
    assert "python prep.py kermany PATH" in lines[0] and "python prep.py synthetic" in lines[0]


# -- DiffAugment (--diffaug) -----------------------------------------------------------------------

def test_diff_augment_keeps_shapes_passes_gradients_and_changes_each_image():
    torch.manual_seed(0)
    x = torch.rand(16, 1, SIZE, SIZE, requires_grad=True)
    y = dcgan.diff_augment(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.4  # a cutout and a shift drop some
    # Per image: the cutout removes about a quarter of the image (half the side, clipped at the border)
    # and no two images get the same brightness.
    zeros = (dcgan.diff_augment(torch.ones(200, 1, SIZE, SIZE) * 5) == 0).float().mean((1, 2, 3))
    assert 0.1 < zeros.mean() < 0.3 and zeros.std() > 0.02


def test_diffaug_augments_real_and_fake_alike_and_g_learns_through_it():
    """train_step sends the real batch, the detached fakes and the fakes for G's step through the
    same augmentation; G's gradient flows through it."""
    G, D, *rest = make_step_parts()
    calls = []

    def recorder(x):
        calls.append(x.requires_grad)
        return dcgan.diff_augment(x)

    real, z = torch.rand(4, 1, SIZE, SIZE) * 2 - 1, torch.randn(4, dcgan.NZ, 1, 1)
    before = [p.detach().clone() for p in G.parameters()]
    stats = dcgan.train_step(G, D, *rest, real, z, recorder)
    assert calls == [False, False, True] and torch.isfinite(stats).all()  # real, fake.detach(), fake
    assert all(not torch.equal(b, p) for b, p in zip(before, G.parameters()))


def test_diffaug_is_off_by_default_and_on_by_flag(synth, tmp_path):
    rows = {}
    for flags in ([], ["--diffaug"]):
        out = tmp_path / ("aug" if flags else "plain")
        assert run_main(train_argv(synth, out, "--max-steps", "1", "--log-every", "1", "--sample-every", "0", *flags)) == 0
        assert json.loads((out / "config.json").read_text())["args"]["diffaug"] == bool(flags)
        rows[bool(flags)] = read_rows(out / "log.csv")[0]
    assert rows[True]["d_x"] != rows[False]["d_x"]  # same seed, same weights: D saw other images
