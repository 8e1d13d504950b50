"""P-GRPO: the reward (``correctness``, ``reward``) and the trajectory-level group advantage
(``advantage``). verl's side (the estimator registration, the trainer mode, the RL dataset class)
is in :mod:`threadweaver_verl.integrations.verl`.

Kept import-light on purpose: ``rl.verify_worker`` runs as a child process
and must start without importing verl or torch.
"""
