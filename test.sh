#!/usr/bin/env bash
# The released zero-shot protocol (SPEC §7, §10): MVTec AD is evaluated with the prompts learned
# on VisA, every other dataset with the prompts learned on MVTec AD. Datasets whose folder or
# meta.json is missing are skipped with one line; the run ends with one summary table: each
# dataset and metric beside the paper's value, the difference in points, and the settings that
# differ from the released protocol (tools/summarize.py). A dataset named in DATASETS that was not
# run (missing data or checkpoint, unknown name) makes the exit status non-zero.
#
#   DATA_ROOT=./data CKPT_ROOT=./checkpoints RESULTS_ROOT=./results EPOCH=15 bash test.sh
#   DATASETS="mvtec visa" EXTRA_ARGS="--device cpu" bash test.sh
#   SEEDS="1 2 3" bash test.sh      # the prompts train.sh learned with each seed: mean and std per dataset
#   K_SHOT=4 SEEDS="1 2 3" bash test.sh  # few-shot: 4 reference images per class, drawn with each seed
#
# SEEDS without K_SHOT: training seeds; seed S evaluates CKPT_ROOT/seed_S/<checkpoint folder> (what
# SEEDS=... bash train.sh writes) into RESULTS_ROOT/seed_S/<dataset>. With K_SHOT=K (> 0): the
# prompts of CKPT_ROOT (for a seed-trained pair, CKPT_ROOT=checkpoints/seed_1), and SEEDS (default
# 111) are the seeds of the reference draw (test.py --k_shot K --seed S), into
# RESULTS_ROOT/kK_seed_S/<dataset>. In both, a plain run's RESULTS_ROOT/<dataset> (the released
# checkpoints' when they are in CKPT_ROOT) stands beside the mean as "base" when it is there.
# The summary also goes to RESULTS_ROOT/summary.json (summary_seeds.json, summary_kK.json), and,
# with --report in EXTRA_ARGS, to summary.html beside it. PAPER=released_log compares with the
# released logs' MVTec AD and VisA numbers instead of the paper's.
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
SEEDS=${SEEDS:-}
K_SHOT=${K_SHOT:-0}
PAPER=${PAPER:-paper}
RELEASED="--depth 9 --n_ctx 12 --t_n_ctx 4 --features_list 24 --image_size 518"

FROM_VISA=9_12_4_multiscale        # prompts trained on VisA -> MVTec AD
FROM_MVTEC=9_12_4_multiscale_visa  # prompts trained on MVTec AD -> the rest

# dataset folder under DATA_ROOT, metric set, checkpoint folder under CKPT_ROOT
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

if [[ ! "$K_SHOT" =~ ^[0-9]+$ ]]; then
    echo "error: K_SHOT=$K_SHOT must be a whole number of reference images per class (0: zero-shot)" >&2
    exit 2
fi
for seed in $SEEDS; do
    if [[ ! "$seed" =~ ^[0-9]+$ ]]; then
        echo "error: SEEDS holds $seed, not a whole number; give seeds like SEEDS=\"1 2 3\"" >&2
        exit 2
    fi
done
if [[ "$PAPER" != paper && "$PAPER" != released_log ]]; then
    echo "error: PAPER=$PAPER: choose paper or released_log" >&2
    exit 2
fi
# Each run: "seed|checkpoint root|results root" (seed "-": test.py's default, no --seed passed).
K_SHOT=$((10#$K_SHOT))
runs=()
if (( K_SHOT > 0 )); then
    for seed in ${SEEDS:-111}; do runs+=("$seed|$CKPT_ROOT|$RESULTS_ROOT/k${K_SHOT}_seed_$seed"); done
    summary_name="summary_k$K_SHOT"
elif [[ -n "${SEEDS// /}" ]]; then
    for seed in $SEEDS; do runs+=("$seed|$CKPT_ROOT/seed_$seed|$RESULTS_ROOT/seed_$seed"); done
    summary_name="summary_seeds"
else
    runs+=("-|$CKPT_ROOT|$RESULTS_ROOT")
    summary_name="summary"
fi

known=" "
for entry in "${PROTOCOL[@]}"; do known+="${entry%% *} "; done
for name in ${DATASETS:-}; do
    if [[ "$known" != *" $name "* ]]; then
        echo "error: DATASETS names $name, not a dataset of the protocol (one of:$known)" >&2
        exit 2
    fi
done

ran=()
base=()
missing=()
skip() {  # one line; a dataset asked for by name that is skipped fails the run at the end
    echo "skip $1: $2"
    if [[ -n "${DATASETS:-}" && " ${missing[*]-} " != *" $1 "* ]]; then missing+=("$1"); fi
}
for run in "${runs[@]}"; do
    IFS='|' read -r seed ckpt_root results_root <<<"$run"
    seed_args=()
    if (( K_SHOT > 0 )); then seed_args=(--k_shot "$K_SHOT"); fi
    if [[ "$seed" != - ]]; then seed_args+=(--seed "$seed"); fi
    hint=""
    if [[ "$seed" != - ]] && (( K_SHOT == 0 )); then hint="; SEEDS=\"$SEEDS\" bash train.sh trains it"; fi
    for entry in "${PROTOCOL[@]}"; do
        read -r dataset metric_set folder <<<"$entry"
        if [[ -n "${DATASETS:-}" && " $DATASETS " != *" $dataset "* ]]; then
            continue
        fi
        data_path="$DATA_ROOT/$dataset"
        checkpoint="$ckpt_root/$folder/epoch_$EPOCH.pth"
        if [[ ! -f "$data_path/meta.json" ]]; then
            skip "$dataset" "$data_path/meta.json not found (see README: Datasets)"
            continue
        fi
        if [[ ! -f "$checkpoint" ]]; then
            skip "$dataset" "prompt checkpoint $checkpoint not found (see checkpoints/README.md$hint)"
            continue
        fi
        # shellcheck disable=SC2086
        "$PYTHON" "$HERE/test.py" --dataset "$dataset" --data_path "$data_path" --checkpoint_path "$checkpoint" \
            --save_path "$results_root/$dataset" --metrics "$metric_set" $RELEASED \
            ${seed_args[@]+"${seed_args[@]}"} $EXTRA_ARGS
        ran+=("$results_root/$dataset")
        if [[ "$results_root" != "$RESULTS_ROOT" && -f "$RESULTS_ROOT/$dataset/results.json" \
              && " ${base[*]-} " != *" $RESULTS_ROOT/$dataset "* ]]; then
            base+=(--base "$RESULTS_ROOT/$dataset")
        fi
    done
done

report=()
if [[ " $EXTRA_ARGS " == *" --report "* ]]; then report=(--report "$RESULTS_ROOT/$summary_name.html"); fi
"$PYTHON" "$HERE/tools/summarize.py" results --paper "$PAPER" --json "$RESULTS_ROOT/$summary_name.json" \
    "${report[@]+"${report[@]}"}" "${base[@]+"${base[@]}"}" "${ran[@]+"${ran[@]}"}"
if (( ${#missing[@]} )); then
    echo "error: DATASETS asked for ${missing[*]}, which could not run (see the skip lines above)" >&2
    exit 1
fi
