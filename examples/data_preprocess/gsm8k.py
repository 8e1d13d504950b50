"""GSM8K -> ThreadWeaver RL parquet (fields: question, answer = worked solution ending '#### 72').

    python examples/data_preprocess/gsm8k.py                                     # test split from the hub
    python examples/data_preprocess/gsm8k.py hub_split=train split=train output=data/gsm8k/train.parquet
    python examples/data_preprocess/gsm8k.py input=gsm8k_test.jsonl

Every setting: threadweaver_verl/data/preprocess.py (PreprocessConfig).
"""

import sys

from threadweaver_verl.data.preprocess import script_main

DEFAULTS = {
    "hub": "openai/gsm8k",
    "subset": "main",
    "hub_split": "test",
    "answer_format": "gsm8k",
    "data_source": "gsm8k",
    "split": "test",
    "output": "data/gsm8k/test.parquet",
}

if __name__ == "__main__":
    sys.exit(script_main(DEFAULTS, sys.argv[1:]))
