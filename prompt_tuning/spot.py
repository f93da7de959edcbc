"""`python -m prompt_tuning.spot {rank,transfer}`: SPoT task retrieval and transfer (`methods/spot.py`).

    python -m prompt_tuning.spot rank --library=LIB --target=library:rte_embedding --backbone=CKPT
    python -m prompt_tuning.spot transfer --library=LIB --target=library:rte_embedding \\
        --backbone=CKPT --init=best --output=rte_init.npy -- --gin_file=... --gin.MODEL_DIR=...
"""

import sys

from prompt_tuning.methods import spot


def console_main() -> None:
  sys.exit(spot.main())


if __name__ == '__main__':
  console_main()
