"""The one checkpoint reader: tells formats apart once and loads parameters from any of them.

Formats:

* ``'t5x'``: T5X legacy checkpoint, a ``checkpoint`` msgpack file whose
  top-level keys are ``{'version', 'optimizer'}`` (plus ``target.*`` zarr
  arrays); read by :mod:`prompt_tuning.checkpoints.t5x_format`.
* ``'huggingface'``: a transformers T5 directory, ``config.json`` plus
  ``model.safetensors``, ``model.safetensors.index.json``,
  ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``; read by
  :mod:`prompt_tuning.checkpoints.huggingface`.
* ``'orbax'``: a directory with Orbax metadata (``_CHECKPOINT_METADATA``,
  ``_METADATA`` or ``manifest.ocdbt``, directly or in an item subdirectory such
  as ``state/``). The ones this project writes
  (``MODEL_DIR/checkpoint_<step>`` with ``prompt_tuning_checkpoint.json``,
  written by the runtime's ``save_checkpoint``) are read by
  :mod:`prompt_tuning.checkpoints.orbax_format`; others are refused with an
  explanation.

A model directory holding ``checkpoint_<step>`` subdirectories (T5X's or ours)
stands for its latest complete checkpoint.

:func:`resolve` does the detection (once) and returns a :class:`Checkpoint`;
:func:`load_params` and :func:`read_step` accept a path or that
:class:`Checkpoint`, so a caller that needs several things from one checkpoint
detects its format once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping, Sequence, Union

from prompt_tuning import fs
from prompt_tuning.checkpoints import orbax_format
from prompt_tuning.checkpoints import t5x_format

Format = Literal['t5x', 'huggingface', 'orbax']

HF_WEIGHT_FILES = (
    'model.safetensors',
    'model.safetensors.index.json',
    'pytorch_model.bin',
    'pytorch_model.bin.index.json',
)
ORBAX_MARKERS = orbax_format.ORBAX_MARKERS
_STEP_DIR_RE = re.compile(r'^checkpoint_(\d+)$')


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A located checkpoint whose format is known (what :func:`resolve` returns).

  Attributes:
    path: the checkpoint itself: a ``checkpoint_<step>`` or Hugging Face
      directory (a model directory is resolved to its latest checkpoint, a T5X
      ``checkpoint`` file to its directory).
    format: ``'t5x'``, ``'huggingface'`` or ``'orbax'``.
    requested: the path the caller gave.
  """

  path: str
  format: Format
  requested: str

  @property
  def is_ours(self) -> bool:
    """Whether this is a complete orbax checkpoint written by this project."""
    return self.format == 'orbax' and orbax_format.is_complete_checkpoint(self.path)


PathOrCheckpoint = Union[str, Checkpoint]


def is_temporary_path(path: str) -> bool:
  """Whether `path` is the directory of an unfinished save (T5X's ``.tmp-<n>`` or ours ``.tmp``)."""
  name = fs.basename(path)
  return t5x_format.is_temporary_path(path) or bool(orbax_format.TMP_DIR_RE.match(name))


def _is_t5x_file(checkpoint_file: str) -> bool:
  return t5x_format.peek_top_level_keys(checkpoint_file) == {'version', 'optimizer'}


def _detect_dir(directory: str) -> Format | None:
  """Format of `directory` itself, or None."""
  ckpt_file = fs.join(directory, t5x_format.CHECKPOINT_FILENAME)
  if fs.isfile(ckpt_file) and _is_t5x_file(ckpt_file):
    return 't5x'
  entries = set(fs.listdir(directory))
  if 'config.json' in entries and any(f in entries for f in HF_WEIGHT_FILES):
    return 'huggingface'
  if orbax_format.METADATA_FILE in entries or orbax_format.has_orbax_metadata(directory):
    return 'orbax'
  return None


def _latest_step_dir(model_dir: str) -> str | None:
  """The complete ``checkpoint_<step>`` (T5X's or ours) with the highest step, or None."""
  steps = {step: 't5x' for step in t5x_format.checkpoint_steps(model_dir)}
  steps.update({step: 'orbax' for step in orbax_format.checkpoint_steps(model_dir)})
  if not steps:
    return None
  return fs.join(model_dir, f'checkpoint_{max(steps)}')


def resolve(path: PathOrCheckpoint) -> Checkpoint:
  """Locates the checkpoint at `path` and detects its format (the one place that does).

  Args:
    path: a checkpoint directory (local or URL), the ``checkpoint`` file of a
      T5X checkpoint, or a model directory whose latest complete
      ``checkpoint_<step>`` subdirectory is a checkpoint. A :class:`Checkpoint`
      is returned as it is.

  Returns:
    The :class:`Checkpoint`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is none of the known formats (the message names what
      was looked for), or is an unfinished ``.tmp`` save.
  """
  if isinstance(path, Checkpoint):
    return path
  requested = str(path)
  path = fs.abspath(requested)
  if is_temporary_path(path):
    raise ValueError(
        f'{path} is the temporary directory of an unfinished (interrupted) save, not a complete '
        'checkpoint. Use the checkpoint without the ".tmp" suffix, or an earlier one.'
    )
  if not fs.exists(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  if not fs.isdir(path):
    if fs.basename(path) == t5x_format.CHECKPOINT_FILENAME and _is_t5x_file(path):
      return Checkpoint(fs.dirname(path), 't5x', requested)
    raise ValueError(
        f'Cannot detect the checkpoint format of file {path}: expected a T5X "checkpoint" '
        'msgpack file with top-level keys {version, optimizer}, or a directory.'
    )
  fmt = _detect_dir(path)
  if fmt is not None:
    return Checkpoint(path, fmt, requested)
  latest = _latest_step_dir(path)
  if latest is not None:
    fmt = _detect_dir(latest)
    if fmt is not None:
      return Checkpoint(latest, fmt, requested)
  entries = fs.listdir(path)
  ignored = [e for e in entries if is_temporary_path(e) or _STEP_DIR_RE.match(e)]
  extra = (
      f' Ignored as incomplete (unfinished or interrupted saves): {", ".join(ignored)}.'
      if ignored
      else ''
  )
  raise ValueError(
      f'Cannot detect the checkpoint format of {path}. Looked for: a T5X legacy checkpoint (a '
      '"checkpoint" msgpack file with top-level keys {version, optimizer}, here or in the latest '
      'checkpoint_<step>/); a Hugging Face T5 directory (config.json plus one of '
      f'{", ".join(HF_WEIGHT_FILES)}); a checkpoint of this project ({orbax_format.METADATA_FILE}, '
      'here or in the latest checkpoint_<step>/); an Orbax checkpoint (one of '
      f'{", ".join(ORBAX_MARKERS)}, here or one level down).{extra}'
  )


def detect_format(path: PathOrCheckpoint) -> Format:
  """Returns ``'t5x'``, ``'huggingface'`` or ``'orbax'`` for a checkpoint path (see :func:`resolve`)."""
  return resolve(path).format


def load_params(
    path: PathOrCheckpoint,
    variables: str | Sequence[str] | None = None,
    *,
    dtype: Any | None = None,
    missing_ok: bool = False,
) -> dict[str, Any]:
  """Loads parameters (flaxformer names) from a checkpoint of any supported format.

  For this project's orbax checkpoints these are the parameters that were
  trained (the prompt, or every parameter for model tuning).

  Args:
    path: a checkpoint path (see :func:`resolve`) or a resolved
      :class:`Checkpoint`.
    variables: optional selection: ``/``-joined paths, subtree prefixes or
      regexes (see :func:`t5x_format.select_variables`). For T5X and orbax
      checkpoints the other arrays are not read.
    dtype: optional dtype for floating-point leaves.
    missing_ok: entries of `variables` that select nothing are skipped instead
      of raising.

  Returns:
    Nested dict of numpy arrays (``{}`` when `variables` selects nothing).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: unknown format; an orbax checkpoint this project did not
      (completely) write.
    t5x_format.UnknownVariableError: a requested variable is not there.
  """
  ckpt = resolve(path)
  if variables is not None and not isinstance(variables, str) and not list(variables):
    return {}
  if ckpt.format == 't5x':
    return t5x_format.load(ckpt.path, variables, dtype=dtype, missing_ok=missing_ok)
  if ckpt.format == 'orbax':
    if not ckpt.is_ours:
      raise orbax_format.IncompleteCheckpointError(orbax_format.incomplete_message(ckpt.path))
    return orbax_format.load(ckpt.path, variables, dtype=dtype, missing_ok=missing_ok)
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  _, params = huggingface.load_t5(ckpt.path)
  return _select(params, variables, dtype, missing_ok)


def _select(
    params: Mapping[str, Any],
    variables: str | Sequence[str] | None,
    dtype: Any | None,
    missing_ok: bool,
) -> dict[str, Any]:
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(params)
  if variables is not None:
    flat = {n: flat[n] for n in t5x_format.select_variables(flat, variables, missing_ok=missing_ok)}
  if dtype is not None:
    flat = {n: t5x_format.cast(v, dtype) for n, v in flat.items()}
  return params_lib.unflatten_params(flat)


def list_params(path: PathOrCheckpoint) -> dict[str, tuple[int, ...] | None]:
  """Names (flaxformer ``/``-paths) of the parameters a checkpoint holds, with their shapes.

  No array is read for T5X checkpoints (shapes come from the msgpack/zarr metadata) nor for this
  project's orbax checkpoints (names from their metadata; shapes are ``None``). A Hugging Face
  directory is read whole (its names depend on the weights it holds).
  """
  ckpt = resolve(path)
  if ckpt.format == 't5x':
    return {n: tuple(shape) for n, (shape, _) in t5x_format.list_variables(ckpt.path).items()}
  if ckpt.format == 'orbax':
    if not ckpt.is_ours:
      raise orbax_format.IncompleteCheckpointError(orbax_format.incomplete_message(ckpt.path))
    return {n: None for n in orbax_format.trainable_paths(ckpt.path)}
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(load_params(ckpt))
  return {n: tuple(v.shape) for n, v in flat.items()}


def read_step(path: PathOrCheckpoint) -> int | None:
  """The training step a checkpoint records (T5X, ours), or None (Hugging Face). No array is read."""
  ckpt = resolve(path)
  if ckpt.format == 't5x':
    return t5x_format.read_step(ckpt.path)
  if ckpt.format == 'orbax' and ckpt.is_ours:
    step = orbax_format.read_metadata(ckpt.path).get('step')
    return None if step is None else int(step)
  return None


def infer_t5_config(
    params_or_shapes: Any, preset: str | None = None, head_dim: int = 64, **overrides: Any
) -> Any:
  """A ``T5Config`` for a parameter tree (see ``architectures.t5.config_from_shapes``).

  Kept here for the conversion script and older callers; the shape reading lives
  next to the config in :mod:`prompt_tuning.architectures.t5`.
  """
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  return t5.config_from_shapes(params_or_shapes, preset, head_dim, **overrides)
