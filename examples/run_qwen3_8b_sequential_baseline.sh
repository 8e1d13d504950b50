#!/usr/bin/env bash
# The sequential baseline for examples/run_qwen3_8b_pgrpo.sh: the same data, reward (no acceleration
# bonus), batch sizes and mean-centred GRPO, with one plain generation per trajectory (verl's stock
# single_turn_agent, stock trainer and `grpo` estimator). ONE node with 8 GPUs.
#
# NOT RUN on the machines this project was built on (2 CPU cores, no GPU). What was checked there:
# the composed config (configs/sequential_baseline_qwen3_8b.yaml) passes verl 0.9.1's own
# validate_config and differs from the P-GRPO recipe only where a baseline must (tests/test_rl_preset.py).
#
#   MODEL=/ckpt/qwen3-8b-sequential-sft bash examples/run_qwen3_8b_sequential_baseline.sh [overrides]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:?set MODEL to the sequential SFT-trained Qwen3-8B checkpoint}"
TRAIN="${TRAIN:-$REPO/data/train.parquet}"
VAL="${VAL:-$REPO/data/aime24/test.parquet}"
OUT="${OUT:-$REPO/checkpoints/qwen3_8b_sequential_baseline}"

python3 -m threadweaver_verl doctor

python3 -m verl.trainer.main_ppo \
    --config-path "$REPO/configs" --config-name sequential_baseline_qwen3_8b \
    actor_rollout_ref.model.path="$MODEL" \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$REPO/configs/agent_loop.yaml" \
    trainer.default_local_dir="$OUT" \
    "$@"
