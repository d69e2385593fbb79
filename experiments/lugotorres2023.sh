#!/usr/bin/env bash
# Lugo-Torres et al., "Synthetic Generation of Pneumonia Images using CycleGAN Model": CycleGANs from
# normal into general (GP: bacterial + viral), bacterial (BP) and viral (VP) pneumonia, objective Eq. 1
# (two adversarial terms + lambda * cycle, no identity term), 100 epochs; every 25 epochs all 1,341 normal
# training X-rays are translated and scored with FID and IS (Table I) against the real target images.
# IS here uses ImageNet classes, as theirs; FID needs the real pt_inception weights (FID_WEIGHTS).
source "$(dirname "$0")/common.sh"
case $SCALE in
  toy)   RUN="--max-steps 2 --size 32 --ngf 8 --ndf 8"; S=64; EVAL=2; DSTS=pneumonia ;;
  cpu)   RUN="--max-steps 3000 --size 64 --ngf 32 --ndf 32"; S=128; EVAL=1500; DSTS="pneumonia bacterial viral" ;;
  paper) RUN="--epochs 100 --decay-epochs 50 --size 256"; S=286; EVAL=33525; DSTS="pneumonia bacterial viral" ;;
esac
prepare $S
for dst in $DSTS; do  # 25 epochs of the 1,341 normal X-rays: 33,525 steps
  python cyclegan.py --src normal --dst $dst --data "$OUT/data$S/train" --out "$OUT/cyclegan_$dst" --lambda-idt 0 \
    --eval-every $EVAL --eval-src train $FID $RUN --sample-every $EVAL --log-every 100 > "$OUT/train_$dst.log"
  echo "normal -> $dst: step, FID, IS, KID, N (metrics.csv)"
  python -c "import csv, sys; [print(f\"{r['step']:>8} {float(r['fid']):8.2f} {float(r['is_mean']):6.3f} \
{float(r['kid_mean']):7.4f}  {r['n_fake']} vs {r['n_real']}\") for r in csv.DictReader(open(sys.argv[1]))]" \
    "$OUT/cyclegan_$dst/metrics.csv"
done
echo "paper, Table I, FID (IS) at epochs 25 / 50 / 75 / 100:"
echo "  GP 64.63 (1.80) / 93.10 (1.82) / 106.58 (1.86) / 86.58 (2.35)"
echo "  BP 68.92 (2.12) / 64.54 (1.97) / 78.45 (1.82) / 67.40 (1.30)"
echo "  VP 54.47 (2.21) / 63.96 (2.25) / 77.95 (2.49) / 60.96 (2.51)"
