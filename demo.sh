#!/usr/bin/env bash
# Offline demo of the whole pipeline, no weights and no data needed (about a minute on 2 CPU cores):
#   1. two synthetic datasets: an auxiliary one (MVTec layout) and a different target (VisA layout);
#   2. a tiny RANDOM CLIP stand-in instead of ViT-L/14@336 (no download);
#   3. train.py learns prompts on the auxiliary set; 4. test.py evaluates zero-shot on the target.
# The numbers show that the pipeline works end to end, NOT what the real model scores.
#
#   bash demo.sh            # writes everything under ./demo_output
#   DEMO_OUT=/tmp/demo bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"

OUT=${DEMO_OUT:-./demo_output}
PYTHON=${PYTHON:-python3}
SIZE=112
DESIGN="--backbone $OUT/tiny_random_clip.pt --image_size $SIZE --features_list 6 12 18 24 --device cpu"

echo "== 1/4 synthetic datasets under $OUT/data"
"$PYTHON" synthetic_dataset.py --layout mvtec --root "$OUT/data/auxiliary" --seed 0 --size 128 --overwrite
"$PYTHON" synthetic_dataset.py --layout visa --root "$OUT/data/target" --seed 1 --size 128 --overwrite

echo "== 2/4 tiny random CLIP stand-in (not the real backbone)"
"$PYTHON" -m pipeline.random_weights --preset tiny --seed 0 --out "$OUT/tiny_random_clip.pt"

echo "== 3/4 train prompts on the auxiliary dataset"
rm -rf "$OUT/checkpoints"
# shellcheck disable=SC2086
"$PYTHON" train.py --dataset synthetic-mvtec --train_data_path "$OUT/data/auxiliary" --save_path "$OUT/checkpoints" \
    --epoch 5 --batch_size 8 --learning_rate 0.002 --num_workers 0 $DESIGN

echo "== 4/4 zero-shot evaluation on the target dataset"
rm -rf "$OUT/results"
# shellcheck disable=SC2086
"$PYTHON" test.py --dataset synthetic-visa --data_path "$OUT/data/target" --checkpoint_path "$OUT/checkpoints/epoch_5.pth" \
    --save_path "$OUT/results" --vis --num_workers 0 $DESIGN

echo
echo "Done. Results: $OUT/results/results.json, per-image scores: $OUT/results/scores.csv,"
echo "overlays: $OUT/results/imgs/. Backbone: a tiny RANDOM stand-in, so these numbers only show"
echo "that the pipeline runs; with ViT-L/14@336px and real data see README: Reference results."
