#!/usr/bin/env bash
# The released zero-shot protocol (SPEC §7, §10): MVTec AD is evaluated with the prompts learned
# on VisA, every other dataset with the prompts learned on MVTec AD. Datasets whose folder or
# meta.json is missing are skipped with one line; the run ends with one summary table. A dataset
# named in DATASETS that was not run (missing data or checkpoint, unknown name) makes the exit
# status non-zero.
#
#   DATA_ROOT=./data CKPT_ROOT=./checkpoints RESULTS_ROOT=./results EPOCH=15 bash test.sh
#   DATASETS="mvtec visa" EXTRA_ARGS="--device cpu" bash test.sh
#
# Relative paths (DATA_ROOT, CKPT_ROOT, RESULTS_ROOT, PYTHON, paths in EXTRA_ARGS) are taken from
# the folder you run the script in; unset roots default to data/, checkpoints/ and results/ of the clone.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

DATA_ROOT=${DATA_ROOT:-$HERE/data}
CKPT_ROOT=${CKPT_ROOT:-$HERE/checkpoints}
RESULTS_ROOT=${RESULTS_ROOT:-$HERE/results}
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

known=" "
for entry in "${PROTOCOL[@]}"; do known+="${entry%% *} "; done
for name in ${DATASETS:-}; do
    if [[ "$known" != *" $name "* ]]; then
        echo "error: DATASETS names $name, not a dataset of the protocol (one of:$known)" >&2
        exit 2
    fi
done

ran=()
missing=()
skip() {  # one line; a dataset asked for by name that is skipped fails the run at the end
    echo "skip $1: $2"
    if [[ -n "${DATASETS:-}" ]]; then missing+=("$1"); fi
}
for entry in "${PROTOCOL[@]}"; do
    read -r dataset metric_set checkpoint <<<"$entry"
    if [[ -n "${DATASETS:-}" && " $DATASETS " != *" $dataset "* ]]; then
        continue
    fi
    data_path="$DATA_ROOT/$dataset"
    if [[ ! -f "$data_path/meta.json" ]]; then
        skip "$dataset" "$data_path/meta.json not found (see README: Datasets)"
        continue
    fi
    if [[ ! -f "$checkpoint" ]]; then
        skip "$dataset" "prompt checkpoint $checkpoint not found (see checkpoints/README.md)"
        continue
    fi
    # shellcheck disable=SC2086
    "$PYTHON" "$HERE/test.py" --dataset "$dataset" --data_path "$data_path" --checkpoint_path "$checkpoint" \
        --save_path "$RESULTS_ROOT/$dataset" --metrics "$metric_set" $RELEASED $EXTRA_ARGS
    ran+=("$RESULTS_ROOT/$dataset")
done

"$PYTHON" "$HERE/tools/summarize.py" results "${ran[@]+"${ran[@]}"}"
if (( ${#missing[@]} )); then
    echo "error: DATASETS asked for ${missing[*]}, which could not run (see the skip lines above)" >&2
    exit 1
fi
