#!/bin/sh
# The shipped SmolLM2 drafter's recipe, in resumable stretches: each stretch trains up to STRETCH more steps,
# evaluates on the 40 held-out GSM8K answers (train/eval.jsonl), exports the bf16 drafter (drafter/) and redraws
# curve.png. Rerun after an interrupt: it resumes from train/checkpoint.json (or, in a fresh clone where only the
# committed export survives, add --init drafters/smollm2-135m/drafter to fine-tune on from it).
set -e
STRETCH=${STRETCH:-500}
while :; do
  ddtree-mlx train-drafter --prompts drafters/smollm2-135m/train_prompts.jsonl --out drafters/smollm2-135m \
      --max-prompts 1248 --eval-prompts ddtree_mlx/prompts/gsm8k_heldout.jsonl --eval-count 40 \
      --block-size 8 --layers 2 --taps 5 --mask-token-id 16 --epochs 12 --anchors 64 --accumulate 4 \
      --vocab data --max-steps "$STRETCH" "$@"
  python -c "import json,sys; s=json.load(open('drafters/smollm2-135m/train/checkpoint.json')); \
sys.exit(0 if s['step'] < s['total_steps'] else 1)" || break
done
