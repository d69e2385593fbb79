"""prep.py: every chest X-ray source in one layout, so that no other script sees a dataset's quirks.

    DATA/train/<class>/<name>.png    8-bit gray PNG, SIZE x SIZE; classes normal, bacterial, viral, covid
    DATA/test/<class>/<name>.png     (and DATA/val/<class>/ with --val-frac)
    DATA/manifest.csv                path,split,class,patient,source: one row per PNG
    DATA/prep.json                   each source's settings: a folder refuses other ones

Each image is made 8-bit gray, cropped to the torso with --crop, made square (--fit crop: the
centre; pad: black bands) and shrunk with Lanczos, which antialiases. From the repository root:

    python prep.py synthetic                     # 750 phantom X-rays in data/synthetic, seconds, no download
    python prep.py kermany ~/Downloads/archive.zip --out data --size 256    # the Kaggle zip, read in place
    python prep.py kermany chest_xray --out data --size 256 --crop --val-frac 0.1
    python prep.py covid covid-chestxray-dataset --out data --size 256 --test-frac 0.2
    python prep.py check data                    # counts, sizes, broken files, duplicates, patient leaks

- Kermany D.S. et al., "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep
  Learning", Cell 172(5):1122-1131, 2018; data doi:10.17632/rscbjbr9sj.2 or the Kaggle zip
  "chest-xray-pneumonia": chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}, bacteria or virus in the
  file name (person12_bacteria_46.jpeg); val joins train. The zip's second copy and junk are ignored.
- Cohen J.P., Morrison P., Dao L., "COVID-19 image data collection", arXiv:2003.11597, 2020:
  metadata.csv + images/; the X-ray PA/AP rows of four classes from `finding`: COVID-19 -> covid, No
  Finding -> normal, Pneumonia/Bacterial/... -> bacterial, other Pneumonia/Viral/... -> viral.
- Phantoms drawn here (normal, bacterial, viral), so that every script runs on a fresh machine.

No patient is in two splits; --val-frac and --test-frac draw whole patients. Kermany numbers
personNNN separately for bacteria and virus files (808 numbers carry both in the Kaggle train
folder; only the per-class reading makes its split patient-disjoint), so a patient is
"bacteria/person12", "virus/person12", "IM-0001" or "NORMAL2-IM-0001". A run may stop at any
time: a PNG appears only when complete, and the same command skips the finished ones. Unreadable
source images are listed and left out. Exit codes: 1 `check` found a problem, 2 a mistake to fix.
"""
import argparse
import collections
import csv
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

CLASSES = ("normal", "bacterial", "viral", "covid")  # the class folders every script knows
SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "split", "class", "patient", "source")
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
CROP_MASK_SIDE = 512  # find the torso on a copy at most this long: the same box, ~6x less work on originals
POOL_MIN_JOBS = 64  # fewer images are converted in-process: starting a worker (~1 s) costs more than it saves
# A Kermany file: the copy of the set it is in, its split and folder; the patient is in its name.
KERMANY_FILE = re.compile(r"^(?P<root>(?:.*/)?)(?P<split>train|test|val)/(?P<folder>NORMAL|PNEUMONIA)/"
                          r"(?P<name>[^/]+)$", re.IGNORECASE)
NORMAL_PATIENT = re.compile(r"^(?:NORMAL2-)?IM-\d+", re.IGNORECASE)  # IM-0115-0001.jpeg: IM-0115
PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)  # bacteria/person12
SYNTHETIC_CLASSES = ("normal", "bacterial", "viral")  # the phantoms' classes (no covid look-alike)
SYNTH_IMAGES_PER_PATIENT = 2  # follow-up images, so that patient-disjoint splits have something to do
SYNTH_TEST_FRACTION = 0.25  # test images per class: n/4

# ---- One preprocessing for every source: 8-bit gray -> (torso crop) -> square -> resize ----
def to_gray8(img):
    """Any PIL image -> 8-bit gray (colour by ITU-R 601-2 luma). 16-bit, 32-bit and float images (a
    12-bit detector stores 0..4095 in 16 bits) are stretched from their own min..max, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, np.float64)
        return Image.fromarray(np.round((a - a.min()) * (255 / (np.ptp(a) or 1))).astype(np.uint8))
    return img.convert("L")

def crop_to_body(img, min_area=0.1):
    """Crop a gray PIL image to the torso, as Dhawan & Nijhawan crop to "the largest contour of torso
    cross-section" ("Cross-Modality Synthetic Data Augmentation using GANs", medRxiv 2024,
    doi:10.1101/2024.06.09.24308649, Sec. 3.2): the largest bright region of a blurred copy, opened to
    cut thin links (labels, wires); no crop when it covers less than `min_area` of the image."""
    small = img.copy()
    small.thumbnail((CROP_MASK_SIDE, CROP_MASK_SIDE), Image.Resampling.BOX)
    blurred = small.filter(ImageFilter.GaussianBlur(2))
    # Otsu's threshold, the level with the largest between-class variance w0 w1 (mean0 - mean1)^2: Otsu,
    # "A Threshold Selection Method from Gray-Level Histograms", IEEE Trans. SMC 9(1), 1979.
    hist = np.array(blurred.histogram(), np.float64)
    w0, m0 = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    level = np.argmax(w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2)
    labels, n = ndimage.label(ndimage.binary_opening(np.asarray(blurred) > level, iterations=2))
    sizes = np.bincount(labels.ravel())[1:]
    if n == 0 or sizes.max() < min_area * labels.size:
        return img
    rows, cols = ndimage.find_objects(labels)[sizes.argmax()]
    sx, sy = img.width / small.width, img.height / small.height  # the box at full size, rounded outwards
    return img.crop((int(cols.start * sx), int(rows.start * sy), math.ceil(cols.stop * sx), math.ceil(rows.stop * sy)))

def preprocess(img, size, crop=False, fit="crop", zscore=False):
    """Any PIL image -> 8-bit gray SIZE x SIZE PIL image (--crop, --fit, --zscore; Lanczos antialiases)."""
    gray = crop_to_body(to_gray8(img)) if crop else to_gray8(img)
    if fit == "crop":
        out = ImageOps.fit(gray, (size, size), Image.Resampling.LANCZOS)
    else:
        out = ImageOps.pad(gray, (size, size), Image.Resampling.LANCZOS, color=0)
    if zscore:  # each image to mean 0, std 1 (Dhawan & Nijhawan Sec. 3.2), kept in 8 bits as 128 + 32 z
        a = np.asarray(out, np.float64)
        out = Image.fromarray(np.clip(128 + 32 * (a - a.mean()) / (a.std() or 1), 0, 255).round().astype(np.uint8))
    return out

# ---- Phantom chest X-rays ----
def _smooth_noise(rng, size, sigma):
    """Gaussian-filtered white noise scaled to unit standard deviation: blotches of ~sigma px."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return n / (n.std() + 1e-12)

def _soft(x, width):
    """A soft step: 1 where x < 0, 0 where x > 0, blending over `width`."""
    return 1.0 / (1.0 + np.exp(np.clip(x / width, -60, 60)))

def synthetic_xray(cls, size, anatomy_seed, exposure_seed):
    """One phantom chest X-ray of class `cls` as a uint8 array (size, size). Film convention: bright =
    dense (bone, tissue, fluid), dark = air. Drawn on a canvas of [-1, 1]^2, so the same phantom renders
    at any size. A patient (anatomy_seed) fixes the anatomy (body width, lung shape, heart size, rib
    spacing, where a lesion sits); each of its images (exposure_seed) is a new exposure of it."""
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
        lungs.append(_soft(inside, edge * 6) * _soft(y - dome, edge * 3))
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
    # Exposure and film: contrast, brightness, blur and grain differ for every image. The mean
    # brightness is drawn from one distribution for all classes: it tells no class apart.
    img = ndimage.gaussian_filter(img, size / 256)
    img += 0.035 * _smooth_noise(e, size, size / 16) + 0.02 * e.standard_normal((size, size))
    img = np.clip(img, 0, None) ** e.uniform(0.8, 1.25)
    img = img * (e.uniform(0.33, 0.47) / (img.mean() + 1e-12))  # the target mean brightness
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

# ---- Small helpers ----
class UserError(Exception):
    """A mistake the user can fix: main() prints `error: <what> — <fix>` and exits with code 2."""

class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error:` line and exit code 2, like every other UserError."""

    def error(self, message):
        self.exit(2, f"error: {message} — see python {self.prog} --help\n")

def in_range(kind, low, high=math.inf):
    """argparse type: a kind (int or float) in [low, high), not nan; else a one-line error."""
    def number(text):  # a ValueError from kind() becomes argparse's "invalid number value"
        if not low <= kind(text) < high:
            raise argparse.ArgumentTypeError(f"{text!r} is not in [{low}, {high})")
        return kind(text)
    return number

def write_atomic(path, write):
    """write(tmp), then rename tmp to path: a crash or Ctrl-C never leaves a half-written file."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

def patient_leaks(rows):
    """Patients that appear in more than one split: {patient: sorted splits}."""
    splits = collections.defaultdict(set)
    for r in rows:
        splits[r["patient"]].add(r["split"])
    return {p: sorted(s) for p, s in splits.items() if len(s) > 1}

def split_by_patient(rows, frac, seed, new_split):
    """Move a seeded random `frac` of the patients (not images) of `rows` into `new_split`."""
    patients = sorted({r["patient"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    moved = {patients[i] for i in order[:round(frac * len(patients))]}
    for r in rows:
        r["split"] = new_split if r["patient"] in moved else r["split"]

def table(rows, title):
    """Images per split and class, as a small text table under `title`."""
    counts = collections.Counter((r["split"], r["class"]) for r in rows)
    classes = [c for c in CLASSES if any(k[1] == c for k in counts)]
    lines = [title, "  split   " + "".join(f"{c:>11}" for c in classes) + f"{'total':>9}"]
    for s in [s for s in SPLITS if any(k[0] == s for k in counts)]:
        cells = [counts[s, c] for c in classes]
        lines.append(f"  {s:<8}" + "".join(f"{k:>11,}" for k in cells) + f"{sum(cells):>9,}")
    return "\n".join(lines)

def read_manifest(data):
    """The rows of DATA/manifest.csv, or [] when there is none."""
    path = Path(data) / "manifest.csv"
    with open(path, newline="") if path.exists() else io.StringIO() as f:
        return list(csv.DictReader(f))

def run_jobs(func, jobs, workers):
    """[func(job) for job in jobs] in `workers` processes, with one progress line on stderr."""
    if not jobs:
        return []
    # spawn: fresh interpreters, safe whatever threads the parent runs. The workers ignore Ctrl-C;
    # the parent gets it once and stops them, so the user sees one message.
    pool = None if workers < 2 or len(jobs) < POOL_MIN_JOBS else multiprocessing.get_context("spawn").Pool(
        min(workers, len(jobs)), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    results, start = [], time.time()
    try:
        for result in pool.imap(func, jobs, chunksize=8) if pool else map(func, jobs):
            results.append(result)
            if len(results) % 50 == 0 or len(results) == len(jobs):
                print(f"\r  {len(results):,}/{len(jobs):,} images, {time.time() - start:.1f} s", end="",
                      file=sys.stderr, flush=True)
    finally:
        print(file=sys.stderr)  # end the progress line, so that an error starts on a line of its own
        if pool:
            pool.terminate()
    return results

# ---- Data: where each source keeps its images and labels ----
open_zip = functools.lru_cache(maxsize=None)(zipfile.ZipFile)  # one handle per archive and process

def list_files(root):
    """The image files in a folder or .zip as sorted relative paths, without hidden files and the
    __MACOSX folder of a zip made on a Mac."""
    root = Path(root)
    if root.is_dir():
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    elif zipfile.is_zipfile(root):
        names = open_zip(str(root)).namelist()
    else:
        what = ("does not exist" if not root.exists() else "is not a readable zip file (an incomplete "
                "download?)" if root.suffix.lower() == ".zip" else "is neither a folder nor a zip file")
        raise UserError(f"{root} {what} — pass the dataset's folder or the .zip you downloaded (again)")
    return sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") or part == "__MACOSX" for part in n.split("/")))

def load(root, rel, size, crop, fit, zscore):
    """One image of a source folder or zip, preprocessed; an unreadable file raises here."""
    img = Image.open(io.BytesIO(open_zip(root).read(rel)) if os.path.isfile(root) else os.path.join(root, rel))
    return preprocess(img, size, crop, fit, zscore)

def kermany_rows(path):
    """The Kermany images as manifest rows (+ '_rel': the file in the folder or zip)."""
    files, copies = list_files(path), collections.defaultdict(list)
    for m in filter(None, map(KERMANY_FILE.match, files)):
        copies[m["root"]].append(m)
    if not copies:
        raise UserError(f"no {{train,test,val}}/{{NORMAL,PNEUMONIA}}/*.jpeg under {path} ({len(files):,} image files "
                        "found elsewhere) — pass the Kaggle zip, or the chest_xray folder or any folder above it")
    # The Kaggle zip holds the set twice (chest_xray/ and chest_xray/chest_xray/): read the copy
    # with the most images (the shallowest on a tie), so that each image is read once.
    root = max(copies, key=lambda c: (len(copies[c]), -c.count("/")))
    print(f"kermany: reading {Path(path, root)} ({len(copies[root]):,} images)")
    rows = []
    for m in copies[root]:
        stem = Path(m["name"]).stem
        if m["folder"].upper() == "NORMAL":
            cls, patient = "normal", (p[0].upper() if (p := NORMAL_PATIENT.match(stem)) else stem)
        elif p := PNEUMONIA_PATIENT.match(stem):
            kind = p[2].lower()
            cls, patient = {"bacteria": "bacterial", "virus": "viral"}[kind], f"{kind}/{p[1].lower()}"
        else:
            print(f"  skipped {m[0]}: a pneumonia file name that says neither bacteria nor virus")
            continue
        rows.append({"split": "test" if m["split"].lower() == "test" else "train",  # val joins train
                     "class": cls, "patient": patient, "source": f"kermany:{m[0][len(root):]}", "_rel": m[0]})
    if empty := [c for c in ("normal", "bacterial", "viral") if not any(r["class"] == c for r in rows)]:
        raise UserError(f"no {', '.join(empty)} images found in {path} — pass the complete Kermany set, with "
                        "its original file names")
    return rows

def covid_class(finding):
    """The class of a metadata.csv `finding` ("Pneumonia/Viral/COVID-19"), or None to leave the row out:
    the four classes of Davoodi & Lo Giudice (Sec. 2: covid, normal, pneumonia bacteria and viral). Other
    findings (fungal, lipoid, tuberculosis, unknown) are left out."""
    f = finding.lower()
    if "covid-19" in f or f.startswith("no finding"):
        return "covid" if "covid-19" in f else "normal"
    return next((c for c in ("bacterial", "viral") if f.startswith(f"pneumonia/{c}")), None)

def covid_rows(root):
    """The collection's X-ray PA/AP images whose finding has a class, as manifest rows (+ '_rel')."""
    if not (root / "metadata.csv").is_file():
        raise UserError(f"{root}/metadata.csv not found — pass the folder of the COVID-19 image data collection "
                        "(github.com/ieee8023/covid-chestxray-dataset) with metadata.csv and images/")
    rows, seen = [], set()
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        meta = list(csv.DictReader(f, restval=""))
    for m in meta:
        cls, view = covid_class(m.get("finding", "")), m.get("view", "").split(" ")[0].upper()  # "AP Supine": AP
        rel = f"images/{m.get('filename')}"
        if cls is None or m.get("modality") != "X-ray" or view not in ("PA", "AP") or rel in seen:
            continue  # (a file listed twice is read once; one listed but missing is reported as unreadable)
        seen.add(rel)
        rows.append({"split": "train", "class": cls, "patient": f"covid/{m.get('patientid')}", "source": f"covid:{rel}",
                     "_rel": rel})
    if not rows:
        raise UserError(f"no X-ray PA/AP image of a known finding in {root}/metadata.csv — pass the collection's "
                        "folder, with its own metadata.csv and images/")
    return rows

# ---- Commands ----
def write_one(job):
    """Make one image and write it as PNG; returns the error of a source image that cannot be read."""
    png, make, args = job
    try:
        img = Image.fromarray(np.asarray(make(*args)))  # a preprocessed PIL image or a phantom's array
    except Exception as e:  # noqa: BLE001 -- one odd file (truncated, not an image) never stops the run
        return f"{type(e).__name__}: {e}".splitlines()[0]
    # Outside the try: a failed write (disk full, read-only) is no fault of this image; it stops the run.
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(png, lambda tmp: img.save(tmp, format="PNG"))

def write_images(out, source, settings, rows, make, workers):
    """Write one source into the DATA folder `out`, each row's PNG being make(*row['_job']). Returns
    the rows written and [(row, error)] for the source images that could not be read."""
    # Record the settings in prep.json and refuse other ones: one size per folder, and a new split
    # would leave the old split's PNGs where the scripts read them.
    out, path = Path(out), Path(out) / "prep.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    for name, old in record.items():
        if name != source and old["size"] != settings["size"]:
            raise UserError(f"{out} already holds {name} images at {old['size']} px — use --size {old['size']} "
                            f"to add {source} images to it, or another --out")
    old = record.get(source, settings)
    if diff := ", ".join(f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted({*old, *settings})
                         if old.get(k) != settings.get(k)):
        raise UserError(f"{out} already holds {source} images made with other settings ({diff}) — use another "
                        "--out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps({**record, source: settings}, indent=2)))
    for tmp in out.glob("*/*/*.png.tmp"):  # left by a run that was killed outright
        tmp.unlink()
    # Convert what an earlier run has not done (a PNG appears only when complete).
    todo = [r for r in rows if not (out / r["path"]).exists()]
    if len(todo) < len(rows):
        print(f"  {len(rows) - len(todo):,} images already done by an earlier run, {len(todo):,} to convert")
    errors = run_jobs(write_one, [(str(out / r["path"]), make, r["_job"]) for r in todo], workers)
    failed = [(r, e) for r, e in zip(todo, errors) if e]
    bad = {r["path"] for r, _ in failed}
    good = [r for r in rows if r["path"] not in bad]
    # This source's rows replace its old ones in the manifest; other sources' rows stay.
    manifest = [r for r in read_manifest(out) if r["source"].split(":")[0] != source] + good
    text = io.StringIO()
    writer = csv.DictWriter(text, MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(manifest, key=lambda r: r["path"]))
    write_atomic(out / "manifest.csv", lambda tmp: Path(tmp).write_text(text.getvalue()))
    return good, failed

def prep_real(args):
    """kermany or covid: read the labels, draw the patient split, convert, report."""
    if args.command == "kermany":
        rows = kermany_rows(args.path)
        split_by_patient([r for r in rows if r["split"] == "train"], args.val_frac, args.seed, "val")
        split = {"val_frac": args.val_frac}
    else:
        rows = covid_rows(Path(args.path))
        split_by_patient(rows, args.test_frac, args.seed, "test")
        split = {"test_frac": args.test_frac}
    names = collections.Counter()
    for r in rows:  # x.jpg and x.png, or train/x and val/x, would both be x.png: number the second
        stem = f"{r['split']}/{r['class']}/{Path(r['_rel']).stem}"
        names[stem] += 1
        r["path"] = f"{stem}.png" if names[stem] == 1 else f"{stem}_{names[stem]}.png"
        r["_job"] = (str(args.path), r["_rel"], args.size, args.crop, args.fit, args.zscore)
    settings = {"size": args.size, "crop": args.crop, "fit": args.fit, "zscore": args.zscore, **split, "seed": args.seed}
    good, failed = write_images(args.out, args.command, settings, rows, load, args.workers)
    print(table(good, f"{args.command}: {len(good):,} images written to {args.out}"))
    for r, error in failed:
        print(f"  skipped unreadable {r['_rel']}: {error}")
    if failed:
        print(f"  {len(failed)} unreadable (listed above)")
    leaks = [f"{p} in {'+'.join(s)}" for p, s in patient_leaks(good).items()]
    print(f"  WARNING: patient ids in more than one split: {len(leaks):,} ({', '.join(leaks[:5])}"
          f"{', ...' if len(leaks) > 5 else ''})" if leaks else "  patient check: no patient appears in two splits")
    return 0

def make_synthetic(out, n=200, size=128, seed=0, workers=1):
    """Write the phantom set into `out`: n images per class in train and n/4 in test, two per
    patient, plus the manifest; returns the manifest rows. The seeds are a function of (seed,
    class, split, patient, image) alone, so the set is the same whatever the number of workers."""
    rows = []
    for ci, cls in enumerate(SYNTHETIC_CLASSES):
        for si, (split, k) in enumerate((("train", n), ("test", max(1, round(n * SYNTH_TEST_FRACTION))))):
            for i in range(k):
                patient = i // SYNTH_IMAGES_PER_PATIENT
                rows.append({"path": f"{split}/{cls}/{cls}_{split}_{i:05d}.png", "split": split, "class": cls,
                             "patient": f"synthetic/{cls}/{split}{patient:05d}", "source": f"synthetic:seed{seed}",
                             "_job": (cls, size, (seed, ci, si, patient), (seed, ci, si, patient, i))})
    good, failed = write_images(out, "synthetic", {"size": size, "n": n, "seed": seed}, rows, synthetic_xray, workers)
    if failed:
        raise RuntimeError(f"drawing a phantom failed: {failed[0][1]}")
    return good

def prep_synthetic(args):
    rows = make_synthetic(args.out, args.n, args.size, args.seed, args.workers)
    print(table(rows, f"synthetic: {len(rows):,} phantom images written to {args.out}"))
    return 0

def prep_check(args):
    """Counts, sizes and modes; broken PNGs; the same pixels twice (a leak across splits); patients
    in two splits; manifest rows vs files. Returns 1 when something would spoil an experiment."""
    data = Path(args.data)
    files = sorted(p.relative_to(data).as_posix() for s in SPLITS for p in (data / s).glob("*/*.png"))
    if not files:
        raise UserError(f"no images in {data}/{{train,test}}/<class>/*.png — make them with `python prep.py "
                        "kermany PATH` or `python prep.py synthetic`")
    same, problems = collections.defaultdict(list), []  # (mode, size, pixel hash) -> files
    for rel in files:
        try:
            with Image.open(data / rel) as img:
                same[img.mode, img.size, hashlib.sha1(img.tobytes()).hexdigest()].append(rel)
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds for a broken file
            problems.append(f"BROKEN {rel}: {type(e).__name__}: {e}".splitlines()[0])
    dups = [v for v in same.values() if len(v) > 1]
    within = [v for v in dups if len({rel.split("/")[0] for rel in v}) == 1]
    manifest = read_manifest(data)
    problems += [f"LEAK (same pixels in two splits): {' = '.join(v)}" for v in dups if v not in within]
    problems += [f"LEAK patient {p} in {' and '.join(s)}" for p, s in patient_leaks(manifest).items()]
    print(table([dict(zip(("split", "class"), rel.split("/"))) for v in same.values() for rel in v],
                f"{data}: {len(files):,} images"))
    kinds = collections.Counter(f"{w}x{h} {mode}" for (mode, (w, h), _), v in same.items() for _ in v)
    print("  size and mode: " + ", ".join(f"{kind} ({k:,})" for kind, k in kinds.most_common()))
    listed = {r["path"] for r in manifest}
    print(f"  manifest: {len({r['patient'] for r in manifest}):,} patients, {len(listed - set(files))} rows "
          f"without a file, {len(set(files) - listed)} files without a row" if manifest else
          "  no manifest.csv: the patient check needs it (prep.py writes one)")
    for line in (problems + [f"duplicate within a split: {' = '.join(v)}" for v in within])[:30]:
        print(f"  {line}")
    print(f"check failed: {len(problems)} problems (broken files or leaks)" if problems else "check passed")
    return 1 if problems else 0

def main(argv=None):
    p = Parser(prog="prep.py", description="Chest X-ray datasets in one layout (see the docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    kw = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    k = sub.add_parser("kermany", help="the Kermany / Kaggle chest-xray-pneumonia set", **kw)
    k.add_argument("path", help="the extracted folder (any level above train/) or the .zip")
    k.add_argument("--val-frac", type=in_range(float, 0, 1), default=0.0, help="share of the train patients moved to val/")
    c = sub.add_parser("covid", help="the COVID-19 image data collection", **kw)
    c.add_argument("path", help="the folder with metadata.csv and images/")
    c.add_argument("--test-frac", type=in_range(float, 0, 1), default=0.2, help="share of the patients in test/")
    s = sub.add_parser("synthetic", help="phantom X-rays drawn here (no download)", **kw)
    s.add_argument("--n", type=in_range(int, 1), default=200, help="train images per class (test gets n/4)")
    for q, out, size in ((k, "data", 256), (c, "data", 256), (s, "data/synthetic", 128)):
        q.add_argument("--out", default=out, help="the DATA folder to write into")
        q.add_argument("--size", type=in_range(int, 8), default=size, help="side of the square PNGs in pixels")
        q.add_argument("--seed", type=in_range(int, 0), default=0, help="seed of the patient draw (synthetic: of the set)")
        q.add_argument("--workers", type=in_range(int, 1), default=min(8, os.cpu_count() or 1), help="worker processes")
    for q in (k, c):
        q.add_argument("--crop", action="store_true", help="crop to the torso (largest bright region) first")
        q.add_argument("--fit", choices=("crop", "pad"), default="crop", help="square by crop or black bands")
        q.add_argument("--zscore", action="store_true", help="each image to mean 128, std 32 (a z-score in 8 bits)")
    sub.add_parser("check", help="counts, sizes, broken files, duplicates, patient leaks", **kw).add_argument(
        "data", help="a folder prep.py wrote")
    args = p.parse_args(argv)
    try:
        sys.exit({"synthetic": prep_synthetic, "check": prep_check}.get(args.command, prep_real)(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # the disk or a folder, not one image (those are listed and skipped)
        print(f"error: cannot read or write {e.filename or 'a file'}: {e.strerror or e} — free some disk space "
              "or pick another --out, then run the same command again (finished images are kept)", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    sys.exit(2)


if __name__ == "__main__":
    main()
