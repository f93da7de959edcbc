"""`launch.fast_shutdown`: what the entry points' quick exit finalizes, and what it leaves.

Checked in fresh interpreters (the behaviour is the interpreter's shutdown): an unreachable object
in a reference cycle that holds buffered, unwritten data (as an abandoned summary writer would) is
still finalized, so its data reaches the file; an object still reachable from a module at exit is
not finalized (frozen out of the collector, as `os._exit` would leave it; without `fast_shutdown`
the module teardown finalizes it), which is why every writer of this project flushes after each
write; calling it twice registers one exit handler.
"""

import os
import subprocess
import sys
import textwrap

import runtime_testlib as rt

_PROGRAM = textwrap.dedent("""
    import atexit, gc, os, sys
    from prompt_tuning.runtime import launch

    gc.disable()  # nothing is collected before exit unless the shutdown collects it
    if sys.argv[2] == 'fast':
      before = atexit._ncallbacks()
      launch.fast_shutdown()
      launch.fast_shutdown()
      os.write(1, b'handlers added %d\\n' % (atexit._ncallbacks() - before))


    class Cyclic:
      def __init__(self, path):
        self.me = self
        self.f = open(path, 'w')
        self.f.write('flushed')  # buffered: on disk only once the file is closed

      def __del__(self):
        self.f.close()


    class Probe:
      def __del__(self, write=os.write):
        write(1, b'module global finalized\\n')


    Cyclic(sys.argv[1])  # unreachable at once, reachable by the collector only
    probe = Probe()  # reachable from __main__ until the module teardown
""")


def _run(tmp_path, mode):
  path = str(tmp_path / f'{mode}.txt')
  proc = subprocess.run(
      [sys.executable, '-c', _PROGRAM, path, mode],
      env=rt.base_env(),
      cwd=rt.REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout
  with open(path) as f:
    return proc.stdout, f.read()


def test_fast_shutdown_finalizes_unreachable_cycles_and_freezes_the_rest(tmp_path):
  out, written = _run(tmp_path, 'fast')
  assert 'handlers added 1' in out, out
  assert written == 'flushed'
  assert 'module global finalized' not in out, out


def test_the_plain_shutdown_finalizes_both(tmp_path):
  out, written = _run(tmp_path, 'plain')
  assert written == 'flushed'
  assert 'module global finalized' in out, out


def test_every_entry_point_asks_for_it():
  for path in (
      'prompt_tuning/train.py',
      'prompt_tuning/eval.py',
      'prompt_tuning/infer.py',
      'prompt_tuning/serve.py',
      'prompt_tuning/sweep.py',
      'prompt_tuning/interpret.py',
      'prompt_tuning/sweeps/check.py',
      'prompt_tuning/sweeps/vectorized.py',
      'scripts/convert_checkpoint.py',
  ):
    with open(os.path.join(rt.REPO, path)) as f:
      assert 'fast_shutdown()' in f.read(), path
