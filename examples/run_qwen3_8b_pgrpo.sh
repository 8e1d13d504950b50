#!/usr/bin/env bash
# ThreadWeaver P-GRPO for Qwen3-8B on ONE node with 8 GPUs (80 GB class), on stock verl 0.9.1.
#
# NOT RUN on the machines this project was built on (2 CPU cores, no GPU). What was checked there:
# the composed config (configs/threadweaver_pgrpo_qwen3_8b.yaml) passes verl 0.9.1's own
# validate_config, and the reward, dataset, estimator and agent loop run through verl's CPU code paths
# (tests/test_rl_*.py). Batch sizes and memory settings are a starting point, not a tuned recipe.
#
# Before: pip install threadweaver-verl (plus verl 0.9.1 and vLLM for your CUDA), an SFT'ed ThreadWeaver
# checkpoint (python -m threadweaver_verl sft ...), and RL parquet files, e.g.
#   python examples/data_preprocess/any_math.py input=train.jsonl data_source=train split=train output=data/train.parquet
#   python examples/data_preprocess/aime.py output=data/aime24/test.parquet
#
#   MODEL=/ckpt/qwen3-8b-threadweaver-sft bash examples/run_qwen3_8b_pgrpo.sh [extra hydra overrides]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:?set MODEL to the SFT-trained ThreadWeaver Qwen3-8B checkpoint}"
TRAIN="${TRAIN:-$REPO/data/train.parquet}"
VAL="${VAL:-$REPO/data/aime24/test.parquet}"
OUT="${OUT:-$REPO/checkpoints/qwen3_8b_pgrpo}"

# verl swallows plugin import errors: check loudly that ours is active before a long run.
python3 -m threadweaver_verl doctor

python3 -m verl.trainer.main_ppo \
    --config-path "$REPO/configs" --config-name threadweaver_pgrpo_qwen3_8b \
    actor_rollout_ref.model.path="$MODEL" \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$REPO/configs/agent_loop.yaml" \
    trainer.default_local_dir="$OUT" \
    "$@"
