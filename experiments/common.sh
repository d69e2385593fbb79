# Sourced by every experiment script: the scale, the data and the output folder.
#   SCALE=toy    phantoms (prep.py synthetic), a few steps: seconds; checks that the pipeline runs
#   SCALE=cpu    the real data at 64 px, budgets for 30-60 minutes on 2 CPU cores at the speeds measured there
#                (64 px: DCGAN 1.2 s/step, AC-GAN 1.9 s/step, CycleGAN --ngf 32 --ndf 32 0.55 s/step)
#   SCALE=paper  the paper's size, epochs and batch size where it states them (else ours): a GPU job
#   KERMANY      the Kaggle chest-xray-pneumonia zip or its chest_xray folder (cpu, paper)
#   FID_WEIGHTS  a local pt_inception-2015-12-05 weights file (else metrics.py downloads it)
#   OUT          where everything goes (default runs/experiments/<script>)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-toy}
NAME=$(basename "$0" .sh)
OUT=${OUT:-runs/experiments/$NAME}
case $SCALE in toy|cpu|paper) ;; *) echo "error: SCALE=$SCALE — use toy, cpu or paper" >&2; exit 2;; esac
if [ "$SCALE" != toy ] && [ -z "${KERMANY:-}" ]; then
  echo "error: SCALE=$SCALE needs the Kermany set — set KERMANY=PATH (the Kaggle zip or chest_xray folder)" >&2; exit 2
fi
mkdir -p "$OUT"
echo "$NAME at SCALE=$SCALE into $OUT"
if [ "$SCALE" = toy ] && [ -z "${FID_WEIGHTS:-}" ]; then  # offline: random Inception weights, numbers meaningless
  FID_WEIGHTS="$OUT/random_inception.pth"
  python -c "import sys, torch, metrics; torch.save(metrics.FIDInceptionV3().state_dict(), sys.argv[1])" "$FID_WEIGHTS"
fi
FID=${FID_WEIGHTS:+--fid-weights $FID_WEIGHTS}
WEIGHTS=${FID_WEIGHTS:+--weights $FID_WEIGHTS}
# prepare SIZE: the Kermany set (or phantoms at SCALE=toy) at SIZE px into $OUT/data$SIZE, once
prepare() {
  if [ "$SCALE" = toy ]; then python prep.py synthetic --out "$OUT/data$1" --n 8 --size "$1" --workers 1 >/dev/null
  else python prep.py kermany "$KERMANY" --out "$OUT/data$1" --size "$1" "${@:2}" >/dev/null; fi
}
