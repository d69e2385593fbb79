#!/usr/bin/env bash
# Noori, "Generating Medical Chest X-Ray Images using GAN", IJISAE 2024: a 64x64 DCGAN with z ~ N(0, 1),
# Adam beta1 0.55, batch 50 (Table 1; lr 0.0002 as its text, the table says 0.002), judged by its loss
# curves. Its last log line: Loss_D 1.2223, Loss_G 2.1597, D(x) 0.6463, D(G(z)) 0.0906 / 0.3155.
# The paper trains on pneumonia X-rays without saying which; we take the bacterial class.
source "$(dirname "$0")/common.sh"
case $SCALE in
  toy)   RUN="--max-steps 2 --batch-size 4 --size 32"; S=32; N=8 ;;
  cpu)   RUN="--max-steps 800 --batch-size 50"; S=64; N=500 ;;
  paper) RUN="--epochs 500 --batch-size 50"; S=64; N=2048 ;;
esac
prepare $S
python dcgan.py --data "$OUT/data$S/train" --cls bacterial --out "$OUT/dcgan" --noise normal --beta1 0.55 --lr 0.0002 \
  --size $S $RUN --log-every 25 > "$OUT/train.log"
python dcgan.py --generate $N --ckpt "$OUT/dcgan/checkpoints/last.pt" --out "$OUT/fakes" >/dev/null
echo "last log lines (loss curve: $OUT/dcgan/loss_curve.png):"; grep '^\[' "$OUT/train.log" | tail -n 2
echo "paper: Loss_D 1.2223 Loss_G 2.1597 D(x) 0.6463 D(G(z)) 0.0906 / 0.3155"
python metrics.py kid "$OUT/data$S/test/bacterial" "$OUT/fakes" $WEIGHTS 2>/dev/null | tail -n 1
