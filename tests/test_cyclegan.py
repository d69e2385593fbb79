"""Tests for cyclegan.py. CPU only, no downloads; 32 px phantoms, narrow nets (ngf = ndf = 8), a few
steps per run; parameter counts on the meta device.

Parameter counts and layer shapes are checked against closed forms from Zhu et al.'s App. 7.2 (and
the reference code's printed totals), the training step against Eq. 3 + the identity term written
out independently, the jitter against plain slicing, and resume against an uninterrupted run.
"""

import contextlib
import copy
import csv
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cyclegan  # noqa: E402

SIZE, N_TRAIN = 32, 8  # 8 train and 2 test images per class; batch 4: 2 steps per epoch
FAST = ["--size", str(SIZE), "--ngf", "8", "--ndf", "8", "--batch-size", "4", "--device", "cpu"]


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


def train_argv(synth, out, *extra, dst="viral"):
    return ["--src", "normal", "--dst", dst, "--data", str(synth / "train"), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def short_run(synth, tmp_path_factory):
    """One 4-step run (2 epochs of 2 steps) shared by the tests that only read its outputs. Warnings
    are kept, to check that the schedulers step after the optimizers."""
    out = tmp_path_factory.mktemp("run") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cyclegan.main(train_argv(synth, out, "--epochs", "2", "--decay-epochs", "1", "--log-every", "1",
                                 "--sample-every", "2", "--save-every", "2"))
    return out, [str(w.message) for w in caught]


def run_main(argv):
    """main(argv) -> its exit code (0 when it returns; a SystemExit message counts as 1)."""
    try:
        cyclegan.main(argv)
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


def conv(c_in, c_out, k):
    return c_in * c_out * k * k + c_out  # weights and bias: instance norm without affine needs the bias


# -- Models ----------------------------------------------------------------------------------------

def test_parameter_counts_and_layers_match_the_reference():
    """Closed forms from App. 7.2's layer lists, RGB at 256 px, ngf = ndf = 64. The reference code
    prints the same networks as 11.378 M (resnet_9blocks), 2.765 M (basic D) and, with its batch
    norm, 54.414 M (unet_256)."""
    with torch.device("meta"):  # shapes and counts only: no memory, no compute
        resnet, D = cyclegan.ResnetGenerator(3, 9), cyclegan.PatchDiscriminator(3)
        unet = cyclegan.UnetGenerator(3, 256)
        small = cyclegan.CycleGAN("resnet", 1, 128)
    assert n_params(resnet) == (conv(3, 64, 7) + conv(64, 128, 3) + conv(128, 256, 3)  # c7s1-64 d128 d256
                                + 9 * 2 * conv(256, 256, 3)                             # R256 x 9
                                + conv(256, 128, 3) + conv(128, 64, 3) + conv(64, 3, 7)) == 11_378_179
    assert n_params(D) == (conv(3, 64, 4) + conv(64, 128, 4) + conv(128, 256, 4) + conv(256, 512, 4)
                           + conv(512, 1, 4)) == 2_764_737                              # C64-C128-C256-C512, 1
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    norms = [m for m in unet.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 6 + 7  # downs 2..7, every up
    assert round((weights + sum(2 * m.num_features for m in norms)) / 1e6, 3) == 54.414  # as with batch norm
    assert [any(isinstance(m, nn.Dropout) for m in up.modules()) for up in unet.ups] == [True] * 3 + [False] * 4
    # Reflection padding of 3 around the 7x7 convolutions (never the channel count), 1 in the blocks;
    # 9 residual blocks at 256 px, 6 at 128 (App. 7.2).
    assert [m.padding for m in resnet if isinstance(m, nn.ReflectionPad2d)] == [(3, 3, 3, 3)] * 2
    assert sum(isinstance(m, cyclegan.ResnetBlock) for m in resnet) == 9
    assert sum(isinstance(m, cyclegan.ResnetBlock) for m in small.G_src2dst) == 6
    for net in (resnet, D, unet, small):  # instance norm (Sec. 4) without affine or running stats
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert norms and all(not m.affine and not m.track_running_stats for m in norms)
        assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd))
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax)) for m in D.modules())  # logits


@pytest.mark.parametrize("kind", ["resnet", "unet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_at_every_size(kind, channels):
    for size in cyclegan.SIZES:
        with torch.device("meta"):
            nets = cyclegan.CycleGAN(kind, channels, size)
            x = torch.empty(2, channels, size, size)
            fake = nets.G_src2dst(x)
            assert fake.shape == x.shape and nets.D_dst(fake).shape == (2, 1, size // 8 - 2, size // 8 - 2)
    assert nets.D_dst(torch.empty(1, channels, 256, 256, device="meta")).shape == (1, 1, 30, 30)
    if kind == "unet":  # log2(size) downsamplings reach 1 x 1
        assert len(nets.G_src2dst.downs) == int(math.log2(size))


def test_patchgan_sees_70x70_patches():
    """With the (global) instance norms removed, one logit's gradient reaches exactly 70 x 70 pixels."""
    D = cyclegan.PatchDiscriminator(1, ndf=4)
    for i, m in enumerate(D):
        if isinstance(m, nn.InstanceNorm2d):
            D[i] = nn.Identity()
    x = torch.randn(1, 1, 256, 256, requires_grad=True)
    D(x)[0, 0, 15, 15].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (70, 70)


def test_init_is_n_0_002_with_zero_biases_and_output_in_tanh_range():
    torch.manual_seed(0)
    nets = cyclegan.CycleGAN("resnet", 1, SIZE, ngf=16, ndf=16)
    weights = torch.cat([m.weight.flatten() for m in nets.modules() if isinstance(m, nn.modules.conv._ConvNd)])
    assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
    assert all((m.bias == 0).all() for m in nets.modules() if isinstance(m, nn.modules.conv._ConvNd))
    with torch.no_grad():
        assert nets.G_dst2src(torch.randn(2, 1, SIZE, SIZE) * 3).abs().max() <= 1


# -- Losses, the pool, the schedule and the training step --------------------------------------------

def test_gan_losses_match_closed_forms():
    logits = torch.tensor([[-1.0, 0.5], [2.0, 0.0]])
    s = torch.sigmoid(logits)
    assert torch.isclose(cyclegan.gan_loss(logits, True, "lsgan"), ((logits - 1) ** 2).mean())
    assert torch.isclose(cyclegan.gan_loss(logits, False, "lsgan"), (logits ** 2).mean())
    assert torch.isclose(cyclegan.gan_loss(logits, True, "bce"), -s.log().mean())
    assert torch.isclose(cyclegan.gan_loss(logits, False, "bce"), -(1 - s).log().mean())


def test_train_step_minimises_eq3_plus_identity():
    """One train_step against Eq. 3 + the identity term written out with the networks as they were
    before the step: every logged term, the 1/2 on the D losses, and the gradients each optimizer
    used (G's from L_G alone, D's from the D losses alone: nothing leaks between them)."""
    torch.manual_seed(0)
    nets = cyclegan.CycleGAN("resnet", 1, SIZE, ngf=4, ndf=4)
    ref = copy.deepcopy(nets)
    x, y = torch.rand(2, 2, 1, SIZE, SIZE) * 2 - 1  # a src and a dst batch
    params = lambda *names: [p for name in names for p in getattr(nets, name).parameters()]  # noqa: E731
    opt_g = torch.optim.SGD(params("G_src2dst", "G_dst2src"), 0.1)
    opt_d = torch.optim.SGD(params("D_src", "D_dst"), 0.1)
    pool_off, scaler_off = cyclegan.ImagePool(0, 0), torch.amp.GradScaler("cpu", enabled=False)
    stats = cyclegan.train_step(nets, opt_g, opt_d, scaler_off, pool_off, pool_off, contextlib.nullcontext(), x, y)
    stats = dict(zip(cyclegan.STATS, stats))
    G, Fy, D_X, D_Y = ref.G_src2dst, ref.G_dst2src, ref.D_src, ref.D_dst
    l1 = lambda a, b: (a - b).abs().mean()  # noqa: E731
    fake_y, fake_x = G(x), Fy(y)
    expected = {"G_adv_src2dst": ((D_Y(fake_y) - 1) ** 2).mean(), "G_adv_dst2src": ((D_X(fake_x) - 1) ** 2).mean(),
                "cycle_src": 10 * l1(Fy(fake_y), x), "cycle_dst": 10 * l1(G(fake_x), y),
                "idt_src2dst": 5 * l1(G(y), y), "idt_dst2src": 5 * l1(Fy(x), x)}  # weight 0.5 * lambda = 5
    loss_g = expected["G_total"] = sum(expected.values())
    expected["D_dst"] = 0.5 * (((D_Y(y) - 1) ** 2).mean() + (D_Y(fake_y.detach()) ** 2).mean())
    expected["D_src"] = 0.5 * (((D_X(x) - 1) ** 2).mean() + (D_X(fake_x.detach()) ** 2).mean())
    expected.update(D_src_real=D_X(x).mean(), D_dst_fake=D_Y(fake_y).mean())
    for name, value in expected.items():
        assert torch.isclose(stats[name], value.detach(), rtol=1e-5, atol=1e-6), name
    loss_d = expected["D_src"] + expected["D_dst"]
    for names, loss in ((("G_src2dst", "G_dst2src"), loss_g), (("D_src", "D_dst"), loss_d)):
        ref.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for name in names:
            for (where, p), q in zip(getattr(ref, name).named_parameters(), getattr(nets, name).parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), f"{name}.{where}"


def images(values):
    """One 1x1 single-channel image per value: (N, 1, 1, 1)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def test_image_pool_fills_first_then_swaps_with_probability_one_half():
    pool = cyclegan.ImagePool(3, seed=0)
    assert torch.equal(pool.query(images([1, 2])), images([1, 2]))
    assert torch.equal(pool.query(images([3])), images([3]))
    assert torch.equal(pool.images, images([1, 2, 3]))
    size, n = 5, 4000
    pool = cyclegan.ImagePool(size, seed=0)
    pool.query(images(range(size)))
    swaps, slots = 0, [0] * size
    for i in range(n):
        before, new = pool.images.clone(), 1000.0 + i
        got = pool.query(images([new])).item()
        if got == new:  # kept the new one, pool untouched
            assert torch.equal(pool.images, before)
        else:  # returned a stored one, the new one in its slot
            slot = (before.flatten() == got).nonzero().item()
            assert pool.images.flatten()[slot] == new
            assert torch.equal(pool.images[torch.arange(size) != slot], before[torch.arange(size) != slot])
            swaps, slots[slot] = swaps + 1, slots[slot] + 1
    assert abs(swaps / n - 0.5) < 5 * math.sqrt(0.25 / n)  # binomial(4000, 1/2), 5 sigma
    assert all(abs(c - swaps / size) < 5 * math.sqrt(swaps / size) for c in slots)  # uniform slots


def test_image_pool_state_resumes_exactly_and_size_zero_is_off():
    a, b = cyclegan.ImagePool(2, seed=7), cyclegan.ImagePool(2, seed=99)
    xs = images(range(40))
    for x in xs[:20]:
        a.query(x[None])
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # the stored fakes and the generator's state
    assert all(torch.equal(a.query(x[None]), b.query(x[None])) for x in xs[20:])
    off = cyclegan.ImagePool(0, seed=0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    out = off.query(x)
    assert torch.equal(out, x) and not out.requires_grad and len(off.images) == 0


def test_learning_rate_is_constant_then_decays_linearly():
    epochs, decay = 10, 4
    factors = [cyclegan.lr_factor(e, epochs, decay) for e in range(epochs)]
    assert factors[:epochs - decay] == [1.0] * (epochs - decay)
    assert factors[-1] == pytest.approx(1 / (decay + 1))  # reference code: 1 - 4/5
    assert all(a > b for a, b in zip(factors[epochs - decay - 1:], factors[epochs - decay:]))
    assert cyclegan.lr_factor(epochs, epochs, decay) == 0.0  # zero one epoch after the end
    assert [cyclegan.lr_factor(e, 200, 100) for e in (0, 99, 100, 199)] == pytest.approx([1, 1, 100 / 101, 1 / 101])


# -- Data ------------------------------------------------------------------------------------------

def test_epoch_plan_is_unaligned_and_a_function_of_seed_and_epoch():
    assert round(256 * cyclegan.JITTER) == 286  # decoded at 286, cropped to 256 (App. 7.1)
    plan = cyclegan.epoch_plan(3, 8, 2, crop=4, flip=False, seed=0, epoch=1)  # dst larger: 8 of each
    assert plan.shape == (4, 8, 2)
    src, dst = plan[:, 0].flatten().tolist(), plan[:, 4].flatten().tolist()
    assert sorted(dst) == list(range(8)) and sorted(src[:3]) == [0, 1, 2] and sorted(src[3:6]) == [0, 1, 2]
    assert 0 <= plan[:, [1, 2, 5, 6]].min() and plan[:, [1, 2, 5, 6]].max() <= 4
    assert not plan[:, [3, 7]].any() and cyclegan.epoch_plan(3, 8, 2, 4, True, 0, 1)[:, [3, 7]].any()  # --flip
    assert torch.equal(plan, cyclegan.epoch_plan(3, 8, 2, 4, False, seed=0, epoch=1))
    assert not torch.equal(plan, cyclegan.epoch_plan(3, 8, 2, 4, False, seed=0, epoch=2))
    assert cyclegan.epoch_plan(9, 4, 2, 4, False, 0, 0).shape == (4, 8, 2)  # the last, smaller batch dropped


def test_jitter_is_a_crop_and_a_flip():
    """Against plain slicing: each image cropped at its offsets, mirrored where asked."""
    images = torch.randint(0, 256, (5, 3, 10, 10), dtype=torch.uint8)
    rows = torch.tensor([[4, 0, 2], [0, 1, 2], [2, 0, 1], [1, 0, 1]])  # index, top, left, flip
    out = cyclegan.jitter(images, rows, 8)
    assert out.shape == (3, 3, 8, 8) and out.min() >= -1 and out.max() <= 1
    for k, (i, t, l, f) in enumerate(rows.T.tolist()):
        crop = images[i, :, t:t + 8, l:l + 8].float() / 127.5 - 1
        assert torch.equal(out[k], crop.flip(-1) if f else crop), k


def test_translation_is_eval_mode_without_grad_and_restores_train_mode():
    torch.manual_seed(0)
    G = cyclegan.UnetGenerator(1, SIZE, ngf=4)  # dropout: train mode would differ run to run
    x = torch.randint(0, 256, (3, 1, SIZE, SIZE), dtype=torch.uint8)
    a, b = cyclegan.translate_images(G, x, batch_size=2), cyclegan.translate_images(G, x)
    assert a.dtype == torch.uint8 and G.training
    G.eval()
    with torch.no_grad():  # -1 -> 0, 1 -> 255, as metrics.py expects
        c = ((G(x.float() / 127.5 - 1) + 1) * 127.5).round().clamp(0, 255).byte()
    for other in (b, c):  # equal up to float rounding at a half grey level (dropout would change far more)
        assert (a.int() - other.int()).abs().max() <= 1


# -- Training runs ---------------------------------------------------------------------------------

def test_short_run_writes_every_output(short_run):
    out, caught = short_run
    assert not [m for m in caught if "lr_scheduler.step()" in m]  # schedulers after the optimizers
    config = json.loads((out / "config.json").read_text())
    args = config["args"]  # Zhu et al.'s values by default
    assert (args["gan_loss"], args["lambda_cyc"], args["lambda_idt"], args["pool_size"], args["lr"], args["flip"],
            args["generator"]) == ("lsgan", 10.0, 0.5, 50, 2e-4, False, "resnet")
    assert config["device"] == "cpu" and config["amp"] == "off"
    rows = read_rows(out / "log.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert list(rows[0]) == ["step", "epoch", "lr", *cyclegan.STATS, "ms_per_step"]
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4])  # epoch 2: 1/(1 + 1)
    for step in (0, 2, 4):  # 4 fixed images per class; rows src, fake, back, dst, fake, back
        with Image.open(out / "samples" / f"step_{step:06d}.png") as im:
            assert im.mode == "L" and im.size == (4 * (SIZE + 2) + 2, 6 * (SIZE + 2) + 2)
    with Image.open(out / "loss_curve.png") as im:
        assert {(255, 0, 0), (0, 0, 255)} <= {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt", "step_000004.pt"]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["model"] == "cyclegan" and ckpt["step"] == 4 and ckpt["args"]["size"] == SIZE
    assert {"nets", "opt_g", "opt_d", "sched_g", "sched_d", "scaler", "pool_src", "pool_dst", "rng_cpu"} <= ckpt.keys()
    assert ckpt["pool_src"]["images"].shape == (16, 1, SIZE, SIZE)  # 4 steps of 4, pool of 50
    assert ckpt["sched_g"]["last_epoch"] == 2
    for opt in ("opt_g", "opt_d"):  # Adam 2e-4, (0.5, 0.999), one for both G and one for both D
        group = ckpt[opt]["param_groups"][0]
        assert (group["initial_lr"], tuple(group["betas"])) == (2e-4, (0.5, 0.999))
        first = "G_src2dst" if opt == "opt_g" else "D_src"
        assert len(group["params"]) == 2 * len([k for k in ckpt["nets"] if k.startswith(first)])
    assert not (out / "metrics.csv").exists()


def test_resume_is_exact_after_ctrl_c_and_after_kill_9(synth, tmp_path):
    """5 steps in one go == 3 steps + --resume (as after Ctrl-C) == 4 steps, then --resume from
    step_000002.pt (kill -9 after the step-2 save: the log rows of steps 3-4 are rewritten). Across an
    epoch end (2 steps per epoch), with the U-Net's dropout, --flip and a pool of 2 that swaps: nets,
    optimizers, schedules, pools, RNG and log agree bit for bit."""
    common = ["--generator", "unet", "--pool-size", "2", "--flip", "--epochs", "3", "--decay-epochs", "2",
              "--log-every", "1", "--sample-every", "0", "--save-every", "2"]
    whole, split, killed = tmp_path / "whole", tmp_path / "split", tmp_path / "killed"
    assert run_main(train_argv(synth, whole, *common, "--max-steps", "5")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "3")) == 0
    assert run_main(train_argv(synth, split, *common, "--max-steps", "5", "--resume")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "4")) == 0
    assert run_main(train_argv(synth, killed, *common, "--max-steps", "5", "--resume",
                               str(killed / "checkpoints/step_000002.pt"))) == 0
    a = load(whole / "checkpoints" / "last.pt")
    for other in (split, killed):
        b = load(other / "checkpoints" / "last.pt")
        assert a["step"] == b["step"] == 5
        for key in ("nets", "opt_g", "opt_d", "sched_g", "sched_d", "pool_src", "pool_dst", "rng_cpu"):
            ta, tb = list(tensors(a[key])), list(tensors(b[key]))
            assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), (other, key)
        assert a["sched_g"] == b["sched_g"]
    assert len(a["pool_src"]["images"]) == 2 and a["sched_g"]["last_epoch"] == 2
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rows]  # noqa: E731
    assert strip(read_rows(whole / "log.csv")) == strip(read_rows(killed / "log.csv"))
    assert [p.name for p in (whole / "samples").iterdir()] == ["step_000000.png"]  # --sample-every 0: off


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


def test_amp_on_cpu_is_bf16_autocast_close_to_fp32(synth, tmp_path, capsys):
    """--amp on a CPU is bf16 autocast: finite losses, fp32 weights and pools in the checkpoint, and
    the first step's losses (before any update) within bf16 rounding of fp32. The last step of a
    --max-steps run gets a sample grid."""
    rows = {}
    for flag in ("--amp", "--no-amp"):
        assert run_main(train_argv(synth, tmp_path / flag, "--max-steps", "2", "--log-every", "1",
                                   "--sample-every", "100", flag)) == 0
        rows[flag] = read_rows(tmp_path / flag / "log.csv")
    assert json.loads((tmp_path / "--amp" / "config.json").read_text())["amp"] == "torch.bfloat16"
    assert all(math.isfinite(float(v)) for r in rows["--amp"] for v in r.values())
    for key in ("G_total", "cycle_src", "D_src", "D_dst"):
        assert abs(float(rows["--amp"][0][key]) - float(rows["--no-amp"][0][key])) < 0.05, key
    ckpt = load(tmp_path / "--amp" / "checkpoints" / "last.pt")
    assert {t.dtype for t in ckpt["nets"].values()} == {torch.float32}
    assert ckpt["pool_src"]["images"].dtype == torch.float32
    assert sorted(p.name for p in (tmp_path / "--amp" / "samples").iterdir()) == ["step_000000.png", "step_000002.png"]
    assert "[1/100][1/2] G_total" in capsys.readouterr().out  # the log line


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch):
    real_step, calls = cyclegan.train_step, []

    def nan_from_step_3(*args):
        calls.append(1)
        stats = real_step(*args)
        return stats * float("nan") if len(calls) >= 3 else stats

    monkeypatch.setattr(cyclegan, "train_step", nan_from_step_3)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_argv(synth, out, "--epochs", "5", "--log-every", "2", "--save-every", "2",
                                 "--sample-every", "0"))
    message = str(e.value.code)
    assert message.startswith("error: non-finite loss at step 4 (after step 2)") and "\n" not in message
    assert str(out / "checkpoints" / "last.pt") in message
    assert load(out / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [2]  # no NaN row


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_finish_the_step_save_and_say_how_to_resume(sig, synth, tmp_path, monkeypatch, capsys):
    real_step, calls = cyclegan.train_step, []

    def interrupt_in_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)  # as if the user pressed Ctrl-C (or `kill` ran) mid-step
        return real_step(*args)

    monkeypatch.setattr(cyclegan, "train_step", interrupt_in_step_2)
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


@pytest.mark.filterwarnings("ignore")  # FID of 2 images warns, as it should
def test_eval_every_writes_metrics_csv(synth, fid_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_main(train_argv(synth, out, "--epochs", "1", "--decay-epochs", "0", "--eval-every", "2",
                               "--fid-weights", str(fid_weights), "--sample-every", "0")) == 0
    rows = read_rows(out / "metrics.csv")
    assert [(r["step"], r["epoch"]) for r in rows] == [("2", "1.0")]
    assert int(rows[0]["n_real"]) == N_TRAIN and int(rows[0]["n_fake"]) == 2  # train viral, test normal
    assert all(math.isfinite(float(rows[0][k])) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert rows[0]["network"] and "eval: FID" in capsys.readouterr().out
    assert (out / "checkpoints" / "step_000002.pt").is_file()  # the scored model is kept


def test_eval_runs_every_e_steps(synth, tmp_path, monkeypatch):
    scored = []

    class Recorder:
        def score(self, fake):
            scored.append(len(fake))
            return {"fid": 1.0, "kid_mean": 0.0, "is_mean": 1.0, "n_fake": len(fake), "n_real": 8, "network": "x"}

    monkeypatch.setattr(cyclegan, "make_evaluator", lambda args, device: (Recorder(), torch.zeros(3, 3, SIZE, SIZE)))
    out = tmp_path / "e"
    assert run_main(train_argv(synth, out, "--epochs", "5", "--eval-every", "4", "--sample-every", "0",
                               "--save-every", "100", "--channels", "3")) == 0  # 3 channels: the gray repeated
    assert json.loads((out / "config.json").read_text())["args"]["decay_epochs"] == 2  # default: half of 5
    assert [(r["step"], r["epoch"]) for r in read_rows(out / "metrics.csv")] == [("4", "2.0"), ("8", "4.0")]
    assert scored == [3, 3] and Image.open(out / "samples" / "step_000000.png").mode == "L"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000004.pt", "step_000008.pt"]


def test_missing_fid_weights_fail_before_training(synth, tmp_path, capsys):
    out = tmp_path / "noweights"
    assert run_main(train_argv(synth, out, "--eval-every", "1", "--fid-weights", str(tmp_path / "missing.pth"))) == 2
    assert "missing.pth" in error_line(capsys)
    assert not (out / "log.csv").exists() and not (out / "checkpoints").exists()


# -- Translate -------------------------------------------------------------------------------------

def test_translate_writes_one_channel_pngs_and_panels(short_run, synth, tmp_path, capsys):
    ckpt = str(short_run[0] / "checkpoints" / "last.pt")
    folder = synth / "test" / "normal"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert run_main(["--translate", str(folder), "--ckpt", ckpt, "--out", str(tmp_path / "fake"), "--grid",
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "fake").glob("*.png")) == names
    for name in names:
        with Image.open(tmp_path / "fake" / name) as im, Image.open(tmp_path / "fake" / "panels" / name) as panel:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
            assert panel.mode == "L" and panel.size == (3 * (SIZE + 2) + 2, SIZE + 4)  # input | translated | back
    assert "wrote 2 images by G_src2dst (normal <-> viral, step 4)" in capsys.readouterr().out
    assert run_main(["--translate", str(folder), "--ckpt", ckpt, "--out", str(tmp_path / "back"),
                     "--direction", "dst2src", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == names
    differ = [Image.open(tmp_path / d / names[0]).tobytes() for d in ("fake", "back")]
    assert differ[0] != differ[1]  # the other generator


@pytest.mark.parametrize("case, needles", [
    ("missing folder", ["no PNG images", "nope", "--translate"]),
    ("empty folder", ["no PNG images", "empty", "--translate"]),
    ("out is the input", ["is the input folder", "another --out"]),
])
def test_translate_folder_errors_come_first_and_alone(case, needles, synth, tmp_path, capsys):
    """Checked before the checkpoint is read (here it does not exist) and before the device line."""
    (tmp_path / "empty").mkdir()
    folder = str(synth / "test" / "normal")
    translate_dir, out = {"missing folder": (str(tmp_path / "nope"), str(tmp_path / "o")),
                          "empty folder": (str(tmp_path / "empty"), str(tmp_path / "o")),
                          "out is the input": (folder, folder)}[case]
    capsys.readouterr()
    assert run_main(["--translate", translate_dir, "--ckpt", str(tmp_path / "none.pt"), "--out", out]) == 2
    line = error_line(capsys)
    assert all(needle in line for needle in needles), line


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
    (root / "bacterial").mkdir()
    (root / "bacterial" / "0.png").write_bytes((synth / "train" / "viral" / "viral_train_00000.png").read_bytes())
    return root


TRAIN = ["--data", "{synth}/train", "--src", "normal", "--dst", "viral"]


@pytest.mark.parametrize("case, argv, expected", [
    ("missing data", ["--data", "{tmp}/nowhere", "--src", "normal", "--dst", "viral"], "prep.py synthetic"),
    ("missing class", ["--data", "{synth}/train", "--src", "normal", "--dst", "covid"], "prep.py kermany"),
    ("unknown class", ["--data", "{synth}/train", "--src", "tuberculosis", "--dst", "viral"], "invalid choice"),
    ("no dst", ["--data", "{synth}/train", "--src", "normal"], "--dst"),
    ("same class", ["--data", "{synth}/train", "--src", "normal", "--dst", "normal"], "both normal"),
    ("empty class", ["--data", "{bad}", "--src", "bacterial", "--dst", "viral"], "viral has 0 PNG images"),
    ("corrupt png", ["--data", "{bad}", "--src", "normal", "--dst", "bacterial"], "broken.png"),
    ("batch too big", ["--data", "{bad}", "--src", "bacterial", "--dst", "normal", "--batch-size", "4"],
     "lower --batch-size"),
    ("unsupported size", [*TRAIN, "--size", "48"], "invalid choice: 48"),
    ("batch zero", [*TRAIN, "--batch-size", "0"], "--batch-size"),
    ("lr nan", [*TRAIN, "--lr", "nan"], "--lr"),
    ("lr text", [*TRAIN, "--lr", "fast"], "--lr"),
    ("negative pool", [*TRAIN, "--pool-size", "-1"], "--pool-size"),
    ("negative eval-every", [*TRAIN, "--eval-every", "-5"], "--eval-every"),
    ("too few to score", ["--data", "{synth}/train", "--src", "bacterial", "--dst", "viral", "--eval-every", "1",
                          "--test-data", "{bad}"], "needs 2 or more images"),
    ("decay longer than training", [*TRAIN, "--epochs", "3", "--decay-epochs", "4"], "--decay-epochs 4"),
    ("no cuda", [*TRAIN, "--device", "cuda:7"], "--device"),
    ("bad device", [*TRAIN, "--device", "tpu"], "--device"),
    ("out is a file", [*TRAIN, "--out", "{file}"], "is a file"),
    ("ckpt without translate", [*TRAIN, "--ckpt", "x.pt"], "--translate"),
    ("translate without ckpt", ["--translate", "{synth}/test/normal", "--out", "{tmp}/t"], "--ckpt"),
    ("missing checkpoint", ["--translate", "{synth}/test/normal", "--ckpt", "{tmp}/none.pt", "--out", "{tmp}/t"],
     "NotFound"),
])
def test_bad_inputs_give_one_line(case, argv, expected, synth, bad_data, tmp_path, capsys):
    if case == "no cuda" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(tmp=tmp_path, synth=synth, bad=bad_data, file=a_file) for a in argv]
    extra = [] if "--device" in argv else ["--device", "cpu"]
    if "--translate" not in argv:
        extra += ["--ngf", "4", "--ndf", "4", "--max-steps", "1"] + ([] if "--size" in argv else ["--size", "32"])
        extra += [] if "--out" in argv else ["--out", str(tmp_path / "run")]
        extra += [] if "--batch-size" in argv else ["--batch-size", "1"]
    assert run_main([*argv, *extra]) == 2, case
    assert expected in error_line(capsys), case


def test_wrong_checkpoints_are_refused(short_run, synth, tmp_path, capsys):
    ckpt = str(short_run[0] / "checkpoints" / "last.pt")  # 32 px, normal -> viral
    assert run_main(train_argv(synth, tmp_path / "t", "--size", "64", "--resume", ckpt)) == 2
    assert "--size 32, not 64" in error_line(capsys)
    assert run_main(train_argv(synth, tmp_path / "t", "--resume", ckpt, dst="bacterial")) == 2
    assert "--dst viral, not bacterial" in error_line(capsys)
    other, garbage = tmp_path / "other.pt", tmp_path / "garbage.pt"
    torch.save({"model": "dcgan", "G": {}}, other)
    garbage.write_bytes(b"this is not a checkpoint")
    for path, expected in ((other, "not a cyclegan.py checkpoint"), (garbage, "cannot read")):
        assert run_main(["--translate", str(synth / "test" / "normal"), "--ckpt", str(path), "--out",
                         str(tmp_path / "g"), "--device", "cpu"]) == 2
        assert expected in error_line(capsys)
        assert run_main(train_argv(synth, tmp_path / "r", "--resume", str(path))) == 2
        assert expected in error_line(capsys)


def test_fresh_run_refuses_to_overwrite_a_run(short_run, synth, capsys):
    assert run_main(train_argv(synth, short_run[0])) == 2
    assert "--resume" in error_line(capsys)


def test_canonical_command_without_data_prints_only_the_error(tmp_path, monkeypatch, capsys):
    """`python cyclegan.py --src normal --dst viral` where data/train is missing: one stderr line
    naming both ways to make the data, nothing on stdout, no run folder."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_main(["--src", "normal", "--dst", "viral"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: data folder data/train not found")
    assert "`python prep.py kermany PATH`" in err and "`python prep.py synthetic`" in err
    assert not (tmp_path / "runs").exists()
    assert run_main(["--help"]) == 0  # the defaults: Zhu et al.'s networks at 256 px, batch 1, 100 epochs
    text = " ".join(capsys.readouterr().out.split())
    for default in ("image side (default: 256)", "--generator {resnet,unet}", "(default: resnet)",
                    "images per class per step (default: 1)", "epochs of max(|src|, |dst|) images (default: 100)"):
        assert default in text, default


def test_subprocess_error_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, "cyclegan.py", "--src", "normal", "--dst", "normal"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --src and --dst are both normal — translate between two different classes"]


def test_the_evidence_script_starts(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evidence_cyclegan.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "tests" / "evidence_cyclegan.py"), run_name="__main__")
    assert e.value.code == 0 and "--minutes" in capsys.readouterr().out


def test_diffaug_augments_every_image_a_discriminator_sees(synth, tmp_path):
    """Both G terms (fakes) and both D terms (real images and pooled fakes) go through the same
    augmentation, the generators learn through it, and it is off unless --diffaug."""
    torch.manual_seed(0)
    nets = cyclegan.CycleGAN("resnet", 1, SIZE, ngf=4, ndf=4)
    params = lambda *names: [p for name in names for p in getattr(nets, name).parameters()]  # noqa: E731
    opt_g, opt_d = torch.optim.SGD(params("G_src2dst", "G_dst2src"), 0.1), torch.optim.SGD(params("D_src", "D_dst"), 0.1)
    pool, scaler = cyclegan.ImagePool(0, 0), torch.amp.GradScaler("cpu", enabled=False)
    calls = []

    def recorder(x):
        calls.append(x.requires_grad)
        return cyclegan.diff_augment(x)

    before = [p.detach().clone() for p in params("G_src2dst")]
    x, y = torch.rand(2, 2, 1, SIZE, SIZE) * 2 - 1
    stats = cyclegan.train_step(nets, opt_g, opt_d, scaler, pool, pool, contextlib.nullcontext(), x, y, augment=recorder)
    assert torch.isfinite(stats).all() and calls == [True, True, False, False, False, False]
    assert all(not torch.equal(b, p) for b, p in zip(before, params("G_src2dst")))
    for flags in ([], ["--diffaug"]):
        out = tmp_path / f"run{len(flags)}"
        assert run_main(train_argv(synth, out, "--max-steps", "1", "--sample-every", "0", *flags)) == 0
        assert json.loads((out / "config.json").read_text())["args"]["diffaug"] == bool(flags)


def test_pneumonia_is_bacterial_and_viral_together_and_eval_can_translate_the_training_split(synth, monkeypatch,
                                                                                              tmp_path, capsys):
    """--dst pneumonia (the papers' general pneumonia, GP) reads both classes; --eval-src train scores
    translations of the whole source training split (the papers' 1,341 images), test: the test split."""
    both = cyclegan.load_class(synth / "train", "pneumonia", SIZE, 1, 1)
    assert len(both) == 2 * N_TRAIN
    assert torch.equal(both, torch.cat([cyclegan.load_class(synth / "train", c, SIZE, 1, 1) for c in ("bacterial", "viral")]))

    class Stub:  # records the real reference set; the src images come back from make_evaluator
        def __init__(self, real, weights=None, device="cpu"):
            self.n_real = len(real)

    import metrics
    monkeypatch.setattr(metrics, "Evaluator", Stub)
    for where, n_src in (("train", N_TRAIN), ("test", 2)):
        args = Namespace(test_data=None, data=str(synth / "train"), src="normal", dst="pneumonia", size=SIZE,
                         channels=1, fid_weights=None, eval_src=where)
        evaluator, inputs = cyclegan.make_evaluator(args, torch.device("cpu"))
        assert (len(inputs), evaluator.n_real) == (n_src, 2 * N_TRAIN)
        assert f"G_src2dst of {n_src} normal images in" in capsys.readouterr().out
