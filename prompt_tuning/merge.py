"""`python -m prompt_tuning.merge`: merge checkpoints or prompts (see `methods/merging.py`).

    python -m prompt_tuning.merge --method=ties --base=PRETRAINED --models=A,B --output=MERGED
    python -m prompt_tuning.merge --method=average --models=library:sst2_a,library:sst2_b \\
        --output=library:sst2_avg --library=LIBRARY_DIR
"""

import sys

from prompt_tuning.methods import merging


def console_main() -> None:
  sys.exit(merging.main())


if __name__ == '__main__':
  console_main()
