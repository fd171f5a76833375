#!/bin/sh
# The SmolLM2 drafter's recipe (the shipped one: phases math, general, broad, then wide), each phase in resumable
# stretches: a stretch trains up to STRETCH more steps, evaluates on the 40 held-out GSM8K answers and the 24 held-out
# code and chat answers (train/eval.jsonl, a row per set), exports the bf16 drafter (drafter/; with SHIP=1 also copied
# to ddtree_mlx/smollm2_drafter/, the one the package ships, which a phase should earn in the engine first) and
# redraws curve.png. Rerun after an interrupt: it resumes from train/checkpoint.json.
#
#   PHASE=math    (done: its logs are in math/) 12 epochs from scratch over the 1,248 GSM8K answers, stopped at
#                 step 2,900 of 3,744 once held-out acceptance had flattened;
#   PHASE=general (done: logs in general/) from the math phase's export: 2 epochs over those answers plus the 502
#                 written instructions' (general_prompts.jsonl: code, explanations, writing, advice), lr 3e-4;
#   PHASE=broad   (done: logs in broad/) from the general phase's export: 2 epochs over
#                 broad_prompts.jsonl (500 of the GSM8K answers, the 502 instructions, 430 standard-library stubs and
#                 296 more instructions), lr 3e-4;
#   PHASE=self    (done: logs in self/; not shipped) from the broad export: 1 epoch over self_prompts.jsonl
#                 (broad_prompts.jsonl plus the first 1,220 requests SmolLM2 wrote itself), lr 3e-4 (737 steps);
#   PHASE=wide    (default; done: logs in wide/, the shipped export) from the broad export: 1 epoch over
#                 wide_prompts.jsonl (broad_prompts.jsonl plus all 2,607 written requests), lr 3e-4, the draft
#                 vocabulary capped at the 10,000 most frequent answer tokens (the uncapped one grew 40% with the
#                 written requests, and a draft's head with it).
set -e
STRETCH=${STRETCH:-500}
PHASE=${PHASE:-wide}
if [ "$PHASE" = math ]; then
  DATA="--prompts drafters/smollm2-135m/train_prompts.jsonl --max-prompts 1248 --epochs 12"
else
  EPOCHS=2
  case "$PHASE" in self|wide) EPOCHS=1;; esac
  DATA="--prompts drafters/smollm2-135m/${PHASE}_prompts.jsonl --epochs $EPOCHS --lr 3e-4"
  [ "$PHASE" = wide ] && DATA="$DATA --vocab-size 10000"
  [ -f drafters/smollm2-135m/train/checkpoint.json ] || DATA="$DATA --init ddtree_mlx/smollm2_drafter"
fi
while :; do
  ddtree-mlx train-drafter $DATA --out drafters/smollm2-135m \
      --eval-prompts ddtree_mlx/prompts/gsm8k_heldout.jsonl drafters/smollm2-135m/heldout_general.jsonl \
      --eval-count 40 \
      --block-size 8 --layers 2 --taps 5 --mask-token-id 16 --anchors 64 --accumulate 4 \
      --vocab data --max-steps "$STRETCH" "$@"
  [ "${SHIP:-0}" = 1 ] && cp drafters/smollm2-135m/drafter/config.json drafters/smollm2-135m/drafter/model.safetensors \
     drafters/smollm2-135m/drafter/draft_vocab.json ddtree_mlx/smollm2_drafter/
  python -c "import json,sys; s=json.load(open('drafters/smollm2-135m/train/checkpoint.json')); \
sys.exit(0 if s['step'] < s['total_steps'] else 1)" || break
done
