#!/usr/bin/env bash
# ThreadWeaver P-GRPO for Qwen3-8B on a multi-node Ray cluster (8 GPUs per node), on stock verl 0.9.1.
#
# NOT RUN on the machines this project was built on (2 CPU cores, no GPU). What was checked there:
# the composed config (configs/threadweaver_pgrpo_qwen3_8b.yaml) passes verl 0.9.1's own
# validate_config, and the reward, dataset, estimator and agent loop run through verl's CPU code paths
# (tests/test_rl_*.py). Batch sizes and memory settings are a starting point, not a tuned recipe.
#
# Cluster: the same Python environment (threadweaver-verl, verl 0.9.1, vLLM) on every node, and this
# repository, the model and the data on a path every node sees (shared file system):
#   head:    ray start --head --port=6379 --dashboard-host=0.0.0.0
#   workers: ray start --address=<head-ip>:6379
# Then, from any machine that reaches the dashboard of the head node:
#   RAY_ADDRESS=http://<head-ip>:8265 NNODES=4 MODEL=/shared/ckpt/qwen3-8b-threadweaver-sft \
#   TRAIN=/shared/data/train.parquet VAL=/shared/data/aime24/test.parquet \
#   bash examples/run_qwen3_8b_pgrpo_multinode.sh [extra hydra overrides]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY_ADDRESS="${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the head node, e.g. http://10.0.0.1:8265}"
NNODES="${NNODES:?set NNODES to the number of nodes in the cluster}"
MODEL="${MODEL:?set MODEL to the SFT-trained ThreadWeaver Qwen3-8B checkpoint (a path every node sees)}"
TRAIN="${TRAIN:?set TRAIN to the RL parquet (a path every node sees)}"
VAL="${VAL:?set VAL to the validation parquet (a path every node sees)}"
OUT="${OUT:-$REPO/checkpoints/qwen3_8b_pgrpo_${NNODES}nodes}"
# more prompts per step with more nodes (64 per node keeps the per-GPU load of the one-node recipe)
PROMPTS_PER_STEP="${PROMPTS_PER_STEP:-$((64 * NNODES))}"

python3 -m threadweaver_verl doctor

# Absolute paths on the shared file system only (relative ones resolve against each worker's own
# working directory); the package comes from each node's environment, not from an uploaded working dir.
ray job submit --address="$RAY_ADDRESS" -- \
    python3 -m verl.trainer.main_ppo \
    --config-path "$REPO/configs" --config-name threadweaver_pgrpo_qwen3_8b \
    actor_rollout_ref.model.path="$MODEL" \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    data.train_batch_size="$PROMPTS_PER_STEP" \
    actor_rollout_ref.rollout.agent.agent_loop_config_path="$REPO/configs/agent_loop.yaml" \
    trainer.nnodes="$NNODES" \
    trainer.default_local_dir="$OUT" \
    "$@"
