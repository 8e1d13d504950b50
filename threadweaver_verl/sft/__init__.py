"""Trie SFT: train on parallel trajectories exactly as fork/join inference runs them.

* :mod:`.trie`    - Requests -> token trie, flattened depth first; packing into rows.
* :mod:`.masks`   - ancestor-only attention: 4-D bool (SDPA) and flex BlockMask.
* :mod:`.loss`    - targets predicted at trie parents (never a flat shift).
* :mod:`.batch`   - row features, the collator, one forward pass.
* :mod:`.data`    - SFT parquet rows -> Requests -> rows (``trie`` or ``expanded`` layout).
* :mod:`.train`   - ``python -m threadweaver_verl sft``: the HF Trainer path (runs anywhere).
* :mod:`.verl_dataset`, :mod:`.verl_engine` - verl's SFT trainer: dataset classes and the
  trie engine (registered by the plugin as ``engine:trie``).
* :mod:`.synthetic` - random format-valid trajectory texts for tests and benchmarks.

See ``docs/sft.md``.
"""

from .loss import mean_nll, parent_logprobs, token_nll
from .masks import block_mask, bool_mask
from .trie import Trie, TrieError, build_trie, chain, concat, pack

__all__ = ["Trie", "TrieError", "build_trie", "chain", "concat", "pack", "bool_mask", "block_mask",
           "parent_logprobs", "token_nll", "mean_nll"]
