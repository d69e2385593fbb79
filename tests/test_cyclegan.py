"""Tests for cyclegan.py: shapes, the paper's details against closed forms, and whole runs on a tiny
synthetic set (32 px, narrow nets) on the CPU. Run: python -m pytest -q tests/test_cyclegan.py"""
import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cyclegan  # noqa: E402
import prep  # noqa: E402

# Tiny but complete: every run below uses the real architectures, only narrower and at 32 px.
TINY = ["--size", "32", "--ngf", "8", "--ndf", "8", "--workers", "0", "--device", "cpu"]
GAN_LOSS_CALLS_PER_STEP = 6          # 2 in the generator step, 4 in the discriminator step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from a second thread, and other test runs share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """prep.py's phantoms: 4 train images per class (an epoch is 4 steps) and 1 test image."""
    out = tmp_path_factory.mktemp("synth")
    prep.make_synthetic(out, n=4, size=32, seed=0)
    return out


def train_args(synth, out, *extra):
    return ["--src", "normal", "--dst", "viral", "--data", str(synth / "train"), "--out", str(out),
            *TINY, *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_one_line_error(capsys, code, excinfo, *needles):
    assert excinfo.value.code == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """One short run (2 epochs of 4 steps) shared by the output and --translate tests. Warnings are
    recorded, to check that the scheduler is stepped after the optimizers."""
    out = tmp_path_factory.mktemp("run") / "cg"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cyclegan.main(train_args(synth, out, "--epochs", "2", "--decay-epochs", "1", "--log-every", "2",
                                 "--sample-every", "4", "--save-every", "4"))
    return out, [str(w.message) for w in caught]


# --- models --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet", "unet"])
@pytest.mark.parametrize("size", [64, 128, 256])
def test_generator_keeps_size(kind, size):
    G = cyclegan.make_generator(kind, 1, size, ngf=8)
    x = torch.rand(1, 1, size, size) * 2 - 1
    with torch.no_grad():
        y = G(x)
    assert y.shape == x.shape
    assert y.abs().max() <= 1                                   # tanh
    if kind == "resnet":                                        # App. 7.2: 6 blocks to 128, 9 from 256
        blocks = sum(isinstance(m, cyclegan.ResnetBlock) for m in G.modules())
        assert blocks == (9 if size >= 256 else 6)
        pads = [m.padding for m in G.model if isinstance(m, nn.ReflectionPad2d)]
        assert pads == [(3, 3, 3, 3)] * 2                       # around the 7x7 convs, not the channel count
    else:                                                       # log2(size) downs, to 1x1
        assert len(G.downs) == int(math.log2(size))
        shapes = []
        G.downs[-1].register_forward_hook(lambda m, i, o: shapes.append(o.shape))
        with torch.no_grad():
            G(x)
        assert shapes[0][-2:] == (1, 1)
        dropouts = [any(isinstance(m, nn.Dropout) for m in up.modules()) for up in G.ups]
        assert dropouts == [True] * 3 + [False] * (len(G.ups) - 3)


def test_three_channels_and_unsupported_sizes():
    G = cyclegan.make_generator("resnet", 3, 32, ngf=4)
    assert G(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    for size in (100, 48, 16):
        with pytest.raises(ValueError, match=f"size {size}"):
            cyclegan.make_generator("resnet", 1, size)
    with pytest.raises(ValueError, match="power-of-two"):
        cyclegan.UnetGenerator(1, 1, 96)


def test_patchgan_gives_30x30_logits_and_sees_70x70_patches():
    D = cyclegan.PatchDiscriminator(1, ndf=8)
    assert D(torch.randn(2, 1, 256, 256)).shape == (2, 1, 30, 30)
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax)) for m in D.modules())   # logits
    # Receptive field: with the (global) instance norms removed, one logit's gradient reaches
    # exactly a 70 x 70 window of the input.
    for i, m in enumerate(D.model):
        if isinstance(m, nn.InstanceNorm2d):
            D.model[i] = nn.Identity()
    x = torch.randn(1, 1, 256, 256, requires_grad=True)
    D(x)[0, 0, 15, 15].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


def test_weights_are_initialised_from_n_0_002():
    model = cyclegan.CycleGAN("resnet", 1, 64, ngf=16, ndf=16)
    weights = torch.cat([m.weight.flatten() for m in model.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
    assert all(m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out                       # weights and bias


def test_networks_match_the_reference_layer_tables_and_parameter_counts():
    """Closed forms from App. 7.2's layer lists, RGB at 256 px with ngf = ndf = 64. The reference
    code prints the same networks as 11.378 M (resnet_9blocks), 2.765 M (basic D) and, with its
    batch norm, 54.414 M (unet_256)."""
    n = lambda net: sum(p.numel() for p in net.parameters())          # noqa: E731
    resnet = (conv_params(3, 64, 7) + conv_params(64, 128, 3) + conv_params(128, 256, 3)    # c7s1-64 d128 d256
              + 9 * 2 * conv_params(256, 256, 3)                                            # R256 x 9
              + conv_params(256, 128, 3) + conv_params(128, 64, 3) + conv_params(64, 3, 7))  # u128 u64 c7s1-3
    G = cyclegan.make_generator("resnet", 3, 256)
    assert n(G) == resnet == 11_378_179
    patch = (conv_params(3, 64, 4) + conv_params(64, 128, 4) + conv_params(128, 256, 4)
             + conv_params(256, 512, 4) + conv_params(512, 1, 4))                           # C64-C128-C256-C512, 1
    assert n(cyclegan.PatchDiscriminator(3)) == patch == 2_764_737
    unet = cyclegan.make_generator("unet", 3, 256)
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    norms = [m for m in unet.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 6 + 7                                  # downs 2..7, every up but the last
    assert round((weights + sum(2 * m.num_features for m in norms)) / 1e6, 3) == 54.414   # as with batch norm
    # Instance norm everywhere (Sec. 4), without affine parameters or running statistics.
    for net in (G, unet, cyclegan.PatchDiscriminator(1, ndf=8)):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert all(not m.affine and not m.track_running_stats
                   for m in net.modules() if isinstance(m, nn.InstanceNorm2d))


# --- losses and helpers ---------------------------------------------------------------------------

def test_gan_losses_match_closed_forms():
    logits = torch.tensor([[-1.0, 0.5], [2.0, 0.0]])
    assert torch.isclose(cyclegan.gan_loss(logits, True, "lsgan"), ((logits - 1) ** 2).mean())
    assert torch.isclose(cyclegan.gan_loss(logits, False, "lsgan"), (logits ** 2).mean())
    assert torch.isclose(cyclegan.gan_loss(logits, True, "bce"), -torch.log(torch.sigmoid(logits)).mean())
    assert torch.isclose(cyclegan.gan_loss(logits, False, "bce"), -torch.log(1 - torch.sigmoid(logits)).mean())


def test_identity_loss_needs_equal_channels():
    y = torch.rand(1, 1, 32, 32) * 2 - 1
    G = cyclegan.ResnetGenerator(1, 1, n_blocks=1, ngf=4)
    assert cyclegan.identity_loss(G, y) >= 0
    with pytest.raises(ValueError, match="identity loss needs as many input as output channels"):
        cyclegan.identity_loss(cyclegan.ResnetGenerator(1, 3, n_blocks=1, ngf=4), y)


def test_train_step_minimises_the_papers_objective():
    """One train_step against Eq. 3 + the identity term written out with the networks as they were
    before the step: the logged terms, the 1/2 on the D losses, and the gradients each optimizer
    used (G's from L_G alone, D's from the D losses alone: nothing leaks between them)."""
    import contextlib
    import copy
    torch.manual_seed(0)
    model = cyclegan.CycleGAN("resnet", 1, 32, ngf=4, ndf=4)
    ref = copy.deepcopy(model)
    x, y = torch.rand(2, 2, 1, 32, 32) * 2 - 1                  # a src and a dst batch
    params = lambda *names: [p for name in names for p in getattr(model, name).parameters()]   # noqa: E731
    opt_G = torch.optim.SGD(params("G_src2dst", "G_dst2src"), lr=0.1)
    opt_D = torch.optim.SGD(params("D_src", "D_dst"), lr=0.1)
    terms = cyclegan.train_step(model, opt_G, opt_D, torch.amp.GradScaler("cpu", enabled=False),
                                cyclegan.ImagePool(0), cyclegan.ImagePool(0), x, y, gan_mode="lsgan",
                                lambda_cyc=10.0, lambda_idt=0.5, autocast=contextlib.nullcontext,
                                memory_format=torch.contiguous_format)
    G, Fy, D_X, D_Y = ref.G_src2dst, ref.G_dst2src, ref.D_src, ref.D_dst
    l1 = lambda a, b: (a - b).abs().mean()                     # noqa: E731
    fake_y, fake_x = G(x), Fy(y)
    expected = {"G_adv_src2dst": ((D_Y(fake_y) - 1) ** 2).mean(), "G_adv_dst2src": ((D_X(fake_x) - 1) ** 2).mean(),
                "cycle_src": 10 * l1(Fy(fake_y), x), "cycle_dst": 10 * l1(G(fake_x), y),
                "idt_src2dst": 5 * l1(G(y), y), "idt_dst2src": 5 * l1(Fy(x), x)}
    loss_G = sum(expected.values())
    expected["G_total"] = loss_G
    expected["D_dst"] = 0.5 * (((D_Y(y) - 1) ** 2).mean() + (D_Y(fake_y.detach()) ** 2).mean())
    expected["D_src"] = 0.5 * (((D_X(x) - 1) ** 2).mean() + (D_X(fake_x.detach()) ** 2).mean())
    for name, value in expected.items():
        assert torch.isclose(terms[name], value.detach(), rtol=1e-5, atol=1e-6), name
    for names, loss in ((("G_src2dst", "G_dst2src"), loss_G), (("D_src", "D_dst"), expected["D_src"] + expected["D_dst"])):
        ref.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for name in names:
            for (where, p), q in zip(getattr(ref, name).named_parameters(), getattr(model, name).parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), f"{name}.{where}"


def images(values):
    """One 1x1 single-channel image per value: (N, 1, 1, 1)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def test_image_pool_fills_first():
    pool = cyclegan.ImagePool(3, torch.Generator().manual_seed(0))
    out = pool.query(images([1, 2]))
    assert torch.equal(out, images([1, 2]))
    out = pool.query(images([3]))
    assert torch.equal(out, images([3]))
    assert torch.equal(pool.images, images([1, 2, 3]))


def test_image_pool_swaps_with_probability_one_half():
    size, n = 5, 4000
    pool = cyclegan.ImagePool(size, torch.Generator().manual_seed(0))
    pool.query(images(range(size)))
    swaps, slots = 0, [0] * size
    for i in range(n):
        before = pool.images.clone()
        new = 1000.0 + i
        got = pool.query(images([new])).item()
        if got == new:                                 # kept the new one, pool untouched
            assert torch.equal(pool.images, before)
        else:                                          # returned a stored one, new one in its slot
            slot = (before.flatten() == got).nonzero().item()
            assert pool.images.flatten()[slot] == new
            assert torch.equal(torch.cat([pool.images[:slot], pool.images[slot + 1:]]),
                               torch.cat([before[:slot], before[slot + 1:]]))
            swaps += 1
            slots[slot] += 1
    assert abs(swaps / n - 0.5) < 5 * math.sqrt(0.25 / n)   # binomial(4000, 1/2), 5 sigma
    assert all(abs(c - swaps / size) < 5 * math.sqrt(swaps / size) for c in slots)   # uniform slots
    # The same seed gives the same choices (the pool's randomness is its own generator's).
    a, b = (cyclegan.ImagePool(2, torch.Generator().manual_seed(7)) for _ in range(2))
    xs = images(range(50))
    assert torch.equal(torch.cat([a.query(x[None]) for x in xs]), torch.cat([b.query(x[None]) for x in xs]))


def test_image_pool_of_size_zero_is_off():
    pool = cyclegan.ImagePool(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    out = pool.query(x)
    assert torch.equal(out, x) and not out.requires_grad
    assert pool.images is None and len(pool.state()) == 0


def test_learning_rate_is_constant_then_decays_to_zero():
    epochs, decay = 10, 4
    factors = [cyclegan.lr_factor(e, epochs, decay) for e in range(epochs)]
    assert factors[:epochs - decay] == [1.0] * (epochs - decay)
    assert factors[-1] == pytest.approx(1 / (decay + 1))        # reference code: 1 - 4/5
    assert all(a > b for a, b in zip(factors[epochs - decay - 1:], factors[epochs - decay:]))
    assert cyclegan.lr_factor(epochs, epochs, decay) == 0.0     # zero one epoch after the end
    assert [cyclegan.lr_factor(e, 200, 100) for e in (0, 99, 100, 199)] == \
        pytest.approx([1, 1, 100 / 101, 1 / 101])                # Zhu et al.: 100 + 100 epochs
    # Driven as in training (scheduler after the optimizer, once per epoch): no warning.
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cyclegan.lr_factor(e, epochs, decay))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(epochs):
            seen.append(opt.param_groups[0]["lr"])
            param.sum().backward()
            opt.step()
            sched.step()
    assert seen[0] == 2e-4 and seen[-1] == pytest.approx(2e-4 / (decay + 1)) and seen[-1] < 0.25 * seen[0]


# --- data ------------------------------------------------------------------------------------------

def test_epoch_is_unaligned_and_a_function_of_seed_and_epoch(synth, tmp_path):
    src = cyclegan.class_images(synth / "train", "normal")
    dst = cyclegan.class_images(synth / "train", "viral") * 2       # a larger dst: 8 images
    data = cyclegan.UnpairedImages(src, dst, 32, 1, False, 0, True, 0, torch.device("cpu"))
    assert data.steps_per_epoch == 8 and data.load_size == 36       # max(|src|, |dst|); 32 * 286/256
    g = lambda epoch: torch.Generator().manual_seed(epoch)          # noqa: E731
    plan = cyclegan.epoch_plan(4, 8, 4, False, g(1))
    assert sorted(plan.index[:4]) == [0, 1, 2, 3] and sorted(plan.index[4:]) == [0, 1, 2, 3]
    assert not any(plan.flip)                                       # --flip is off by default
    assert any(cyclegan.epoch_plan(4, 8, 4, True, g(1)).flip)
    assert all(0 <= t <= 4 for t in plan.top + plan.left)
    assert cyclegan.epoch_plan(4, 8, 4, False, g(1)) == plan
    first = [torch.cat(b) for b in data.batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, [torch.cat(b) for b in data.batches(0)]))
    assert not all(torch.equal(a, b) for a, b in zip(first, [torch.cat(b) for b in data.batches(1)]))
    # A resumed epoch continues with exactly the batches an uninterrupted one would have used.
    assert all(torch.equal(a, torch.cat(b)) for a, b in zip(first[3:], data.batches(0, 3)))


def test_fast_and_plain_pipelines_give_the_same_batches(synth):
    src = cyclegan.class_images(synth / "train", "normal")
    dst = cyclegan.class_images(synth / "train", "viral")
    cpu = torch.device("cpu")
    fast = cyclegan.UnpairedImages(src, dst, 32, 2, True, 0, True, 0, cpu)
    plain = cyclegan.UnpairedImages(src, dst, 32, 2, True, 0, False, 0, cpu)
    pairs = list(zip(fast.batches(1, 1), plain.batches(1, 1)))
    assert len(pairs) == 1
    for (a, b), (c, d) in pairs:
        assert a.shape == (2, 1, 32, 32) and a.dtype == torch.uint8
        assert torch.equal(a, c) and torch.equal(b, d)


# --- whole runs ------------------------------------------------------------------------------------

def test_short_run_writes_every_output(trained):
    out, caught = trained
    assert not [m for m in caught if "lr_scheduler.step()" in m]
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["src"] == "normal" and config["args"]["size"] == 32
    assert {"torch", "torchvision", "python", "device"} <= config.keys()
    rows = read_csv(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert list(rows[0]) == ["step", "epoch", "lr", *cyclegan.LOG_TERMS, "ms_per_step"]
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    assert float(rows[0]["lr"]) == 2e-4 and float(rows[-1]["lr"]) == pytest.approx(1e-4)   # 1/(1+1)
    assert float(rows[0]["ms_per_step"]) > 0
    for step in (4, 8):
        grid = Image.open(out / "samples" / f"step_{step:06d}.png")
        assert grid.mode == "L" and grid.size == (4 * 34 + 2, 6 * 34 + 2)   # 4 images x 6 rows
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["last.pt", "step_000004.pt", "step_000008.pt"]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["model"] == "cyclegan" and ckpt["step"] == 8 and ckpt["epoch"] == 2
    assert set(ckpt["models"]) == {"G_src2dst", "G_dst2src", "D_src", "D_dst"}
    assert ckpt["pool_src"].shape == (8, 1, 32, 32)                  # 8 steps, pool of 50
    assert ckpt["sched_G"]["last_epoch"] == 2
    for opt in ("opt_G", "opt_D"):                                   # Adam 2e-4, (0.5, 0.999)
        group = ckpt[opt]["param_groups"][0]
        assert (group["initial_lr"], tuple(group["betas"])) == (2e-4, (0.5, 0.999))
    assert {"torch", "pool"} <= ckpt["rng"].keys()


def test_resume_equals_uninterrupted(synth, tmp_path):
    """3 steps, stop, resume to 6 (across an epoch end, with dropout and a pool that swaps) ==
    6 steps in one go: weights, optimizers, schedulers, pools and RNG states, bit for bit."""
    extra = ("--generator", "unet", "--pool-size", "2", "--epochs", "3", "--decay-epochs", "2",
             "--log-every", "2", "--sample-every", "100", "--save-every", "100")
    cyclegan.main(train_args(synth, tmp_path / "a", *extra, "--max-steps", "6"))
    cyclegan.main(train_args(synth, tmp_path / "b", *extra, "--max-steps", "3"))
    first_leg = load(tmp_path / "b" / "checkpoints" / "last.pt")
    cyclegan.main(train_args(synth, tmp_path / "b", *extra, "--max-steps", "6", "--resume"))
    a, b = (load(tmp_path / run / "checkpoints" / "last.pt") for run in ("a", "b"))
    assert first_leg["step"] == 3 and a["step"] == b["step"] == 6

    def assert_same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                assert_same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                assert_same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for key in ("models", "opt_G", "opt_D", "sched_G", "sched_D", "pool_src", "pool_dst", "rng"):
        assert_same(a[key], b[key], key)
    assert not torch.equal(first_leg["models"]["G_src2dst"]["last.0.weight"],
                           b["models"]["G_src2dst"]["last.0.weight"])     # it did train on
    assert len(a["pool_src"]) == 2 and a["sched_G"]["last_epoch"] == 1
    assert [int(r["step"]) for r in read_csv(tmp_path / "b" / "log.csv")] == [2, 3, 4, 6]


def test_translate_keeps_names_and_sizes_and_writes_panels(trained, tmp_path):
    out, _ = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("L", (40, 40), 90).save(inputs / "a.png")
    Image.new("L", (50, 30), 160).save(inputs / "b.png")
    Image.new("RGB", (33, 47), (10, 200, 30)).save(inputs / "c.jpeg")
    ckpt = str(out / "checkpoints" / "last.pt")
    cyclegan.main(["--translate", str(inputs), "--ckpt", ckpt, "--out", str(tmp_path / "fake"),
                   "--grid", "--device", "cpu"])
    for name, size in (("a.png", (40, 40)), ("b.png", (50, 30)), ("c.jpeg", (33, 47))):
        im = Image.open(tmp_path / "fake" / name)
        assert im.size == size and im.mode == "L"
        panel = Image.open(tmp_path / "fake" / "panels" / f"{Path(name).stem}.png")
        assert panel.size == (3 * size[0], size[1]) and panel.mode == "L"
    cyclegan.main(["--translate", str(inputs), "--ckpt", ckpt, "--out", str(tmp_path / "back"),
                   "--direction", "dst2src", "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["a.png", "b.png", "c.jpeg"]


def test_translate_uses_the_generator_in_eval_mode(trained):
    """The same input twice gives the same output (U-Net dropout would not), and it equals a
    direct G_src2dst forward pass on the resized input."""
    out, _ = trained
    ckpt = load(out / "checkpoints" / "last.pt")
    model = cyclegan.CycleGAN("resnet", 1, 32, 8, 8)
    for name, net in model.named_children():
        net.load_state_dict(ckpt["models"][name])
    x = cyclegan.load_images(cyclegan.class_images(ckpt["args"]["data"], "normal")[:2], 32)
    with cyclegan.eval_mode(model.G_src2dst):
        a = cyclegan.translate_images(model.G_src2dst, x, torch.device("cpu"))
        b = cyclegan.to_uint8(model.G_src2dst(x.float() / 127.5 - 1))
    assert torch.equal(a, b) and model.G_src2dst.training


def copy_of(synth, tmp_path):
    """A writable copy of the synthetic train split."""
    data = tmp_path / "data"
    shutil.copytree(synth / "train", data)
    return data


def test_corrupt_png_read_by_dataloader_workers_is_a_one_line_error(synth, tmp_path, monkeypatch, capsys):
    """--no-fast --workers 2: a truncated PNG that only a DataLoader worker process would decode
    (it sorts after the 4 fixed sample images) is caught up front by check_images; and if a file
    gets past that check, the worker's error still arrives as the one line, not a traceback."""
    data = copy_of(synth, tmp_path)
    png = (data / "normal" / "normal_train_00000.png").read_bytes()
    (data / "normal" / "zz_broken.png").write_bytes(png[:len(png) // 2])
    argv = ["--src", "normal", "--dst", "viral", "--data", str(data), "--size", "32", "--ngf", "8",
            "--ndf", "8", "--device", "cpu", "--no-fast", "--workers", "2", "--max-steps", "5"]
    with pytest.raises(SystemExit) as e:
        cyclegan.main([*argv, "--out", str(tmp_path / "checked")])
    assert_one_line_error(capsys, 2, e, "cannot read image", "zz_broken.png", "prep.py")
    assert not (tmp_path / "checked" / "log.csv").exists()                 # failed before training
    monkeypatch.setattr(cyclegan, "check_images", lambda paths, workers=1: None)
    with pytest.raises(SystemExit) as e:
        cyclegan.main([*argv, "--out", str(tmp_path / "unchecked")])
    assert_one_line_error(capsys, 2, e, "cannot read image", "zz_broken.png", "prep.py")


def test_preload_falls_back_to_disk_when_host_memory_is_short(synth, tmp_path, monkeypatch, capsys):
    """--fast preloads 8 images at the 36 px jitter size: 8 x 36 x 36 = 10,368 bytes of uint8. With
    25 kB of free host memory that fits in half of it; with 10 kB it does not, and a short run still
    completes, reading the PNGs from disk, after a one-line note."""
    free = cyclegan.free_host_memory_bytes()
    assert free is None or free > 0                                  # MemAvailable on Linux
    src = cyclegan.class_images(synth / "train", "normal")
    dst = cyclegan.class_images(synth / "train", "viral")
    cpu = torch.device("cpu")
    monkeypatch.setattr(cyclegan, "free_host_memory_bytes", lambda: 25_000)
    assert cyclegan.UnpairedImages(src, dst, 32, 1, False, 0, True, 0, cpu).preloaded
    monkeypatch.setattr(cyclegan, "free_host_memory_bytes", lambda: 10_000)
    assert not cyclegan.UnpairedImages(src, dst, 32, 1, False, 0, True, 0, cpu).preloaded
    capsys.readouterr()
    cyclegan.main(train_args(synth, tmp_path / "disk", "--max-steps", "2", "--log-every", "1"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: preloading 1.04e-05 GB of uint8 images needs more than half of the 1e-05 GB "
                     "of free host memory; reading PNGs from disk each epoch instead (slower)"]
    assert len(read_csv(tmp_path / "disk" / "log.csv")) == 2
    assert (tmp_path / "disk" / "checkpoints" / "last.pt").is_file()


def test_amp_on_a_cpu_is_bf16_autocast_with_close_losses(synth, tmp_path):
    """--amp on a CPU: bf16 autocast, finite losses, fp32 weights in the checkpoint; its losses
    differ from the fp32 run's by far less than another seed's do (issue 8: "autocast does not
    change results beyond noise")."""
    logs = {}
    for name, flags in {"amp": ["--amp"], "fp32": ["--no-amp"], "seed1": ["--no-amp", "--seed", "1"]}.items():
        cyclegan.main(train_args(synth, tmp_path / name, *flags, "--max-steps", "2", "--log-every", "1"))
        logs[name] = read_csv(tmp_path / name / "log.csv")
    config = json.loads((tmp_path / "amp" / "config.json").read_text())
    assert config["amp"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["amp"] == "off"
    assert all(math.isfinite(float(r[k])) for r in logs["amp"] for k in cyclegan.LOG_TERMS)
    ckpt = load(tmp_path / "amp" / "checkpoints" / "last.pt")
    assert {t.dtype for sd in ckpt["models"].values() for t in sd.values()} == {torch.float32}
    assert ckpt["pool_src"].dtype == torch.float32 and not ckpt["scaler"]          # no grad scaler on a CPU

    def gap(a, b):
        return sum(abs(float(ra[k]) - float(rb[k])) for ra, rb in zip(a, b) for k in cyclegan.LOG_TERMS)

    assert gap(logs["amp"], logs["fp32"]) < 0.25 * gap(logs["seed1"], logs["fp32"])


def test_canonical_command_without_data_names_data_train(tmp_path, monkeypatch, capsys):
    """`python cyclegan.py --src normal --dst viral` as the README gives it: the papers' defaults,
    and where data/train is missing, one line that says how to make it."""
    args = cyclegan.parse_args(["--src", "normal", "--dst", "viral"])
    assert (args.data, args.size, args.generator, args.batch_size, args.epochs, args.decay_epochs,
            args.gan_loss, args.pool_size, args.flip, args.amp) == \
        ("data/train", 256, "resnet", 1, 100, 50, "lsgan", 50, False, None)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cyclegan.main(["--src", "normal", "--dst", "viral"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""                      # no device line or CPU warning first
    assert err.splitlines() == [
        "error: data folder data/train not found — make it with `python prep.py kermany PATH --out data` "
        "(real X-rays) or `python prep.py synthetic` (phantoms, then --data data/synthetic/train), "
        "or pass --data"]
    assert not (tmp_path / "runs").exists()


def test_no_fast_and_random_data_run(synth, tmp_path):
    cyclegan.main(train_args(synth, tmp_path / "plain", "--no-fast", "--max-steps", "2", "--log-every", "1"))
    rows = read_csv(tmp_path / "plain" / "log.csv")
    assert len(rows) == 2 and float(rows[-1]["ms_per_step"]) > 0
    cyclegan.main(["--src", "normal", "--dst", "viral", "--data", str(tmp_path / "nothing-here"),
                   "--out", str(tmp_path / "random"), *TINY, "--random-data", "--channels", "3",
                   "--max-steps", "2", "--log-every", "1"])
    assert len(read_csv(tmp_path / "random" / "log.csv")) == 2
    assert Image.open(tmp_path / "random" / "samples" / "step_000002.png").mode == "RGB"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch, capsys):
    real_gan_loss, calls = cyclegan.gan_loss, [0]

    def poisoned(logits, target_is_real, mode):       # NaN from the third step on
        calls[0] += 1
        loss = real_gan_loss(logits, target_is_real, mode)
        return loss * float("nan") if calls[0] > 2 * GAN_LOSS_CALLS_PER_STEP else loss

    monkeypatch.setattr(cyclegan, "gan_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth, out, "--save-every", "2", "--log-every", "100", "--max-steps", "8"))
    line = assert_one_line_error(capsys, 1, e, "non-finite loss at step 4", "last.pt (step 2)")
    assert "first bad step after 2" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt"]
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for sd in ckpt["models"].values() for t in sd.values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_and_exits_130(sig, synth, tmp_path, monkeypatch, capsys):
    real_gan_loss, calls = cyclegan.gan_loss, [0]

    def interrupting(logits, target_is_real, mode):   # Ctrl-C during the second step
        calls[0] += 1
        if calls[0] == GAN_LOSS_CALLS_PER_STEP + 1:
            signal.raise_signal(sig)
        return real_gan_loss(logits, target_is_real, mode)

    monkeypatch.setattr(cyclegan, "gan_loss", interrupting)
    handler = signal.getsignal(sig)
    out = tmp_path / "int"
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth, out, "--max-steps", "8"))
    assert e.value.code == 130
    assert "--resume" in capsys.readouterr().err
    assert load(out / "checkpoints" / "last.pt")["step"] == 2
    assert signal.getsignal(sig) is handler


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, needles", [
    ("unknown class", ["invalid choice: 'pneumonia'"]),
    ("same class", ["--src and --dst are both normal"]),
    ("missing data folder", ["data folder", "not found", "prep.py kermany", "prep.py synthetic"]),
    ("missing class folder", ["class folder", "covid", "prep.py synthetic"]),
    ("empty class folder", ["no images in", "prep.py synthetic"]),
    ("unsupported size", ["--size 100 is not supported", "256"]),
    ("translate without ckpt", ["--translate needs --ckpt"]),
    ("amp without fast", ["--amp goes with --fast"]),
])
def test_bad_inputs_give_one_line_errors(case, needles, synth, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    (empty / "viral").mkdir()
    argv = {
        "unknown class": train_args(synth, tmp_path / "o", "--src", "pneumonia"),
        "same class": train_args(synth, tmp_path / "o", "--dst", "normal"),
        "missing data folder": train_args(synth, tmp_path / "o", "--data", str(tmp_path / "nope")),
        "missing class folder": train_args(synth, tmp_path / "o", "--dst", "covid"),
        "empty class folder": train_args(synth, tmp_path / "o", "--data", str(empty)),
        "unsupported size": train_args(synth, tmp_path / "o", "--size", "100"),
        "translate without ckpt": ["--translate", str(synth / "test" / "normal"), "--out", str(tmp_path / "t")],
        "amp without fast": train_args(synth, tmp_path / "o", "--no-fast", "--amp"),
    }[case]
    with pytest.raises(SystemExit) as e:
        cyclegan.main(argv)
    assert_one_line_error(capsys, 2, e, *needles)


@pytest.mark.parametrize("case, needles", [
    ("missing folder", ["folder", "not found", "--translate"]),
    ("empty folder", ["no images (.png", "pass a folder of images"]),
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
    with pytest.raises(SystemExit) as e:
        cyclegan.main(["--translate", translate_dir, "--ckpt", str(tmp_path / "none.pt"), "--out", out])
    out_text, err = capsys.readouterr()
    assert e.value.code == 2 and out_text == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


def test_wrong_checkpoints_give_one_line_errors(trained, synth, tmp_path, capsys):
    out, _ = trained
    folder = str(synth / "test" / "normal")
    other = tmp_path / "dcgan.pt"
    torch.save({"model": "dcgan", "step": 1}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [(other, ["not a CycleGAN checkpoint", "'dcgan'"]), (garbage, ["cannot read checkpoint"]),
             (tmp_path / "missing.pt", ["not found"])]
    for path, needles in cases:
        with pytest.raises(SystemExit) as e:
            cyclegan.main(["--translate", folder, "--ckpt", str(path), "--out", str(tmp_path / "x"), "--device", "cpu"])
        assert_one_line_error(capsys, 2, e, *needles)
    # Resuming a 32 px normal->viral run as 64 px normal->bacterial names both mismatches.
    last = str(out / "checkpoints" / "last.pt")
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth, tmp_path / "r", "--resume", last, "--dst", "bacterial", "--size", "64"))
    assert_one_line_error(capsys, 2, e, "does not match", "--dst viral (this run: bacterial)",
                          "--size 32 (this run: 64)")
    # A fresh run never overwrites an existing one.
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth, out))
    assert_one_line_error(capsys, 2, e, "already holds a run", "--resume")


def test_command_line_error_in_a_subprocess():
    result = subprocess.run([sys.executable, "cyclegan.py", "--src", "normal", "--dst", "normal"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --src and --dst are both normal — translate between two different classes"]


# --- evaluation ----------------------------------------------------------------------------------
# metrics.py with a random-weights Inception: the numbers mean nothing, the path is what is tested.
# A score() runs the Inception at 299 px and a 2048-d Frechet distance, whatever N: seconds on an
# idle 2-core CPU, up to a minute on a busy one. So the real path is scored once; which epochs are
# evaluated is tested with evaluate() recorded instead.

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    import metrics
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(metrics.FIDInceptionV3().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def synth6(tmp_path_factory):
    """6 train and 2 test images per class: the fewest metrics.py can score (N >= 2)."""
    out = tmp_path_factory.mktemp("synth6")
    prep.make_synthetic(out, n=6, size=32, seed=0)
    return out


def test_eval_every_writes_metrics_csv(synth6, tmp_path, fid_weights):
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # metrics.py: N < 2048
        cyclegan.main(train_args(synth6, out, "--batch-size", "3", "--epochs", "1", "--decay-epochs", "0",
                                 "--eval-every", "1", "--fid-weights", str(fid_weights)))
    rows = read_csv(out / "metrics.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(2, 1)]          # 6 images / 3
    row = rows[0]
    assert int(row["n_fake"]) == 2 and int(row["n_real"]) == 6                   # test normal, train viral
    assert row["network"].startswith("custom weights random_inception.pth")      # random test weights, named
    assert all(math.isfinite(float(row[k])) for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    assert Path(row["checkpoint"]).is_file()                                      # the scored model is kept


def test_eval_runs_every_e_epochs_and_after_the_last(synth, tmp_path, monkeypatch):
    scored = []
    monkeypatch.setattr(cyclegan, "make_evaluator", lambda args, device: ("evaluator", None))
    monkeypatch.setattr(cyclegan, "evaluate", lambda model, ev, src, device, log, step, epoch, ckpt:
                        scored.append((epoch, step, Path(ckpt).is_file())))
    cyclegan.main(train_args(synth, tmp_path / "e", "--batch-size", "4", "--epochs", "5",
                             "--decay-epochs", "2", "--eval-every", "2"))
    assert scored == [(2, 2, True), (4, 4, True), (5, 5, True)]          # one step per epoch


def test_eval_every_fails_before_training(synth6, synth, tmp_path, capsys):
    out = tmp_path / "noweights"
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth6, out, "--eval-every", "1", "--fid-weights", str(tmp_path / "none.pth")))
    assert_one_line_error(capsys, 2, e, "none.pth")
    assert not (out / "checkpoints").exists() and not (out / "log.csv").exists()
    # n=4 gives one test image per class: too few to score, said up front.
    with pytest.raises(SystemExit) as e:
        cyclegan.main(train_args(synth, out, "--eval-every", "1", "--fid-weights", "unused.pth"))
    assert_one_line_error(capsys, 2, e, "at least 2")
