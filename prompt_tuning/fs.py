"""The file system layer of the library: local paths through `os`, URLs through `tf.io.gfile`.

Every module that touches checkpoints, prompt files or model directories goes through these
functions, so `gs://bucket/...` (or any other scheme TensorFlow's file systems know) works wherever
a local path does. A path is *remote* when it starts with `<scheme>://`; everything else is a local
path (`~` is expanded).

TensorFlow is imported only inside the functions, and only for remote paths: a process that trains
or serves from local files never imports it (`tests/runtime/test_lazy_imports.py`).

Writes are atomic where the file system allows it: `write_bytes` writes a temporary sibling and
renames it over the target (a reader sees the old file or the new one, never half of one; an
interrupted write leaves the old file as it was), and `rename(..., overwrite=True)` replaces a file
with `os.replace`. On object stores (`gs://`) an object only appears once it is completely
uploaded, so a direct write is atomic there too; renaming a directory on them is a copy and is not.
"""

import builtins
import contextlib
import os
import re
import shutil
import time
from typing import IO, Any, List, Union

PathLike = Union[str, os.PathLike]

_SCHEME_RE = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def _gfile() -> Any:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile


def _str(path: PathLike) -> str:
  return os.fspath(path)


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`, `s3://...`, ...) rather than a local path."""
  return bool(_SCHEME_RE.match(_str(path)))


def _local(path: PathLike) -> str:
  return os.path.expanduser(_str(path))


# ----------------------------------------------------------------------------------------------
# Path arithmetic (no file system access).
# ----------------------------------------------------------------------------------------------


def join(path: PathLike, *parts: PathLike) -> str:
  """Joins path components; URLs are joined with `/` whatever the operating system."""
  path = _str(path)
  if is_remote(path):
    out = path.rstrip('/')
    for part in parts:
      out = f'{out}/{_str(part).strip("/")}'
    return out
  return os.path.join(path, *(_str(p) for p in parts))


def basename(path: PathLike) -> str:
  """The last component of `path` (a trailing `/` is ignored)."""
  return _str(path).rstrip('/').rsplit('/', 1)[-1]


def dirname(path: PathLike) -> str:
  """`path` without its last component (a trailing `/` is ignored)."""
  path = _str(path).rstrip('/')
  if is_remote(path):
    head = path.rsplit('/', 1)[0]
    return head if is_remote(head) else path  # `gs://bucket` has no parent.
  return os.path.dirname(path)


def abspath(path: PathLike) -> str:
  """An absolute local path (`~` expanded), or the URL without a trailing `/`."""
  path = _str(path)
  if is_remote(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------------
# Queries.
# ----------------------------------------------------------------------------------------------


def exists(path: PathLike) -> bool:
  """Whether a file or directory exists at `path`."""
  if is_remote(path):
    return _gfile().exists(_str(path))
  return os.path.exists(_local(path))


def isdir(path: PathLike) -> bool:
  """Whether `path` is a directory."""
  if is_remote(path):
    return _gfile().isdir(_str(path))
  return os.path.isdir(_local(path))


def isfile(path: PathLike) -> bool:
  """Whether `path` is a file (exists and is not a directory)."""
  if is_remote(path):
    gfile = _gfile()
    return gfile.exists(_str(path)) and not gfile.isdir(_str(path))
  return os.path.isfile(_local(path))


def listdir(path: PathLike, *, missing_ok: bool = False) -> List[str]:
  """Sorted names of the entries of directory `path` (no trailing `/` on subdirectories).

  Args:
    path: a directory.
    missing_ok: return `[]` when `path` does not exist instead of raising.

  Raises:
    FileNotFoundError: `path` does not exist (and not `missing_ok`).
    NotADirectoryError: `path` is a file.
  """
  if not exists(path):
    if missing_ok:
      return []
    raise FileNotFoundError(f'Cannot list {_str(path)}: the directory does not exist.')
  if not isdir(path):
    raise NotADirectoryError(f'Cannot list {_str(path)}: it is a file, not a directory.')
  if is_remote(path):
    names = [name.rstrip('/') for name in _gfile().listdir(_str(path))]
  else:
    names = os.listdir(_local(path))
  return sorted(names)


# ----------------------------------------------------------------------------------------------
# Changes.
# ----------------------------------------------------------------------------------------------


def makedirs(path: PathLike) -> None:
  """Creates directory `path` and its parents; nothing happens when it exists."""
  if is_remote(path):
    _gfile().makedirs(_str(path))
  else:
    os.makedirs(_local(path), exist_ok=True)


def rmtree(path: PathLike, *, missing_ok: bool = False) -> None:
  """Deletes directory `path` and everything under it (a file is deleted too).

  Raises:
    FileNotFoundError: nothing exists at `path` (and not `missing_ok`).
  """
  if not exists(path):
    if missing_ok:
      return
    raise FileNotFoundError(f'Cannot delete {_str(path)}: it does not exist.')
  if is_remote(path):
    gfile = _gfile()
    if gfile.isdir(_str(path)):
      gfile.rmtree(_str(path))
    else:
      gfile.remove(_str(path))
  elif os.path.isdir(_local(path)) and not os.path.islink(_local(path)):
    shutil.rmtree(_local(path))
  else:
    os.remove(_local(path))


def remove(path: PathLike, *, missing_ok: bool = False) -> None:
  """Deletes file `path`."""
  if not exists(path):
    if missing_ok:
      return
    raise FileNotFoundError(f'Cannot delete {_str(path)}: it does not exist.')
  if is_remote(path):
    _gfile().remove(_str(path))
  else:
    os.remove(_local(path))


def rename(src: PathLike, dst: PathLike, *, overwrite: bool = False) -> None:
  """Moves `src` to `dst`.

  Locally a file (or a directory onto a missing or empty one) is moved with `os.replace`, which
  is atomic: `dst` is the old entry or the new one, never missing and never half written. A
  directory that replaces a non-empty directory is swapped in with two renames (the old one is
  moved aside, the new one moved in, then the old one deleted), so `dst` is missing only between
  the two renames and the old contents are never deleted before the new ones are in place.

  Args:
    src: the existing file or directory.
    dst: its new name.
    overwrite: replace an existing `dst`.

  Raises:
    FileNotFoundError: `src` does not exist.
    FileExistsError: `dst` exists and `overwrite` is False.
  """
  src, dst = _str(src), _str(dst)
  if not exists(src):
    raise FileNotFoundError(f'Cannot rename {src}: it does not exist.')
  if exists(dst) and not overwrite:
    raise FileExistsError(f'Cannot rename {src} to {dst}: {dst} exists (pass overwrite=True).')
  if is_remote(src) or is_remote(dst):
    gfile = _gfile()
    if overwrite and gfile.isdir(dst):
      _swap_dir(src, dst)
    else:
      gfile.rename(src, dst, overwrite=overwrite)
    return
  if os.path.isdir(_local(dst)) and os.listdir(_local(dst)):
    _swap_dir(src, dst)
  else:
    os.replace(_local(src), _local(dst))


def _swap_dir(src: str, dst: str) -> None:
  """Replaces directory `dst` by `src`: `dst` aside, `src` in, then the old `dst` deleted."""
  old = f'{dst.rstrip("/")}.old-{time.time_ns()}'
  move = _gfile().rename if is_remote(dst) else (lambda a, b: os.rename(_local(a), _local(b)))
  move(dst, old)
  try:
    move(src, dst)
  except BaseException:
    move(old, dst)  # Put the old one back: `dst` is never lost.
    raise
  rmtree(old, missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Contents.
# ----------------------------------------------------------------------------------------------


def open(path: PathLike, mode: str = 'rb') -> IO[Any]:  # pylint: disable=redefined-builtin
  """Opens a file like the builtin `open` (local) or `tf.io.gfile.GFile` (URLs).

  Raises:
    FileNotFoundError: reading a file that does not exist (for URLs as well).
  """
  if is_remote(path):
    if 'r' in mode and not isfile(path):
      raise FileNotFoundError(f'{_str(path)} does not exist (or is a directory).')
    return _gfile().GFile(_str(path), mode)
  return builtins.open(_local(path), mode)


def read_bytes(path: PathLike) -> bytes:
  """The contents of file `path`."""
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: PathLike, encoding: str = 'utf-8') -> str:
  """The contents of text file `path`."""
  return read_bytes(path).decode(encoding)


def write_bytes(path: PathLike, data: bytes, *, atomic: bool = True) -> None:
  """Writes `data` to file `path`, replacing it.

  With `atomic` (the default) a local file is written to a temporary sibling, flushed to disk and
  renamed over `path`: a crash leaves the old file (or none) and at most a `*.tmp-*` sibling,
  never a truncated `path`. Objects on `gs://` appear only when completely uploaded.
  """
  if is_remote(path):
    with _gfile().GFile(_str(path), 'wb') as f:
      f.write(data)
    return
  target = _local(path)
  if not atomic:
    with builtins.open(target, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return
  tmp = f'{target}.tmp-{os.getpid()}-{time.time_ns()}'
  try:
    with builtins.open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str, *, encoding: str = 'utf-8', atomic: bool = True) -> None:
  """Writes `text` to file `path` (atomically, see `write_bytes`)."""
  write_bytes(path, text.encode(encoding), atomic=atomic)
