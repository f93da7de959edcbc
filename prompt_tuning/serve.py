"""`python -m prompt_tuning.serve --gin_file=models/... --gin_file=runs/serve.gin
--gin.CHECKPOINT_PATH=... --library DIR --port N` (gin: `serve_script.serve`).

Serves every prompt of the library trained on the frozen backbone, with mixed-task dynamic
batching (see `prompt_tuning/serving/`). `--workers N` starts N server processes behind the one
address (`SO_REUSEPORT`); worker i gets `PROMPT_TUNING_WORKER=i` in its environment, and with
`--pin_accelerators` also `CUDA_VISIBLE_DEVICES=i` (one accelerator each). SIGTERM (or Ctrl-C)
finishes the requests in flight, then exits.
"""

import os
import signal
import subprocess
import sys

import gin

if __name__ == '__main__':
  from prompt_tuning.runtime import launch as _launch  # pylint: disable=g-import-not-at-top

  _launch.tune_malloc()  # first: it may restart the process, before JAX is imported (below)

from prompt_tuning.serving.server import serve  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position

WORKER_ENV = 'PROMPT_TUNING_WORKER'


def _flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  if 'library' not in flags.FLAGS:
    flags.DEFINE_string('library', None, 'The prompt library directory (prompt_tuning.library).')
    flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
    flags.DEFINE_integer('port', 8000, 'Port to listen on.')
    flags.DEFINE_integer('workers', 1, 'Server processes behind the one address (SO_REUSEPORT).')
    flags.DEFINE_boolean(
        'pin_accelerators', False, 'With --workers: worker i sees only accelerator i.'
    )
  return flags.FLAGS


def _run_workers(flags_, argv) -> None:
  """Starts `--workers` copies of this command (one server process each) and supervises them."""
  children = []
  for i in range(flags_.workers):
    env = dict(os.environ, **{WORKER_ENV: str(i)})
    if flags_.pin_accelerators:
      env['CUDA_VISIBLE_DEVICES'] = str(i)
      env['TPU_VISIBLE_CHIPS'] = str(i)
    args = (
        [sys.executable, '-m', 'prompt_tuning.serve']
        + [a for a in argv[1:] if not a.startswith('--workers')]
        + ['--workers=1']
    )
    children.append(subprocess.Popen(args, env=env))

  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [child.wait() for child in children]
  sys.exit(max(codes))


def main(argv):
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  flags_ = _flags()
  if flags_.workers > 1:
    _run_workers(flags_, sys.argv)
    return
  serve_using_gin = gin.configurable(serve)
  launch.main_with_gin(
      lambda: serve_using_gin(  # pylint: disable=no-value-for-parameter
          library_dir=flags_.library, host=flags_.host, port=flags_.port
      ),
      argv,
  )


def console_main():
  from prompt_tuning.runtime import gin_utils, launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()
  launch.fast_shutdown()
  launch.define_flags()
  _flags()
  gin_utils.run(main)


if __name__ == '__main__':
  console_main()
