#!/usr/bin/env bash
# Noori, "Generating Medical Chest X-Ray Images using Generative Adversarial Network", IJISAE 2024: a 64x64
# DCGAN (Sec. 6), z normal (Sec. 6.1), Adam "Beta" 0.55, batch 50 (Table 1; lr 0.0002 as Sec. 7, Table 1 says
# 0.002), judged by its loss curves (Fig. 7). Its log line (Sec. 7): Loss_D 1.2223, Loss_G 2.1597, D(x) 0.6463,
# D(G(z)) 0.0906 / 0.3155. Data: Kermany (Sec. 4), class unnamed (Sec. 6: "regular x-ray images", Sec. 8:
# "an underrepresented class"); we take normal, the "regular" X-rays.
source "$(dirname "$0")/common.sh"
case $SCALE in
  toy)   RUN="--max-steps 2 --batch-size 4 --size 32"; S=32; N=8 ;;
  cpu)   RUN="--max-steps 800 --batch-size 50"; S=64; N=500 ;;
  paper) RUN="--epochs 500 --batch-size 50"; S=64; N=2048 ;;
esac
prepare $S
python dcgan.py --data "$OUT/data$S/train" --cls normal --out "$OUT/dcgan" --noise normal --beta1 0.55 --lr 0.0002 \
  --size $S $RUN --log-every 25 > "$OUT/train.log"
python dcgan.py --generate $N --ckpt "$OUT/dcgan/checkpoints/last.pt" --out "$OUT/fakes" >/dev/null
echo "last log lines (loss curve: $OUT/dcgan/loss_curve.png):"; grep '^\[' "$OUT/train.log" | tail -n 2
echo "paper: Loss_D 1.2223 Loss_G 2.1597 D(x) 0.6463 D(G(z)) 0.0906 / 0.3155"
python metrics.py kid "$OUT/data$S/test/normal" "$OUT/fakes" $WEIGHTS 2>/dev/null | tail -n 1
