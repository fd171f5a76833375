#!/bin/sh
# Rebuild the drafter shipped in ddtree_mlx/smollm2_drafter/ from the prompt files beside this script. Run it from
# anywhere; run it again after an interrupt and it continues where it stopped (README.md: phases, data, timings).
#
#   sh drafters/smollm2-135m/train.sh             # the final export lands in drafters/smollm2-135m/drafter/
#   SHIP=1 sh drafters/smollm2-135m/train.sh      # ... and is copied over the package's drafter as well
#
# Environment: RUN (work directory, default drafters/smollm2-135m/run: answers, ~8 GB of cached target hidden
# states, a checkpoint, log, eval and export per phase), DEST (where the final export is copied), STRETCH (steps
# between held-out evaluations and exports, default 500), SHIP=1 (also copy the export into the package). Relative
# paths are taken from the repository root.
#
# Phases, each from the previous phase's export (--init): math (12-epoch schedule, stopped at step 2,900 of 3,744),
# general (2 epochs), broad (2 epochs), wide (1 epoch, draft vocabulary capped at 10,000 tokens). Each phase's first
# run has SmolLM2 answer the prompts the earlier phases did not (greedy, up to 256 tokens; all phases share one
# answers file, so each prompt is answered once). Every stage of train-drafter resumes from what is on disk.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."  # the repository root: the benchmark prompt sets are read from benchmarks/prompts/
D=drafters/smollm2-135m
RUN=${RUN:-$D/run}
DEST=${DEST:-$D/drafter}
STRETCH=${STRETCH:-500}
EVAL="--eval-prompts benchmarks/prompts/gsm8k_heldout.jsonl $D/heldout_general.jsonl --eval-count 40"
SHAPE="--block-size 8 --layers 2 --taps 5 --mask-token-id 16 --anchors 64 --accumulate 4 --vocab data"
EXPORT="config.json model.safetensors draft_vocab.json"

# The requests SmolLM2 wrote itself are committed: with all 2,607 there this only checks the file. Without it, it
# writes them again (seeded batches; none sharing eight words in a row with a benchmark or held-out prompt).
ddtree-mlx write-prompts --out $D/written_prompts.jsonl --count 2600 --batch 32 \
    --exclude benchmarks/prompts/*.jsonl $D/heldout_general.jsonl

mkdir -p "$RUN/hidden"
cat $D/broad_prompts.jsonl $D/written_prompts.jsonl > "$RUN/wide_prompts.jsonl.tmp"
mv "$RUN/wide_prompts.jsonl.tmp" "$RUN/wide_prompts.jsonl"

progress() {  # "step total_steps" of a phase's checkpoint, "0 0" before its first one
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['step'], s['total_steps'])" \
      "$1/train/checkpoint.json" 2>/dev/null || echo "0 0"
}

link() { [ -L "$2" ] || [ -e "$2" ] || ln -s "$1" "$2"; }

# phase NAME STOP OPTIONS...: train in $RUN/NAME until step STOP (0: the end of its schedule) in stretches of
# STRETCH steps, each ending with a held-out evaluation and an export in $RUN/NAME/drafter; then mark it done.
phase() {
  name=$1 out=$RUN/$1 stop=$2
  shift 2
  [ -f "$out/done" ] && return 0
  mkdir -p "$out/train"
  link ../answers.jsonl "$out/answers.jsonl"  # one answers file and one hidden-state cache for all phases
  link ../eval_answers.jsonl "$out/eval_answers.jsonl"
  link ../../hidden "$out/train/hidden"
  while :; do
    s=$(progress "$out") && step=${s% *} total=${s#* }
    end=$stop && [ "$end" = 0 ] && end=$total  # before a first checkpoint: unknown, and unused
    steps=$STRETCH
    [ "$total" = 0 ] || [ $((end - step)) -ge "$STRETCH" ] || steps=$((end - step))  # 0: evaluate, export only
    echo "train.sh: phase $name from step $step: $steps steps" >&2
    ddtree-mlx train-drafter "$@" --out "$out" $EVAL $SHAPE --max-steps "$steps"
    s=$(progress "$out") && step=${s% *} total=${s#* }
    end=$stop && [ "$end" = 0 ] && end=$total
    [ "$step" -lt "$end" ] || break
  done
  touch "$out/done"
}

phase math 2900 --prompts $D/general_prompts.jsonl --max-prompts 1248 --epochs 12 --lr 6e-4
phase general 0 --prompts $D/general_prompts.jsonl --epochs 2 --lr 3e-4 --init "$RUN/math/drafter"
phase broad 0 --prompts $D/broad_prompts.jsonl --epochs 2 --lr 3e-4 --init "$RUN/general/drafter"
phase wide 0 --prompts "$RUN/wide_prompts.jsonl" --epochs 1 --lr 3e-4 --vocab-size 10000 --init "$RUN/broad/drafter"

mkdir -p "$DEST"
for f in $EXPORT; do cp "$RUN/wide/drafter/$f" "$DEST/"; done
[ "${SHIP:-0}" = 1 ] && for f in $EXPORT; do cp "$RUN/wide/drafter/$f" ddtree_mlx/smollm2_drafter/; done
echo "train.sh: the drafter is in $DEST$([ "${SHIP:-0}" = 1 ] && echo ' and ddtree_mlx/smollm2_drafter')" >&2
