"""`python -m prompt_tuning.recycle`: recycle a prompt to another backbone (`methods/recycling.py`).

    python -m prompt_tuning.recycle --prompt=library:sst2_a --source=CKPT_A --target=CKPT_B \\
        --recycler=v2v-lin --vocabulary=tasks.toy:get_toy_vocabulary --word_offset=0 \\
        --num_words=200 --output=library:sst2_a_on_b --library=LIBRARY_DIR
"""

import sys

from prompt_tuning.methods import recycling


def console_main() -> None:
  sys.exit(recycling.main())


if __name__ == '__main__':
  console_main()
