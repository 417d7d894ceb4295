#!/usr/bin/env bash
# The released training protocol (SPEC §6, §9): prompts learned on MVTec AD's test split are
# used for every other dataset; prompts learned on VisA's test split are used for MVTec AD.
# The checkpoint folder names are the original's (the suffix names the evaluation target).
#
#   DATA_ROOT=./data CKPT_ROOT=./checkpoints bash train.sh
#   DATASETS=visa EXTRA_ARGS="--device cpu --num_workers 4" bash train.sh
#   SEEDS="1 2 3" bash train.sh   # the released protocol once per seed (train.py --seed S), into
#                                 # CKPT_ROOT/seed_S/<the folders above>; SEEDS="1 2 3" bash test.sh evaluates them
#
# With SEEDS, each training dataset's frozen image features are cached once, kept on disk in
# CKPT_ROOT/feature_cache/<dataset> (train.py --keep_cache --cache_dir) and reused by every seed, so a
# second seed runs no image forward, only the prompt steps. The cache stays for later seeds (7.2 GiB for MVTec AD, 9.0 GiB for VisA at the released 518 px and
# features 24; see README: Training from cached features); delete the folder when done. Not with
# --no_cache or --cache_dir in EXTRA_ARGS (then those apply).
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
SEEDS=${SEEDS:-}
# Released hyper-parameters; lr 1e-3 and seed 111 are train.py's defaults.
RELEASED="--depth 9 --n_ctx 12 --t_n_ctx 4 --features_list 24 --image_size 518 --batch_size 8 --epoch 15"

for name in ${DATASETS:-}; do
    if [[ " mvtec visa " != *" $name "* ]]; then
        echo "error: DATASETS names $name; train.sh trains on mvtec and visa" >&2
        exit 2
    fi
done

for seed in $SEEDS; do
    if [[ ! "$seed" =~ ^[0-9]+$ ]]; then
        echo "error: SEEDS holds $seed, not a whole number; give seeds like SEEDS=\"1 2 3\"" >&2
        exit 2
    fi
done

ran=()
missing=()
cached=()
train_on() {  # dataset, save path, then more train.py flags
    local dataset=$1 save_path=$2
    shift 2
    local data_path="$DATA_ROOT/$dataset"
    if [[ -n "${DATASETS:-}" && " $DATASETS " != *" $dataset "* ]]; then
        return 0
    fi
    if [[ ! -f "$data_path/meta.json" ]]; then
        echo "skip $dataset: $data_path/meta.json not found (download the dataset and run generate_dataset_json/$dataset.py --root $data_path)"
        if [[ -n "${DATASETS:-}" && " ${missing[*]-} " != *" $dataset "* ]]; then missing+=("$dataset"); fi
        return 0
    fi
    # shellcheck disable=SC2086
    "$PYTHON" "$HERE/train.py" --dataset "$dataset" --train_data_path "$data_path" --save_path "$save_path" \
        $RELEASED "$@" $EXTRA_ARGS
    ran+=("$save_path")
}

if [[ -z "${SEEDS// /}" ]]; then
    train_on mvtec "$CKPT_ROOT/9_12_4_multiscale_visa"
    train_on visa "$CKPT_ROOT/9_12_4_multiscale"
else
    own_cache=1
    if [[ " $EXTRA_ARGS " == *" --no_cache "* || " $EXTRA_ARGS " == *" --cache_dir"* ]]; then own_cache=0; fi
    for seed in $SEEDS; do
        for pair in "mvtec|9_12_4_multiscale_visa" "visa|9_12_4_multiscale"; do
            IFS='|' read -r dataset folder <<<"$pair"
            cache_args=()
            if (( own_cache )); then
                cache_args=(--keep_cache --cache_dir "$CKPT_ROOT/feature_cache/$dataset")
            fi
            before=${#ran[@]}
            train_on "$dataset" "$CKPT_ROOT/seed_$seed/$folder" --seed "$seed" ${cache_args[@]+"${cache_args[@]}"}
            if (( own_cache && ${#ran[@]} > before )) && [[ " ${cached[*]-} " != *" $dataset "* ]]; then
                cached+=("$dataset")
            fi
        done
    done
    for dataset in ${cached[@]+"${cached[@]}"}; do
        echo "feature cache of $dataset kept for later seeds in $CKPT_ROOT/feature_cache/$dataset (delete it when done)"
    done
fi

"$PYTHON" "$HERE/tools/summarize.py" train "${ran[@]+"${ran[@]}"}"
if (( ${#missing[@]} )); then
    echo "error: DATASETS asked for ${missing[*]}, which could not run (see the skip lines above)" >&2
    exit 1
fi
