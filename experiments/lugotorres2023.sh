#!/usr/bin/env bash
# Lugo-Torres et al., "Synthetic Generation of Pneumonia Images using CycleGAN Model": CycleGANs from
# normal into general (GP; here bacterial + viral), bacterial (BP) and viral (VP) pneumonia, their objective
# (two adversarial terms + lambda * cycle; no identity term, though their notebook adds one of weight 5),
# 100 epochs, 1,341 fakes per set scored with FID and IS every 25 epochs (Table I). Here all normal training
# X-rays are translated and scored against the real target images; IS uses ImageNet classes; FID needs the
# real pt_inception weights (FID_WEIGHTS).
source "$(dirname "$0")/common.sh"
case $SCALE in
  toy)   RUN="--max-steps 2 --size 32 --ngf 8 --ndf 8"; S=64; EVAL=2; DSTS=pneumonia ;;
  cpu)   RUN="--max-steps 2000 --size 64 --ngf 32 --ndf 32"; S=128; EVAL=1000; DSTS="pneumonia bacterial viral" ;;
  paper) RUN="--epochs 100 --decay-epochs 0 --size 256"; S=286; EVAL=epochs; DSTS="pneumonia bacterial viral" ;;
esac
prepare $S
for dst in $DSTS; do
  if [ "$EVAL" = epochs ]; then  # every 25 epochs; an epoch is max(|src|, |dst|) steps at batch 1
    n=$(ls "$OUT/data$S/train/normal" | wc -l); m=$(cat <(ls "$OUT/data$S/train/bacterial") <(ls "$OUT/data$S/train/viral") | wc -l)
    [ $dst != pneumonia ] && m=$(ls "$OUT/data$S/train/$dst" | wc -l)
    EVERY=$(( 25 * (n > m ? n : m) ))
  else EVERY=$EVAL; fi
  python cyclegan.py --src normal --dst $dst --data "$OUT/data$S/train" --out "$OUT/cyclegan_$dst" --lambda-idt 0 \
    --eval-every $EVERY --eval-src train $FID $RUN --sample-every $EVERY --log-every 100 > "$OUT/train_$dst.log"
  echo "normal -> $dst: step, FID, IS, KID, N (metrics.csv)"
  python -c "import csv, sys; [print(f\"{r['step']:>8} {float(r['fid']):8.2f} {float(r['is_mean']):6.3f} \
{float(r['kid_mean']):7.4f}  {r['n_fake']} vs {r['n_real']}\") for r in csv.DictReader(open(sys.argv[1]))]" \
    "$OUT/cyclegan_$dst/metrics.csv"
done
echo "paper, Table I, FID (IS) at epochs 25 / 50 / 75 / 100:"
echo "  GP 64.63 (1.80) / 93.10 (1.82) / 106.58 (1.86) / 86.58 (2.35)"
echo "  BP 68.92 (2.12) / 64.54 (1.97) / 78.45 (1.82) / 67.40 (1.30)"
echo "  VP 54.47 (2.21) / 63.96 (2.25) / 77.95 (2.49) / 60.96 (2.51)"
