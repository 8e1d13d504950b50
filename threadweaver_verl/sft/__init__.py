"""Trie SFT: train on parallel trajectories exactly as fork/join inference runs them.

* :mod:`.trie`    - Requests -> token trie, flattened depth first; packing into rows.
* :mod:`.masks`   - ancestor-only attention: 4-D bool (SDPA) and flex BlockMask.
* :mod:`.loss`    - targets predicted at trie parents (never a flat shift).
* :mod:`.batch`   - row features, the collator, one forward pass.
* :mod:`.data`    - SFT parquet rows -> Requests -> rows (``trie`` or ``expanded`` layout).
* :mod:`.train`   - ``python -m threadweaver_verl sft``: the HF Trainer path (runs anywhere).
* verl's SFT trainer uses these through :mod:`threadweaver_verl.integrations.verl.sft_dataset` and
  :mod:`threadweaver_verl.integrations.verl.sft_engine` (the trie engine, ``engine:trie``).
* :mod:`.synthetic` - random format-valid trajectory texts for tests and benchmarks.

See ``docs/sft.md``.
"""

from threadweaver_verl.sft.loss import mean_nll, parent_logprobs, token_nll
from threadweaver_verl.sft.masks import block_mask, bool_mask
from threadweaver_verl.sft.trie import Trie, TrieError, build_trie, chain, concat, pack

__all__ = [
    "Trie",
    "TrieError",
    "build_trie",
    "chain",
    "concat",
    "pack",
    "bool_mask",
    "block_mask",
    "parent_logprobs",
    "token_nll",
    "mean_nll",
]
