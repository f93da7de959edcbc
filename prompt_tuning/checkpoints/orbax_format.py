"""Reads the orbax checkpoints this project writes (the runtime's `save_checkpoint`).

Layout under a model directory (`MODEL_DIR`)::

  checkpoint_<step>/                 orbax PyTree {step, trainable, opt_state, data}
      prompt_tuning_checkpoint.json  metadata: step, trainable_paths, ...; written last
  checkpoint_<step>.tmp/             a save in progress (or killed): never read
  checkpoint_<step>.old-<ns>/        a replaced checkpoint during its replacement: never read
  numpy_checkpoints/checkpoint_<step>/<path with '.' for '/'>.npy

A `checkpoint_<step>` directory is *complete* once its `prompt_tuning_checkpoint.json` exists: the
writer renames the directory to its final name only after writing it, and readers here refuse a
directory without it. The parameters it holds are the *trainable* ones (the prompt for prompt
tuning, everything for model tuning), under their flaxformer paths.

This module only reads; writing (and resuming a train state) is the runtime's job
(`save_checkpoint` in `runtime/checkpoints.py`), which uses the names defined here. Dependencies
go one way: the runtime imports this module, never the reverse.
"""

import json
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib
from prompt_tuning.checkpoints import t5x_format

METADATA_FILE = 'prompt_tuning_checkpoint.json'
FORMAT_NAME = 'prompt_tuning/orbax-1'
STEP_DIR_RE = re.compile(r'^checkpoint_(\d+)$')
TMP_DIR_RE = re.compile(r'^checkpoint_(\d+)\.tmp.*$')
# A replaced checkpoint moved aside while its successor is renamed in (`fs.rename(overwrite=True)`).
OLD_DIR_RE = re.compile(r'^checkpoint_(\d+)\.old-\d+$')
# Files orbax writes into every checkpoint directory (any of them marks one).
ORBAX_MARKERS = ('_CHECKPOINT_METADATA', '_METADATA', 'manifest.ocdbt')


class IncompleteCheckpointError(ValueError):
  """An orbax checkpoint directory this project did not (completely) write."""


def is_complete_checkpoint(path: str) -> bool:
  """Whether `path` is a checkpoint directory this project finished writing."""
  return fs.isfile(fs.join(path, METADATA_FILE))


def has_orbax_metadata(directory: str) -> bool:
  """Whether `directory`, or an item subdirectory of it (e.g. `state/`), holds orbax's metadata.

  `checkpoint_<step>` subdirectories do not count: they make `directory` a model directory, not a
  checkpoint.
  """
  try:
    entries = fs.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return False
  if any(m in entries for m in ORBAX_MARKERS):
    return True
  for entry in entries:
    if STEP_DIR_RE.match(entry) or TMP_DIR_RE.match(entry) or OLD_DIR_RE.match(entry):
      continue
    sub = fs.join(directory, entry)
    if fs.isdir(sub) and any(m in fs.listdir(sub) for m in ORBAX_MARKERS):
      return True
  return False


def read_metadata(path: str) -> Dict[str, Any]:
  """The JSON metadata of a checkpoint directory (`{}` when it has none)."""
  meta = fs.join(path, METADATA_FILE)
  if not fs.isfile(meta):
    return {}
  return json.loads(fs.read_text(meta))


def checkpoint_steps(model_dir: str) -> List[int]:
  """Sorted steps of the complete `checkpoint_<step>` directories in `model_dir` (`[]` if none)."""
  steps = []
  for name in fs.listdir(model_dir, missing_ok=True):
    m = STEP_DIR_RE.match(name)
    if m and is_complete_checkpoint(fs.join(model_dir, name)):
      steps.append(int(m.group(1)))
  return sorted(steps)


def latest_checkpoint_path(model_dir: str) -> Optional[str]:
  """The complete `checkpoint_<step>` directory of `model_dir` with the highest step, or None."""
  steps = checkpoint_steps(model_dir)
  return fs.join(model_dir, f'checkpoint_{steps[-1]}') if steps else None


def incomplete_message(path: str) -> str:
  """Why an orbax directory without our metadata cannot be read, and what to do."""
  return (
      f'{path} is an orbax checkpoint without {METADATA_FILE}: either a save of this project '
      'that was interrupted before it was committed (point to an earlier complete '
      'checkpoint_<step>, or to the model directory to get its latest complete one), or an '
      'orbax checkpoint written by another program (restore it with orbax.checkpoint and save '
      'its parameters with prompt_tuning.checkpoints.t5x_format.save).'
  )


def _check_complete(path: str) -> None:
  if not fs.exists(path):
    raise FileNotFoundError(f'Checkpoint {path} does not exist.')
  if not is_complete_checkpoint(path):
    raise IncompleteCheckpointError(
        f'{path} is not a complete prompt_tuning checkpoint (no {METADATA_FILE}); it may be a '
        'partially written checkpoint from an interrupted run. Point to another checkpoint.'
    )


def restore(path: str) -> Dict[str, Any]:
  """The whole saved tree `{step, trainable, opt_state, data}` of a complete checkpoint.

  Raises:
    FileNotFoundError: nothing at `path`.
    IncompleteCheckpointError: `path` has no metadata file (unfinished or foreign checkpoint).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _check_complete(path)
  return ocp.PyTreeCheckpointer().restore(fs.abspath(path))


def trainable_paths(path: str) -> List[str]:
  """The `/`-joined paths of the parameters a complete checkpoint holds (no array is read)."""
  _check_complete(path)
  meta = read_metadata(path)
  if 'trainable_paths' in meta:
    return list(meta['trainable_paths'])
  return list(params_lib.flatten_params(restore(path)['trainable']))


def load(
    path: str,
    variables: Union[None, str, Sequence[str]] = None,
    *,
    dtype: Any = None,
    missing_ok: bool = False,
) -> Dict[str, Any]:
  """The parameters (the trainable subtree) of a complete checkpoint as nested numpy arrays.

  Only the selected arrays are read (orbax partial restore); the optimizer state is never read.

  Args:
    path: a complete `checkpoint_<step>` directory.
    variables: optional selection: `/`-joined paths, subtree prefixes or regexes (see
      `t5x_format.select_variables`).
    dtype: optional dtype for floating-point leaves.
    missing_ok: entries of `variables` that select nothing are skipped instead of raising.

  Raises:
    FileNotFoundError: nothing at `path`.
    IncompleteCheckpointError: `path` has no metadata file.
    t5x_format.UnknownVariableError: a requested variable is not in the checkpoint.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  names = trainable_paths(path)
  if variables is not None:
    names = t5x_format.select_variables(names, variables, missing_ok=missing_ok)
  if not names:
    return {}
  item = params_lib.unflatten_params({n: 0 for n in names})
  restore_args = params_lib.unflatten_params(
      {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}
  )
  raw = ocp.PyTreeCheckpointer().restore(
      fs.abspath(path),
      args=ocp.args.PyTreeRestore(
          item={'trainable': item}, restore_args={'trainable': restore_args}, partial_restore=True
      ),
  )
  flat = params_lib.flatten_params(raw.get('trainable', {}))
  if dtype is not None:
    flat = {n: t5x_format.cast(v, dtype) for n, v in flat.items()}
  return params_lib.unflatten_params({n: np.asarray(flat[n]) for n in names if n in flat})
