"""Shared command-line handling of the train/eval/infer entry points (T5X's flags).

Output is quiet by default: this project's progress lines, and warnings and errors of the libraries;
not the INFO lines of orbax, seqio or TensorFlow, nor TensorFlow's C++ start-up lines. `--verbose`
(or absl's `-v 1`) shows everything, and full tracebacks of errors. Errors a user can cause end in
one `ERROR: ...` line; Ctrl-C and SIGTERM in one line saying where to resume.
"""

import atexit
import contextlib
import gc
import logging as py_logging
import os
import re
import sys
from typing import Callable, Iterator

from absl import flags
from absl import logging

FLAGS = flags.FLAGS


_FAST_SHUTDOWN = False


def _collect_then_freeze() -> None:
  gc.collect()
  gc.freeze()


def fast_shutdown() -> None:
  """Makes the interpreter's shutdown quick: 0.1-0.2 s instead of 1.5 s on 2 cores.

  After JAX, TensorFlow and Keras are imported, Python's shutdown spends most of its time in the
  garbage collector, walking their module graphs again and again as the modules are torn down.
  This registers an exit handler, run after the ones registered later (JAX's, orbax's), that
  collects once, so garbage in reference cycles is finalized as usual (an abandoned summary writer
  or file still flushes), then freezes what is left out of the collector (`gc.freeze`). What is
  still reachable from a module at that point is then not finalized, as after `os._exit`: every
  writer of this project flushes after each write and closes its files, and `logging`'s own exit
  handler (registered earlier) still runs after this one. Every entry point calls it first; later
  calls do nothing (the first registration, the one that runs last, stays).
  """
  global _FAST_SHUTDOWN
  if not _FAST_SHUTDOWN:
    _FAST_SHUTDOWN = True
    atexit.register(_collect_then_freeze)


# What `tune_malloc` does, per `PROMPT_TUNING_MALLOC` mode: `tcmalloc` preloads gperftools'
# allocator, which keeps freed blocks for reuse; `mimalloc` preloads Microsoft's mimalloc (PyPI's
# `cmeel-mimalloc`, or a system library) set to keep them too; `auto` (the default) preloads the
# first of the two that is installed, where the user has chosen no allocator; `hugepages` adds these
# `GLIBC_TUNABLES` (large blocks, XLA's per-call temporaries, on transparent huge pages: 512x fewer
# page faults); `off` leaves glibc's allocator as it is.
MALLOC_MODES = {
    'auto': {},
    'hugepages': {'glibc.malloc.hugetlb': '1'},
    'mimalloc': {},
    'off': {},
    'tcmalloc': {},
}
DEFAULT_MALLOC_MODE = 'auto'
MALLOC_ENV = 'PROMPT_TUNING_MALLOC'
_MALLOC_DONE_ENV = '_PROMPT_TUNING_MALLOC_APPLIED'
# tcmalloc reports every allocation above 1 GiB on stderr (XLA's temporaries of larger models),
# and by default returns a free span to the system now and then (after 2 GiB of frees, then every
# 8 GiB): a whole temporaries block, which the next call faults in again. Rate 0 keeps them; the
# `Trainer` hands back what loading and compiling freed (`release_free_memory`).
_TCMALLOC_QUIET = {
    'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50),
    'TCMALLOC_RELEASE_RATE': '0',
}


# mimalloc hands freed memory back to the system after `purge_delay` ms (default 10): a whole
# temporaries block between two steps. A delay of 10^9 ms keeps it; `release_free_memory` still
# hands everything free back at once (`mi_collect(true)` purges whatever the delay). mimalloc's
# own page settings stay: no explicit large OS pages, transparent huge pages requested for its
# arenas (`MIMALLOC_ALLOW_THP=0` in the environment turns that off: 106 MiB less at the methods
# benchmark's prompt training peak, 3% slower; `benchmarks/ANALYSIS.md`).
_MIMALLOC_KEEP = {'MIMALLOC_PURGE_DELAY': str(10**9), 'MIMALLOC_SHOW_WARNINGS': '0'}


def _glibc_version() -> tuple:
  import platform  # pylint: disable=g-import-not-at-top

  lib, version = platform.libc_ver()
  if lib != 'glibc':
    return ()
  try:
    return tuple(int(x) for x in version.split('.')[:2])
  except ValueError:
    return ()


def _transparent_hugepages_off() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[never]' in f.read()
  except OSError:
    return True


def _check_mode(mode: str) -> None:
  if mode not in MALLOC_MODES:
    raise ValueError(
        f'{MALLOC_ENV}={mode!r} is not a mode: use one of {", ".join(sorted(MALLOC_MODES))}.'
    )


def malloc_tunables(mode: str, environ=None) -> dict:
  """The `GLIBC_TUNABLES` entries `tune_malloc` would add (empty: nothing to add)."""
  environ = os.environ if environ is None else environ
  _check_mode(mode)
  if not MALLOC_MODES[mode]:
    return {}  # `off`, `auto`, `tcmalloc`: no need to read the C library's version
  if not sys.platform.startswith('linux') or _glibc_version() < (2, 35):
    return {}  # glibc.malloc.hugetlb came with glibc 2.35; other C libraries ignore the variable
  if _transparent_hugepages_off():
    return {}
  present = {item.split('=', 1)[0] for item in environ.get('GLIBC_TUNABLES', '').split(':') if item}
  # The user's own settings win, key by key.
  return {k: v for k, v in MALLOC_MODES[mode].items() if k not in present}


def find_tcmalloc() -> str:
  """The installed tcmalloc library's name for `LD_PRELOAD` ('' when there is none)."""
  import ctypes.util  # pylint: disable=g-import-not-at-top

  for name in ('tcmalloc_minimal', 'tcmalloc'):
    found = ctypes.util.find_library(name)
    if found:
      return found
  return ''


def find_mimalloc() -> str:
  """The installed mimalloc library's path for `LD_PRELOAD` ('' when there is none): the one of
  the `cmeel-mimalloc` wheel (`pip install cmeel-mimalloc`; its `cmeel.prefix/lib` sits in a
  `site-packages` on `sys.path`), else a system library."""
  for root in sys.path:
    for name in ('libmimalloc.so.3', 'libmimalloc.so.2', 'libmimalloc.so'):
      path = os.path.join(root or '.', 'cmeel.prefix', 'lib', name)
      if os.path.isfile(path):
        return path
  import ctypes.util  # pylint: disable=g-import-not-at-top

  return ctypes.util.find_library('mimalloc') or ''


def _allocator_chosen(environ) -> bool:
  """Whether the user preloads an allocator of their own or sets glibc's malloc tunables."""
  preload = environ.get('LD_PRELOAD', '').lower()
  return 'malloc' in preload or 'glibc.malloc.' in environ.get('GLIBC_TUNABLES', '')


def malloc_environment(mode: str, environ=None) -> dict:
  """The environment variables `tune_malloc` would set, with their new values (empty: none).

  Raises ValueError, naming the cause and the fix, for an unknown mode and for `tcmalloc` where no
  tcmalloc library is installed.
  """
  environ = os.environ if environ is None else environ
  _check_mode(mode)
  if mode == 'auto' and _allocator_chosen(environ):
    return {}
  if mode in ('auto', 'tcmalloc', 'mimalloc'):
    preload = environ.get('LD_PRELOAD', '')
    if mode != 'auto' and mode in preload:
      return {}  # preloaded already (by the user, or by this restart)
    linux = sys.platform.startswith('linux')
    library, settings = '', _TCMALLOC_QUIET
    if mode in ('auto', 'tcmalloc') and linux:
      library = find_tcmalloc()
    if not library and mode in ('auto', 'mimalloc') and linux:
      library, settings = find_mimalloc(), _MIMALLOC_KEEP
    if not library and mode == 'auto':
      return {}  # glibc's allocator, as before
    if not library and mode == 'tcmalloc':
      raise ValueError(
          f"{MALLOC_ENV}=tcmalloc needs gperftools' tcmalloc library, and none is installed "
          '(`ldconfig -p` lists no libtcmalloc_minimal or libtcmalloc): install it (Debian, '
          'Ubuntu: `apt-get install libtcmalloc-minimal4`) or unset '
          f'{MALLOC_ENV}.'
      )
    if not library:
      raise ValueError(
          f'{MALLOC_ENV}=mimalloc needs the mimalloc library, and none is installed (no '
          '`cmeel-mimalloc` wheel, no libmimalloc in `ldconfig -p`): `pip install cmeel-mimalloc` '
          f'or unset {MALLOC_ENV}.'
      )
    env = {k: v for k, v in settings.items() if k not in environ}
    env['LD_PRELOAD'] = ':'.join([library] + [preload] * bool(preload))
    return env
  add = malloc_tunables(mode, environ)
  if not add:
    return {}
  current = environ.get('GLIBC_TUNABLES', '')
  return {
      'GLIBC_TUNABLES': ':'.join([current] * bool(current) + [f'{k}={v}' for k, v in add.items()])
  }


def tune_malloc() -> None:
  """Restarts this process once, where asked or useful, with an allocator set for XLA's buffers.

  On the CPU, every call of a compiled XLA executable allocates its temporaries as one large
  block (597 MiB for the T5 1.1 small training step at prompt length 100) and frees it afterwards.
  glibc serves blocks above 32 MiB with a fresh `mmap` and returns them with `munmap`, so each call
  touches that memory anew: a page fault per 4 KiB (195,000 and 0.4 s of kernel time per step on 2
  cores when the block was 750 MiB; the scoring forward: 340,000), 10-20% of the step. PyTorch's
  allocations stay under the threshold and are reused. The C library reads its settings
  (`GLIBC_TUNABLES`, `LD_PRELOAD`) only when a process starts, so every compute entry point calls
  this first: if settings are asked for and missing, the process re-executes itself (same PID,
  arguments and environment, plus the settings) before anything heavy is imported.

  By default (`PROMPT_TUNING_MALLOC=auto`), where gperftools' tcmalloc is installed
  (`libtcmalloc_minimal.so.4`, Debian package `libtcmalloc-minimal4`) and the user preloads no
  allocator and sets no `glibc.malloc.` tunable, the process restarts with tcmalloc preloaded. It
  keeps freed blocks and hands them out again: no faults after the first calls, 1.2-1.3x the
  training throughput on 2 cores (AMD EPYC). XLA frees a call's temporaries just after its outputs
  are ready, so a call started at once would take a second block and keep both resident; the
  `Trainer` therefore waits for each step on the CPU under tcmalloc (`Trainer.wait_for_each_step`),
  and peak memory stays at glibc's. Without tcmalloc, `auto` preloads mimalloc where it is installed
  (a dependency on Linux: PyPI's `cmeel-mimalloc`, so `pip` alone brings it where tcmalloc cannot
  be installed; or a system `libmimalloc`), with a purge delay that keeps freed blocks
  (`MIMALLOC_PURGE_DELAY`; `release_free_memory` still hands them back at once), and the `Trainer`
  waits for each step as under tcmalloc; without either, glibc's allocator is left alone.
  `PROMPT_TUNING_MALLOC=tcmalloc` or `=mimalloc` asks for one outright (missing, an error); `off`
  keeps glibc's.
  `PROMPT_TUNING_MALLOC=hugepages` backs large blocks with transparent huge pages
  (`glibc.malloc.hugetlb=1`): 2 MiB pages, 512x fewer faults, the same resident memory; 0.85-0.9x
  the step time on 2 cores. On a virtual machine whose balloon driver hands free memory back to the
  host (free page reporting, after 2 s), though, a block that lay free for longer than that is
  re-faulted from the host, and the call took 1.5x as long instead (measured with 3 s between
  calls, and on every other call of a 2 s single-threaded step). An entry the user already has in
  `GLIBC_TUNABLES` wins, as does a tcmalloc the user preloads. `hugepages` does nothing off Linux,
  on a C library other than glibc >= 2.35, or with transparent huge pages disabled
  (`/sys/kernel/mm/transparent_hugepage/enabled` is `never`); `tcmalloc` without the library is an
  error; a failed re-execution runs on as before.
  """
  if os.environ.get(_MALLOC_DONE_ENV) or not sys.executable:
    return
  mode = os.environ.get(MALLOC_ENV, '').strip().lower() or DEFAULT_MALLOC_MODE
  try:
    changes = malloc_environment(mode)
  except ValueError as e:
    raise SystemExit(f'ERROR: {e}') from None
  os.environ[_MALLOC_DONE_ENV] = mode
  if not changes:
    return
  env = dict(os.environ, **changes)
  argv = list(getattr(sys, 'orig_argv', None) or [sys.executable] + sys.argv)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # run on as we are, only slower
    print(
        f'prompt_tuning: could not restart with {", ".join(sorted(changes))} ({e}); continuing',
        file=sys.stderr,
    )


def tcmalloc_loaded() -> bool:
  """Whether gperftools' tcmalloc serves this process's `malloc` (preloaded)."""
  import ctypes  # pylint: disable=g-import-not-at-top

  try:
    return bool(ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory)
  except (AttributeError, OSError):
    return False


def mimalloc_loaded() -> bool:
  """Whether mimalloc serves this process's `malloc`: preloaded (`LD_PRELOAD`), it overrides
  `malloc` and puts `mi_collect` in the global namespace (a library that only links it does not
  serve `malloc`)."""
  import ctypes  # pylint: disable=g-import-not-at-top

  if 'mimalloc' not in os.environ.get('LD_PRELOAD', ''):
    return False
  try:
    return bool(ctypes.CDLL(None).mi_collect)
  except (AttributeError, OSError):
    return False


def caching_allocator_loaded() -> bool:
  """Whether a preloaded allocator that keeps freed blocks for reuse (tcmalloc, or mimalloc as
  `tune_malloc` sets it) serves this process."""
  return tcmalloc_loaded() or mimalloc_loaded()


def release_free_memory() -> None:
  """Hands the memory the C allocator holds free back to the operating system.

  Called once the training step is compiled: loading the checkpoint and compiling leave hundreds of
  MiB freed but resident in glibc's arenas (`malloc_trim`), tcmalloc's page heap or mimalloc's
  pages (`mi_collect(true)`), under the step's own temporaries. Does nothing where none of these
  allocators is there.
  """
  import ctypes  # pylint: disable=g-import-not-at-top

  try:
    lib = ctypes.CDLL(None)
  except OSError:
    return
  for name, args in (
      ('MallocExtension_ReleaseFreeMemory', ()),
      ('mi_collect', (True,)),
      ('malloc_trim', (0,)),
  ):
    fn = getattr(lib, name, None)
    if fn is not None:
      fn(*args)
      return


def define_flags() -> None:
  if 'gin_file' in FLAGS:
    return
  flags.DEFINE_multi_string(
      'gin_file', default=[], help='Gin files (searched in --gin_search_paths and configs/).'
  )
  flags.DEFINE_multi_string(
      'gin_bindings', default=[], help='Individual gin bindings; --gin.NAME=VALUE also works.'
  )
  flags.DEFINE_list(
      'gin_search_paths', default=['.'], help='Comma-separated directories searched for gin files.'
  )
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data directory (local or gs://).')
  flags.DEFINE_list(
      'seqio_additional_cache_dirs', [], 'Directories searched for cached seqio tasks.'
  )
  flags.DEFINE_boolean(
      'multiprocess_gpu', False, 'Initialize jax.distributed for multi-process GPU/CPU runs.'
  )
  flags.DEFINE_string(
      'coordinator_address', None, 'IP:port of process 0 (with --multiprocess_gpu).'
  )
  flags.DEFINE_integer('process_count', None, 'Number of processes (with --multiprocess_gpu).')
  flags.DEFINE_integer('process_index', None, 'Index of this process (with --multiprocess_gpu).')
  flags.DEFINE_boolean(
      'tpu_multihost', False, 'Call jax.distributed.initialize() with no arguments (TPU pods).'
  )
  flags.DEFINE_string(
      'cpu_collectives', 'gloo', 'CPU collectives implementation for multi-process CPU runs.'
  )
  flags.DEFINE_boolean(
      'verbose',
      False,
      'Show the INFO logs of the libraries (orbax, seqio, TensorFlow start-up) and full tracebacks.',
  )
  flags.DEFINE_boolean(
      'allow_unused_macros',
      False,
      'Accept gin macros that no binding references (by default a likely typo, and an error).',
  )


def _verbose_requested(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return (
      any(a in ('--verbose', '--verbose=true', '--verbose=True', '-v') for a in argv)
      or any(re.match(r'^(--verbosity|-v)=?[1-9]', a) for a in argv)
      or bool(os.environ.get('PROMPT_TUNING_VERBOSE'))
  )


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
  """Sends file descriptor 2 to /dev/null (C++ libraries write there directly)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def quiet_startup() -> None:
  """Imports TensorFlow without its C++ start-up lines (oneDNN, CUDA probing) unless verbose.

  Call it before anything imports TensorFlow (seqio does); the entry modules do.
  """
  if _verbose_requested() or 'tensorflow' in sys.modules:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  with _stderr_silenced():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.experimental.set_visible_devices([], 'GPU')


class _QuietFilter(py_logging.Filter):
  """Quiet mode: this project's records, and the libraries' warnings (orbax's not at all).

  orbax logs every step of every save at INFO and, when a save fails, the same error with a
  traceback from each of its threads; the run reports the failure itself in one line.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = record.pathname or ''
    if (
        f'{os.sep}prompt_tuning{os.sep}' in path
        and 'site-packages' not in path.split(f'{os.sep}prompt_tuning{os.sep}')[-1]
    ):
      return True
    if f'{os.sep}orbax{os.sep}' in path:
      return record.levelno >= py_logging.CRITICAL
    return record.levelno >= py_logging.WARNING


def _quiet_logging() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietFilter) for f in handler.filters):
    handler.addFilter(_QuietFilter())


def initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.multiprocess_gpu:
    if (
        FLAGS.coordinator_address is None
        or FLAGS.process_count is None
        or FLAGS.process_index is None
    ):
      raise ValueError(
          '--multiprocess_gpu needs --coordinator_address, --process_count and --process_index.'
      )
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
    logging.info(
        'jax.distributed.initialize(%s, %d, %d)',
        FLAGS.coordinator_address,
        FLAGS.process_count,
        FLAGS.process_index,
    )
    jax.distributed.initialize(
        FLAGS.coordinator_address, num_processes=FLAGS.process_count, process_id=FLAGS.process_index
    )
  elif FLAGS.tpu_multihost:
    jax.distributed.initialize()


def _user_error_types():
  """Exceptions shown as one `ERROR:` line (config, data, checkpoint and NaN errors raised for the user)."""
  from prompt_tuning.runtime import trainer  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  types = [
      ValueError,
      OSError,  # FileNotFoundError, PermissionError, NotADirectoryError, ...
      KeyError,
      TypeError,
      RuntimeError,
      trainer.NanLossError,
      utils.FeatureLengthError,
  ]
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    types.append(tf.errors.OpError)
  except ImportError:
    pass
  return tuple(types)


def _message(e: BaseException) -> str:
  msg = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    msg = e.args[0]
  # gin appends "In call to configurable 'x' (<function x at 0x...>)" lines: the message is the
  # user's one line without them (--verbose shows the traceback and gin's context).
  lines = [l for l in msg.splitlines() if not l.strip().startswith('In call to configurable')]
  return re.sub(r' \(<(?:function|class|bound method) [^>]*>\)', '', '\n'.join(lines)).strip()


def main_with_gin(fn: Callable, argv) -> None:
  """Parses gin (with clear errors), sets up TF/TFDS/distributed state, then calls `fn()`.

  Errors a user can cause end in one `ERROR: ...` message naming the cause and the fix, exit code 1
  (2 for gin configuration errors), without a traceback; `--verbose` (or
  `PROMPT_TUNING_TRACEBACK=1`) re-raises them. Ctrl-C and SIGTERM end in one line, exit code
  128 + the signal number.
  """
  del argv
  verbose = FLAGS.verbose or _verbose_requested() or logging.get_verbosity() > logging.INFO
  quiet_startup()
  import gin  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top

  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))
  py_logging.getLogger('absl').setLevel(py_logging.DEBUG if verbose else py_logging.INFO)
  if not verbose:
    _quiet_logging()
    faults.quiet_closed_event_loop()
  if FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top

    seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
  if FLAGS.seqio_additional_cache_dirs:
    import seqio  # pylint: disable=g-import-not-at-top

    seqio.add_global_cache_dirs(FLAGS.seqio_additional_cache_dirs)
  traceback_wanted = verbose or bool(os.environ.get('PROMPT_TUNING_TRACEBACK'))
  try:
    gin_utils.parse_gin_flags(
        FLAGS.gin_search_paths,
        FLAGS.gin_file,
        FLAGS.gin_bindings,
        allow_unused_macros=FLAGS.allow_unused_macros,
    )
  except gin_utils.GinConfigError as e:
    if traceback_wanted:
      raise
    print(f'\nERROR: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    initialize_distributed()
    fn()
  except KeyboardInterrupt as e:
    if traceback_wanted:
      raise
    code = getattr(e, 'exit_code', 130)
    message = (
        str(e)
        if isinstance(e, faults.TrainingInterrupted) and str(e)
        else ('interrupted (Ctrl-C); nothing written so far is lost: rerun the same command.')
    )
    logging.warning('%s', message)
    print(f'\n{message}', file=sys.stderr, flush=True)
    sys.exit(code)
  except _user_error_types() as e:  # pylint: disable=catching-non-exception
    if traceback_wanted:
      raise
    logging.error('%s: %s', type(e).__name__, _message(e))
    print(
        f'\nERROR: {type(e).__name__}: {_message(e)}\n(--verbose shows the full traceback)',
        file=sys.stderr,
    )
    sys.exit(1)
