#!/usr/bin/env bash
# The released training protocol (SPEC §6, §9): prompts learned on MVTec AD's test split are
# used for every other dataset; prompts learned on VisA's test split are used for MVTec AD.
# The checkpoint folder names are the original's (the suffix names the evaluation target).
#
#   DATA_ROOT=./data CKPT_ROOT=./checkpoints bash train.sh
#   DATASETS=visa EXTRA_ARGS="--device cpu --num_workers 4" bash train.sh
#
# Relative paths (DATA_ROOT, CKPT_ROOT, PYTHON, paths in EXTRA_ARGS) are taken from the folder you
# run the script in; unset roots default to data/ and checkpoints/ of the clone. A dataset named in
# DATASETS (mvtec, visa) whose meta.json is missing makes the exit status non-zero.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

DATA_ROOT=${DATA_ROOT:-$HERE/data}
CKPT_ROOT=${CKPT_ROOT:-$HERE/checkpoints}
EXTRA_ARGS=${EXTRA_ARGS:-}
PYTHON=${PYTHON:-python3}
# Released hyper-parameters; lr 1e-3 and seed 111 are train.py's defaults.
RELEASED="--depth 9 --n_ctx 12 --t_n_ctx 4 --features_list 24 --image_size 518 --batch_size 8 --epoch 15"

for name in ${DATASETS:-}; do
    if [[ " mvtec visa " != *" $name "* ]]; then
        echo "error: DATASETS names $name; train.sh trains on mvtec and visa" >&2
        exit 2
    fi
done

ran=()
missing=()
train_on() {
    local dataset=$1 save_path=$2
    local data_path="$DATA_ROOT/$dataset"
    if [[ -n "${DATASETS:-}" && " $DATASETS " != *" $dataset "* ]]; then
        return 0
    fi
    if [[ ! -f "$data_path/meta.json" ]]; then
        echo "skip $dataset: $data_path/meta.json not found (download the dataset and run generate_dataset_json/$dataset.py --root $data_path)"
        if [[ -n "${DATASETS:-}" ]]; then missing+=("$dataset"); fi
        return 0
    fi
    # shellcheck disable=SC2086
    "$PYTHON" "$HERE/train.py" --dataset "$dataset" --train_data_path "$data_path" --save_path "$save_path" \
        $RELEASED $EXTRA_ARGS
    ran+=("$save_path")
}

train_on mvtec "$CKPT_ROOT/9_12_4_multiscale_visa"
train_on visa "$CKPT_ROOT/9_12_4_multiscale"

"$PYTHON" "$HERE/tools/summarize.py" train "${ran[@]+"${ran[@]}"}"
if (( ${#missing[@]} )); then
    echo "error: DATASETS asked for ${missing[*]}, which could not run (see the skip lines above)" >&2
    exit 1
fi
