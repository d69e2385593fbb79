"""Tests for prep.py: layouts, labels, patients, image modes, bad files, re-runs, phantoms."""
import csv
import collections
import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prep  # noqa: E402

# The real X-ray sample (a folder holding chest_xray/ and covid/): its tests skip without it.
SAMPLE = Path(os.environ["XRAY_SAMPLE"]) if os.environ.get("XRAY_SAMPLE") else None


def needs_sample(part):
    return pytest.mark.skipif(SAMPLE is None or not (SAMPLE / part).is_dir(),
                              reason=f"set XRAY_SAMPLE to a folder holding {part}/")


# A miniature Kaggle tree with the real file-name patterns: (split, folder, name, class, patient)
KAGGLE_FILES = [
    ("train", "NORMAL", "IM-0115-0001.jpeg", "normal", "IM-0115"),
    ("train", "NORMAL", "IM-0117-0001-0002.jpeg", "normal", "IM-0117"),
    ("train", "NORMAL", "NORMAL2-IM-0588-0001.jpeg", "normal", "NORMAL2-IM-0588"),
    ("train", "PNEUMONIA", "person12_bacteria_46.jpeg", "bacterial", "bacteria/person12"),
    ("train", "PNEUMONIA", "person12_bacteria_47.jpeg", "bacterial", "bacteria/person12"),
    ("train", "PNEUMONIA", "person13_bacteria_48.jpeg", "bacterial", "bacteria/person13"),
    # The same person number with a virus file is another patient (per-class numbering).
    ("train", "PNEUMONIA", "person12_virus_6.jpeg", "viral", "virus/person12"),
    ("train", "PNEUMONIA", "person1_virus_6.jpeg", "viral", "virus/person1"),
    ("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg", "normal", "NORMAL2-IM-1427"),
    ("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg", "bacterial", "bacteria/person1946"),
    ("test", "NORMAL", "IM-0001-0001.jpeg", "normal", "IM-0001"),
    ("test", "PNEUMONIA", "person100_bacteria_475.jpeg", "bacterial", "bacteria/person100"),
    # person12 again, in test, but as a virus patient: not the train bacteria/person12.
    ("test", "PNEUMONIA", "person1000_virus_1681.jpeg", "viral", "virus/person1000"),
]


def jpeg_bytes(seed, size=(40, 30), mode="L"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_kaggle_tree(root, prefix="chest_xray"):
    """The extracted Kaggle archive: chest_xray/{train,test,val}/..., plus junk."""
    for i, (split, folder, name, _, _) in enumerate(KAGGLE_FILES):
        p = root / prefix / split / folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(i))
    (root / prefix / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\1junk")
    junk = root / "__MACOSX" / prefix / "train" / "NORMAL" / "._IM-0115-0001.jpeg"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"not an image")
    return root


def zip_tree(src, zpath):
    """The tree as a zip file, as downloaded (paths inside are relative to src)."""
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return zpath


def read_rows(data):
    with open(Path(data) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(argv):
    """prep.main in-process; returns the exit code."""
    with pytest.raises(SystemExit) as e:
        prep.main([str(a) for a in argv])
    return e.value.code


def expected_rows():
    out = {}
    for split, folder, name, cls, patient in KAGGLE_FILES:
        s = "test" if split == "test" else "train"
        out[f"{s}/{cls}/{Path(name).stem}.png"] = (s, cls, patient)
    return out


@pytest.mark.parametrize("layout", ["plain", "nested", "zip", "nested_zip", "inner"])
def test_kermany_layouts_labels_and_patients(tmp_path, layout):
    src = make_kaggle_tree(tmp_path / "src")
    if layout in ("nested", "nested_zip"):  # the Kaggle zip's duplicate chest_xray/chest_xray copy
        make_kaggle_tree(tmp_path / "src" / "chest_xray", prefix="chest_xray")
    if layout in ("zip", "nested_zip"):
        src = zip_tree(src, tmp_path / "archive.zip")
    if layout == "inner":  # the user points at chest_xray/ itself
        src = src / "chest_xray"
    out = tmp_path / "data"
    assert run(["kermany", src, "--out", out, "--size", 32, "--workers", 1]) == 0
    rows = read_rows(out)
    got = {r["path"]: (r["split"], r["class"], r["patient"]) for r in rows}
    assert got == expected_rows()  # one copy of each image, val joined to train, right labels
    for r in rows:
        img = Image.open(out / r["path"])
        assert img.mode == "L" and img.size == (32, 32)
        assert r["source"].startswith("kermany:")
    assert not prep.patient_leaks(rows)


def test_kermany_prints_the_table_and_reports_a_patient_in_two_splits(tmp_path, capsys):
    src = make_kaggle_tree(tmp_path / "src")
    out = tmp_path / "data"
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    text = capsys.readouterr().out
    assert re.search(r"split +normal +bacterial +viral +total", text)
    assert re.search(r"train +4 +4 +2 +10\n", text) and re.search(r"test +1 +1 +1 +3\n", text)
    assert "patient check: no patient appears in two splits" in text
    # A second image of train patient IM-0115 in the dataset's test folder: reported, and
    # `check` on the result fails.
    (src / "chest_xray" / "test" / "NORMAL" / "IM-0115-0002.jpeg").write_bytes(jpeg_bytes(99))
    out = tmp_path / "leaky"
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    text = capsys.readouterr().out
    assert "WARNING: patient ids in more than one split: 1 (IM-0115 in test+train)" in text
    assert run(["check", out]) == 1
    assert "LEAK patient IM-0115 in test and train" in capsys.readouterr().out


def test_kermany_val_frac_is_patient_disjoint(tmp_path):
    src = make_kaggle_tree(tmp_path / "src")
    out = tmp_path / "data"
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1, "--val-frac", 0.5]) == 0
    rows = read_rows(out)
    splits = collections.Counter(r["split"] for r in rows)
    assert splits["val"] > 0 and splits["train"] > 0 and splits["test"] == 3
    by_patient = collections.defaultdict(set)
    for r in rows:
        by_patient[r["patient"]].add(r["split"])
        assert r["path"].startswith(r["split"] + "/") and (out / r["path"]).exists()
    assert all(len(s) == 1 for s in by_patient.values())
    assert by_patient["bacteria/person12"] in ({"train"}, {"val"})  # its two images stay together


def test_kermany_multiprocess_from_the_zip_equals_single_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prep, "POOL_MIN_JOBS", 0)  # use the worker processes even for 13 images
    src = make_kaggle_tree(tmp_path / "src")
    zpath = zip_tree(src, tmp_path / "archive.zip")
    assert run(["kermany", src, "--out", tmp_path / "a", "--size", 24, "--workers", 1]) == 0
    capsys.readouterr()
    # Two processes, each reading the zip in place.
    assert run(["kermany", zpath, "--out", tmp_path / "b", "--size", 24, "--workers", 2]) == 0
    assert re.search(r"13/13 images, \d+\.\d s", capsys.readouterr().err)  # the progress line
    rows = read_rows(tmp_path / "a")
    assert [r["path"] for r in rows] == [r["path"] for r in read_rows(tmp_path / "b")]
    for r in rows:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()


def test_truncated_and_garbage_files_are_skipped_and_listed(tmp_path, capsys):
    src = make_kaggle_tree(tmp_path / "src")
    bad = src / "chest_xray" / "train" / "PNEUMONIA" / "person13_bacteria_48.jpeg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated JPEG
    (src / "chest_xray" / "test" / "NORMAL" / "IM-0002-0001.jpeg").write_bytes(b"garbage")
    out = tmp_path / "data"
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    text = capsys.readouterr().out
    assert "person13_bacteria_48.jpeg" in text and "IM-0002-0001.jpeg" in text
    assert "2 unreadable" in text
    paths = {r["path"] for r in read_rows(out)}
    assert "train/bacterial/person13_bacteria_48.png" not in paths
    assert len(paths) == len(KAGGLE_FILES) - 1
    assert not list(out.rglob("*.tmp"))
    # Every image of a class unreadable (a broken download): each is listed, the rest is written.
    for p in (src / "chest_xray").rglob("*virus*"):
        p.write_bytes(p.read_bytes()[:100])
    assert run(["kermany", src, "--out", tmp_path / "o2", "--workers", 1]) == 0
    text = capsys.readouterr().out
    assert "skipped unreadable chest_xray/train/PNEUMONIA/person1_virus_6.jpeg" in text
    assert "5 unreadable (listed above)" in text


def test_rerun_is_idempotent_and_interrupted_run_continues(tmp_path, monkeypatch, capsys):
    src = make_kaggle_tree(tmp_path / "src")
    ref = tmp_path / "ref"
    run(["kermany", src, "--out", ref, "--size", 16, "--workers", 1])

    # Ctrl-C in the middle of writing the 5th PNG, after half of its bytes are on disk.
    out = tmp_path / "data"
    real_save, saves = Image.Image.save, []

    def interrupted_save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 5:
            buf = io.BytesIO()
            real_save(self, buf, *args, **kwargs)
            Path(fp).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 130
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert "run the same command again" in capsys.readouterr().err
    half_written = Path(str(saves[4])[: -len(".tmp")])
    assert len(list(out.rglob("*.png"))) == 4 and not half_written.exists()
    assert not list(out.rglob("*.tmp"))  # the partial temp file was removed
    assert not (out / "manifest.csv").exists()  # written once, at the end
    # A temp file left by a run that was killed outright (no chance to clean up).
    stale = out / "test" / "normal" / "IM-0001-0001.png.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half an image")

    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    assert "4 images already done by an earlier run, 9 to convert" in capsys.readouterr().out
    for r in read_rows(ref):
        assert (out / r["path"]).read_bytes() == (ref / r["path"]).read_bytes()
    assert read_rows(out) == read_rows(ref)
    assert not list(out.rglob("*.tmp"))

    # A third run writes nothing: every file keeps its modification time.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # Other settings into the same folder are refused instead of mixing sizes, or splits (a
    # val split made later would leave its images in train/ too).
    assert run(["kermany", src, "--out", out, "--size", 32, "--workers", 1]) == 2
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1, "--val-frac", 0.5]) == 2
    assert "val_frac: 0.0 -> 0.5" in capsys.readouterr().err


def test_a_failed_write_stops_the_run_in_one_line_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    """Disk full or an unwritable --out is not a broken image: no 'skipped unreadable' list and
    no 'download again' advice, one error line, exit 2; the same command then finishes."""
    src = make_kaggle_tree(tmp_path / "src")
    out = tmp_path / "data"
    real_save, saves = Image.Image.save, []

    def disk_full(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 3:
            raise OSError(28, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 2
    monkeypatch.setattr(Image.Image, "save", real_save)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("error: cannot read or write ") and "No space left on device" in err[-1]
    assert "Traceback" not in captured.err and "unreadable" not in captured.out
    assert len(list(out.rglob("*.png"))) == 2 and not list(out.rglob("*.tmp"))
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 1]) == 0
    assert len(read_rows(out)) == len(KAGGLE_FILES)

    # The same from the worker processes: train/ is a file, so no class folder can be made there.
    monkeypatch.setattr(prep, "POOL_MIN_JOBS", 0)
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "train").write_text("in the way")
    capsys.readouterr()
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 2]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith(f"error: cannot read or write {out / 'train'}")
    assert "Traceback" not in captured.err and "unreadable" not in captured.out
    (out / "train").unlink()
    assert run(["kermany", src, "--out", out, "--size", 16, "--workers", 2]) == 0
    assert len(read_rows(out)) == len(KAGGLE_FILES)


def test_ctrl_c_stops_the_worker_processes_and_the_run_continues(tmp_path):
    """A real interrupt: SIGINT to a running `prep.py kermany --workers 2` (a subprocess)."""
    a = (np.add.outer(np.arange(600), np.arange(800)) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    src = tmp_path / "chest_xray"
    names = [f"NORMAL/IM-{i:04d}-0001.jpeg" for i in range(480)]  # long enough for SIGINT to land mid-run
    names += ["PNEUMONIA/person1_bacteria_1.jpeg", "PNEUMONIA/person1_virus_1.jpeg"]
    for name in names:
        (src / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (src / "train" / name).write_bytes(buf.getvalue())
    out = tmp_path / "data"
    cmd = [sys.executable, "prep.py", "kermany", str(src), "--out", str(out), "--size", "32",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(out.glob("train/*/*.png")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr
    done = len(list(out.rglob("*.png")))
    assert 0 < done < len(names)  # stopped part-way
    # Every finished PNG is complete; the same command finishes the rest.
    assert run(["kermany", src, "--out", out, "--size", 32, "--workers", 2]) == 0
    rows = read_rows(out)
    assert len(rows) == len(names)
    assert len({(out / r["path"]).read_bytes() for r in rows}) == 1  # same source, same bytes
    expected = prep.preprocess(Image.open(io.BytesIO(buf.getvalue())), 32)
    assert np.array_equal(np.asarray(Image.open(out / rows[0]["path"])), expected)
    assert not list(out.rglob("*.tmp"))


def pil_image(mode):
    """A 20x10 gradient in `mode`, plus the gray levels we expect back."""
    ramp = np.tile(np.linspace(0, 1, 20), (10, 1))
    if mode in ("I;16", "I", "F"):
        lo, hi, dtype = {"I;16": (1000, 4000, np.uint16), "I": (-5000, 70000, np.int32),
                         "F": (0.25, 0.75, np.float32)}[mode]
        img = Image.fromarray((lo + ramp * (hi - lo)).astype(dtype))
        assert img.mode == mode
        return img, np.round(ramp * 255)  # rescaled from its own min..max to the full range
    gray = np.round(ramp * 255).astype(np.uint8)
    return Image.fromarray(gray).convert(mode), gray.astype(np.float64)  # "1": PIL dithers, checked below


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "I", "F", "CMYK", "1"])
def test_every_pil_mode_becomes_8bit_gray(mode):
    img, expected = pil_image(mode)
    out = np.asarray(prep.to_gray8(img))
    assert out.dtype == np.uint8 and out.shape == (10, 20)
    if mode == "1":
        assert set(np.unique(out)) <= {0, 255}  # two levels, whatever the dithering
        assert out[:, :3].mean() < 64 and out[:, -3:].mean() > 191
    elif mode in ("CMYK", "P"):
        assert np.abs(out - expected).max() <= 8  # lossy colour round trips
    else:
        assert np.abs(out - expected).max() <= 1
    if mode in ("I;16", "I", "F"):
        assert out.min() == 0 and out.max() == 255  # the full range


def test_square_fit_crop_to_body_and_antialiased_resize():
    a = Image.fromarray(np.full((60, 100), 7, np.uint8))
    assert np.asarray(prep.preprocess(a, 60)).min() == 7  # --fit crop: the middle 60x60, no border
    padded = np.asarray(prep.preprocess(a, 100, fit="pad"))  # --fit pad: black bands above and below
    assert padded.shape == (100, 100) and padded[:20].max() == 0 and padded[80:].max() == 0
    assert (padded[20:80] == 7).all()
    body = np.full((100, 120), 10, np.uint8)
    body[20:80, 30:100] = 200  # a bright torso on dark air, plus a small bright label
    body[2:6, 2:6] = 255
    w, h = prep.crop_to_body(Image.fromarray(body)).size
    assert abs(h - 60) <= 3 and abs(w - 70) <= 3
    assert prep.preprocess(Image.fromarray(body), 32, crop=True).size == (32, 32)
    # An original-size radiograph: the box is found on a smaller copy, then scaled back.
    big = np.full((1000, 1200), 10, np.uint8)
    big[200:800, 300:1000] = 200
    big[20:60, 20:60] = 255
    w, h = prep.crop_to_body(Image.fromarray(big)).size
    assert 600 <= h <= 604 and 700 <= w <= 704
    # A one-pixel checkerboard shrunk 8x: an antialiased resize averages it to mid-gray,
    # nearest-neighbour or plain bilinear sampling would keep (near) black and white pixels.
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    small = np.asarray(prep.preprocess(Image.fromarray(board), 32)).astype(np.float64)
    assert small.shape == (32, 32) and np.abs(small - 127.5).max() < 4


def test_odd_modes_and_the_fit_and_crop_flags_on_the_command_line(tmp_path):
    # A wide radiograph: dark air around a bright 'torso' that is off-centre.
    a = np.full((60, 120), 20, np.uint8)
    a[10:50, 10:50] = 220
    src = make_kaggle_tree(tmp_path / "src")
    normal = src / "chest_xray" / "train" / "NORMAL"
    for name in ("IM-0115-0001", "IM-0117-0001-0002", "NORMAL2-IM-0588-0001"):
        (normal / f"{name}.jpeg").unlink()
    Image.fromarray(a).save(normal / "IM-0115-0001.png")
    for mode, name in zip(["RGB", "I;16", "P", "1"], ["IM-0117-0001-0002", "NORMAL2-IM-0588-0001", "IM-1", "IM-2"]):
        pil_image(mode)[0].save(normal / f"{name}.png")  # PNG holds all these modes

    def prepared(*flags, name="IM-0115-0001"):
        out = tmp_path / "_".join(flags or ("default",))
        if not out.exists():
            assert run(["kermany", src, "--out", out, "--size", 30, "--workers", 1, *flags]) == 0
        img = Image.open(out / "train" / "normal" / f"{name}.png")
        assert img.mode == "L" and img.size == (30, 30)
        return np.asarray(img).astype(int)

    for name in ["IM-0117-0001-0002", "NORMAL2-IM-0588-0001", "IM-1", "IM-2"]:  # odd modes, through it all
        prepared(name=name)
    center = prepared()  # --fit crop: the middle 60x60 of the 60x120 image, half of the torso
    assert center.shape == (30, 30) and center[15, :5].mean() > 150 and center[15, -5:].mean() < 60
    pad = prepared("--fit", "pad")  # the whole image, black bands above and below
    assert pad[:7].max() == 0 and pad[-7:].max() == 0 and pad[15, 3:13].mean() > 150
    body = prepared("--crop")  # cropped to the torso first: bright almost everywhere
    assert body[3:-3, 3:-3].mean() > 200
    assert (tmp_path / "--crop").is_dir()
    z = prepared("--zscore").astype(np.float64)  # Dhawan & Nijhawan's z-score, stored as 128 + 32 z
    expected = (center - center.mean()) / center.std() * 32 + 128
    assert abs(z.mean() - 128) < 1 and abs(z.std() - 32) < 1 and np.abs(z - expected).max() <= 1


def test_covid_collection(tmp_path, capsys):
    root = tmp_path / "covid"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(20):
        view, modality, finding = "PA", "X-ray", "Pneumonia/Viral/COVID-19"
        if i == 1:
            view = "AP Supine"
        if i == 2:
            view = "L"  # lateral: dropped
        if i == 3:
            modality = "CT"  # dropped
        if i in (4, 5, 6, 7):  # Davoodi & Lo Giudice's four classes come from `finding`; the rest is dropped
            finding = {4: "Pneumonia/Bacterial/Streptococcus", 5: "No Finding", 6: "Pneumonia/Viral/SARS",
                       7: "Pneumonia/Fungal/Pneumocystis"}[i]
        name = f"img{i}.jpg"
        (root / "images" / name).write_bytes(jpeg_bytes(i, mode="RGB"))
        rows.append({"patientid": str(i // 2), "finding": finding, "view": view, "modality": modality,
                     "folder": "images", "filename": name})
    rows.append(dict(rows[0]))  # the same file listed twice: converted once
    rows.append(dict(rows[0], filename="missing.jpg"))  # listed, but not in images/
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "data"
    assert run(["covid", root, "--out", out, "--size", 16, "--workers", 1, "--test-frac", 0.3]) == 0
    text = capsys.readouterr().out
    assert "img0.jpg" not in text  # listed twice: converted once
    assert "skipped unreadable images/missing.jpg: FileNotFoundError" in text  # listed, but not in images/
    got = read_rows(out)
    assert collections.Counter(r["class"] for r in got) == {"covid": 14, "bacterial": 1, "normal": 1, "viral": 1}
    assert {r["split"] for r in got} == {"train", "test"}
    assert not prep.patient_leaks(got)
    # A second source in the same folder keeps the first one's manifest rows; at another size
    # it is refused (one folder, one image size).
    capsys.readouterr()
    assert run(["synthetic", "--out", out, "--n", 2, "--size", 32, "--workers", 1]) == 2
    assert "already holds covid images at 16 px — use --size 16" in capsys.readouterr().err
    assert run(["synthetic", "--out", out, "--n", 2, "--size", 16, "--workers", 1]) == 0
    sources = collections.Counter(r["source"].split(":")[0] for r in read_rows(out))
    assert sources == {"covid": 17, "synthetic": 9}


def test_covid_findings_map_to_the_four_classes():
    cases = {"Pneumonia/Viral/COVID-19": "covid", "COVID-19": "covid", "No Finding": "normal",
             "Pneumonia/Bacterial/Klebsiella": "bacterial", "Pneumonia/Viral/Influenza": "viral",
             "Pneumonia/Fungal/Aspergillosis": None, "Tuberculosis": None, "Pneumonia": None, "todo": None}
    assert {f: prep.covid_class(f) for f in cases} == cases


def test_synthetic_is_deterministic_and_laid_out(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "POOL_MIN_JOBS", 0)  # --workers 2 really uses two processes
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["synthetic", "--out", a, "--n", 6, "--size", 32, "--seed", 3, "--workers", 1]) == 0
    assert run(["synthetic", "--out", b, "--n", 6, "--size", 32, "--seed", 3, "--workers", 2]) == 0
    rows = read_rows(a)
    assert collections.Counter((r["split"], r["class"]) for r in rows) == {
        (s, c): (6 if s == "train" else 2) for s in ("train", "test") for c in prep.SYNTHETIC_CLASSES}
    for r in rows:
        assert (a / r["path"]).read_bytes() == (b / r["path"]).read_bytes()
        img = Image.open(a / r["path"])
        assert img.mode == "L" and img.size == (32, 32)
    assert not prep.patient_leaks(rows)
    other = prep.synthetic_xray("viral", 32, (4, 2, 0, 0), (4, 2, 0, 0, 0))
    assert not np.array_equal(other, np.asarray(Image.open(a / "train/viral/viral_train_00000.png")))


def test_synthetic_classes_differ_in_shape_not_in_mean_brightness():
    n, size = 60, 48
    means, images = {}, {}
    for ci, cls in enumerate(prep.SYNTHETIC_CLASSES):
        imgs = np.stack([prep.synthetic_xray(cls, size, (0, ci, i), (0, ci, i, 0)) for i in range(n)])
        images[cls] = imgs.astype(np.float64)
        means[cls] = imgs.reshape(n, -1).mean(1)
    # The best single threshold on mean brightness, for each pair of classes, is near chance.
    for c1, c2 in [("normal", "bacterial"), ("normal", "viral"), ("bacterial", "viral")]:
        values = np.concatenate([means[c1], means[c2]])
        labels = np.r_[np.zeros(n), np.ones(n)]
        best = max(max(((values > t) == labels).mean(), ((values <= t) == labels).mean()) for t in values)
        assert best < 0.75, (c1, c2, best)
    # Yet the images differ where the disease is: per-pixel class means are far apart in the
    # lungs (a nearest-centroid rule on pixels beats chance clearly on held-out phantoms).
    centroids = {c: images[c][: n // 2].mean(0) for c in images}
    correct = 0
    for ci, c in enumerate(images):
        for img in images[c][n // 2:]:
            img = img - img.mean()
            d = {k: ((img - (v - v.mean())) ** 2).sum() for k, v in centroids.items()}
            correct += min(d, key=d.get) == c
    assert correct / (3 * (n - n // 2)) > 0.5


def test_check_reports_leaks_duplicates_and_broken_files(tmp_path, capsys):
    data = tmp_path / "syn"
    prep.make_synthetic(data, n=4, size=16, seed=0)
    assert run(["check", data]) == 0
    assert "check passed" in capsys.readouterr().out
    # A patient in two splits.
    rows = read_rows(data)
    rows[0]["patient"] = next(r["patient"] for r in rows if r["split"] != rows[0]["split"])
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=prep.MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows)
    assert run(["check", data]) == 1
    assert "LEAK patient" in capsys.readouterr().out
    # A copied image across splits and a broken PNG.
    prep.make_synthetic(tmp_path / "syn2", n=4, size=16, seed=0)
    data = tmp_path / "syn2"
    src = data / "train" / "normal" / "normal_train_00000.png"
    (data / "test" / "normal" / "copy.png").write_bytes(src.read_bytes())
    # Other bytes, same pixels, same split: a duplicate within a split (reported, not a failure).
    other = data / "train" / "bacterial" / "bacterial_train_00001.png"
    Image.open(other).save(data / "train" / "viral" / "same_pixels.png", compress_level=1)
    assert (data / "train" / "viral" / "same_pixels.png").read_bytes() != other.read_bytes()
    (data / "test" / "viral" / "broken.png").write_bytes(src.read_bytes()[:40])
    assert run(["check", data]) == 1
    text = capsys.readouterr().out
    assert "LEAK (same pixels in two splits): test/normal/copy.png = train/normal/normal_train_00000.png" in text
    assert "BROKEN test/viral/broken.png" in text
    assert ("duplicate within a split: train/bacterial/bacterial_train_00001.png = "
            "train/viral/same_pixels.png") in text
    assert "check failed: 2 problems" in text  # a duplicate within a split is only reported
    assert "size and mode: 16x16 L (17)" in text and "0 rows without a file, 3 files without a row" in text


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    def error_of(argv):
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "does not exist" in error_of(["kermany", tmp_path / "nope"])
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    err = error_of(["kermany", tmp_path / "flat"])
    assert "{train,test,val}/{NORMAL,PNEUMONIA}" in err and "1 image files found elsewhere" in err
    # One level too deep (chest_xray/train): the layout is not there either.
    src = make_kaggle_tree(tmp_path / "deep")
    assert "{train,test,val}/{NORMAL,PNEUMONIA}" in error_of(["kermany", src / "chest_xray" / "train"])
    src = make_kaggle_tree(tmp_path / "src")
    for p in (src / "chest_xray").rglob("*virus*"):
        p.unlink()
    assert "no viral images" in error_of(["kermany", src, "--out", tmp_path / "o", "--workers", 1])
    (tmp_path / "notes.txt").write_text("hello")
    assert "neither a folder nor a zip file" in error_of(["kermany", tmp_path / "notes.txt"])
    (tmp_path / "archive.zip").write_bytes(b"PK\3\4 the first bytes of a download that stopped")
    assert "not a readable zip file" in error_of(["kermany", tmp_path / "archive.zip"])
    assert "metadata.csv" in error_of(["covid", tmp_path / "flat"])
    err = error_of(["check", tmp_path / "missing"])
    assert "prep.py kermany" in err and "prep.py synthetic" in err
    # Flag values: one line too, naming the flag, the value and the fix.
    assert "--size: '4' is not in [8, inf)" in error_of(["synthetic", "--size", 4, "--out", tmp_path / "s"])
    assert "--val-frac: '1.5' is not in [0, 1)" in error_of(["kermany", src, "--val-frac", 1.5])
    assert "--test-frac: '-0.1' is not in [0, 1)" in error_of(["covid", tmp_path, "--test-frac", -0.1])
    assert "--n: '0' is not in [1, inf)" in error_of(["synthetic", "--n", 0, "--out", tmp_path / "s"])
    assert "--workers: invalid number value: 'x'" in error_of(["synthetic", "--workers", "x"])


def test_command_line_runs_as_a_script(tmp_path):
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, "prep.py", "synthetic", "--out", str(out), "--n", "3", "--size", "16"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "synthetic: 12 phantom images written to" in r.stdout
    r = subprocess.run([sys.executable, "prep.py", "check", str(tmp_path / "nothing")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


@needs_sample("chest_xray")
def test_real_kermany_sample_matches_its_manifest(tmp_path, capsys):
    with open(SAMPLE / "manifest.csv", newline="") as f:
        sample = list(csv.DictReader(f))
    label = {"normal": "normal", "bacteria": "bacterial", "virus": "viral"}
    expected = collections.Counter((r["split"], label[r["label"]]) for r in sample)
    out = tmp_path / "data"
    # One process: the pool is tested elsewhere, and starting it costs more than 505 images.
    assert run(["kermany", SAMPLE / "chest_xray", "--out", out, "--size", 64, "--workers", 1]) == 0
    rows = read_rows(out)
    assert collections.Counter((r["split"], r["class"]) for r in rows) == expected
    # Every file of the sample's manifest, with its class and the patient key of the docstring.
    by_name = {r["source"].split("/")[-1]: r for r in rows}
    assert set(by_name) == {r["filename"] for r in sample}
    for r in sample:
        got = by_name[r["filename"]]
        assert got["class"] == label[r["label"]] and got["split"] == r["split"]
        key = r["patient_id"] if r["label"] == "normal" else f"{r['label']}/{r['patient_id']}"
        assert got["patient"] == key
    # The printed table says the same.
    text = capsys.readouterr().out
    for split in ("train", "test"):
        cells = " +".join(str(expected[(split, c)]) for c in ("normal", "bacterial", "viral"))
        assert re.search(rf"{split} +{cells} +{sum(expected[(split, c)] for c in label.values())}\n", text)
    assert not prep.patient_leaks(rows)
    assert run(["check", out]) == 0


@needs_sample("covid")
def test_real_covid_sample(tmp_path):
    out = tmp_path / "data"
    assert run(["covid", SAMPLE / "covid", "--out", out, "--size", 32, "--workers", 1]) == 0
    rows = read_rows(out)
    assert len(rows) == 30 and not prep.patient_leaks(rows)
