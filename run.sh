#!/usr/bin/env bash
# The pipeline of the guide on the embedded default world, then the report card (out/report.md).
#
#   bash run.sh              the main job: every stage once at its default, and what the report card's
#                            headline needs (budget: 20 minutes on 2 CPU cores; docs/pipeline.md has
#                            each stage's time)
#   bash run.sh --sweep      also the sweeps: DPO beta 0.05 0.5 1 2 5, the KL coefficient 0.02 0.05 0.2 0.5 1
#                            of PPO, GRPO and RLOO (about 20 minutes more)
#   bash run.sh --all        everything: the sweeps, plus SFT with LoRA and QLoRA, domain adaptation, SFT
#                            after it with rehearsal (and without), GRPO with an exact-answer reward on the
#                            region's questions, plain DPO (out/dpo_rpo0), DPO from the base model, the
#                            head-only reward model, the LLM judge and what each label source costs (the
#                            gold lexicon, the judge, BERTScore, ROUGE-L -> reward model -> RLOO, and DPO;
#                            docs/judges.md), the chain-of-thought block (out/cot, docs/cot.md), and helpful
#                            and harmless: SFT without refusals and helpful-only SFT (what leaks), the combined
#                            preference set, its reward model, DPO, PPO and RLOO on it (docs/harmless.md)
#   bash run.sh --seeds N    the alignment runs (DPO, PPO, GRPO, RLOO; with --sweep or --all their sweeps too)
#                            with N seeds: --seed 1337 (the default) into out/dpo..., then --seed 1, 2, ...
#                            into out/dpo..._s2, _s3, ...; report.py shows mean ± sd over the seeds
#   bash run.sh --quick      the main job at toy size, about a minute (tests/test_run.py runs it)
#   bash run.sh --plan       print each stage and the command it would run, run nothing (with any of
#                            the options above: `bash run.sh --all --seeds 3 --plan`)
#   bash run.sh --force      redo stages whose output already exists (default: skip them)
#   bash run.sh --out DIR    write everything under DIR instead of out/
#   bash run.sh --until NAME stop after stage NAME (pretrain, prompting, sft, ...; a wrong name lists them)
#   bash run.sh --help       this text
#
# The main job: pretrain -> prompting (base model, no training) -> SFT -> preference pairs -> reward model
# -> DPO (RPO alpha 1), PPO, GRPO and RLOO from the SFT model -> report.py. "SFT alone" is the out/sft row
# of the report. --all inserts after SFT: LoRA, QLoRA -> domain adaptation -> SFT with rehearsal of the
# text it read (out/domain_sft_replay) -> GRPO with an exact-answer reward on the region's questions
# (out/domain_grpo).
# Each stage prints the command it runs, so any one can be rerun by hand; each prints "== NAME done in N s"
# (python bench.py --run-log LOG tabulates them). Ctrl-C stops the pipeline: the stage in training saves a
# resumable state, and `bash run.sh` again skips the finished stages and continues that one with --resume.
# Arguments are checked before anything runs: an unknown option or stage, or an option without its value,
# is one line and exit 2.
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "run.sh: $*" >&2; exit 2; }
OUT=out QUICK=0 FORCE=0 UNTIL="" SEEDS=1 SWEEP=0 ALL=0 SHOW_PLAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --force) FORCE=1 ;;
    --sweep) SWEEP=1 ;;
    --all) ALL=1 SWEEP=1 ;;
    --plan) SHOW_PLAN=1 ;;
    --out) [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || fail "--out needs a directory"; OUT="$2"; shift ;;
    --until) [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || fail "--until needs a stage name"; UNTIL="$2"; shift ;;
    --seeds) [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || fail "--seeds needs a positive integer"; SEEDS="$2"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) fail "unknown option $1 (try --help)" ;;
  esac
  shift
done
case "$SEEDS" in ''|*[!0-9]*|0*) fail "--seeds needs a positive integer, not '$SEEDS'" ;; esac
PY=${PYTHON:-python3}
RERUN="bash run.sh"   # the command that continues this pipeline
[ "$QUICK" = 1 ] && RERUN="$RERUN --quick"
[ "$ALL" = 1 ] && RERUN="$RERUN --all"
[ "$ALL" = 0 ] && [ "$SWEEP" = 1 ] && RERUN="$RERUN --sweep"
[ "$OUT" != out ] && RERUN="$RERUN --out $OUT"
[ -n "$UNTIL" ] && RERUN="$RERUN --until $UNTIL"
[ "$SEEDS" != 1 ] && RERUN="$RERUN --seeds $SEEDS"

# finished DONE_FILE: it exists, and if it is a checkpoint's config.json, not one saved mid-run
finished() {
  [ -e "$1" ] && ! grep -q '"finished": false' "$1"
}

# stage NAME DONE_FILE command...: run unless finished (and not --force); a stage whose directory holds
# a resumable state (stopped by Ctrl-C) continues with --resume; one that fails stops the pipeline.
# DONE_FILE "-": it always runs. While PLAN=1 it only records NAME in STAGES (so --until is checked
# before anything runs), and prints NAME and the command with --plan.
PLAN=0 STAGES=()
stage() {
  local name=$1 done_file=$2; shift 2
  if [ "$PLAN" = 1 ]; then
    STAGES+=("$name")
    if [ "$SHOW_PLAN" = 1 ]; then echo "$name: $*"; fi
    return
  fi
  local dir resume=() code=0
  dir=$(dirname "$done_file")
  if [ "$FORCE" = 0 ] && finished "$done_file"; then
    echo "== $name: $done_file exists, skipped (--force to redo)"
  else
    if [ -e "$dir/resume/state.safetensors" ]; then   # a stopped run: continue it, or with --force start afresh
      if [ "$FORCE" = 0 ]; then resume=(--resume); else resume=(--force); fi
    fi
    echo "== $name: $* ${resume[*]}"
    local t0=$(date +%s)
    "$@" "${resume[@]}" || code=$?
    if [ "$code" != 0 ]; then
      echo "== $name stopped (exit $code); continue with: $RERUN (finished stages are skipped," \
           "a stage with a saved state resumes)" >&2
      exit "$code"
    fi
    echo "== $name done in $(( $(date +%s) - t0 )) s"
  fi
  if [ "$name" = "$UNTIL" ]; then
    echo "== stopped after $name (--until)"
    exit 0
  fi
}

if [ "$QUICK" = 1 ]; then   # toy size: every stage runs, nothing is meant to be good
  PRE="--n-layer 2 --n-head 2 --n-embd 64 --vocab-size 512 --batch-size 8 --max-iters 40 --eval-interval 1000 --recall-limit 20 --eval-tokens 4096"
  PROMPT="--n 8 --ks 0,2 --cot-ks 0,1 --study-k 2 --orderings 2"
  SFT="--max-iters 12 --batch-size 8 --eval-n 8 --recall-limit 20"
  # a toy SFT model writes no real reviews (every sample ties), so quick mode takes pairs from the
  # world's own review data (two reviews of different sentiment per prompt) through --labels
  PREF="--labels $OUT/world_pairs.jsonl"
  RM="--max-iters 8 --eval-interval 1000"
  DPO="--max-iters 6 --eval-limit 8 --eval-interval 1000"
  PPO="--iters 2 --rollout-batch 8 --eval-limit 8"
  GRPO="--iters 2 --rollout-batch 4 --eval-limit 8"
  REPORT="--n 8 --prompts 8"
  PREF_HH="--n 2 --limit 40 --max-new-tokens 16" HH_PPO="" HH_GRPO=""
  BETAS="0.5" KLS="0.2" GKLS=""   # quick mode: GRPO and RLOO at the default KL coefficient only
else
  PRE="" PROMPT="" SFT="" PREF="" RM="" DPO="" PPO="" GRPO="" REPORT="" PREF_HH=""
  # RL on the combined objective: its prompts are 43% reviews, so twice the rollout and the minibatch give each
  # iteration about the default run's review prompts (28 of 64 for PPO, 7 of 16 for RLOO) in its optimizer steps
  HH_PPO="--rollout-batch 64 --minibatch 16" HH_GRPO="--rollout-batch 16 --minibatch 16"
  # beta 0.1 is out/dpo, kl 0.1 is out/ppo (and grpo, rloo); beta 2, 5 and kl 0.5, 1: the frontier at KL 0-5
  BETAS="0.05 0.5 1 2 5" KLS="0.02 0.05 0.2 0.5 1" GKLS="$KLS"
fi
if [ "$SWEEP" = 0 ]; then BETAS="" KLS="" GKLS=""; fi

# seeds K: the alignment runs with seed number K (1: --seed 1337, the default, no suffix; K > 1: --seed K-1,
# suffix _sK); their sweeps with --sweep, plain DPO with --all
seeds() {
  local s=$1 SFX="" SEED=""
  if [ "$s" != 1 ]; then SFX="_s$s" SEED="--seed $((s - 1))"; fi
  stage dpo$SFX    $OUT/dpo$SFX/config.json    $PY dpo.py --init $OUT/sft --data $OUT/preferences/train.jsonl --out $OUT/dpo$SFX $SEED $DPO
  if [ "$ALL" = 1 ]; then
    stage dpo_rpo0$SFX $OUT/dpo_rpo0$SFX/config.json $PY dpo.py --init $OUT/sft --data $OUT/preferences/train.jsonl --rpo-alpha 0 --out $OUT/dpo_rpo0$SFX $SEED $DPO
  fi
  for b in $BETAS; do
    stage dpo_beta$b$SFX $OUT/dpo_beta$b$SFX/config.json $PY dpo.py --init $OUT/sft --data $OUT/preferences/train.jsonl --beta $b --out $OUT/dpo_beta$b$SFX $SEED $DPO
  done
  stage ppo$SFX    $OUT/ppo$SFX/config.json    $PY ppo.py --init $OUT/sft --reward $OUT/reward --out $OUT/ppo$SFX $SEED $PPO
  for c in $KLS; do
    stage ppo_kl$c$SFX $OUT/ppo_kl$c$SFX/config.json $PY ppo.py --init $OUT/sft --reward $OUT/reward --kl-coef $c --out $OUT/ppo_kl$c$SFX $SEED $PPO
  done
  stage grpo$SFX   $OUT/grpo$SFX/config.json   $PY grpo.py --init $OUT/sft --reward $OUT/reward --out $OUT/grpo$SFX $SEED $GRPO
  stage rloo$SFX   $OUT/rloo$SFX/config.json   $PY grpo.py --init $OUT/sft --reward $OUT/reward --advantage rloo --out $OUT/rloo$SFX $SEED $GRPO
  for c in $GKLS; do
    stage grpo_kl$c$SFX $OUT/grpo_kl$c$SFX/config.json $PY grpo.py --init $OUT/sft --reward $OUT/reward --kl-coef $c --out $OUT/grpo_kl$c$SFX $SEED $GRPO
    stage rloo_kl$c$SFX $OUT/rloo_kl$c$SFX/config.json $PY grpo.py --init $OUT/sft --reward $OUT/reward --advantage rloo --kl-coef $c --out $OUT/rloo_kl$c$SFX $SEED $GRPO
  done
}

# --all: chain of thought on additions (docs/cot.md), its own block. A small base model whose tokenizer writes
# every digit as a token; on the same 20000 training sums (none a val or test sum), SFT on worked column steps
# against SFT on the bare number, 3 seeds each, each scored on the 167 held-out additions with a carry by the
# number after the steps; then GRPO with the exact-answer reward on top of the first worked-steps model; and per
# seed worked-steps SFT stopped at 400 steps, then GRPO with a reward on every column step (lr 1e-5, 400 iterations).
cot_rows() {
  local C=$OUT/cot t s
  stage cot_pretrain $C/pretrain/config.json $PY pretrain.py --split-digits --n-layer 2 --n-head 4 --n-embd 128 --max-iters 300 --eval-interval 300 --recall-limit 0 --seed 1 --out $C/pretrain
  for t in cot direct; do
    stage cot_data_$t $C/data/${t}_train.jsonl $PY world.py --n-train 20000 --addition-sft $t $C/data/${t}_train.jsonl
    stage cot_val_$t  $C/data/${t}_val.jsonl $PY world.py --split val --addition-sft $t $C/data/${t}_val.jsonl
    stage cot_test_$t $C/data/${t}_test.jsonl $PY world.py --split test --with-carries --addition-sft $t $C/data/${t}_test.jsonl
    for s in 1 2 3; do
      stage cot_sft_${t}_s$s $C/sft_${t}_s$s/config.json $PY sft.py --init $C/pretrain --data $C/data/${t}_train.jsonl --val-data $C/data/${t}_val.jsonl --max-iters 1000 --batch-size 32 --lr 1e-3 --recall-limit 0 --eval-n 50 --seed $s --out $C/sft_${t}_s$s
      stage cot_eval_${t}_s$s $C/sft_${t}_s$s/eval/results.json $PY prompting.py --init $C/sft_${t}_s$s --task-file $C/data/${t}_test.jsonl --ks 0 --metric number --no-doc-start --n 200 --out $C/sft_${t}_s$s/eval
    done
  done
  stage cot_rl_prompts $C/data/rl_prompts.jsonl $PY world.py --n-train 20000 --answer-only --addition-sft cot $C/data/rl_prompts.jsonl
  stage cot_grpo $C/grpo/config.json $PY grpo.py --init $C/sft_cot_s1 --reward exact --prompts $C/data/rl_prompts.jsonl --eval-prompts none --iters 30 --rollout-batch 16 --group-size 8 --minibatch 32 --max-new-tokens 72 --lr 5e-5 --seed 1 --out $C/grpo
  stage cot_eval_grpo $C/grpo/eval/results.json $PY prompting.py --init $C/grpo --task-file $C/data/cot_test.jsonl --ks 0 --metric number --no-doc-start --n 200 --out $C/grpo/eval
  for s in 1 2 3; do   # the RL lift: worked steps stopped at 400 steps, then GRPO with a reward on every step
    stage cot_sft400_s$s $C/sft400_s$s/config.json $PY sft.py --init $C/pretrain --data $C/data/cot_train.jsonl --val-data $C/data/cot_val.jsonl --max-iters 400 --batch-size 32 --lr 1e-3 --recall-limit 0 --eval-n 50 --seed $s --out $C/sft400_s$s
    stage cot_eval_sft400_s$s $C/sft400_s$s/eval/results.json $PY prompting.py --init $C/sft400_s$s --task-file $C/data/cot_test.jsonl --ks 0 --metric number --no-doc-start --n 200 --out $C/sft400_s$s/eval
    stage cot_grpo_steps_s$s $C/grpo_steps_s$s/config.json $PY grpo.py --init $C/sft400_s$s --reward exact --steps-reward 1 --prompts $C/data/rl_prompts.jsonl --eval-prompts none --iters 400 --rollout-batch 16 --group-size 8 --minibatch 32 --max-new-tokens 72 --lr 1e-5 --min-lr 1e-5 --seed $s --out $C/grpo_steps_s$s
    stage cot_eval_grpo_steps_s$s $C/grpo_steps_s$s/eval/results.json $PY prompting.py --init $C/grpo_steps_s$s --task-file $C/data/cot_test.jsonl --ks 0 --metric number --no-doc-start --n 200 --out $C/grpo_steps_s$s/eval
  done
}

# label_sources K: what each label source costs (docs/judges.md), seed number K as in seeds(): pairs of the SFT
# model's samples labelled by the gold lexicon, the LLM judge (out/judge), BERTScore and ROUGE-L against reference
# reviews -> a reward model on each (measured on the held-out pairs as gold orders them) -> RLOO on it, and DPO on
# the same pairs; out/preferences_X, reward_X, rloo_X, dpo_X (+ _sK). report.py groups them across seeds.
label_sources() {
  local s=$1 SFX="" SEED="" src name P
  if [ "$s" != 1 ]; then SFX="_s$s" SEED="--seed $((s - 1))"; fi
  for src in gold:sentiment llm:llm:$OUT/judge bertscore:bertscore rougeL:rougeL; do
    name=${src%%:*} P=$OUT/preferences_${src%%:*}$SFX
    stage preferences_$name$SFX $P/val_gold.jsonl $PY preferences.py --init $OUT/sft --task review --judge ${src#*:} --out $P $SEED
    stage reward_$name$SFX $OUT/reward_$name$SFX/config.json $PY reward.py --init $OUT/sft --data $P/train.jsonl --val-data $P/val_gold.jsonl --out $OUT/reward_$name$SFX $SEED
    stage rloo_$name$SFX $OUT/rloo_$name$SFX/config.json $PY grpo.py --init $OUT/sft --reward $OUT/reward_$name$SFX --advantage rloo --out $OUT/rloo_$name$SFX $SEED
    stage dpo_$name$SFX $OUT/dpo_$name$SFX/config.json $PY dpo.py --init $OUT/sft --data $P/train.jsonl --out $OUT/dpo_$name$SFX $SEED
  done
}

# --all: helpful and harmless (docs/harmless.md). SFT without the refusals (out/sft_plain; with rehearsal of the
# corpus, out/sft_plain_replay, which keeps the door codes that plain SFT forgets) and a helpful-only SFT that answers
# the requests for a door code or an insult (out/sft_helpful): what leaks. Then the combined preference
# set (out/preferences_hh: the review prompts judged by the lexicon, the requests and their benign look-alikes by the
# harmlessness judge) -> a reward model on it (out/reward_hh); hh_seeds K: DPO, PPO and RLOO on the combined
# objective (RL prompts: review and harmless, out/data/hh_prompts.jsonl), seed number K as in seeds(), from out/sft
# (*_hh) and from the helpful-only model (*_helpful_hh; DPO on pairs of its own samples, preferences_helpful_hh).
harmless_rows() {
  local plain=facts,sentiment,addition,review,story
  stage sft_plain   $OUT/sft_plain/config.json   $PY sft.py --init $OUT/pretrain --tasks $plain --out $OUT/sft_plain $SFT
  stage sft_plain_replay $OUT/sft_plain_replay/config.json $PY sft.py --init $OUT/pretrain --tasks $plain --replay 0.3 --out $OUT/sft_plain_replay $SFT
  stage sft_helpful $OUT/sft_helpful/config.json $PY sft.py --init $OUT/pretrain --tasks $plain,helpful_only --out $OUT/sft_helpful $SFT
  stage hh_prompts  $OUT/data/hh_prompts.jsonl   $PY world.py --hh-prompts $OUT/data/hh_prompts.jsonl
  stage preferences_hh $OUT/preferences_hh/val.jsonl $PY preferences.py --init $OUT/sft --task hh --out $OUT/preferences_hh $PREF_HH
  stage reward_hh   $OUT/reward_hh/config.json   $PY reward.py --init $OUT/sft --data $OUT/preferences_hh/train.jsonl --out $OUT/reward_hh $RM
  stage preferences_helpful_hh $OUT/preferences_helpful_hh/val.jsonl $PY preferences.py --init $OUT/sft_helpful --task hh --out $OUT/preferences_helpful_hh $PREF_HH
}

hh_seeds() {
  local s=$1 SFX="" SEED="" P=$OUT/data/hh_prompts.jsonl
  if [ "$s" != 1 ]; then SFX="_s$s" SEED="--seed $((s - 1))"; fi
  local from pre
  for from in sft sft_helpful; do
    pre=""; [ "$from" = sft_helpful ] && pre=helpful_
    stage dpo_${pre}hh$SFX  $OUT/dpo_${pre}hh$SFX/config.json  $PY dpo.py --init $OUT/$from --data $OUT/preferences_${pre}hh/train.jsonl --out $OUT/dpo_${pre}hh$SFX $SEED $DPO
    stage ppo_${pre}hh$SFX  $OUT/ppo_${pre}hh$SFX/config.json  $PY ppo.py --init $OUT/$from --reward $OUT/reward_hh --prompts $P --out $OUT/ppo_${pre}hh$SFX $SEED $PPO $HH_PPO
    stage rloo_${pre}hh$SFX $OUT/rloo_${pre}hh$SFX/config.json $PY grpo.py --init $OUT/$from --reward $OUT/reward_hh --advantage rloo --prompts $P --out $OUT/rloo_${pre}hh$SFX $SEED $GRPO $HH_GRPO
  done
}

pipeline() {
  stage pretrain   $OUT/pretrain/config.json   $PY pretrain.py --out $OUT/pretrain $PRE
  stage prompting  $OUT/prompting/results.json $PY prompting.py --init $OUT/pretrain --out $OUT/prompting $PROMPT
  stage sft        $OUT/sft/config.json        $PY sft.py --init $OUT/pretrain --out $OUT/sft $SFT
  if [ "$ALL" = 1 ]; then   # sft.py's other modes and the verifiable reward
    stage sft_lora   $OUT/sft_lora/config.json   $PY sft.py --init $OUT/pretrain --out $OUT/sft_lora --lora 8 $SFT
    stage sft_qlora  $OUT/sft_qlora/config.json  $PY sft.py --init $OUT/pretrain --out $OUT/sft_qlora --qlora 8 $SFT
    stage domain     $OUT/domain/config.json     $PY sft.py --mode domain --init $OUT/pretrain --out $OUT/domain $SFT
    if [ "$ALL" = 1 ]; then   # SFT on the adapted model without rehearsal: what the rehearsal is measured against
      stage domain_sft $OUT/domain_sft/config.json $PY sft.py --init $OUT/domain --out $OUT/domain_sft $SFT
    fi
    stage domain_sft_replay $OUT/domain_sft_replay/config.json $PY sft.py --init $OUT/domain --replay 0.3 --out $OUT/domain_sft_replay $SFT
    # RL with a verifiable reward: the region's training questions, 1 for the exact answer (quick: $GRPO shortens it)
    stage domain_grpo $OUT/domain_grpo/config.json $PY grpo.py --init $OUT/domain_sft_replay --reward exact --task domain_facts --iters 100 --max-new-tokens 16 --out $OUT/domain_grpo $GRPO
  fi
  if [ "$QUICK" = 1 ]; then
    stage world_pairs $OUT/world_pairs.jsonl $PY world.py --pairs $OUT/world_pairs.jsonl --max-prompts 80
  fi
  stage preferences $OUT/preferences/val.jsonl $PY preferences.py --init $OUT/sft --out $OUT/preferences $PREF
  stage reward     $OUT/reward/config.json     $PY reward.py --init $OUT/sft --data $OUT/preferences/train.jsonl --out $OUT/reward $RM
  if [ "$ALL" = 1 ]; then
    stage reward_head $OUT/reward_head/config.json $PY reward.py --init $OUT/sft --data $OUT/preferences/train.jsonl --train head --out $OUT/reward_head $RM
  fi
  for s in $(seq 1 "$SEEDS"); do seeds "$s"; done
  if [ "$ALL" = 1 ]; then
    stage dpo_from_base $OUT/dpo_from_base/config.json $PY dpo.py --init $OUT/pretrain --data $OUT/preferences/train.jsonl --out $OUT/dpo_from_base $DPO
  fi
  if [ "$ALL" = 1 ]; then   # what each label source costs: the LLM judge, then label_sources for each seed
    stage judge $OUT/judge/config.json $PY judge.py --init $OUT/pretrain --out $OUT/judge
    for s in $(seq 1 "$SEEDS"); do label_sources "$s"; done
  fi
  if [ "$ALL" = 1 ]; then   # helpful and harmless: what leaks, then the combined objective for each seed
    harmless_rows
    for s in $(seq 1 "$SEEDS"); do hh_seeds "$s"; done
  fi
  if [ "$ALL" = 1 ] && [ "$QUICK" = 0 ]; then cot_rows; fi   # full size only: --quick --all skips it
  stage report     -                           $PY report.py --out-dir $OUT $REPORT
}

PLAN=1; pipeline; PLAN=0
if [ -n "$UNTIL" ] && [[ " ${STAGES[*]} " != *" $UNTIL "* ]]; then
  more=""; [ "$ALL" = 0 ] && more=" (--sweep and --all add more)"
  fail "unknown stage '$UNTIL' for --until; the stages of this run: ${STAGES[*]}$more"
fi
if [ "$SHOW_PLAN" = 1 ]; then exit 0; fi
START=$(date +%s)
mkdir -p "$OUT"
pipeline
echo "== pipeline finished in $(( $(date +%s) - START )) s; report: $OUT/report.md"
