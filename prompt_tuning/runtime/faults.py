"""Faults a run meets, and what the user sees: one line naming the cause, nothing lost.

* `check_output_dir`: `MODEL_DIR` (and the eval/infer output directories) must be a writable
  directory; checked before any work.
* `RunLock`: one writer per `MODEL_DIR`. A lock file (`MODEL_DIR/prompt_tuning.lock`) names the
  holder (host, pid, start time, command); a second run refuses to start. The holder keeps an
  exclusive `flock` on the file, which the kernel drops when the process dies, so a lock left by a
  killed run is taken over safely (with a warning naming it). Only process 0 of a multi-process
  job takes it. Where `flock` is not available (object stores), a lock of a live process on this
  host, or of any process on another host, is respected and one of a dead process on this host is
  taken over.
* `Interrupts`: Ctrl-C (SIGINT) and SIGTERM during training. A signal during a training step or a
  checkpoint save stops training at the end of it; anywhere else it stops at once. On SIGTERM (how
  cloud VMs and TPU pods announce preemption) the current step is saved first, as T5X does on
  preemption. A second Ctrl-C stops at once. The run then ends with one line: "interrupted at step
  N; last complete checkpoint M; rerun the same command to resume".
* `describe_os_error`: the OS cause of a failed write (no space left on device, read-only file
  system, ...), read from an exception chain or from TensorStore's message.
* `quiet_closed_event_loop`: drops the "Event loop is closed" errors TensorStore's callbacks print
  after orbax has given up on a damaged or unwritable checkpoint.

This module imports neither JAX, seqio nor TensorFlow at module level.
"""

import contextlib
import datetime
import errno
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from absl import logging

from prompt_tuning import fs

LOCK_FILE = 'prompt_tuning.lock'


class OutputDirError(ValueError):
  """An output directory (MODEL_DIR, EVAL_OUTPUT_DIR, INFER_OUTPUT_DIR) cannot be written."""


class ModelDirInUseError(RuntimeError):
  """Another run holds the lock of MODEL_DIR."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the earlier ones are intact."""


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped the run (a KeyboardInterrupt, so no `except Exception` eats it)."""

  def __init__(self, signum: int, message: str = ''):
    super().__init__(message or f'interrupted by {signal.Signals(signum).name}')
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


# ----------------------------------------------------------------------------------------------
# OS errors.
# ----------------------------------------------------------------------------------------------

_ERRNO_WORDS = {
    errno.ENOSPC: 'no space left on device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EFBIG: 'file too large (file size limit)',
    errno.EROFS: 'read-only file system',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted',
    errno.EIO: 'input/output error',
}
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")


def os_errno(e: BaseException) -> Optional[int]:
  """The errno behind `e`: an `OSError` in its chain, or the code in TensorStore's message."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = _TS_ERRNO.search(str(e))
    if m:
      return int(m.group(1))
    for code, words in ((errno.ENOSPC, 'No space left on device'), (errno.EROFS, 'Read-only')):
      if words in str(e):
        return code
    e = e.__cause__ or e.__context__
  return None


def describe_os_error(e: BaseException) -> str:
  """A few words for the OS cause of `e` ('no space left on device'), or its first line."""
  code = os_errno(e)
  if code in _ERRNO_WORDS:
    return _ERRNO_WORDS[code]
  if code is not None:
    return os.strerror(code).lower()
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


# ----------------------------------------------------------------------------------------------
# Output directories.
# ----------------------------------------------------------------------------------------------


def check_output_dir(path: str, what: str) -> str:
  """Creates `path` if needed and checks that it is a writable directory; returns it.

  Raises:
    OutputDirError: naming `what` (e.g. 'MODEL_DIR'), the path and the cause.
  """
  if fs.exists(path) and not fs.isdir(path):
    raise OutputDirError(
        f'{what} {path} is a file, not a directory: point {what} at a directory (it is created '
        'when missing), or move the file away.'
    )
  probe = fs.join(path, f'.write_test-{socket.gethostname()}-{os.getpid()}')
  try:
    fs.makedirs(path)
    fs.write_bytes(probe, b'', atomic=False)
    fs.remove(probe, missing_ok=True)
  except (OSError, ValueError) as e:  # tf.io.gfile raises its own errors for URLs.
    if isinstance(e, NotADirectoryError) or (fs.exists(path) and not fs.isdir(path)):
      raise OutputDirError(
          f'{what} {path} is inside a file, not a directory: point {what} at a directory.'
      ) from None
    raise OutputDirError(
        f'{what} {path} is not writable ({describe_os_error(e)}): point {what} at a directory '
        'this user can write, or fix its permissions.'
    ) from None
  return path


# ----------------------------------------------------------------------------------------------
# One writer per MODEL_DIR.
# ----------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe_holder(info: Dict[str, Any]) -> str:
  started = info.get('start_time')
  when = (
      datetime.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M:%S')
      if isinstance(started, (int, float))
      else '?'
  )
  return f'pid {info.get("pid", "?")} on host {info.get("host", "?")}, started {when}'


class RunLock:
  """The lock of one MODEL_DIR (see the module docstring). Use `acquire()` and `release()`."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = fs.join(model_dir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._held = False
    self.took_over: Optional[Dict[str, Any]] = None

  def _info(self) -> Dict[str, Any]:
    return {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'start_time': time.time(),
        'command': ' '.join(sys.argv)[:1000],
        'state': 'running',
    }

  def _refuse(self, info: Dict[str, Any]) -> None:
    raise ModelDirInUseError(
        f'MODEL_DIR {self.model_dir} is in use by another run ({_describe_holder(info)}; command: '
        f'{info.get("command", "?")[:200]}). Two runs must not write one MODEL_DIR: wait for it '
        f'to end, stop it, or use another MODEL_DIR. (Lock file: {self.path}.)'
    )

  @staticmethod
  def _parse(text: str) -> Dict[str, Any]:
    try:
      info = json.loads(text) if text.strip() else {}
    except ValueError:
      info = {}
    return info if isinstance(info, dict) else {}

  def _note_takeover(self, previous: Dict[str, Any]) -> None:
    if previous.get('state') == 'running':
      self.took_over = previous
      logging.warning(
          'MODEL_DIR %s was locked by a run that is no longer running (%s); taking the lock over.',
          self.model_dir,
          _describe_holder(previous),
      )

  def acquire(self) -> 'RunLock':
    """Takes the lock or raises `ModelDirInUseError` naming the holder."""
    if fs.is_remote(self.path):
      return self._acquire_without_flock()
    import fcntl  # pylint: disable=g-import-not-at-top

    fd = os.open(fs.abspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      text = os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace')
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        self._refuse(self._parse(text))
      # No flock on this file system: fall back to the recorded pid.
      return self._acquire_without_flock()
    self._fd = fd
    self._note_takeover(self._parse(os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace')))
    self._write(self._info())
    self._held = True
    return self

  def _acquire_without_flock(self) -> 'RunLock':
    if fs.exists(self.path):
      previous = self._parse(fs.read_text(self.path))
      if previous.get('state') == 'running':
        same_host = previous.get('host') == socket.gethostname()
        pid = previous.get('pid')
        if not (same_host and isinstance(pid, int) and not _pid_alive(pid)):
          self._refuse(previous)
        self._note_takeover(previous)
    fs.write_text(self.path, json.dumps(self._info(), indent=1))
    self._held = True
    return self

  def _write(self, info: Dict[str, Any]) -> None:
    data = json.dumps(info, indent=1).encode('utf-8')
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, data, 0)
      os.fsync(self._fd)
    else:
      fs.write_bytes(self.path, data)

  def release(self) -> None:
    """Marks the lock released and drops it (the file stays: removing it would race)."""
    if not self._held:
      return
    self._held = False
    with contextlib.suppress(OSError, ValueError):
      info = self._parse(
          os.pread(self._fd, 1 << 16, 0).decode('utf-8', 'replace')
          if self._fd is not None
          else fs.read_text(self.path)
      )
      info.update(state='released', end_time=time.time())
      self._write(info)
    if self._fd is not None:
      os.close(self._fd)  # Drops the flock.
      self._fd = None

  def __enter__(self) -> 'RunLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM.
# ----------------------------------------------------------------------------------------------


class Interrupts:
  """SIGINT/SIGTERM handling of a training run (see the module docstring).

  Inside `deferred()` (a training step, a checkpoint save) a signal only sets `signum` and calls
  `on_stop` (which asks the trainer to stop after the current step); elsewhere it raises
  `TrainingInterrupted` at once. A second SIGINT always raises at once. Handlers are installed only
  in the main thread and restored by `restore()`.
  """

  def __init__(self, on_stop: Optional[Callable[[], None]] = None):
    self.signum: Optional[int] = None
    self.on_stop = on_stop
    self._deferred = 0
    self._previous: Dict[int, Any] = {}

  def install(self) -> 'Interrupts':
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    again = self.signum is not None
    self.signum = signum
    if self._deferred and not (again and signum == signal.SIGINT):
      logging.warning(
          '%s received: stopping after the current step%s.',
          signal.Signals(signum).name,
          ' (and saving it)' if signum == signal.SIGTERM else '',
      )
      if self.on_stop is not None:
        self.on_stop()
      return
    raise TrainingInterrupted(signum)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Signals inside this block stop the run at its end instead of interrupting it."""
    self._deferred += 1
    try:
      yield
    finally:
      self._deferred -= 1

  def check(self) -> None:
    """Raises `TrainingInterrupted` if a signal arrived during a deferred block."""
    if self.signum is not None:
      raise TrainingInterrupted(self.signum)


# ----------------------------------------------------------------------------------------------
# Noise.
# ----------------------------------------------------------------------------------------------

_HOOK_INSTALLED = False


def quiet_closed_event_loop() -> None:
  """Drops "RuntimeError: Event loop is closed" reports of TensorStore callbacks (idempotent).

  When orbax gives up on a checkpoint it cannot read or write, TensorStore still calls back into
  the asyncio loop orbax has already closed; Python reports each of those as an unraisable
  exception with a traceback, which says nothing about the cause. Every other unraisable exception
  still goes to the previous hook.
  """
  global _HOOK_INSTALLED
  if _HOOK_INSTALLED:
    return
  _HOOK_INSTALLED = True
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and 'Event loop is closed' in str(value):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def interrupted_message(signum: int, step: Optional[int], last: Optional[Tuple[int, str]]) -> str:
  """The one line that ends an interrupted training run."""
  name = {signal.SIGINT: 'interrupted (Ctrl-C)', signal.SIGTERM: 'terminated (SIGTERM)'}.get(
      signum, f'stopped by {signal.Signals(signum).name}'
  )
  where = f' at step {step}' if step is not None else ' before training started'
  ckpt = f'last complete checkpoint {last[0]} ({last[1]})' if last else 'no checkpoint was written'
  return f'{name}{where}; {ckpt}; rerun the same command to resume.'
