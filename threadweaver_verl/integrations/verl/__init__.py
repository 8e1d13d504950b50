"""Everything that imports verl: the ``verl.plugins`` entry point (``plugin``), the agent loop over verl's
server manager (``agent_loop``), the ``p_grpo`` estimator (``advantage``), the ``threadweaver`` trainer mode
(``trainer``), the RL and SFT dataset classes (``rl_dataset``, ``sft_dataset``) and the trie SFT engine
(``sft_engine``). The method code these call (``rollout``, ``rl``, ``sft``, ``format``) never imports verl."""
