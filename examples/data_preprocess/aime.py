"""AIME -> ThreadWeaver RL parquet (fields: problem|Problem, answer|Answer; integer answers become text).

    python examples/data_preprocess/aime.py                                   # AIME 2024 from the hub
    python examples/data_preprocess/aime.py input=aime25.jsonl data_source=aime25 output=data/aime25.parquet

Every setting: threadweaver_verl/data/preprocess.py (PreprocessConfig).
"""

import sys

from threadweaver_verl.data.preprocess import script_main

DEFAULTS = {
    "hub": "HuggingFaceH4/aime_2024",
    "hub_split": "train",
    "data_source": "aime24",
    "split": "test",
    "output": "data/aime24/test.parquet",
}

if __name__ == "__main__":
    sys.exit(script_main(DEFAULTS, sys.argv[1:]))
