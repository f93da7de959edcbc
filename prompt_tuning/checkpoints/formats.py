"""Tells checkpoint formats apart and loads parameters from any of them.

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
  as ``state/``); the runtime's own checkpoints
  (:mod:`prompt_tuning.runtime.checkpoints`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Sequence

from prompt_tuning.checkpoints import t5x_format

Format = Literal['t5x', 'huggingface', 'orbax']

HF_WEIGHT_FILES = (
    'model.safetensors',
    'model.safetensors.index.json',
    'pytorch_model.bin',
    'pytorch_model.bin.index.json',
)
ORBAX_MARKERS = t5x_format._ORBAX_MARKERS  # pylint: disable=protected-access

# pylint: disable=protected-access
_exists = t5x_format._exists
_isdir = t5x_format._isdir
_isfile = t5x_format._isfile
_join = t5x_format._join
_listdir = t5x_format._listdir
# pylint: enable=protected-access


def _is_t5x_file(checkpoint_file: str) -> bool:
  return t5x_format.peek_top_level_keys(checkpoint_file) == {'version', 'optimizer'}


def _detect_dir(directory: str) -> Format | None:
  """Format of `directory` itself, or None."""
  ckpt_file = _join(directory, t5x_format.CHECKPOINT_FILENAME)
  if _isfile(ckpt_file) and _is_t5x_file(ckpt_file):
    return 't5x'
  entries = set(_listdir(directory))
  if 'config.json' in entries and any(f in entries for f in HF_WEIGHT_FILES):
    return 'huggingface'
  if t5x_format._has_orbax_metadata(directory):  # pylint: disable=protected-access
    return 'orbax'
  return None


def detect_format(path: str) -> Format:
  """Returns ``'t5x'``, ``'huggingface'`` or ``'orbax'`` for a checkpoint path.

  Args:
    path: a checkpoint directory (local or URL), the ``checkpoint`` file of a
      T5X checkpoint, or a model directory whose latest ``checkpoint_<step>``
      subdirectory is a checkpoint.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is none of the known formats (the message names what
      was looked for), or is an unfinished ``.tmp-`` save.
  """
  path = os.fspath(path)
  if t5x_format.is_temporary_path(path):
    raise ValueError(
        f'{path} is the temporary directory of an unfinished (interrupted) '
        'save, not a complete checkpoint.'
    )
  if not _exists(path):
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  if not _isdir(path):
    if os.path.basename(path.rstrip('/')) == t5x_format.CHECKPOINT_FILENAME and _is_t5x_file(path):
      return 't5x'
    raise ValueError(
        f'Cannot detect the checkpoint format of file {path}: expected a T5X '
        '"checkpoint" msgpack file with top-level keys {version, optimizer}, '
        'or a directory.'
    )
  fmt = _detect_dir(path)
  if fmt is not None:
    return fmt
  steps = t5x_format.checkpoint_steps(path)
  if steps:
    fmt = _detect_dir(_join(path, f'checkpoint_{steps[-1]}'))
    if fmt is not None:
      return fmt
  raise ValueError(
      f'Cannot detect the checkpoint format of {path}. Looked for: a T5X '
      'legacy checkpoint (a "checkpoint" msgpack file with top-level keys '
      '{version, optimizer}, here or in the latest checkpoint_<step>/); a '
      'Hugging Face T5 directory (config.json plus one of '
      f'{", ".join(HF_WEIGHT_FILES)}); an Orbax checkpoint (one of '
      f'{", ".join(ORBAX_MARKERS)}, here or one level down).'
  )


def load_params(
    path: str, variables: str | Sequence[str] | None = None, *, dtype: Any | None = None
) -> dict[str, Any]:
  """Loads parameters (flaxformer names) from a T5X or Hugging Face checkpoint.

  Args:
    path: checkpoint path; the format is detected with :func:`detect_format`.
    variables: optional selection (paths, subtree prefixes or regexes; see
      :func:`t5x_format.select_variables`). For T5X checkpoints the other
      arrays are not read.
    dtype: optional dtype for floating-point leaves.

  Returns:
    Nested dict of arrays.

  Raises:
    NotImplementedError: for Orbax checkpoints (use
      ``prompt_tuning.runtime.checkpoints``).
  """
  fmt = detect_format(path)
  if fmt == 't5x':
    return t5x_format.load(path, variables, dtype=dtype)
  if fmt == 'huggingface':
    from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

    _, params = huggingface.load_t5(path)
    flat = t5x_format.flatten_params(params)
    if variables is not None:
      flat = {n: flat[n] for n in t5x_format.select_variables(flat, variables)}
    if dtype is not None:
      flat = {n: _cast_any(v, dtype) for n, v in flat.items()}
    return t5x_format.unflatten_params(flat)
  raise NotImplementedError(
      f'{path} is an Orbax checkpoint; restore it with '
      'prompt_tuning.runtime.checkpoints (which owns the Orbax layout), not '
      'with load_params.'
  )


def _cast_any(x: Any, dtype: Any) -> Any:
  """Casts floating-point numpy / jax arrays to `dtype`; others unchanged."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  if not hasattr(x, 'dtype') or not t5x_format._is_float_dtype(x.dtype):  # pylint: disable=protected-access
    return x
  if isinstance(x, np.ndarray):
    return x.astype(np.dtype(dtype))
  return x.astype(dtype)


# ----------------------------------------------------------------------------
# T5 configuration from parameter shapes.
# ----------------------------------------------------------------------------

_LAYER_RE = re.compile(r'^(encoder|decoder)/layers_(\d+)/')


def _shapes(params_or_shapes: Any) -> dict[str, tuple[int, ...]]:
  """``{'a/b': shape}`` from a nested param tree or a flat name->shape map."""
  flat = (
      params_or_shapes
      if all(isinstance(k, str) and '/' in k for k in params_or_shapes) and params_or_shapes
      else t5x_format.flatten_params(params_or_shapes)
  )
  out = {}
  for k, v in flat.items():
    if hasattr(v, 'shape'):
      out[k] = tuple(int(d) for d in v.shape)
    elif isinstance(v, (tuple, list)) and v and isinstance(v[0], (tuple, list)):
      out[k] = tuple(int(d) for d in v[0])  # list_variables: (shape, dtype).
    elif isinstance(v, (tuple, list)):
      out[k] = tuple(int(d) for d in v)
  return out


def infer_t5_shape_fields(params_or_shapes: Any) -> dict[str, Any]:
  """Infers the T5Config fields that parameter shapes determine.

  Args:
    params_or_shapes: a nested parameter tree (flaxformer names), a flat
      ``{'a/b': array}`` dict, a flat ``{'a/b': shape}`` dict, or the output of
      :func:`t5x_format.list_variables`.

  Returns:
    A dict with some of ``vocab_size, emb_dim, num_heads, head_dim, mlp_dim,
    num_encoder_layers, num_decoder_layers, mlp_activations,
    logits_via_embedding, relative_attention_num_buckets``. ``num_heads`` and
    ``head_dim`` are only present when a relative-position embedding (or a 3-D
    attention kernel) determines them.

  Raises:
    ValueError: the tree is not a T5 encoder-decoder (no embedding/encoder).
  """
  shapes = _shapes(params_or_shapes)
  emb = shapes.get('token_embedder/embedding')
  if emb is None or not any(k.startswith('encoder/') for k in shapes):
    raise ValueError(
        'Cannot infer a T5 configuration: the parameters have no '
        '"token_embedder/embedding" or no "encoder/..." (is this a T5 '
        f'encoder-decoder checkpoint?). Some names: {sorted(shapes)[:5]}.'
    )
  fields: dict[str, Any] = {'vocab_size': emb[0], 'emb_dim': emb[1]}
  layers = {'encoder': set(), 'decoder': set()}
  for k in shapes:
    m = _LAYER_RE.match(k)
    if m:
      layers[m.group(1)].add(int(m.group(2)))
  fields['num_encoder_layers'] = len(layers['encoder'])
  fields['num_decoder_layers'] = len(layers['decoder'])
  relpos = shapes.get('encoder/relpos_bias/rel_embedding') or shapes.get(
      'decoder/relpos_bias/rel_embedding'
  )
  query = shapes.get('encoder/layers_0/attention/query/kernel')
  if relpos is not None:
    fields['num_heads'] = relpos[0]
    fields['relative_attention_num_buckets'] = relpos[1]
  if query is not None and len(query) == 3:
    fields['num_heads'], fields['head_dim'] = query[1], query[2]
  elif query is not None and 'num_heads' in fields:
    if query[1] % fields['num_heads']:
      raise ValueError(
          f'Attention width {query[1]} is not a multiple of the '
          f'{fields["num_heads"]} heads given by the relative-position '
          'embedding.'
      )
    fields['head_dim'] = query[1] // fields['num_heads']
  mlp_prefix = 'encoder/layers_0/mlp/'
  if mlp_prefix + 'wi_0/kernel' in shapes:
    fields['mlp_dim'] = shapes[mlp_prefix + 'wi_0/kernel'][-1]
    n_wi = len([k for k in shapes if k.startswith(mlp_prefix + 'wi_')])
    fields['mlp_activations'] = (
        ('gelu', 'linear') if n_wi == 2 else tuple('gelu' for _ in range(n_wi))
    )
  elif mlp_prefix + 'wi/kernel' in shapes:
    fields['mlp_dim'] = shapes[mlp_prefix + 'wi/kernel'][-1]
    fields['mlp_activations'] = ('relu',)
  fields['logits_via_embedding'] = 'decoder/logits_dense/kernel' not in shapes
  return fields


def _norm(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def infer_t5_config(
    params_or_shapes: Any, preset: str | None = None, head_dim: int = 64, **overrides: Any
) -> Any:
  """A ``T5Config`` for a parameter tree: preset, inferred shapes, overrides.

  Without `preset`, the T5 1.1 base preset (gated MLP) or T5 1.0 base preset
  (ReLU MLP) supplies what shapes cannot tell (dropout, maximum relative
  distance, ...) and every shape field is inferred; the head count comes from
  the relative-position embedding, else from `head_dim` (default 64). With a
  `preset`, its values are used and checked against the shapes: a mismatch is
  an error naming every disagreeing field. `overrides` are applied last and
  are not checked.

  Args:
    params_or_shapes: see :func:`infer_t5_shape_fields`.
    preset: a ``prompt_tuning.architectures.t5.get_config`` preset name.
    head_dim: head size assumed when nothing in the tree fixes it.
    **overrides: T5Config fields to set.

  Returns:
    A ``prompt_tuning.architectures.t5.T5Config``.

  Raises:
    ValueError: shapes contradict the preset, or the tree is not a T5
      encoder-decoder.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  fields = infer_t5_shape_fields(params_or_shapes)
  heads_known = 'head_dim' in fields
  width = _shapes(params_or_shapes).get('encoder/layers_0/attention/query/kernel', (0, 0))[1]
  if preset is None:
    if not heads_known and width:
      hd = overrides.get('head_dim', head_dim)
      if 'num_heads' in overrides:
        hd = width // overrides['num_heads']
      if width % hd:
        raise ValueError(
            f'Attention width {width} is not a multiple of head_dim {hd}; '
            'pass head_dim/num_heads or a --config preset.'
        )
      fields['num_heads'], fields['head_dim'] = width // hd, hd
    gated = len(fields.get('mlp_activations', ('gelu', 'linear'))) > 1
    config = t5.get_config('t5_1_1_base' if gated else 't5_1_0_base')
    config = dataclasses.replace(config, **fields)
  else:
    config = t5.get_config(preset)
    mismatches = []
    for name, value in fields.items():
      if name in overrides:
        continue
      have = getattr(config, name, None)
      if name == 'mlp_activations':  # Spellings vary; gating must agree.
        same = len(_norm(have)) == len(_norm(value))
      else:
        same = _norm(have) == _norm(value)
      if not same:
        mismatches.append(f'{name}: preset {have!r}, checkpoint {value!r}')
    if not heads_known and width and not ('num_heads' in overrides or 'head_dim' in overrides):
      if config.num_heads * config.head_dim != width:
        mismatches.append(
            f'num_heads*head_dim: preset {config.num_heads}*'
            f'{config.head_dim}, checkpoint attention width {width}'
        )
    if mismatches:
      raise ValueError(
          f'The checkpoint does not match preset {preset!r}: '
          + '; '.join(mismatches)
          + '. Pick a matching preset, or omit it to '
          'infer the configuration from the shapes.'
      )
  if overrides:
    config = dataclasses.replace(config, **overrides)
  return config
