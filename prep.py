"""prep.py: every dataset in one layout, so the model scripts never see a dataset's quirks.

Each source is decoded, turned into 8-bit grayscale, optionally cropped to the body,
made square, resized and written as PNG into one layout (see DESIGN.md):

    DATA/train/<class>/<name>.png     8-bit grayscale, SIZE x SIZE
    DATA/test/<class>/<name>.png      (DATA/val/... with --val-frac)
    DATA/manifest.csv                 path,split,class,patient,source
    DATA/prep.json                    the settings each source was prepared with

Commands:

    python prep.py synthetic                      # 750 phantom X-rays in data/synthetic, no download
    python prep.py kermany ~/Downloads/archive.zip --out data --size 256    # the zip, read in place
    python prep.py kermany chest_xray --out data --size 256 --crop --val-frac 0.1
    python prep.py covid covid-chestxray-dataset --out data --size 256 --test-frac 0.2
    python prep.py check data                     # counts, sizes, broken files, duplicates, leakage

Sources:
- Kermany et al. 2018, "Chest X-Ray Images (Pneumonia)" (Kaggle "chest-xray-pneumonia", or
  Mendeley Data doi:10.17632/rscbjbr9sj.2): chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}.
  Pneumonia file names carry the type: person12_bacteria_46.jpeg, person1_virus_6.jpeg.
- Cohen et al. 2020, "COVID-19 image data collection": metadata.csv + images/.
- A procedural phantom set (normal, bacterial, viral) for tests and first runs.

Patients never span two splits. In the Kermany set the personNNN numbers run separately for
bacteria and virus files (808 numbers carry both in the Kaggle train folder, and only the
per-class reading makes the official split patient-disjoint), so a pneumonia patient is
"bacteria/person12" or "virus/person12"; a normal patient is "IM-0001" or "NORMAL2-IM-0001".

Re-running skips images already written. Every image is written under a temporary name and
renamed, so an interrupted run never leaves a half-written PNG and simply continues.
"""
import argparse
import collections
import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from scipy import ndimage

CLASSES = ("normal", "bacterial", "viral", "covid")
SPLITS = ("train", "val", "test")
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
MANIFEST_FIELDS = ("path", "split", "class", "patient", "source")
MAKE_DATA_HINT = "make it with `python prep.py kermany PATH` or `python prep.py synthetic`"

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not grey pixels


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with code 2."""


# ---------------------------------------------------------------------------------------------
# One preprocessing for every source: decode -> 8-bit gray -> (crop to body) -> square -> resize
# ---------------------------------------------------------------------------------------------

def to_gray8(img):
    """Any PIL image -> uint8 array (H, W).

    8-bit modes go through PIL's own conversions (ITU-R 601 luma for colour; alpha and palette
    transparency are dropped). 16-bit, 32-bit integer and float images carry more than 256
    levels, often in a narrow band (a 12-bit detector stores 0..4095 in I;16), so they are
    rescaled from their own min..max to 0..255 instead of being clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, np.uint8)
        return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode not in ("1", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def otsu_threshold(gray):
    """Otsu's threshold of a uint8 image: the level that best separates two intensity groups."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


CROP_MASK_SIDE = 512  # find the body on a copy at most this long: same box, ~6x less work on originals


def crop_to_body(gray, min_area=0.1):
    """Crop to the bounding box of the largest bright connected region (the torso).

    As the AC-GAN paper crops to "the largest contour of torso cross-section" (Dhawan & Nijhawan,
    Sec. 3.2): Otsu threshold on a blurred copy, a morphological opening to cut thin links
    (labels, wires), the largest component by scipy.ndimage.label.
    If that component covers less than `min_area` of the image the image is returned unchanged.
    Images longer than CROP_MASK_SIDE are searched on a box-filtered smaller copy and the box is
    scaled back (outwards), so the crop itself keeps the full resolution.
    """
    h, w = gray.shape
    scale = min(1.0, CROP_MASK_SIDE / max(h, w))
    small = gray
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BOX))
    smooth = ndimage.gaussian_filter(small.astype(np.float32), sigma=2)
    mask = smooth > otsu_threshold(np.clip(smooth, 0, 255).astype(np.uint8))
    mask = ndimage.binary_opening(mask, iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return gray
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < min_area * small.size:
        return gray
    rows, cols = ndimage.find_objects(labels)[largest - 1]
    sy, sx = h / small.shape[0], w / small.shape[1]
    top, bottom = int(rows.start * sy), min(h, int(np.ceil(rows.stop * sy)))
    left, right = int(cols.start * sx), min(w, int(np.ceil(cols.stop * sx)))
    return gray[top:bottom, left:right]


def make_square(gray, fit):
    """'crop': centre crop of the long side (default); 'pad': pad the short side with black."""
    h, w = gray.shape
    if h == w:
        return gray
    if fit == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return gray[top:top + s, left:left + s]
    s = max(h, w)
    out = np.zeros((s, s), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = gray
    return out


def preprocess(img, size, crop=False, fit="crop"):
    """PIL image -> square uint8 array (size, size). Resizing uses Lanczos, which low-pass
    filters when shrinking (antialiasing), so fine rib edges do not alias into moire."""
    gray = to_gray8(img)
    if crop:
        gray = crop_to_body(gray)
    gray = make_square(gray, fit)
    if gray.shape != (size, size):
        gray = np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.LANCZOS))
    return gray


def write_png_atomic(array, path):
    """Write under a temporary name, then rename: a crash never leaves a half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        Image.fromarray(array, mode="L").save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-write: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading sources: a folder or a zip file, seen as a list of relative paths
# ---------------------------------------------------------------------------------------------

def is_junk(relpath):
    """macOS resource forks, hidden files and anything that is not an image file."""
    parts = relpath.split("/")
    if "__MACOSX" in parts or any(p.startswith(".") for p in parts):
        return True
    return Path(relpath).suffix.lower() not in IMAGE_EXTS


def list_files(root):
    """All non-junk image files under a folder or inside a .zip, as '/'-separated relative paths."""
    root = Path(root)
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    elif root.is_dir():
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    elif root.suffix.lower() == ".zip":
        raise UserError(f"{root} is not a readable zip file (an incomplete download?) — download it "
                        "again, or extract it and pass the folder")
    else:
        raise UserError(f"{root} is neither a folder nor a zip file — pass the extracted dataset "
                        "folder or the downloaded .zip")
    return sorted(n for n in names if not is_junk(n))


_open_zips = {}  # per process: zip path -> ZipFile, so workers open each archive once


def read_image(root, relpath):
    """Open an image from a folder or zip and decode it fully (so truncation is found here)."""
    root = Path(root)
    if root.is_file():
        zf = _open_zips.get(root)
        if zf is None:
            zf = _open_zips[root] = zipfile.ZipFile(root)
        img = Image.open(io.BytesIO(zf.read(relpath)))
    else:
        img = Image.open(root / relpath)
    img.load()
    return img


# ---------------------------------------------------------------------------------------------
# Converting a list of jobs with several processes, skipping what is done, reporting progress
# ---------------------------------------------------------------------------------------------

def convert_one(job):
    """job = (root, relpath, out_path, size, crop, fit) -> (relpath, error or None)."""
    root, relpath, out_path, size, crop, fit = job
    if os.path.exists(out_path):
        return relpath, None  # done by an earlier run (files only appear complete, see above)
    try:
        array = preprocess(read_image(root, relpath), size, crop, fit)
    except Exception as e:  # noqa: BLE001 -- one odd file must never stop the whole run
        return relpath, f"{type(e).__name__}: {e}".splitlines()[0]
    # Outside the try: a failed write (disk full, no permission) is no fault of this image and
    # would fail for every other one too, so it stops the run (main() reports it in one line).
    write_png_atomic(array, out_path)
    return relpath, None


POOL_MIN_JOBS = 64  # below this, starting the worker processes (~1 s each) costs more than it saves


def _ignore_sigint():
    """Pool initializer: Ctrl-C reaches every process; only the parent handles it (and stops
    the workers), so the user sees one message instead of a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(func, jobs, workers, what="images"):
    """Run func(job) -> (name, error or None) over all jobs with `workers` processes and a
    progress line (count, rate, ETA) on stderr. Returns {name: error} for the jobs that failed.
    The caller drops the jobs that are already done, so a finished re-run starts no process."""
    failed = {}
    n = len(jobs)
    if n == 0:
        return failed
    start = time.time()
    first = last = None  # the rate is measured from the first finished job, after start-up
    shown = False  # a progress line is on screen (an error message must start on a new line)

    def progress(done, final=False):
        nonlocal first, last, shown
        now = time.time()
        if first is None:
            first = last = now
        if not final and now - last < 0.5:
            return
        last = now
        if done > 1 and now > first:
            rate = (done - 1) / (now - first)
            eta = (n - done) / rate
            timing = f"{rate:.0f}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        else:
            timing = "starting"
        if final:
            timing = f"{done / max(now - start, 1e-9):.0f}/s  {now - start:.1f} s"
        print(f"\r  {done:,}/{n:,} {what}  {timing}  ", end="\n" if final else "",
              file=sys.stderr, flush=True)
        shown = not final

    if workers <= 1 or n < POOL_MIN_JOBS:
        pool, results = None, map(func, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, n), initializer=_ignore_sigint)
        results = pool.imap_unordered(func, jobs, chunksize=max(1, min(16, n // (8 * workers))))
    try:
        for done, (name, err) in enumerate(results, 1):
            if err:
                failed[name] = err
            progress(done)
    except BaseException:
        if shown:
            print(file=sys.stderr)  # end the progress line; the error goes on its own line
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    progress(n, final=True)
    return failed


# ---------------------------------------------------------------------------------------------
# The manifest and the settings record, shared by all sources written to one DATA folder
# ---------------------------------------------------------------------------------------------

def read_manifest(data):
    path = Path(data) / "manifest.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(data, rows, source_name):
    """Replace the rows of one source (e.g. 'kermany') and keep the others."""
    keep = [r for r in read_manifest(data) if r["source"].split(":")[0] != source_name]
    rows = sorted(keep + rows, key=lambda r: r["path"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(data) / "manifest.csv", buf.getvalue())


def check_settings(data, source_name, settings):
    """Refuse to mix images made with different settings in one folder."""
    path = Path(data) / "prep.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    other = {k: v["size"] for k, v in record.items() if k != source_name and v.get("size") != settings["size"]}
    if other:
        name, size = next(iter(other.items()))
        raise UserError(f"{data} already holds {name} images at {size} px — use --size {size} to add "
                        f"{source_name} images to it, or another --out")
    old = record.get(source_name)
    if old is not None and old != settings:
        diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        raise UserError(f"{data} already holds {source_name} images made with other settings "
                        f"({diff}) — use another --out or delete that folder")
    record[source_name] = settings
    Path(data).mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def summary_table(rows, title):
    """Counts per split and class, as a small text table."""
    counts = collections.Counter((r["split"], r["class"]) for r in rows)
    classes = [c for c in CLASSES if any(k[1] == c for k in counts)]
    splits = [s for s in SPLITS if any(k[0] == s for k in counts)]
    lines = [title, "  split   " + "".join(f"{c:>11}" for c in classes) + f"{'total':>9}"]
    for s in splits:
        cells = "".join(f"{counts[(s, c)]:>11,}" for c in classes)
        lines.append(f"  {s:<8}" + cells + f"{sum(counts[(s, c)] for c in classes):>9,}")
    return "\n".join(lines)


def patient_leaks(rows):
    """Patients that appear in more than one split: {patient: sorted splits}."""
    splits = collections.defaultdict(set)
    for r in rows:
        splits[r["patient"]].add(r["split"])
    return {p: sorted(s) for p, s in splits.items() if len(s) > 1}


def split_by_patient(rows, frac, seed, new_split):
    """Move a random `frac` of the patients (not images) of `rows` into split `new_split`."""
    patients = sorted({r["patient"] for r in rows})
    rng = np.random.default_rng(seed)
    n_move = int(round(frac * len(patients)))
    moved = set(rng.permutation(np.array(patients, dtype=object))[:n_move].tolist())
    for r in rows:
        if r["patient"] in moved:
            r["split"] = new_split
    return rows


# ---------------------------------------------------------------------------------------------
# Kermany "Chest X-Ray Images (Pneumonia)"
# ---------------------------------------------------------------------------------------------

KERMANY_LAYOUT = re.compile(r"^(?P<root>(?:.*/)?)(?P<split>train|test|val)/(?P<folder>NORMAL|PNEUMONIA)/"
                            r"(?P<name>[^/]+)$", re.IGNORECASE)
NORMAL_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)
PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)


def kermany_label(folder, name):
    """(class, patient) from the folder and file name, or (None, reason) if it has none."""
    stem = Path(name).stem
    if folder.upper() == "NORMAL":
        m = NORMAL_PATIENT.match(stem)
        return "normal", (m.group(1).upper() if m else stem)
    m = PNEUMONIA_NAME.match(stem)
    if not m:
        return None, "pneumonia file name names neither bacteria nor virus"
    person, kind = m.group(1).lower(), m.group(2).lower()
    return {"bacteria": "bacterial", "virus": "viral"}[kind], f"{kind}/{person}"


def find_kermany(files):
    """Pick the copy of the dataset to use and parse every file in it.

    The Kaggle zip holds the dataset twice (chest_xray/ and chest_xray/chest_xray/): files are
    grouped by the folder above train/test/val, and the group with the most images wins (the
    shallowest on a tie), so each image is read once.
    """
    groups = collections.defaultdict(list)
    for rel in files:
        m = KERMANY_LAYOUT.match(rel)
        if m:
            groups[m.group("root")].append((rel, m))
    if not groups:
        return None, []
    root = max(groups, key=lambda g: (len(groups[g]), -g.count("/")))
    return root, groups[root]


def prep_kermany(args):
    files = list_files(args.path)
    root, entries = find_kermany(files)
    if not entries:
        raise UserError(f"no images in the expected layout {{train,test,val}}/{{NORMAL,PNEUMONIA}}/*.jpeg "
                        f"under {args.path} ({len(files):,} image files found elsewhere) — pass the "
                        "Kaggle 'chest-xray-pneumonia' zip or the chest_xray folder that holds train/ "
                        "and test/ (or any folder above it)")
    print(f"kermany: reading {Path(args.path, root)} ({len(entries):,} images)")
    rows, unlabeled, used_names = [], [], set()
    for rel, m in entries:
        cls, patient = kermany_label(m.group("folder"), m.group("name"))
        if cls is None:
            unlabeled.append(f"{rel} ({patient})")
            continue
        split = "test" if m.group("split").lower() == "test" else "train"  # the 16 val images join train
        stem = Path(m.group("name")).stem
        name = f"{stem}.png" if (split, cls, stem) not in used_names else f"{stem}_{m.group('split')}.png"
        used_names.add((split, cls, stem))
        rows.append({"path": f"{split}/{cls}/{name}", "split": split, "class": cls,
                     "patient": patient, "source": f"kermany:{rel[len(root):]}", "_rel": rel})
    if args.val_frac > 0:
        train = [r for r in rows if r["split"] == "train"]
        split_by_patient(train, args.val_frac, args.seed, "val")
        for r in train:
            if r["split"] == "val":
                r["path"] = "val/" + r["path"].split("/", 1)[1]
    empty = [c for c in ("normal", "bacterial", "viral") if not any(r["class"] == c for r in rows)]
    if empty:
        raise UserError(f"no {', '.join(empty)} images found in {args.path} — is this the complete "
                        "Kermany chest_xray set (NORMAL and PNEUMONIA folders, original file names)?")
    return finish(args, "kermany", rows, unlabeled)


# ---------------------------------------------------------------------------------------------
# COVID-19 image data collection (Cohen et al. 2020)
# ---------------------------------------------------------------------------------------------

def prep_covid(args):
    root = Path(args.path)
    if not (root / "metadata.csv").exists():
        raise UserError(f"{root}/metadata.csv not found — pass the folder of the COVID-19 image data "
                        "collection (github.com/ieee8023/covid-chestxray-dataset) with metadata.csv and images/")
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        meta = list(csv.DictReader(f))
    needed = {"patientid", "finding", "view", "modality", "filename"}
    if meta and not needed <= set(meta[0]):
        raise UserError(f"{root}/metadata.csv lacks the columns {sorted(needed - set(meta[0]))} — is it "
                        "the collection's own metadata.csv?")
    rows, unlabeled, seen, names = [], [], set(), set()
    for m in meta:
        view = (m["view"] or "").split(" ")[0].upper()  # "AP Supine" and "AP semi erect" are AP views
        if m["modality"] != "X-ray" or view not in ("PA", "AP"):
            continue
        if "COVID-19" not in (m["finding"] or ""):
            continue
        rel = next((f"{d}/{m['filename']}" for d in ("images", m.get("folder") or "images")
                    if (root / d / m["filename"]).exists()), None)
        if rel is None:
            unlabeled.append(f"images/{m['filename']} (listed in metadata.csv, file missing)")
            continue
        if rel in seen:
            unlabeled.append(f"{rel} (a second metadata.csv row for the same file)")
            continue
        seen.add(rel)
        stem = Path(m["filename"]).stem
        if stem in names:  # x.jpg and x.png would both become x.png
            stem += "_" + Path(m["filename"]).suffix.lstrip(".").lower()
        names.add(stem)
        rows.append({"path": f"train/covid/{stem}.png", "split": "train",
                     "class": "covid", "patient": f"covid/{m['patientid']}",
                     "source": f"covid:{rel}", "_rel": rel})
    if not rows:
        raise UserError(f"no COVID-19 X-ray PA/AP rows with an image found under {root} — check that "
                        "images/ sits next to metadata.csv")
    print(f"covid: reading {root} ({len(meta):,} metadata.csv rows, {len(rows):,} COVID-19 X-ray PA/AP images)")
    split_by_patient(rows, args.test_frac, args.seed, "test")
    for r in rows:
        r["path"] = f"{r['split']}/covid/" + r["path"].split("/")[-1]
    return finish(args, "covid", rows, unlabeled)


def finish(args, source_name, rows, unlabeled):
    """Shared last steps of a real source: convert, write the manifest, report."""
    # The split options belong to the settings too: another split into the same folder would
    # leave the old split's PNGs behind where the model scripts read them.
    split_flags = {k: getattr(args, k) for k in ("val_frac", "test_frac") if hasattr(args, k)}
    settings = {"size": args.size, "crop": args.crop, "fit": args.fit, **split_flags}
    if any(split_flags.values()):
        settings["seed"] = args.seed  # draws the patients of the split
    check_settings(args.out, source_name, settings)
    out = Path(args.out)
    jobs = [(str(args.path), r["_rel"], str(out / r["path"]), args.size, args.crop, args.fit) for r in rows]
    todo = [j for j in jobs if not os.path.exists(j[2])]
    if len(todo) < len(jobs):
        print(f"  {len(jobs) - len(todo):,} images already done by an earlier run, {len(todo):,} to convert")
    failed = run_jobs(convert_one, todo, args.workers)
    for j in jobs:  # temp files that a run killed outright (power cut, kill -9) left behind
        Path(j[2] + ".tmp").unlink(missing_ok=True)
    good = [{k: r[k] for k in MANIFEST_FIELDS} for r in rows if r["_rel"] not in failed]
    write_manifest(out, good, source_name)
    print(summary_table(good, f"{source_name}: {len(good):,} images written to {out}"))
    for rel, err in sorted(failed.items()):
        print(f"  skipped unreadable {rel}: {err}")
    for u in unlabeled:
        print(f"  skipped {u}")
    if failed or unlabeled:
        counts = [f"{len(failed)} unreadable"] if failed else []
        counts += [f"{len(unlabeled)} skipped for another reason"] if unlabeled else []
        print(f"  {', '.join(counts)} (listed above)")
    lost = sorted({r["class"] for r in rows} - {r["class"] for r in good}, key=CLASSES.index)
    if lost:
        raise UserError(f"none of the {', '.join(lost)} images in {args.path} could be read (listed "
                        "above) — download the dataset again; the copy here looks broken")
    leaks = patient_leaks(good)
    if leaks:
        some = ", ".join(f"{p} in {'+'.join(s)}" for p, s in list(leaks.items())[:5])
        more = ", ..." if len(leaks) > 5 else ""
        print(f"  WARNING: patient ids in more than one split: {len(leaks):,} ({some}{more})")
    else:
        print("  patient check: no patient appears in two splits")
    return 0


# ---------------------------------------------------------------------------------------------
# Synthetic phantom chest X-rays
# ---------------------------------------------------------------------------------------------
# Film convention: bright = dense (bone, tissue, fluid), dark = air. Drawn on a unit canvas with
# coordinates in [-1, 1], so the same phantom renders at any size. A "patient" fixes the anatomy
# (body width, lung shape, heart size, rib spacing, where a lesion sits); each of a patient's
# images is a new exposure of it (noise, brightness, contrast, a small shift).

SYNTHETIC_CLASSES = ("normal", "bacterial", "viral")
SYNTH_IMAGES_PER_PATIENT = 2  # follow-up images, so patient-aware splits have something to do
SYNTH_TEST_FRACTION = 0.25


def _smooth_noise(rng, size, sigma):
    """Gaussian-filtered white noise scaled to unit standard deviation: blotches of ~sigma px."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return n / (n.std() + 1e-12)


def _soft(x, width):
    """A soft step: 1 where x < 0, 0 where x > 0, blending over `width`."""
    return 1.0 / (1.0 + np.exp(np.clip(x / width, -60, 60)))


def synthetic_xray(cls, size, anatomy_seed, exposure_seed):
    """One phantom chest X-ray of class `cls` as a uint8 array (size, size)."""
    a = np.random.default_rng(anatomy_seed)   # the patient
    e = np.random.default_rng(exposure_seed)  # this acquisition
    shift_x, shift_y = e.normal(0, 0.03, 2)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    x, y = x - shift_x, y - shift_y
    edge = 2.5 / size  # about one pixel of blur on every outline

    # Body: a wide ellipse of soft tissue; outside it is air (dark).
    body_w, body_h = a.uniform(0.78, 0.92), a.uniform(1.05, 1.25)
    body = _soft((x / body_w) ** 2 + ((y - 0.1) / body_h) ** 2 - 1, edge * 4)
    img = 0.55 * body

    # Lungs: two tall air-filled fields (dark) whose lower edge is the diaphragm dome.
    lung_w, lung_h, gap = a.uniform(0.27, 0.33), a.uniform(0.55, 0.65), a.uniform(0.08, 0.13)
    top = a.uniform(-0.75, -0.65)
    lungs = []
    for side in (-1, 1):
        cx = side * (gap + lung_w)
        dome = top + 2 * lung_h - 0.18 * (1 - ((x - cx) / lung_w) ** 2)  # diaphragm, higher in the middle
        inside = ((x - cx) / lung_w) ** 2 + ((y - top - lung_h) / lung_h) ** 2 - 1
        lung = _soft(inside, edge * 6) * _soft(y - dome, edge * 3)
        lungs.append(lung)
    lung_field = np.maximum(*lungs)
    img -= 0.38 * lung_field * body

    # Ribs: bright arcs across the lung fields, posterior ribs curving down towards the sides.
    rib_gap = a.uniform(0.15, 0.19)
    phase = y - a.uniform(0.25, 0.4) * np.abs(x) - 0.35 * x ** 2
    ribs = np.exp(-((np.mod(phase - top, rib_gap) - rib_gap / 2) / (rib_gap * 0.16)) ** 2)
    img += 0.10 * ribs * lung_field
    # Lung markings: faint branching vessels, denser near the hila (the middle).
    vessels = np.abs(_smooth_noise(a, size, size / 40)) < 0.25
    img += 0.05 * vessels * lung_field * np.exp(-np.abs(x) / 0.5)
    # Clavicles: two bright bars sloping up from the middle towards the shoulders.
    for side in (-1, 1):
        bar = np.abs(y - (top - 0.02) + 0.25 * side * x - 0.1 * np.abs(x)) - 0.035
        img += 0.16 * _soft(bar, edge * 3) * _soft(np.abs(x) - 0.75, edge * 8) * (np.abs(x) > 0.05)

    # Spine: a vertical bright band with vertebrae; heart: a bright blob to the patient's left
    # (the image's right, as a PA film is viewed).
    spine_w = a.uniform(0.07, 0.09)
    vertebrae = 0.85 + 0.15 * np.cos(2 * np.pi * (y - top) / a.uniform(0.11, 0.14))
    img += 0.25 * _soft(np.abs(x) - spine_w, edge * 3) * vertebrae * body
    heart_r, heart_x, heart_y = a.uniform(0.26, 0.32), a.uniform(0.1, 0.16), a.uniform(0.25, 0.35)
    heart = _soft(((x - heart_x) / (heart_r * 1.3)) ** 2 + ((y - heart_y) / heart_r) ** 2 - 1, edge * 12)
    img += 0.24 * heart * body

    # Disease. Bacterial: one dense lobar consolidation, a large smooth-edged opacity filling part
    # of one lung. Viral: diffuse, bilateral, patchy and interstitial (reticular) opacities.
    if cls == "bacterial":
        side = a.choice([-1, 1])
        cx = side * (gap + lung_w) + a.normal(0, 0.05)
        cy = top + lung_h * a.uniform(0.8, 1.5)
        rx, ry = lung_w * a.uniform(0.6, 0.9), lung_h * a.uniform(0.35, 0.55)
        wobble = 0.25 * _smooth_noise(a, size, size / 12)
        blob = _soft(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 - 1 + wobble, 0.12)
        img += 0.30 * blob * lungs[0 if side < 0 else 1]
    elif cls == "viral":
        patches = np.clip(_smooth_noise(a, size, size / 28) - 0.35, 0, None)
        reticular = np.abs(_smooth_noise(a, size, size / 64))
        img += (0.11 * patches + 0.07 * (reticular < 0.35)) * lung_field

    # Exposure and film: contrast, brightness, blur and grain differ for every image. The target
    # mean brightness is drawn from one distribution for all classes, so no class can be told
    # apart by mean brightness alone.
    img = ndimage.gaussian_filter(img, size / 256)
    img += 0.035 * _smooth_noise(e, size, size / 16) + 0.02 * e.standard_normal((size, size))
    img = np.clip(img, 0, None) ** e.uniform(0.8, 1.25)
    target_mean = e.uniform(0.33, 0.47)
    img = img * (target_mean / (img.mean() + 1e-12))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_synthetic(out, n=200, size=128, seed=0, workers=1):
    """Write the phantom set: n images per class in train and n/4 in test, with a manifest."""
    out = Path(out)
    n_test = max(1, int(round(n * SYNTH_TEST_FRACTION)))
    rows, jobs = [], []
    for ci, cls in enumerate(SYNTHETIC_CLASSES):
        for si, (split, count) in enumerate((("train", n), ("test", n_test))):
            for i in range(count):
                patient = i // SYNTH_IMAGES_PER_PATIENT
                name = f"{cls}_{split}_{i:05d}"
                rows.append({"path": f"{split}/{cls}/{name}.png", "split": split, "class": cls,
                             "patient": f"synthetic/{cls}/{split}{patient:05d}",
                             "source": f"synthetic:seed{seed}"})
                # Seeds are a pure function of (seed, class, split, patient, image), so the set
                # is the same whatever the order or the number of processes.
                jobs.append((cls, size, (seed, ci, si, patient), (seed, ci, si, patient, i),
                             str(out / rows[-1]["path"])))
    check_settings(out, "synthetic", {"size": size, "n": n, "seed": seed})
    run_jobs(_write_synthetic, [j for j in jobs if not os.path.exists(j[-1])], workers)
    write_manifest(out, rows, "synthetic")
    return rows


def _write_synthetic(job):
    cls, size, anatomy_seed, exposure_seed, path = job
    write_png_atomic(synthetic_xray(cls, size, anatomy_seed, exposure_seed), path)
    return path, None


def prep_synthetic(args):
    t0 = time.time()
    rows = make_synthetic(args.out, args.n, args.size, args.seed, args.workers)
    print(summary_table(rows, f"synthetic: {len(rows):,} phantom images ({args.size}x{args.size}) "
                              f"in {args.out} ({time.time() - t0:.1f} s)"))
    return 0


# ---------------------------------------------------------------------------------------------
# check: what is in a prepared folder, and is it sound?
# ---------------------------------------------------------------------------------------------

def prep_check(args):
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"{data} does not exist — {MAKE_DATA_HINT}")
    files = sorted(p for s in SPLITS for p in (data / s).glob("*/*.png"))
    if not files:
        raise UserError(f"no images in {data}/{{train,test}}/<class>/*.png — {MAKE_DATA_HINT}")
    counts, sizes, modes, broken = collections.Counter(), collections.Counter(), collections.Counter(), []
    by_hash = collections.defaultdict(list)
    for p in files:
        rel = p.relative_to(data).as_posix()
        split, cls = rel.split("/")[:2]
        try:
            with Image.open(p) as img:
                img.load()
                sizes[img.size] += 1
                modes[img.mode] += 1
                key = f"{img.mode}{img.size}".encode() + img.tobytes()  # same pixels, not same file
                by_hash[hashlib.sha1(key).hexdigest()].append(rel)
            counts[(split, cls)] += 1
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            broken.append(f"{rel}: {type(e).__name__}: {e}".splitlines()[0])
    rows = [{"split": s, "class": c} for (s, c), k in counts.items() for _ in range(k)]
    print(summary_table(rows, f"{data}: {len(files):,} images"))
    print("  sizes: " + ", ".join(f"{w}x{h} ({k:,})" for (w, h), k in sizes.most_common()))
    print("  modes: " + ", ".join(f"{m} ({k:,})" for m, k in modes.most_common()))
    unknown = sorted({c for (_, c) in counts} - set(CLASSES))
    if unknown:
        print(f"  note: class folders outside {CLASSES}: {unknown}")
    problems = 0
    for b in broken:
        print(f"  BROKEN {b}")
    problems += len(broken)
    dups = [v for v in by_hash.values() if len(v) > 1]
    within = [v for v in dups if len({r.split("/")[0] for r in v}) == 1]
    across = [v for v in dups if len({r.split("/")[0] for r in v}) > 1]
    print(f"  exact duplicates: {len(within)} groups within a split, {len(across)} across splits")
    for v in within[:10]:
        print(f"  duplicate within a split: {' = '.join(v)}")
    for v in across[:10]:
        print(f"  LEAK (same pixels in two splits): {' = '.join(v)}")
    problems += len(across)
    manifest = read_manifest(data)
    if not manifest:
        print("  no manifest.csv: the patient check needs it (prep.py writes one)")
    else:
        leaks = patient_leaks(manifest)
        for p, s in list(leaks.items())[:10]:
            print(f"  LEAK patient {p} in {' and '.join(s)}")
        problems += len(leaks)
        listed = {r["path"] for r in manifest}
        on_disk = {p.relative_to(data).as_posix() for p in files}
        if listed - on_disk or on_disk - listed:
            print(f"  manifest: {len(listed - on_disk)} rows without a file, "
                  f"{len(on_disk - listed)} files without a row")
        print(f"  patients: {len({r['patient'] for r in manifest}):,}, in two splits: {len(leaks)}")
    if problems:
        print(f"check failed: {len(broken)} broken files, {len(across)} cross-split duplicates, "
              f"{len(patient_leaks(manifest)) if manifest else 0} leaking patients")
        return 1
    print("check passed")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Prepare chest X-ray datasets in one layout.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, out_default, size_default, seed_help, work):
        q.add_argument("--out", default=out_default, help="output DATA folder")
        q.add_argument("--size", type=int, default=size_default, help="output side length in pixels")
        q.add_argument("--seed", type=int, default=0, help=seed_help)
        q.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                       help=f"processes that {work} (default: the CPU count, at most 8; here %(default)s)")

    def real(q, seed_help):
        common(q, "data", 256, seed_help, "decode and resize")
        q.add_argument("--crop", action="store_true", help="crop to the body (largest bright region) first")
        q.add_argument("--fit", choices=("crop", "pad"), default="crop",
                       help="make square by centre-cropping the long side or padding the short side")

    k = sub.add_parser("kermany", help="the Kermany / Kaggle chest-xray-pneumonia set", formatter_class=fmt)
    k.add_argument("path", help="the extracted folder (any level above train/) or the .zip")
    real(k, "seed of the --val-frac patient draw")
    k.add_argument("--val-frac", type=float, default=0.0,
                   help="carve a patient-disjoint val split with this fraction of the train patients "
                        "out of train (0: no val split; the dataset's 16 val images join train)")
    c = sub.add_parser("covid", help="the COVID-19 image data collection", formatter_class=fmt)
    c.add_argument("path", help="folder with metadata.csv and images/")
    real(c, "seed of the --test-frac patient draw")
    c.add_argument("--test-frac", type=float, default=0.2, help="fraction of patients in the test split")
    s = sub.add_parser("synthetic", help="procedural phantom X-rays (no download)", formatter_class=fmt)
    common(s, "data/synthetic", 128, "seed of the phantom set (same seed, same bytes)", "draw and write")
    s.add_argument("--n", type=int, default=200, help="train images per class (test gets n/4)")
    ch = sub.add_parser("check", help="counts, sizes, broken files, duplicates, patient leakage",
                        formatter_class=fmt)
    ch.add_argument("data", help="a folder written by prep.py")
    args = p.parse_args(argv)
    if getattr(args, "size", 8) < 8:
        raise UserError(f"--size {args.size} is too small — use --size 8 or more "
                        "(64, 128 or 256 are usual)")
    for name in ("val_frac", "test_frac"):
        if not 0 <= getattr(args, name, 0) < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(args, name)} is not in [0, 1) — use a fraction, "
                            f"e.g. {flag} 0.1 (0: none)")
    if getattr(args, "n", 1) < 1:
        raise UserError(f"--n {args.n} makes no images — use --n 1 or more (the default is 200)")
    return args


def main(argv=None):
    run = {"kermany": prep_kermany, "covid": prep_covid, "synthetic": prep_synthetic, "check": prep_check}
    try:
        args = parse_args(argv)
        if args.command in ("kermany", "covid") and not Path(args.path).exists():
            raise UserError(f"{args.path} does not exist — download the dataset first (see README, "
                            "'Real data') and pass its folder or .zip")
        code = run[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk or the folders, not one image (those are skipped and listed)
        print(f"error: cannot read or write {e.filename or 'a file'}: {e.strerror or e} — free some disk "
              "space or pick another --out, then run the same command again (finished images are kept)",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to continue",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
