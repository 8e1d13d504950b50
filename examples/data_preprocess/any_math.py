"""Any math file or hub dataset with question/answer fields -> ThreadWeaver RL parquet.

    python examples/data_preprocess/any_math.py input=train.parquet data_source=my_math output=data/train.parquet
    python examples/data_preprocess/any_math.py input=x.jsonl question_key=prompt answer_key=target split=train
    python examples/data_preprocess/any_math.py hub=owner/name hub_split=train data_source=name

Fields are detected (problem/question, answer, else a solution's last \\boxed{}) unless given.
Every setting: threadweaver_verl/data/preprocess.py (PreprocessConfig).
"""

import sys

from threadweaver_verl.data.preprocess import script_main

if __name__ == "__main__":
    sys.exit(script_main({}, sys.argv[1:]))
