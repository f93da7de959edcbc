"""The prompt library: trained prompts (or banks, or method artifacts) with their metadata.

A library is a directory. Each entry is a name, one or more arrays (`prompt`: `[P, H]` for a prompt,
`[N, P, H]` for a bank) and metadata: task or mixture, method and its gin config, length,
initialization, training steps, metrics at the kept step, and the **backbone fingerprint** of the
frozen model the prompt was trained on, so a prompt is never silently used with another model.

Reading API (what eval/infer, SPoT, recycling, ensembling and the server use)::

    lib = library.Library('/path/to/library')
    lib.list()                      # [EntryInfo(name, metadata)], sorted by name (no array read)
    lib.list(backbone=ckpt)         # only the entries trained on that backbone
    entry = lib.get('sst2_a')       # Entry(name, metadata, arrays); entry.array is the prompt
    entry = lib.get('sst2_a', backbone=ckpt)   # BackboneMismatchError unless fingerprints match
    lib.version()                   # int, +1 on every add/rm: poll it to hot-reload
    lib.index_path                  # the one file every change rewrites (watch its mtime)
    library.backbone_fingerprint(params_or_checkpoint_or_embedding)  # -> Fingerprint
    library.load_prompt('library:sst2_a', library_dir=..., backbone=ckpt)  # -> np.ndarray

`backbone` arguments accept a checkpoint path (any format `checkpoints.formats.load_params` reads:
only `token_embedder/embedding` is read), a parameter tree, a `[V, H]` embedding table or a
`Fingerprint`. References `library:NAME` work wherever a prompt file does (`PROMPT_FILE`,
`prompts.np_load`); the library directory is `LIBRARY_DIR` in gin, else `$PROMPT_TUNING_LIBRARY`.

Writing: `lib.add(name, array, metadata, backbone=...)`, `lib.remove(name)`, `lib.export(name,
path)`; from the command line `python -m prompt_tuning.library {add,list,show,rm,export}`; from a
training run `configs/runs/add_to_library.gin` (`AddToLibrary`, called at the end of training).

Layout and guarantees::

    LIBRARY_DIR/
      LIBRARY.json              index: {format, version, entries: {name: {id, metadata}}}
      objects/<id>/             one immutable directory per added entry:
        metadata.json             the entry's metadata
        <array name>.npy          its arrays (`prompt.npy`, ...)
      tmp/                      entries being written
      .lock                     writers hold an exclusive `flock` while they update the index

An entry is written completely under `tmp/` and renamed into `objects/` (atomic), then the index is
rewritten (atomically, `fs.write_bytes`) under the lock, and only then is a replaced object deleted.
A writer killed at any point leaves the index pointing at the old complete object or the new
complete one; leftovers (`tmp/*`, unreferenced objects) are removed by later writers once they are an
hour old. Two writers never corrupt an entry or lose each other's entries (the index update is a
locked read-modify-write). Readers never lock: they read the index, then the immutable object (and
re-read the index once if the object was replaced meanwhile). Locking needs a local directory; on
`gs://` keep to one writer at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from prompt_tuning import fs

FORMAT_NAME = 'prompt_tuning/library-1'
INDEX_FILE = 'LIBRARY.json'
OBJECTS_DIR = 'objects'
TMP_DIR = 'tmp'
LOCK_FILE = '.lock'
METADATA_FILE = 'metadata.json'
REF_PREFIX = 'library:'
ENV_VAR = 'PROMPT_TUNING_LIBRARY'
EMBEDDING_PATH = 'token_embedder/embedding'
# Leftovers of interrupted writers are removed once they are this old (seconds).
STALE_AGE = 3600.0
NUM_FINGERPRINT_ROWS = 16

_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$')
_ARRAY_NAME_RE = re.compile(r'^[A-Za-z0-9_]{1,64}$')

BackboneLike = Any  # str checkpoint path | params tree | [V, H] array | Fingerprint | None


class LibraryError(ValueError):
  """A library operation that cannot be done (unknown entry, bad name, existing entry, ...)."""


class BackboneMismatchError(LibraryError):
  """A library entry was trained on another backbone than the one it is used with."""


# ----------------------------------------------------------------------------------------------
# Backbone fingerprints.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """Identifies a frozen backbone by its embedding table.

  Attributes:
    vocab_size: rows of `token_embedder/embedding`.
    emb_dim: its columns.
    digest: sha256 (hex) of the shape and of `NUM_FINGERPRINT_ROWS` fixed rows (evenly spaced ids,
      first and last included), rounded to bfloat16 so a float32 and a bfloat16 copy of one
      checkpoint agree.
  """

  vocab_size: int
  emb_dim: int
  digest: str

  def __str__(self) -> str:
    return f'V{self.vocab_size}xH{self.emb_dim}:{self.digest[:12]}'

  def to_json(self) -> Dict[str, Any]:
    return {'vocab_size': self.vocab_size, 'emb_dim': self.emb_dim, 'digest': self.digest}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> 'Fingerprint':
    return cls(int(value['vocab_size']), int(value['emb_dim']), str(value['digest']))


def fingerprint_rows(vocab_size: int) -> np.ndarray:
  """The embedding row ids a fingerprint hashes: evenly spaced, first and last included."""
  n = min(NUM_FINGERPRINT_ROWS, vocab_size)
  return np.unique(np.linspace(0, vocab_size - 1, n).round().astype(np.int64))


def fingerprint_of_embedding(embedding: Any) -> Fingerprint:
  """The `Fingerprint` of a `[V, H]` embedding table."""
  table = np.asarray(embedding)
  if table.ndim != 2:
    raise LibraryError(f'An embedding table is [vocab, embed], got shape {table.shape}.')
  rows = np.ascontiguousarray(table[fingerprint_rows(table.shape[0])].astype(np.float32))
  # float32 -> bfloat16 bits, round to nearest even (as ml_dtypes does for finite values).
  bits = rows.view(np.uint32).astype(np.uint64)
  rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype('<u2')
  h = hashlib.sha256()
  h.update(f'{table.shape[0]}x{table.shape[1]}'.encode())
  h.update(rounded.tobytes())
  return Fingerprint(int(table.shape[0]), int(table.shape[1]), h.hexdigest())


def _embedding_of(params: Mapping[str, Any]) -> Any:
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(params)
  for key in (EMBEDDING_PATH, f'target/{EMBEDDING_PATH}', f'params/{EMBEDDING_PATH}'):
    if key in flat:
      return flat[key]
  raise LibraryError(
      f"The parameters have no {EMBEDDING_PATH!r}; pass the frozen backbone's parameters or "
      'checkpoint to fingerprint it.'
  )


_FINGERPRINT_CACHE: Dict[str, Fingerprint] = {}


def backbone_fingerprint(backbone: BackboneLike) -> Fingerprint:
  """The `Fingerprint` of a backbone.

  Args:
    backbone: a checkpoint path (T5X, Hugging Face or this project's; only the embedding variable
      is read), a `.npy` file holding the `[V, H]` embedding table, a parameter tree, a `[V, H]`
      array, or a `Fingerprint` (returned as it is).

  Returns:
    The fingerprint.
  """
  if isinstance(backbone, Fingerprint):
    return backbone
  if isinstance(backbone, (str, os.PathLike)):
    path = str(backbone)
    key = fs.abspath(path)
    if key not in _FINGERPRINT_CACHE:
      if fs.isfile(path) and path.endswith('.npy'):
        table = _load_npy(path)
      else:
        from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

        try:
          loaded = formats.load_params(path, variables=[EMBEDDING_PATH])
        except KeyError:
          raise LibraryError(
              f'Cannot fingerprint the backbone {path}: it has no {EMBEDDING_PATH!r} (a '
              'prompt-only checkpoint?). Pass the frozen backbone checkpoint.'
          ) from None
        table = _embedding_of(loaded)
      _FINGERPRINT_CACHE[key] = fingerprint_of_embedding(table)
    return _FINGERPRINT_CACHE[key]
  if isinstance(backbone, Mapping):
    return fingerprint_of_embedding(np.asarray(_embedding_of(backbone)))
  if hasattr(backbone, 'shape'):
    return fingerprint_of_embedding(np.asarray(backbone))
  raise LibraryError(
      f'Cannot fingerprint a backbone given as {type(backbone).__name__}: pass a checkpoint path, '
      'a parameter tree, an embedding table or a Fingerprint.'
  )


def _describe_backbone(fp: Optional[Fingerprint], source: Optional[str]) -> str:
  if fp is None:
    return 'an unrecorded backbone'
  return f'backbone {fp}' + (f' ({source})' if source else '')


# ----------------------------------------------------------------------------------------------
# Entries.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntryInfo:
  """An entry's name and metadata (what `Library.list` returns; no array is read)."""

  name: str
  metadata: Mapping[str, Any]

  @property
  def fingerprint(self) -> Optional[Fingerprint]:
    value = self.metadata.get('backbone')
    return Fingerprint.from_json(value) if value else None

  @property
  def shape(self) -> tuple:
    return tuple(self.metadata.get('shapes', {}).get('prompt', ()))


@dataclasses.dataclass(frozen=True)
class Entry(EntryInfo):
  """An entry with its arrays (what `Library.get` returns)."""

  arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def array(self) -> np.ndarray:
    """The main array: `prompt` (the only array when there is one)."""
    if 'prompt' in self.arrays:
      return self.arrays['prompt']
    if len(self.arrays) == 1:
      return next(iter(self.arrays.values()))
    raise LibraryError(
        f'Entry {self.name!r} has no "prompt" array; its arrays are {sorted(self.arrays)}.'
    )


def check_name(name: str) -> str:
  """Returns `name` when it is a valid entry name, else raises `LibraryError`."""
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise LibraryError(
        f'Invalid library entry name {name!r}: use letters, digits, "_", "-" and "." (starting '
        'with a letter or digit, at most 128 characters).'
    )
  return name


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  return buffer.getvalue()


def _load_npy(path: str) -> np.ndarray:
  with fs.open(path, 'rb') as f:
    return np.load(f, allow_pickle=False)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


class Library:
  """A prompt library directory (see the module docstring)."""

  def __init__(self, path: str):
    if not path:
      raise LibraryError(
          f'No library directory: set LIBRARY_DIR (gin), pass --library or set ${ENV_VAR}.'
      )
    self.path = fs.abspath(str(path))

  def __repr__(self) -> str:
    return f'Library({self.path!r})'

  # ----- paths -----

  @property
  def index_path(self) -> str:
    """The index file; every change rewrites it (watch its mtime, or poll `version()`)."""
    return fs.join(self.path, INDEX_FILE)

  def _object_dir(self, object_id: str) -> str:
    return fs.join(self.path, OBJECTS_DIR, object_id)

  # ----- reading -----

  def _read_index(self) -> Dict[str, Any]:
    if not fs.exists(self.index_path):
      return {'format': FORMAT_NAME, 'version': 0, 'entries': {}}
    try:
      index = json.loads(fs.read_text(self.index_path))
    except ValueError as e:
      raise LibraryError(f'{self.index_path} is not a library index ({e}).') from None
    if index.get('format') != FORMAT_NAME:
      raise LibraryError(
          f'{self.index_path} has format {index.get("format")!r}, expected {FORMAT_NAME!r}.'
      )
    return index

  def exists(self) -> bool:
    """Whether the directory holds a library index."""
    return fs.exists(self.index_path)

  def version(self) -> int:
    """A counter that every add and rm increments (0 for an empty or missing library)."""
    return int(self._read_index().get('version', 0))

  def names(self) -> List[str]:
    return sorted(self._read_index()['entries'])

  def __contains__(self, name: str) -> bool:
    return name in self._read_index()['entries']

  def list(self, backbone: BackboneLike = None, *, task: Optional[str] = None) -> List[EntryInfo]:
    """The entries, sorted by name; with `backbone`, only those trained on it; with `task`, only
    those of that task or mixture."""
    entries = self._read_index()['entries']
    fp = backbone_fingerprint(backbone) if backbone is not None else None
    out = []
    for name in sorted(entries):
      info = EntryInfo(name, entries[name]['metadata'])
      if fp is not None and info.fingerprint != fp:
        continue
      if task is not None and info.metadata.get('task') != task:
        continue
      out.append(info)
    return out

  def info(self, name: str) -> EntryInfo:
    """One entry's metadata (no array read)."""
    entries = self._read_index()['entries']
    if name not in entries:
      raise self._unknown(name, entries)
    return EntryInfo(name, entries[name]['metadata'])

  def _unknown(self, name: str, entries: Mapping[str, Any]) -> LibraryError:
    import difflib  # pylint: disable=g-import-not-at-top

    close = difflib.get_close_matches(name, list(entries), n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    known = f' It has {len(entries)} entries.' if entries else ' It is empty.'
    return LibraryError(
        f'No entry {name!r} in the prompt library {self.path}.{known}{hint} '
        f'(`python -m prompt_tuning.library list --library={self.path}` lists them.)'
    )

  def get(self, name: str, backbone: BackboneLike = None) -> Entry:
    """An entry with its arrays.

    Args:
      name: the entry.
      backbone: if given (checkpoint path, params, embedding or Fingerprint), the entry's recorded
        backbone must be this one.

    Raises:
      LibraryError: no such entry.
      BackboneMismatchError: the entry was trained on another backbone (or has none recorded).
    """
    for attempt in range(3):
      entries = self._read_index()['entries']
      if name not in entries:
        raise self._unknown(name, entries)
      record = entries[name]
      directory = self._object_dir(record['id'])
      try:
        arrays = {
            key: _load_npy(fs.join(directory, f'{key}.npy'))
            for key in record['metadata'].get('shapes', {})
        }
      except FileNotFoundError:
        if attempt < 2:  # Replaced or removed by a writer between the two reads: read again.
          continue
        raise LibraryError(
            f'Entry {name!r} of {self.path} points at {directory}, which is missing.'
        ) from None
      entry = Entry(name, record['metadata'], arrays)
      if backbone is not None:
        check_backbone(entry, backbone)
      return entry
    raise AssertionError('unreachable')

  # ----- writing -----

  @contextlib.contextmanager
  def _lock(self) -> Iterator[None]:
    fs.makedirs(self.path)
    if fs.is_remote(self.path):
      yield  # No locks on object stores: one writer at a time (see the module docstring).
      return
    import fcntl  # pylint: disable=g-import-not-at-top

    with open(os.path.join(self.path, LOCK_FILE), 'a+') as f:  # pylint: disable=unspecified-encoding
      fcntl.flock(f.fileno(), fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

  def _write_index(self, index: Dict[str, Any]) -> None:
    index['version'] = int(index.get('version', 0)) + 1
    index['format'] = FORMAT_NAME
    text = json.dumps(index, indent=1, sort_keys=True, default=_json_default)
    fs.write_text(self.index_path, text)

  def add(
      self,
      name: str,
      arrays: Union[np.ndarray, Mapping[str, np.ndarray]],
      metadata: Optional[Mapping[str, Any]] = None,
      *,
      backbone: BackboneLike = None,
      allow_no_backbone: bool = False,
      overwrite: bool = False,
      progress: Optional[Callable[[str], None]] = None,
  ) -> EntryInfo:
    """Adds (or with `overwrite` replaces) an entry, atomically.

    Args:
      name: the entry name.
      arrays: the prompt (`[P, H]`, or a `[N, P, H]` bank), or `{array name: array}` (a method
        artifact; `prompt` is the main array).
      metadata: JSON-serializable metadata (task, method, gin, init, steps, metrics, ...).
      backbone: the frozen backbone the prompt was trained on (checkpoint path, params,
        embedding or Fingerprint); recorded as its fingerprint.
      allow_no_backbone: add without a backbone (the entry then cannot be checked at load time).
      overwrite: replace an existing entry of that name.
      progress: optional callable receiving progress messages.

    Returns:
      The added entry's `EntryInfo`.
    """
    check_name(name)
    say = progress or (lambda _: None)
    if not isinstance(arrays, Mapping):
      arrays = {'prompt': arrays}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if not arrays:
      raise LibraryError(f'Entry {name!r} has no arrays.')
    for key, value in arrays.items():
      if not _ARRAY_NAME_RE.match(key):
        raise LibraryError(f'Invalid array name {key!r} (letters, digits and "_").')
      if value.dtype.hasobject:
        raise LibraryError(f'Array {key!r} of entry {name!r} holds Python objects.')
    if backbone is None and not allow_no_backbone:
      raise LibraryError(
          f'Entry {name!r} needs the backbone it was trained on (a checkpoint path): it is '
          'recorded as a fingerprint so the prompt is never used with another model. Pass '
          'backbone=... (--backbone), or allow_no_backbone=True (--no_backbone) to skip the check.'
      )
    meta = dict(metadata or {})
    fp = backbone_fingerprint(backbone) if backbone is not None else None
    meta['name'] = name
    meta['backbone'] = fp.to_json() if fp is not None else None
    if isinstance(backbone, (str, os.PathLike)):
      meta.setdefault('backbone_source', str(backbone))
    meta['shapes'] = {k: list(v.shape) for k, v in arrays.items()}
    meta['dtypes'] = {k: v.dtype.name for k, v in arrays.items()}
    main = arrays.get('prompt')
    if main is not None and main.ndim >= 2:
      meta.setdefault('length', int(main.shape[-2]))
      meta.setdefault('kind', 'bank' if main.ndim == 3 else 'prompt')
    meta.setdefault('kind', 'artifact')
    meta['added'] = time.time()
    # Fail early (before writing anything) when the name is taken.
    if not overwrite and name in self._read_index()['entries']:
      raise LibraryError(
          f'The library {self.path} already has an entry {name!r}; pass overwrite=True '
          '(--overwrite) to replace it, or choose another name.'
      )
    object_id = f'{time.strftime("%Y%m%d-%H%M%S")}-{uuid.uuid4().hex[:12]}'
    tmp = fs.join(self.path, TMP_DIR, object_id)
    fs.makedirs(tmp)
    try:
      for key, value in arrays.items():
        say(f'writing array {key} {tuple(value.shape)} to {tmp}')
        fs.write_bytes(fs.join(tmp, f'{key}.npy'), _npy_bytes(value))
      fs.write_text(
          fs.join(tmp, METADATA_FILE),
          json.dumps(meta, indent=1, sort_keys=True, default=_json_default),
      )
      fs.makedirs(fs.join(self.path, OBJECTS_DIR))
      say(f'moving {tmp} into objects/')
      fs.rename(tmp, self._object_dir(object_id))
    except BaseException:
      fs.rmtree(tmp, missing_ok=True)
      raise
    replaced, committed = None, False
    try:
      with self._lock():
        index = self._read_index()
        if name in index['entries']:
          if not overwrite:
            raise LibraryError(
                f'The library {self.path} already has an entry {name!r} (added concurrently); '
                'pass overwrite=True to replace it.'
            )
          replaced = index['entries'][name]['id']
        record = json.loads(json.dumps(meta, default=_json_default))
        index['entries'][name] = {'id': object_id, 'metadata': record}
        say(f'writing the index {self.index_path}')
        self._write_index(index)
        committed = True
        say('committed')
        self._collect_garbage(index)
    except BaseException:
      if not committed:
        fs.rmtree(self._object_dir(object_id), missing_ok=True)
      raise
    if replaced is not None:
      fs.rmtree(self._object_dir(replaced), missing_ok=True)
    return EntryInfo(name, meta)

  def remove(self, name: str) -> None:
    """Removes an entry (the index first, then its files)."""
    with self._lock():
      index = self._read_index()
      if name not in index['entries']:
        raise self._unknown(name, index['entries'])
      object_id = index['entries'].pop(name)['id']
      self._write_index(index)
    fs.rmtree(self._object_dir(object_id), missing_ok=True)

  def _collect_garbage(self, index: Mapping[str, Any]) -> None:
    """Removes leftovers of interrupted writers that are older than `STALE_AGE` (under the lock)."""
    if fs.is_remote(self.path):
      return
    now = time.time()
    live = {record['id'] for record in index['entries'].values()}
    for sub, keep in ((TMP_DIR, set()), (OBJECTS_DIR, live)):
      for object_id in fs.listdir(fs.join(self.path, sub), missing_ok=True):
        path = fs.join(self.path, sub, object_id)
        if object_id in keep:
          continue
        with contextlib.suppress(OSError):
          if now - os.path.getmtime(path) > STALE_AGE:
            fs.rmtree(path, missing_ok=True)

  def export(self, name: str, path: str, *, metadata_path: Optional[str] = None) -> None:
    """Writes an entry's main array to a `.npy` file (atomically), and optionally its metadata."""
    entry = self.get(name)
    fs.write_bytes(path, _npy_bytes(entry.array))
    if metadata_path:
      fs.write_text(
          metadata_path, json.dumps(dict(entry.metadata), indent=1, default=_json_default)
      )


def check_backbone(entry: EntryInfo, backbone: BackboneLike) -> None:
  """Raises `BackboneMismatchError` unless `entry` was trained on `backbone`."""
  fp = backbone_fingerprint(backbone)
  recorded = entry.fingerprint
  if recorded == fp:
    return
  source = str(backbone) if isinstance(backbone, (str, os.PathLike)) else None
  if recorded is None:
    raise BackboneMismatchError(
        f'Library entry {entry.name!r} has no recorded backbone, so it cannot be checked '
        f'against {_describe_backbone(fp, source)}. Re-add it with --backbone, or load it '
        'without a backbone check.'
    )
  raise BackboneMismatchError(
      f'Library entry {entry.name!r} was trained on '
      f'{_describe_backbone(recorded, entry.metadata.get("backbone_source"))}, but the model '
      f'is {_describe_backbone(fp, source)}. A prompt only works with the frozen model it was '
      'trained on: use an entry trained on this backbone (`python -m prompt_tuning.library list '
      '--backbone=<checkpoint>`), or recycle the prompt to it (`python -m prompt_tuning.recycle`).'
  )


# ----------------------------------------------------------------------------------------------
# References (`library:NAME`).
# ----------------------------------------------------------------------------------------------


def is_ref(value: Any) -> bool:
  """Whether `value` is a `library:NAME` reference."""
  return isinstance(value, str) and value.startswith(REF_PREFIX)


def parse_ref(ref: str) -> str:
  """`'library:NAME'` -> `'NAME'`."""
  if not is_ref(ref):
    raise LibraryError(f'{ref!r} is not a library reference (expected "library:NAME").')
  return check_name(ref[len(REF_PREFIX) :])


def default_library_dir(library_dir: Optional[str] = None) -> str:
  """`library_dir`, else `$PROMPT_TUNING_LIBRARY`; an error naming both when neither is set."""
  path = library_dir or os.environ.get(ENV_VAR)
  if not path:
    raise LibraryError(
        'A library:NAME reference needs the library directory: set LIBRARY_DIR '
        f'(--gin.LIBRARY_DIR="\'/path/to/library\'") or the environment variable {ENV_VAR}.'
    )
  return path


def load_entry(
    ref_or_name: str, library_dir: Optional[str] = None, backbone: BackboneLike = None
) -> Entry:
  """The entry of `library:NAME` (or `NAME`), checked against `backbone` when given."""
  name = parse_ref(ref_or_name) if is_ref(ref_or_name) else check_name(ref_or_name)
  return Library(default_library_dir(library_dir)).get(name, backbone=backbone)


def load_prompt(
    name: str, library_dir: Optional[str] = None, backbone: BackboneLike = None
) -> np.ndarray:
  """The prompt array of a library entry (`NAME` or `library:NAME`); gin-configurable.

  Args:
    name: the entry.
    library_dir: the library (`LIBRARY_DIR`); default `$PROMPT_TUNING_LIBRARY`.
    backbone: the frozen model the prompt is used with (usually `%INITIAL_CHECKPOINT_PATH`); when
      given, the entry must have been trained on it.
  """
  return load_entry(name, library_dir, backbone).array


def prompt_loader(
    name: str, library_dir: Optional[str] = None, backbone: BackboneLike = None
) -> Callable[[], np.ndarray]:
  """A zero-argument loader of `load_prompt(...)` (read when the prompt is initialized)."""
  return lambda: load_prompt(name, library_dir, backbone)


# ----------------------------------------------------------------------------------------------
# Adding from a training run.
# ----------------------------------------------------------------------------------------------


def read_eval_history(model_dir: str) -> Dict[str, Dict[int, Dict[str, float]]]:
  """`{task: {step: {metric: value}}}` from the seqio JSON logs under `model_dir/inference_eval`."""
  out: Dict[str, Dict[int, Dict[str, float]]] = {}
  directory = fs.join(model_dir, 'inference_eval')
  for fname in fs.listdir(directory, missing_ok=True):
    if not fname.endswith('-metrics.jsonl'):
      continue
    task = fname[: -len('-metrics.jsonl')]
    for line in fs.read_text(fs.join(directory, fname)).splitlines():
      if not line.strip():
        continue
      row = json.loads(line)
      step = int(row.pop('step'))
      out.setdefault(task, {})[step] = {
          k: float(v) for k, v in row.items() if isinstance(v, (int, float))
      }
  return out


def numpy_prompt_steps(model_dir: str, file_name: str) -> List[int]:
  """Steps with a saved `.npy` prompt `file_name` under `model_dir/numpy_checkpoints`."""
  steps = []
  for sub in fs.listdir(fs.join(model_dir, 'numpy_checkpoints'), missing_ok=True):
    match = re.match(r'^checkpoint_(\d+)$', sub)
    if match and fs.exists(fs.join(model_dir, 'numpy_checkpoints', sub, file_name)):
      steps.append(int(match.group(1)))
  return sorted(steps)


@dataclasses.dataclass
class AddToLibrary:
  """A training run's end-of-training callback that adds its prompt to a library.

  Bound by `configs/runs/add_to_library.gin` as `train.on_train_end`. `select='final'` adds the
  prompt of the last step; `select='best'` the saved prompt (`numpy_checkpoints/`) of the step
  with the best `metric` in the run's inference evaluations (`inference_eval/*-metrics.jsonl`).

  Attributes:
    library_dir: the library (`LIBRARY_DIR`).
    name: the entry name (`LIBRARY_ENTRY_NAME`); default the task name.
    backbone: the frozen checkpoint (`INITIAL_CHECKPOINT_PATH`), recorded as the backbone's source;
      the fingerprint is taken from the trained state's own embedding table.
    task: the task or mixture the prompt was trained on.
    method: a short method name recorded in the metadata.
    initialization: how the prompt was initialized (recorded).
    select: 'final' or 'best'.
    metric: with 'best', the metric to maximize (e.g. 'accuracy'); `task/metric` picks the task.
    variable: the prompt parameter path.
    overwrite: replace an existing entry of that name.
    description: free text recorded in the metadata.
  """

  library_dir: Optional[str] = None
  name: Optional[str] = None
  backbone: Optional[str] = None
  task: Optional[str] = None
  method: str = 'prompt_tuning'
  initialization: Optional[str] = None
  select: str = 'final'
  metric: Optional[str] = 'accuracy'
  variable: str = 'encoder/prompt/prompt/prompt'
  overwrite: bool = True
  description: Optional[str] = None

  def __call__(
      self,
      *,
      model_dir: str,
      train_state: Any,
      step: int,
      metrics: Optional[Mapping[str, Any]] = None,
  ) -> Optional[EntryInfo]:
    import jax  # pylint: disable=g-import-not-at-top
    from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

    if jax.process_index() != 0:
      return None
    if self.select not in ('final', 'best'):
      raise LibraryError(f"AddToLibrary.select must be 'final' or 'best', got {self.select!r}.")
    name = self.name or self.task
    if not name:
      raise LibraryError('AddToLibrary needs a name: set LIBRARY_ENTRY_NAME.')
    library = Library(default_library_dir(self.library_dir))
    flat = params_lib.flatten_params(train_state.params)
    if self.variable not in flat:
      prompts = [p for p in flat if p.endswith('/prompt')]
      raise LibraryError(
          f'AddToLibrary: no parameter {self.variable!r} in the trained state (prompt-like '
          f'parameters: {prompts[:5]}); set AddToLibrary.variable.'
      )
    array, kept_step = np.asarray(jax.device_get(flat[self.variable])), int(step)
    # The fingerprint of the backbone the prompt was actually trained with (its frozen embedding).
    embedding = flat.get(EMBEDDING_PATH)
    if embedding is not None:
      backbone = fingerprint_of_embedding(np.asarray(jax.device_get(embedding)))
    else:
      backbone = self.backbone
    kept_metrics = _plain_metrics(metrics or {})
    if self.select == 'best':
      array, kept_step, kept_metrics = self._best(model_dir, array, kept_step, kept_metrics)
    try:
      import gin  # pylint: disable=g-import-not-at-top

      gin_config = gin.operative_config_str()
    except Exception:  # pylint: disable=broad-except
      gin_config = None
    meta = {
        'task': self.task,
        'method': self.method,
        'initialization': self.initialization,
        'steps': kept_step,
        'metrics': kept_metrics,
        'selected': self.select,
        'model_dir': model_dir,
        'gin': gin_config,
        'description': self.description,
        'backbone_source': self.backbone,
    }
    info = library.add(
        name,
        array,
        meta,
        backbone=backbone,
        allow_no_backbone=backbone is None,
        overwrite=self.overwrite,
    )
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.info(
        'Added the %s prompt (step %d) to the library %s as %r.',
        self.select,
        kept_step,
        library.path,
        name,
    )
    return info

  def _best(self, model_dir, array, step, metrics):
    history = read_eval_history(model_dir)
    task, metric = None, self.metric
    if metric and '/' in metric:
      task, metric = metric.split('/', 1)
    candidates = {}
    for t, by_step in history.items():
      if task is not None and t != task:
        continue
      for s, values in by_step.items():
        if metric in values:
          candidates.setdefault(s, values[metric])
    file_name = self.variable.replace('/', '.') + '.npy'
    saved = set(numpy_prompt_steps(model_dir, file_name)) | {step}
    usable = {s: v for s, v in candidates.items() if s in saved}
    if not usable:
      raise LibraryError(
          f"AddToLibrary(select='best'): no evaluation of {self.metric!r} at a step with a saved "
          f'prompt in {model_dir} (evaluated steps: {sorted(candidates)}, saved prompts: '
          f'{sorted(saved)}). Make EVAL_PERIOD a multiple of the checkpoint period, or use '
          "select='final'."
      )
    # Highest metric; among equal ones the earliest step.
    best = max(sorted(usable), key=lambda s: usable[s])
    if best != step:
      array = _load_npy(fs.join(model_dir, 'numpy_checkpoints', f'checkpoint_{best}', file_name))
    kept = {
        f'{t}/{k}': v for t, by_step in history.items() for k, v in by_step.get(best, {}).items()
    }
    return array, best, kept


def _plain_metrics(metrics: Mapping[str, Any]) -> Dict[str, float]:
  out = {}

  def visit(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f'{prefix}/{k}' if prefix else str(k), v)
      return
    try:
      out[prefix] = float(np.asarray(value))
    except (TypeError, ValueError):
      pass

  visit('', metrics)
  return out


# ----------------------------------------------------------------------------------------------
# Command line: python -m prompt_tuning.library {add,list,show,rm,export}
# ----------------------------------------------------------------------------------------------


def _read_prompt_source(path: str, variable: Optional[str]) -> tuple:
  """(array, step or None) from a `.npy` file or a checkpoint's prompt variable."""
  if fs.isfile(path) and not fs.basename(path) == 'checkpoint':
    return _load_npy(path), None
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

  ckpt = formats.resolve(path)
  selection = variable or r'.*prompt/prompt/prompt'
  flat = params_lib.flatten_params(formats.load_params(ckpt, variables=[selection]))
  if len(flat) != 1:
    raise LibraryError(
        f'{path}: {selection!r} selects {len(flat)} variables ({sorted(flat)[:5]}); pass '
        '--variable with the full path of the prompt.'
    )
  return np.asarray(next(iter(flat.values()))), formats.read_step(ckpt)


def _table(rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _metric_summary(metrics: Mapping[str, Any]) -> str:
  if not metrics:
    return '-'
  items = sorted(metrics.items())
  return ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in items[:3])


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m prompt_tuning.library`; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.library',
      description='Manage a prompt library (trained prompts plus metadata and backbone fingerprint).',
  )
  parser.add_argument(
      '--library', default=os.environ.get(ENV_VAR), help=f'library directory (default ${ENV_VAR})'
  )
  sub = parser.add_subparsers(dest='command', required=True)
  add = sub.add_parser('add', help='add a prompt (.npy file or checkpoint) as an entry')
  add.add_argument('name')
  add.add_argument('--prompt', required=True, help='a .npy file or a checkpoint holding the prompt')
  add.add_argument('--variable', help='prompt variable path in a checkpoint')
  add.add_argument('--backbone', help='the frozen checkpoint (or embedding .npy) it was trained on')
  add.add_argument('--no_backbone', action='store_true', help='add without a backbone fingerprint')
  add.add_argument('--task')
  add.add_argument('--method', default='prompt_tuning')
  add.add_argument('--init', dest='initialization')
  add.add_argument('--steps', type=int)
  add.add_argument('--metrics', help='JSON object of metrics at the kept step')
  add.add_argument('--gin_file', action='append', default=[], help='gin file(s) of the run')
  add.add_argument('--description')
  add.add_argument('--overwrite', action='store_true')
  add.add_argument('-v', '--verbose', action='store_true', help='print each write step')
  lst = sub.add_parser('list', help='list the entries')
  lst.add_argument('--backbone', help='only entries trained on this checkpoint')
  lst.add_argument('--task')
  lst.add_argument('--json', action='store_true')
  show = sub.add_parser('show', help="print an entry's metadata")
  show.add_argument('name')
  rm = sub.add_parser('rm', help='remove an entry')
  rm.add_argument('name')
  export = sub.add_parser('export', help="write an entry's prompt to a .npy file")
  export.add_argument('name')
  export.add_argument('--output', required=True)
  export.add_argument('--metadata_output')
  args = parser.parse_args(argv)
  try:
    lib = Library(args.library)
    if args.command == 'add':
      array, step = _read_prompt_source(args.prompt, args.variable)
      meta = {
          'task': args.task,
          'method': args.method,
          'initialization': args.initialization,
          'steps': args.steps if args.steps is not None else step,
          'metrics': json.loads(args.metrics) if args.metrics else {},
          'gin': '\n'.join(fs.read_text(g) for g in args.gin_file) or None,
          'description': args.description,
          'source': args.prompt,
      }
      say = (lambda m: print(f'[library] {m}', flush=True)) if args.verbose else None
      info = lib.add(
          args.name,
          array,
          meta,
          backbone=args.backbone,
          allow_no_backbone=args.no_backbone,
          overwrite=args.overwrite,
          progress=say,
      )
      print(f'added {info.name}: shape {info.shape}, backbone {info.fingerprint}')
    elif args.command == 'list':
      infos = lib.list(args.backbone, task=args.task)
      if args.json:
        print(json.dumps([{'name': i.name, **i.metadata} for i in infos], default=_json_default))
      elif not infos:
        print(f'(no entries in {lib.path})')
      else:
        rows = [('name', 'kind', 'shape', 'task', 'method', 'steps', 'metrics', 'backbone')]
        for i in infos:
          m = i.metadata
          rows.append(
              (
                  i.name,
                  m.get('kind', '-'),
                  'x'.join(str(d) for d in i.shape) or '-',
                  m.get('task') or '-',
                  m.get('method') or '-',
                  '-' if m.get('steps') is None else str(m['steps']),
                  _metric_summary(m.get('metrics') or {}),
                  str(i.fingerprint) if i.fingerprint else '-',
              )
          )
        print(_table(rows))
    elif args.command == 'show':
      print(json.dumps(dict(lib.info(args.name).metadata), indent=1, default=_json_default))
    elif args.command == 'rm':
      lib.remove(args.name)
      print(f'removed {args.name}')
    elif args.command == 'export':
      lib.export(args.name, args.output, metadata_path=args.metadata_output)
      print(f'wrote {args.output}')
  except (LibraryError, FileNotFoundError, ValueError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f'ERROR: {type(e).__name__}: {msg}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
