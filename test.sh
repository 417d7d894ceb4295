#!/usr/bin/env bash
# The released zero-shot protocol (SPEC §7, §10): MVTec AD is evaluated with the prompts learned
# on VisA, every other dataset with the prompts learned on MVTec AD. Datasets whose folder or
# meta.json is missing are skipped with one line; the run ends with one summary table.
#
#   DATA_ROOT=./data CKPT_ROOT=./checkpoints bash test.sh
#   DATASETS="mvtec visa" EXTRA_ARGS="--device cpu" bash test.sh
set -euo pipefail
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT:-./data}
CKPT_ROOT=${CKPT_ROOT:-./checkpoints}
RESULTS_ROOT=${RESULTS_ROOT:-./results}
EXTRA_ARGS=${EXTRA_ARGS:-}
PYTHON=${PYTHON:-python3}
EPOCH=${EPOCH:-15}
RELEASED="--depth 9 --n_ctx 12 --t_n_ctx 4 --features_list 24 --image_size 518"

FROM_VISA="$CKPT_ROOT/9_12_4_multiscale/epoch_$EPOCH.pth"       # trained on VisA -> MVTec AD
FROM_MVTEC="$CKPT_ROOT/9_12_4_multiscale_visa/epoch_$EPOCH.pth" # trained on MVTec AD -> the rest

# dataset folder under DATA_ROOT, metric set, checkpoint
PROTOCOL=(
    "mvtec image-pixel-level $FROM_VISA"
    "visa image-pixel-level $FROM_MVTEC"
    "mpdd image-pixel-level $FROM_MVTEC"
    "btad image-pixel-level $FROM_MVTEC"
    "sdd image-pixel-level $FROM_MVTEC"
    "dagm image-pixel-level $FROM_MVTEC"
    "dtd image-pixel-level $FROM_MVTEC"
    "headct image-level $FROM_MVTEC"
    "brainmri image-level $FROM_MVTEC"
    "br35h image-level $FROM_MVTEC"
    "covid image-level $FROM_MVTEC"
    "isic pixel-level $FROM_MVTEC"
    "clinicdb pixel-level $FROM_MVTEC"
    "colondb pixel-level $FROM_MVTEC"
    "kvasir pixel-level $FROM_MVTEC"
    "endo pixel-level $FROM_MVTEC"
    "tn3k pixel-level $FROM_MVTEC"
)

ran=()
for entry in "${PROTOCOL[@]}"; do
    read -r dataset metric_set checkpoint <<<"$entry"
    if [[ -n "${DATASETS:-}" && " $DATASETS " != *" $dataset "* ]]; then
        continue
    fi
    data_path="$DATA_ROOT/$dataset"
    if [[ ! -f "$data_path/meta.json" ]]; then
        echo "skip $dataset: $data_path/meta.json not found (see README: Datasets)"
        continue
    fi
    if [[ ! -f "$checkpoint" ]]; then
        echo "skip $dataset: prompt checkpoint $checkpoint not found (see checkpoints/README.md)"
        continue
    fi
    # shellcheck disable=SC2086
    "$PYTHON" test.py --dataset "$dataset" --data_path "$data_path" --checkpoint_path "$checkpoint" \
        --save_path "$RESULTS_ROOT/$dataset" --metrics "$metric_set" $RELEASED $EXTRA_ARGS
    ran+=("$RESULTS_ROOT/$dataset")
done

"$PYTHON" tools/summarize.py results "${ran[@]+"${ran[@]}"}"
