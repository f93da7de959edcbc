"""Reads and writes T5X "legacy" checkpoints (msgpack + one zarr array per leaf).

Layout of one checkpoint directory (``checkpoint_<step>/``), as written by
``t5x.checkpoints.Checkpointer.save`` (``VERSION = 3``)::

  checkpoint                      # msgpack: {'version': 3, 'optimizer': {...}}
  target.token_embedder.embedding/
    .zarray                       # zarr v2 metadata (gzip level 1, C order)
    0.0  1.0 ...                  # gzip-compressed chunks
  state.param_states.<...>.v_row/ # optimizer slots, unless small (inline)

The ``optimizer`` tree holds ``target`` (the parameters), ``state/step`` and
``state/param_states``. A leaf that was written to TensorStore appears in the
msgpack as a TensorStore spec dict whose path is *relative* to the checkpoint
directory (either ``spec['kvstore']['path']`` or, in older files, the top-level
``spec['path']``); other leaves are stored inline as flax msgpack ndarrays.

Public functions:

* :func:`load` / :func:`load_variable`: parameters (the ``target`` tree) as
  nested dicts of numpy arrays, optionally only some variables (the others are
  never read).
* :func:`load_t5x_checkpoint`: the whole ``optimizer`` tree (target and state).
* :func:`list_variables`: names, shapes and dtypes without reading any array.
* :func:`save`: writes the same format atomically (temporary sibling directory,
  then rename).
* :func:`find_checkpoint`: resolves a checkpoint file, checkpoint directory or
  model directory (latest ``checkpoint_<step>``) to a checkpoint directory.

Local paths and ``gs://`` URLs are supported (files through
:mod:`prompt_tuning.fs`, arrays through TensorStore's ``file`` and ``gcs``
drivers). To read a checkpoint whose format is not known in advance, use
:func:`prompt_tuning.checkpoints.formats.load_params`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import ml_dtypes
import msgpack
import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib

VERSION = 3
CHECKPOINT_FILENAME = 'checkpoint'
# Largest chunk T5X writes (``_choose_chunk_shape``): 64 MiB.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
# Leaves with at most this many bytes are written inline into the msgpack file.
DEFAULT_INLINE_MAX_SIZE = 256
# Bytes of array data read or written concurrently.
_MAX_INFLIGHT_BYTES = 1 << 30

_TMP_RE = re.compile(r'\.tmp-\d+$')
_STEP_DIR_RE = re.compile(r'^checkpoint_(\d+)$')
_ZARR_DRIVERS = ('zarr', 'zarr2', 'zarr3', 'n5')

Params = dict[str, Any]


class CheckpointError(ValueError):
  """A path is not a (complete, supported) T5X checkpoint."""


class UnknownVariableError(CheckpointError, KeyError):
  """A requested variable is not in the checkpoint."""

  def __str__(self) -> str:  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ''


def is_temporary_path(path: str) -> bool:
  """Whether `path` is the temporary directory of an unfinished save."""
  return bool(_TMP_RE.search(fs.basename(path)))


# ----------------------------------------------------------------------------
# Trees.
# ----------------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
  """Whether a msgpack leaf is a TensorStore spec dict (array stored apart)."""
  return (
      isinstance(x, Mapping)
      and x.get('driver') in _ZARR_DRIVERS
      and ('kvstore' in x or 'path' in x)
  )


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Flattens a msgpack tree to tuple keys; spec dicts and non-mappings are leaves.

  Unlike `prompt_tuning.params.flatten_params` (the library's `/`-path helper, used for parameter
  trees), this keeps the keys apart, so `save` can refuse keys that contain `/`, and keeps empty
  subtrees (T5X writes `param_states: {}`), which the msgpack layout needs.
  """
  if isinstance(tree, Mapping) and not _is_spec(tree):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    if not tree and prefix:
      out[prefix] = {}
    return out
  return {prefix: tree}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for keys, value in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def select_variables(
    names: Iterable[str], variables: str | Sequence[str], *, missing_ok: bool = False
) -> list[str]:
  """Returns the names selected by `variables`, in the order of `names`.

  Each entry of `variables` is, in this order of precedence: an exact
  ``/``-joined path (a leading ``target/`` is ignored), a prefix naming a whole
  subtree (``encoder/layers_0``), or a regular expression that must match a
  whole path (``encoder/layers_\\d+/mlp/.*``).

  Args:
    names: all available ``/``-joined paths.
    variables: one entry or a sequence of entries.
    missing_ok: skip entries that select nothing instead of raising.

  Returns:
    The selected names.

  Raises:
    UnknownVariableError: an entry selects nothing (close matches are listed)
      and not `missing_ok`.
  """
  if isinstance(variables, str):
    variables = [variables]
  names = list(names)
  name_set = set(names)
  selected = set()
  for entry in variables:
    entry = str(entry).strip('/')
    if entry.startswith('target/') and entry not in name_set:
      entry = entry[len('target/') :]
    if entry in name_set:
      selected.add(entry)
      continue
    under = [n for n in names if n.startswith(entry + '/')]
    if under:
      selected.update(under)
      continue
    try:
      pattern = re.compile(entry)
      matched = [n for n in names if pattern.fullmatch(n)]
    except re.error:
      matched = []
    if matched:
      selected.update(matched)
      continue
    if missing_ok:
      continue
    close = difflib.get_close_matches(entry, names, n=5, cutoff=0.5)
    hint = (
        f' Close matches: {", ".join(close)}.'
        if close
        else f' The checkpoint has {len(names)} variables, e.g. ' f'{", ".join(names[:5])}.'
    )
    raise UnknownVariableError(
        f'Variable {entry!r} is not in the checkpoint (it is neither a '
        f'variable path, a subtree prefix, nor a regex matching one).{hint}'
    )
  return [n for n in names if n in selected]


# ----------------------------------------------------------------------------
# Locating and parsing checkpoints.
# ----------------------------------------------------------------------------


def checkpoint_steps(model_dir: str) -> list[int]:
  """Steps of the complete ``checkpoint_<step>`` directories in `model_dir`."""
  if not fs.isdir(model_dir):
    return []
  steps = []
  for entry in fs.listdir(model_dir):
    m = _STEP_DIR_RE.match(entry)
    if m and fs.isfile(fs.join(model_dir, entry, CHECKPOINT_FILENAME)):
      steps.append(int(m.group(1)))
  return sorted(steps)


def find_checkpoint(path: str, step: int | None = None) -> str:
  """Resolves `path` to a T5X checkpoint directory.

  Args:
    path: a ``checkpoint_<step>`` directory, the ``checkpoint`` file inside
      one, or a model directory holding ``checkpoint_<step>`` directories (the
      latest, or `step`, is used).
    step: the step to pick inside a model directory.

  Returns:
    The checkpoint directory (it contains a ``checkpoint`` file).

  Raises:
    FileNotFoundError: nothing exists at `path` or `step` is not there.
    CheckpointError: `path` exists but is not a complete T5X checkpoint.
  """
  path = fs.abspath(os.fspath(path))
  if is_temporary_path(path) or (
      is_temporary_path(fs.dirname(path)) and fs.basename(path) == CHECKPOINT_FILENAME
  ):
    raise CheckpointError(
        f'{path} is the temporary directory of an unfinished (interrupted) '
        'save, not a complete checkpoint. Use the directory without the '
        '".tmp-<timestamp>" suffix, or delete this one.'
    )
  if not fs.exists(path):
    raise FileNotFoundError(f'T5X checkpoint not found: {path} does not exist.')
  if not fs.isdir(path):
    if fs.basename(path) == CHECKPOINT_FILENAME:
      return fs.dirname(path)
    raise CheckpointError(
        f'{path} is a file but not a T5X checkpoint: pass the '
        'checkpoint_<step> directory or its "checkpoint" file.'
    )
  if fs.isfile(fs.join(path, CHECKPOINT_FILENAME)):
    return path
  steps = checkpoint_steps(path)
  if steps:
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {path}; available steps: ' f'{steps}.'
      )
    return fs.join(path, f'checkpoint_{chosen}')
  entries = set(fs.listdir(path))
  from prompt_tuning.checkpoints import orbax_format  # pylint: disable=g-import-not-at-top

  if orbax_format.has_orbax_metadata(path):
    raise CheckpointError(
        f'{path} is an Orbax checkpoint, not a T5X legacy checkpoint; load its '
        'parameters with prompt_tuning.checkpoints.formats.load_params.'
    )
  tmp = sorted(e for e in entries if is_temporary_path(e))
  extra = f' It contains unfinished saves ({", ".join(tmp)}), which are ' 'ignored.' if tmp else ''
  raise CheckpointError(
      f'{path} is not a T5X checkpoint: it has no "{CHECKPOINT_FILENAME}" '
      f'file and no checkpoint_<step> subdirectories.{extra}'
  )


def peek_top_level_keys(checkpoint_file: str) -> set[str] | None:
  """Top-level keys of a msgpack map file without decoding its values.

  Returns None when the file does not start with a msgpack map.
  """
  with fs.open(checkpoint_file, 'rb') as f:
    unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=2**31 - 1)
    return _peek_keys(unpacker)


def _peek_keys(unpacker: msgpack.Unpacker) -> set[str] | None:
  try:
    n = unpacker.read_map_header()
    keys = set()
    for _ in range(n):
      keys.add(unpacker.unpack())
      unpacker.skip()
    return keys
  except Exception:  # pylint: disable=broad-except
    return None


def _read_contents(ckpt_dir: str) -> dict[str, Any]:
  """Parses and validates the msgpack file of a checkpoint directory."""
  from flax import serialization  # pylint: disable=g-import-not-at-top

  ckpt_file = fs.join(ckpt_dir, CHECKPOINT_FILENAME)
  data = fs.read_bytes(ckpt_file)
  if data.startswith(b'model_checkpoint_path'):
    raise CheckpointError(
        f'{ckpt_file} is a TensorFlow (T5X_TF / Mesh TensorFlow) checkpoint '
        'index, not a T5X checkpoint; it is not supported.'
    )
  try:
    contents = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'{ckpt_file} is not a T5X checkpoint: it is not a msgpack file '
        f'({type(e).__name__}: {e}).'
    ) from None
  if not isinstance(contents, dict) or set(contents) != {'version', 'optimizer'}:
    keys = sorted(contents) if isinstance(contents, dict) else type(contents)
    raise CheckpointError(
        f'{ckpt_file} is not a T5X checkpoint: expected top-level keys '
        f"['optimizer', 'version'], found {keys}."
    )
  version = contents['version']
  try:
    version = int(version)
  except (TypeError, ValueError):
    raise CheckpointError(f'{ckpt_file}: invalid checkpoint version {version!r}.') from None
  if version < 2:
    raise CheckpointError(
        f'{ckpt_file} has checkpoint version {version}; versions earlier than '
        '2 are not supported (as in T5X). Re-save it with a recent T5X.'
    )
  if version > VERSION:
    logging.warning(
        '%s has checkpoint version %d, newer than %d; reading it ' 'anyway.',
        ckpt_file,
        version,
        VERSION,
    )
  optimizer = contents['optimizer']
  if not isinstance(optimizer, dict) or 'target' not in optimizer:
    raise CheckpointError(f'{ckpt_file} is not a T5X checkpoint: "optimizer" has no "target".')
  return contents


# ----------------------------------------------------------------------------
# TensorStore.
# ----------------------------------------------------------------------------


def _parse_gs(url: str) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  rest = url[len('gs://') :]
  bucket, _, key = rest.partition('/')
  return bucket, key.strip('/')


def _kvstore_spec(array_dir: str) -> dict[str, Any] | str:
  """A TensorStore kvstore spec for a local directory or URL (trailing /)."""
  if array_dir.startswith('gs://'):
    bucket, key = _parse_gs(array_dir)
    return {'driver': 'gcs', 'bucket': bucket, 'path': key + '/'}
  if fs.is_remote(array_dir):
    return array_dir.rstrip('/') + '/'  # Let TensorStore parse other URLs.
  return {'driver': 'file', 'path': os.path.abspath(array_dir) + '/'}


def _array_dir(ckpt_dir: str, spec: Mapping[str, Any]) -> str:
  """Absolute location of the zarr array described by a stored spec."""
  kvstore = spec.get('kvstore', {})
  kv_path = kvstore.get('path', '') if isinstance(kvstore, Mapping) else ''
  top_path = spec.get('path', '')

  def absolute(p):
    return fs.is_remote(p) or os.path.isabs(p)

  if top_path:
    # Legacy form: the driver-level `path` is appended to the kvstore path.
    rel = top_path if (not kv_path or absolute(kv_path)) else fs.join(kv_path, top_path)
  else:
    rel = kv_path
  rel = str(rel).rstrip('/')
  if not rel:
    raise CheckpointError(f'Spec without a path in {ckpt_dir}: {spec}')
  if absolute(rel):
    # Saved with an absolute path; prefer the copy next to the msgpack file.
    local = fs.join(ckpt_dir, fs.basename(rel))
    if not fs.is_remote(local) and os.path.isdir(local):
      return local
    return rel
  return fs.join(ckpt_dir, rel)


def _ts():
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  return ts


def _read_specs(ckpt_dir: str, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Reads the arrays behind `specs` (name -> stored spec), concurrently."""
  ts = _ts()
  names = list(specs)
  opened = {}
  for name in names:
    location = _array_dir(ckpt_dir, specs[name])
    open_spec = {'driver': specs[name].get('driver', 'zarr'), 'kvstore': _kvstore_spec(location)}
    opened[name] = (location, ts.open(open_spec, open=True, read=True))
  out = {}
  pending: list[tuple[str, Any]] = []
  inflight = 0

  def drain():
    nonlocal inflight
    for n, fut in pending:
      out[n] = np.asarray(fut.result())
    pending.clear()
    inflight = 0

  for name in names:
    location, fut = opened[name]
    try:
      store = fut.result()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'Cannot open the array of variable {name!r} at {location}: ' f'{e}'
      ) from None
    nbytes = math.prod(store.shape) * store.dtype.numpy_dtype.itemsize
    if pending and inflight + nbytes > _MAX_INFLIGHT_BYTES:
      drain()
    pending.append((name, store.read()))
    inflight += nbytes
  drain()
  return out


def _choose_chunk_shape(
    shape: Sequence[int], itemsize: int, max_chunk_bytes: int = MAX_CHUNK_BYTES
) -> list[int]:
  """Largest chunk shape (dividing `shape`) of at most `max_chunk_bytes`.

  Like T5X's ``_choose_chunk_shape``: repeatedly shrink the currently largest
  chunk dimension to its next smaller divisor of the full dimension.
  """
  target = max(1, max_chunk_bytes // max(1, itemsize))
  chunk = [max(1, int(d)) for d in shape]
  while math.prod(chunk) > target:
    i = max(range(len(chunk)), key=lambda j: chunk[j])
    if chunk[i] == 1:
      break
    full = max(1, int(shape[i]))
    chunk[i] = max(d for d in range(1, chunk[i]) if full % d == 0)
  return chunk


def _zarr_dtype_name(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype == ml_dtypes.bfloat16:
    return 'bfloat16'
  return dtype.name


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def _is_float_dtype(dtype: Any) -> bool:
  dtype = np.dtype(dtype)
  if dtype.kind == 'f':
    return True
  try:
    ml_dtypes.finfo(dtype)
    return True
  except (ValueError, TypeError):
    return False


def _cast(x: Any, dtype: Any | None) -> Any:
  if dtype is None or not isinstance(x, np.ndarray) or not _is_float_dtype(x.dtype):
    return x
  dtype = np.dtype(dtype)
  return x if x.dtype == dtype else x.astype(dtype)


def cast(x: Any, dtype: Any | None) -> Any:
  """Casts a floating-point numpy or jax array to `dtype`; other leaves are returned unchanged."""
  if isinstance(x, np.ndarray):
    return _cast(x, dtype)
  if dtype is None or isinstance(x, np.generic) or not hasattr(x, 'astype'):
    return x
  if not hasattr(x, 'dtype') or not _is_float_dtype(x.dtype):
    return x
  return x.astype(dtype)


def _to_numpy(x: Any) -> Any:
  """Inline leaves: numpy scalars become 0-d arrays; others are kept."""
  if isinstance(x, np.generic):
    return np.asarray(x)
  return x


def _materialize(ckpt_dir: str, flat: Mapping[str, Any], dtype: Any | None) -> dict[str, Any]:
  specs = {n: v for n, v in flat.items() if _is_spec(v)}
  t0 = time.time()
  arrays = _read_specs(ckpt_dir, specs) if specs else {}
  if specs:
    logging.info('Read %d arrays from %s in %.1fs.', len(specs), ckpt_dir, time.time() - t0)
  out = {}
  for name, value in flat.items():
    value = arrays[name] if name in arrays else _to_numpy(value)
    out[name] = _cast(value, dtype)
  return out


def _target_flat(contents: Mapping[str, Any]) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in _flatten(contents['optimizer']['target']).items()}


def load(
    path: str,
    variables: str | Sequence[str] | None = None,
    *,
    dtype: Any | None = None,
    step: int | None = None,
    missing_ok: bool = False,
) -> Params:
  """Loads the parameters (``optimizer/target``) of a T5X legacy checkpoint.

  Args:
    path: a ``checkpoint_<step>`` directory, the ``checkpoint`` file in it, or
      a model directory (its latest checkpoint, or `step`). Local or ``gs://``.
    variables: if given, only these variables are read (the other arrays are
      not touched): ``/``-joined paths such as ``token_embedder/embedding``,
      subtree prefixes, or regexes matching whole paths.
    dtype: if given, floating-point leaves are cast to it. By default stored
      dtypes (including bfloat16) are kept.
    step: the step to use when `path` is a model directory.
    missing_ok: entries of `variables` that select nothing are skipped
      instead of raising.

  Returns:
    Nested dicts of numpy arrays named as in the checkpoint.

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: `path` is not a complete, supported T5X checkpoint.
    UnknownVariableError: a requested variable is not in the checkpoint.
  """
  ckpt_dir = find_checkpoint(path, step)
  contents = _read_contents(ckpt_dir)
  flat = _target_flat(contents)
  if variables is not None:
    flat = {n: flat[n] for n in select_variables(flat, variables, missing_ok=missing_ok)}
  return params_lib.unflatten_params(_materialize(ckpt_dir, flat, dtype))


def load_variable(
    path: str, variable: str, *, dtype: Any | None = None, step: int | None = None
) -> np.ndarray:
  """Loads one parameter (exact ``/``-joined path) of a T5X checkpoint."""
  ckpt_dir = find_checkpoint(path, step)
  flat = _target_flat(_read_contents(ckpt_dir))
  name = variable.strip('/')
  if name not in flat and name.startswith('target/'):
    name = name[len('target/') :]
  if name not in flat:
    close = difflib.get_close_matches(name, list(flat), n=5, cutoff=0.5)
    hint = f' Close matches: {", ".join(close)}.' if close else ''
    raise UnknownVariableError(f'Variable {variable!r} is not in the checkpoint {ckpt_dir}.{hint}')
  return _materialize(ckpt_dir, {name: flat[name]}, dtype)[name]


def load_t5x_checkpoint(
    path: str, *, dtype: Any | None = None, step: int | None = None
) -> dict[str, Any]:
  """Loads the whole ``optimizer`` tree: ``{'target': ..., 'state': ...}``.

  Args:
    path: as for :func:`load`.
    dtype: if given, every floating-point leaf (parameters and optimizer
      slots) is cast to it.
    step: the step to use when `path` is a model directory.

  Returns:
    Nested dicts; array leaves are numpy arrays, ``state/step`` a 0-d array.
  """
  ckpt_dir = find_checkpoint(path, step)
  contents = _read_contents(ckpt_dir)
  flat = _flatten(contents['optimizer'])
  by_name = {'/'.join(k): v for k, v in flat.items()}
  loaded = _materialize(ckpt_dir, by_name, dtype)
  return _unflatten({k: loaded['/'.join(k)] for k in flat})


def read_step(path: str, *, step: int | None = None) -> int | None:
  """The training step (``state/step``) of a checkpoint, without reading any array."""
  contents = _read_contents(find_checkpoint(path, step))
  value = contents['optimizer'].get('state', {}).get('step')
  return None if value is None else int(np.asarray(value))


def load_state_variables(
    path: str, names: Iterable[str], *, dtype: Any | None = None, step: int | None = None
) -> dict[str, np.ndarray]:
  """Loads optimizer-state leaves by name, e.g. ``param_states/encoder/.../kernel/v_row``.

  Names are ``/``-joined paths under ``optimizer/state``; those absent from
  the checkpoint are left out of the result (only the present ones are read).
  """
  ckpt_dir = find_checkpoint(path, step)
  state = _read_contents(ckpt_dir)['optimizer'].get('state', {})
  flat = {'/'.join(k): v for k, v in _flatten(state).items()}
  wanted = {n: flat[n] for n in names if n in flat}
  return _materialize(ckpt_dir, wanted, dtype)


def list_variables(
    path: str, *, include_state: bool = False, step: int | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
  """Names -> (shape, dtype name) of the stored leaves, without reading arrays.

  Args:
    path: as for :func:`load`.
    include_state: also list optimizer leaves (prefixed ``state/``); target
      names are then prefixed ``target/``.
    step: the step to use when `path` is a model directory.
  """
  ckpt_dir = find_checkpoint(path, step)
  contents = _read_contents(ckpt_dir)
  tree = contents['optimizer'] if include_state else contents['optimizer']['target']
  out = {}
  for keys, leaf in _flatten(tree).items():
    name = '/'.join(keys)
    if _is_spec(leaf):
      meta = leaf.get('metadata', {})
      shape = meta.get('shape')
      dtype = leaf.get('dtype') or meta.get('dtype')
      if shape is None or dtype is None:  # Incomplete spec: ask the .zarray.
        store = (
            _ts()
            .open(
                {
                    'driver': leaf.get('driver', 'zarr'),
                    'kvstore': _kvstore_spec(_array_dir(ckpt_dir, leaf)),
                }
            )
            .result()
        )
        shape, dtype = store.shape, store.dtype.numpy_dtype.name
      dtype = {
          '<f4': 'float32',
          '<f2': 'float16',
          '<i4': 'int32',
          '<f8': 'float64',
          '<i8': 'int64',
      }.get(dtype, dtype)
      out[name] = (tuple(int(d) for d in shape), str(dtype))
    elif isinstance(leaf, (np.ndarray, np.generic)):
      out[name] = (tuple(leaf.shape), _zarr_dtype_name(leaf.dtype))
    elif isinstance(leaf, (int, float, bool)):
      out[name] = ((), type(leaf).__name__)
  return out


# ----------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------


def _state_dict(tree: Any) -> Any:
  """Converts flax structs / namedtuples / dataclasses to nested dicts."""
  if tree is None:
    return None
  from flax import serialization  # pylint: disable=g-import-not-at-top

  return serialization.to_state_dict(tree)


def _leaf_to_numpy(x: Any) -> Any:
  if x is None or isinstance(x, (int, float, bool, str, bytes, dict)):
    return x
  if isinstance(x, np.generic):
    return x
  return np.asarray(x)


def save(
    path: str,
    params: Mapping[str, Any],
    step: int,
    *,
    optimizer_state: Any = None,
    dtype: Any | None = None,
    inline_max_size: int = DEFAULT_INLINE_MAX_SIZE,
    overwrite: bool = False,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    max_inflight_bytes: int = _MAX_INFLIGHT_BYTES,
) -> str:
  """Writes a T5X legacy checkpoint (``VERSION = 3``) to directory `path`.

  The checkpoint is assembled in ``<path>.tmp-<timestamp>`` and renamed to
  `path` at the end, so an interrupted save never leaves a directory that
  :func:`load` accepts. (On ``gs://`` the rename is not atomic, but the
  ``checkpoint`` file, which readers require, is written last.)

  Args:
    path: the checkpoint directory to create, e.g. ``.../checkpoint_1000``.
    params: nested dict of arrays (numpy or jax), stored under ``target``. A
      leaf may also be a zero-argument callable returning the array: it is
      called when that leaf is written, so a tree of loaders is saved one
      array at a time (streaming; see `max_inflight_bytes`).
    step: the training step, stored as ``state/step``.
    optimizer_state: optional optimizer state: an object with a
      ``param_states`` attribute / key (e.g. ``OptimizerState``), or the
      ``param_states`` tree itself; flax structs are converted to dicts.
      ``None`` writes empty ``param_states``.
    dtype: if given, floating-point parameters are cast to it before saving
      (optimizer state is kept as is), like T5X's ``save_dtype``.
    inline_max_size: leaves with at most this many bytes, and all scalars, are
      stored inline in the msgpack file; larger ones as zarr arrays.
    overwrite: replace an existing checkpoint at `path`.
    max_chunk_bytes: largest zarr chunk.
    max_inflight_bytes: arrays handed to TensorStore but not yet written are
      kept below this many bytes (0: each array is written before the next
      one is read or computed).

  Returns:
    The absolute path of the written checkpoint.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    ValueError: a tree key cannot be stored (contains '/' or collides).
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top

  ts = _ts()
  path = fs.abspath(os.fspath(path))
  if is_temporary_path(path):
    raise ValueError(f'Refusing to save to a temporary-looking path {path}.')
  if fs.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass overwrite=True to replace it.')

  target = _state_dict(params)
  state_tree = _state_dict(optimizer_state)
  if isinstance(state_tree, Mapping) and 'param_states' in state_tree:
    param_states = state_tree['param_states']
  elif hasattr(optimizer_state, 'param_states'):
    param_states = _state_dict(optimizer_state.param_states)
  else:
    param_states = state_tree if state_tree is not None else {}
  tree = {
      'target': target,
      'state': {'step': np.asarray(int(step), np.int32), 'param_states': param_states},
  }
  flat = _flatten(tree)
  for keys in flat:
    bad = [k for k in keys if '/' in k or not k]
    if bad:
      raise ValueError(
          f'Cannot save key {bad[0]!r} at {"/".join(keys)}: '
          "keys must be non-empty and contain no '/'."
      )

  tmp = f'{path}.tmp-{int(time.time())}'
  while fs.exists(tmp):
    tmp = f'{path}.tmp-{int(time.time() * 1000)}'
  fs.makedirs(tmp)
  writes: list[Any] = []
  try:
    stored: dict[tuple[str, ...], Any] = {}
    inflight = 0
    seen_dirs: dict[str, str] = {}
    remote = path.startswith('gs://')
    n_arrays = 0
    t0 = time.time()
    for keys, leaf in flat.items():
      if callable(leaf):
        if max_inflight_bytes <= 0 and writes:  # Streaming: the previous array is written first.
          for w in writes:
            w.result()
          writes.clear()
          inflight = 0
        leaf = leaf()
      leaf = _leaf_to_numpy(leaf)
      if keys[0] == 'target':
        leaf = _cast(leaf, dtype)
      if not isinstance(leaf, np.ndarray) or leaf.ndim == 0 or leaf.nbytes <= inline_max_size:
        stored[keys] = leaf
        continue
      if leaf.dtype.hasobject:
        raise ValueError(f'Cannot save object array at {"/".join(keys)}.')
      name = '.'.join(keys)
      if name in seen_dirs:
        raise ValueError(
            f'Variables {seen_dirs[name]!r} and {"/".join(keys)!r} map to the '
            f'same array directory {name!r}.'
        )
      seen_dirs[name] = '/'.join(keys)
      leaf = np.ascontiguousarray(leaf)
      dtype_name = _zarr_dtype_name(leaf.dtype)
      metadata = {
          'chunks': _choose_chunk_shape(leaf.shape, leaf.dtype.itemsize, max_chunk_bytes),
          'compressor': {'id': 'gzip', 'level': 1},
          'shape': [int(d) for d in leaf.shape],
      }
      write_spec = {
          'driver': 'zarr',
          'dtype': dtype_name,
          'kvstore': _kvstore_spec(fs.join(tmp, name)),
          'metadata': dict(metadata, order='C'),
      }
      if inflight + leaf.nbytes > max_inflight_bytes and writes:
        for w in writes:
          w.result()
        writes.clear()
        inflight = 0
      store = ts.open(write_spec, create=True, delete_existing=True).result()
      writes.append(store.write(leaf))
      inflight += leaf.nbytes
      n_arrays += 1
      kvstore = (
          {'driver': 'gcs', 'bucket': 't5x-dummy-bucket', 'path': name + '/'}
          if remote
          else {'driver': 'file', 'path': name + '/'}
      )
      stored[keys] = {
          'driver': 'zarr',
          'dtype': dtype_name,
          'kvstore': kvstore,
          'metadata': metadata,
      }
    for w in writes:
      w.result()
    data = serialization.msgpack_serialize(
        {'version': VERSION, 'optimizer': _unflatten(stored)}, in_place=True
    )
    fs.write_bytes(fs.join(tmp, CHECKPOINT_FILENAME), data)  # Written last.
    # With overwrite, the old checkpoint is moved aside and deleted only once the new one is in.
    fs.rename(tmp, path, overwrite=overwrite)
  except BaseException:
    for w in writes:  # Let pending writes finish before deleting their files.
      try:
        w.result()
      except Exception:  # pylint: disable=broad-except
        pass
    try:
      fs.rmtree(tmp)
    except Exception:  # pylint: disable=broad-except
      pass
    raise
  logging.info(
      'Saved T5X checkpoint %s (%d arrays, %d inline leaves) in ' '%.1fs.',
      path,
      n_arrays,
      len(stored) - n_arrays,
      time.time() - t0,
  )
  return path
