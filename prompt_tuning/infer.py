"""`python -m prompt_tuning.infer --gin_file=...` (T5X's infer.py; gin: `infer_script.infer`)."""

import gin

if __name__ == '__main__':
  # Before TensorFlow is imported (below, through seqio): its C++ start-up lines stay quiet.
  from prompt_tuning.runtime import launch as _launch  # pylint: disable=g-import-not-at-top

  _launch.tune_malloc()  # first: it may restart the process
  _launch.fast_shutdown()
  _launch.quiet_startup()

from prompt_tuning.runtime.infer import infer  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position


def main(argv):
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  infer_using_gin = gin.configurable(infer)
  launch.main_with_gin(lambda: infer_using_gin(), argv)  # pylint: disable=no-value-for-parameter,unnecessary-lambda


def console_main():
  from prompt_tuning.runtime import gin_utils, launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()
  launch.fast_shutdown()
  launch.define_flags()
  gin_utils.run(main)


if __name__ == '__main__':
  console_main()
