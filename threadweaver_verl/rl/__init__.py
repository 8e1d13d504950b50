"""Reinforcement learning with verl: the P-GRPO reward (``correctness``,
``reward``), the RL dataset (``dataset``) and the advantage estimator.

Kept import-light on purpose: ``rl.verify_worker`` runs as a child process
and must start without importing verl or torch.
"""
