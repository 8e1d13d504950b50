"""MATH-500 -> ThreadWeaver RL parquet (fields: problem, answer; solution/subject/level ignored).

    python examples/data_preprocess/math500.py                        # from the hub (needs `datasets`)
    python examples/data_preprocess/math500.py input=math500.jsonl    # from a local copy
    python examples/data_preprocess/math500.py output=data/math500.parquet instruction=null

Every setting: threadweaver_verl/data/preprocess.py (PreprocessConfig).
"""

import sys

from threadweaver_verl.data.preprocess import script_main

DEFAULTS = {
    "hub": "HuggingFaceH4/MATH-500",
    "hub_split": "test",
    "data_source": "math500",
    "split": "test",
    "output": "data/math500/test.parquet",
}

if __name__ == "__main__":
    sys.exit(script_main(DEFAULTS, sys.argv[1:]))
