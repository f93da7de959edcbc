"""`python -m prompt_tuning.train --gin_file=... --gin.MODEL_DIR=...` (T5X's train.py).

Gin files refer to this module as `import __main__ as train_script` and bind `train_script.train`.
"""

import gin

if __name__ == '__main__':
  # Before TensorFlow is imported (below, through seqio): its C++ start-up lines stay quiet.
  from prompt_tuning.runtime import launch as _launch  # pylint: disable=g-import-not-at-top

  _launch.tune_malloc()  # first: it may restart the process
  _launch.fast_shutdown()
  _launch.quiet_startup()

from prompt_tuning.runtime.train import train  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position


def main(argv):
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  train_using_gin = gin.configurable(train)
  launch.main_with_gin(lambda: train_using_gin(), argv)  # pylint: disable=no-value-for-parameter,unnecessary-lambda


def console_main():
  from prompt_tuning.runtime import gin_utils, launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()
  launch.fast_shutdown()
  launch.define_flags()
  gin_utils.run(main)


if __name__ == '__main__':
  console_main()
