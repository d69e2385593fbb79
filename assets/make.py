"""Remake the pictures the README shows (small PNGs, under 150 KB each).

    python assets/make.py study                       # study_page.png: the reader-study page in headless Chromium
    python assets/make.py shrink NAME SRC.png [SRC.png ...] [--rows R]   # NAME.png: sample grids (tests/
        evidence_real.py's grids/, a run's samples/) side by side, 10 px apart, the top R of 8 rows, gray, <= 150 KB

The study page is made from phantoms (prep.py synthetic), so it needs no data; it needs Debian's
chromium and chromium-driver and the selenium package (tests/requirements.txt).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ASSETS = Path(__file__).resolve().parent
REPO = ASSETS.parent


def study():
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = lambda *a: subprocess.run([sys.executable, *map(str, a)], cwd=REPO, check=True, capture_output=True)  # noqa: E731
        run("prep.py", "synthetic", "--out", tmp / "data", "--n", 40, "--size", 128)
        run("classify.py", "study", "make", "--real", tmp / "data/test", "--fake", tmp / "data/train",
            "--n", 100, "--seed", 1, "--out", tmp / "study")
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--window-size=900,760", f"--user-data-dir={tmp / 'profile'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
        try:
            driver.get((tmp / "study" / "study.html").as_uri())
            driver.find_element(By.ID, "reader").send_keys("AB")
            driver.find_element(By.ID, "go").click()
            body = driver.find_element(By.TAG_NAME, "body")
            for key in "s1r2s3r1s2":  # five images answered
                body.send_keys(key)
            body.send_keys("s")      # the sixth half answered: "Synthetic" lit, no class yet
            driver.save_screenshot(str(tmp / "page.png"))
        finally:
            driver.quit()
        Image.open(tmp / "page.png").convert("RGB").quantize(64).save(ASSETS / "study_page.png", optimize=True)
    print(f"wrote {ASSETS / 'study_page.png'} ({(ASSETS / 'study_page.png').stat().st_size // 1024} KB)")


def shrink(name, *srcs, rows=8, limit=150_000):
    """Gray copies of srcs (8 x 8 grids, top `rows` rows) side by side, scaled by 3/4 until under `limit` bytes."""
    parts = [(im := Image.open(s).convert("L")).crop((0, 0, im.width, 2 + (im.height - 2) * rows // 8)) for s in srcs]
    img = Image.new("L", (sum(p.width for p in parts) + 10 * (len(parts) - 1), max(p.height for p in parts)), 255)
    for i, p in enumerate(parts):
        img.paste(p, (sum(q.width + 10 for q in parts[:i]), 0))
    while True:
        img.save(ASSETS / f"{name}.png", optimize=True)
        if (ASSETS / f"{name}.png").stat().st_size <= limit:
            break
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS)
    print(f"wrote {ASSETS / name}.png ({img.width} x {img.height}, {(ASSETS / f'{name}.png').stat().st_size // 1024} KB)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["study", "shrink"])
    p.add_argument("args", nargs="*", help="shrink: NAME SRC.png [SRC.png ...]")
    p.add_argument("--rows", type=int, default=8, help="shrink: keep the top ROWS rows of each 8-row grid")
    a = p.parse_args()
    study() if a.what == "study" else shrink(*a.args, rows=a.rows)
