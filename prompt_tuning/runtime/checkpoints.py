"""Orbax checkpoints of the training state, `.npy` prompt exports, and restoring initial weights.

Layout under `MODEL_DIR`:

    checkpoint_<step>/                 orbax PyTree: step, trainable params, optimizer state, data position
        prompt_tuning_checkpoint.json  written last, before the directory gets its final name
    numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt.npy

A checkpoint is written under `checkpoint_<step>.tmp` and renamed only when complete, so a process
killed mid-write leaves a `.tmp` directory that restore ignores (and the next save removes). Older
checkpoints beyond `keep` are deleted only after the new one is committed.

This module writes checkpoints and restores train states. Reading parameters out of a checkpoint
of any format (ours, T5X, Hugging Face) is `prompt_tuning.checkpoints.formats.load_params`; the
layout names and the reader of our checkpoints live in `prompt_tuning.checkpoints.orbax_format`.
Files go through `prompt_tuning.fs` (local paths, `gs://`).
"""

import io
import json
from absl import logging
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib
from prompt_tuning.checkpoints import formats
from prompt_tuning.checkpoints import orbax_format
from prompt_tuning.runtime import train_state as train_state_lib

METADATA_FILE = orbax_format.METADATA_FILE
_TMP_RE = orbax_format.TMP_DIR_RE

path_exists = fs.exists
is_complete_checkpoint = orbax_format.is_complete_checkpoint
read_metadata = orbax_format.read_metadata
all_steps = orbax_format.checkpoint_steps
latest_checkpoint_path = orbax_format.latest_checkpoint_path


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _fetch(x):
  if x is None:
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    # Sharded over devices of several processes: gather the global value on every process.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _to_host(tree):
  return jax.tree_util.tree_map(_fetch, tree)


def prompt_file_name(path: str) -> str:
  return path.replace('/', '.') + '.npy'


def _atomic_np_save(path: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array)
  fs.write_bytes(path, buffer.getvalue())


def save_checkpoint(
    model_dir: str,
    state: train_state_lib.TrainState,
    *,
    data_state: Optional[Mapping[str, Any]] = None,
    keep: Optional[int] = None,
    prompt_regex: str = r'.*prompt.*',
    dtype: Optional[str] = None,
    extra_metadata: Optional[Mapping[str, Any]] = None,
    numpy_exports: Optional[Mapping[str, Any]] = None,
) -> str:
  """Saves the state atomically and exports prompt-like trainable parameters as `.npy`.

  `numpy_exports` (`{path: array}`, e.g. from `SaveCheckpointConfig.export_fn`) replaces the
  default `.npy` export of the trainable parameters matching `prompt_regex`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  step = int(jax.device_get(state.step))
  final = fs.join(model_dir, f'checkpoint_{step}')
  tmp = final + '.tmp'
  if jax.process_index() == 0:
    fs.makedirs(model_dir)
    # Leftovers of saves that were killed mid-write (never complete, never restored) are removed.
    for name in fs.listdir(model_dir):
      if _TMP_RE.match(name) or orbax_format.OLD_DIR_RE.match(name):
        fs.rmtree(fs.join(model_dir, name), missing_ok=True)
  _barrier('pt_ckpt_pre')
  tree = state.state_dict()
  trainable = _to_host(tree['trainable'])
  if dtype:
    trainable = jax.tree_util.tree_map(lambda x: x.astype(dtype), trainable)
  payload = {
      'step': np.asarray(step, np.int64),
      'trainable': trainable,
      'opt_state': _to_host(_drop_none(tree['opt_state'])),
      'data': {k: np.asarray(v) for k, v in (data_state or {}).items()},
  }
  ocp.PyTreeCheckpointer().save(fs.abspath(tmp), payload)
  _barrier('pt_ckpt_written')
  flat = params_lib.flatten_params(trainable)
  if jax.process_index() == 0:
    meta = {
        'step': step,
        'format': orbax_format.FORMAT_NAME,
        'time': time.time(),
        'trainable_paths': sorted(flat),
        **(extra_metadata or {}),
    }
    fs.write_text(fs.join(tmp, METADATA_FILE), json.dumps(meta, indent=1))
    # An existing checkpoint of the same step is replaced only once the new one is complete.
    fs.rename(tmp, final, overwrite=True)
    np_dir = fs.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}')
    fs.makedirs(np_dir)
    if numpy_exports is None:
      exports = {p: v for p, v in flat.items() if re.fullmatch(prompt_regex, p)}
    else:
      exports = _to_host(dict(numpy_exports))
    for path, value in exports.items():
      _atomic_np_save(fs.join(np_dir, prompt_file_name(path)), np.asarray(value))
    if keep:
      for old in all_steps(model_dir)[:-keep]:
        fs.rmtree(fs.join(model_dir, f'checkpoint_{old}'), missing_ok=True)
    logging.info('Saved checkpoint %s', final)
  _barrier('pt_ckpt_done')
  return final


def _drop_none(tree):
  if isinstance(tree, dict):
    return {k: _drop_none(v) for k, v in tree.items() if v is not None}
  return tree


def restore_checkpoint(path: str) -> Dict[str, Any]:
  """Reads a checkpoint written by `save_checkpoint` (raw nested dict: step, trainable, opt_state, data).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: `path` is not a complete checkpoint of this project.
  """
  return orbax_format.restore(path)


def restore_into_state(
    state: train_state_lib.TrainState, raw: Mapping[str, Any]
) -> train_state_lib.TrainState:
  opt_template = jax.tree_util.tree_map(lambda x: x, state.opt_state)
  raw = dict(raw)
  import flax  # pylint: disable=g-import-not-at-top

  template_dict = flax.serialization.to_state_dict(opt_template)
  raw['opt_state'] = _fill_none(template_dict, raw.get('opt_state', {}))
  return state.restore_state(raw)


def _fill_none(template, raw):
  if isinstance(template, dict):
    return {
        k: (
            _fill_none(v, raw.get(k))
            if raw is not None and k in raw
            else (None if v is None else _fill_none(v, None) if isinstance(v, dict) else v)
        )
        for k, v in template.items()
    }
  return raw if raw is not None else template


# ----------------------------------------------------------------------------- initial weights


def checkpoint_step(path: str) -> Optional[int]:
  """The training step stored in a checkpoint (ours or T5X's); None when it has none (Hugging Face)."""
  try:
    return formats.read_step(path)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not read the step of checkpoint %s (%s); starting at step 0.', path, e)
  return None


def load_checkpoint_params(
    path: str, variables: Optional[Sequence[str]] = None
) -> Dict[str, np.ndarray]:
  """Flat `{path: array}` parameters from any supported checkpoint (ours, T5X legacy, Hugging Face).

  `variables` selects parameters (exact paths, subtree prefixes or regexes); those not in the
  checkpoint are left out of the result rather than being an error (the caller decides).
  """
  if not fs.exists(path):
    raise FileNotFoundError(
        f'Checkpoint path {path!r} does not exist. Check INITIAL_CHECKPOINT_PATH / '
        'RestoreCheckpointConfig.path (a T5X checkpoint_<step> directory, a Hugging Face T5 directory or '
        'one of our checkpoint_<step> directories).'
    )
  params = formats.load_params(
      path, None if variables is None else list(variables), missing_ok=True
  )
  return params_lib.flatten_params(params)


def _likely_cause(path: str, expected, found) -> str:
  if 'embedding' in path or 'logits_dense' in path:
    return (
        'the vocabulary size differs: set NUM_EMBEDDINGS / the vocabulary to match the checkpoint '
        '(T5 and T5 1.1 use 32128, mT5 250112)'
    )
  if 'prompt' in path:
    return 'PROMPT_LENGTH or the model width differs from the prompt that was saved'
  return (
      'the model size differs: pick the size preset/gin file that matches the checkpoint (e.g. '
      't5_1_1_base vs t5_1_1_large)'
  )


def load_initial_optimizer_state(
    path: str,
    opt_state: Any,
    *,
    assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None,
) -> Tuple[Any, List[str], List[str]]:
  """Fills the optimizer slots of `opt_state` that a T5X checkpoint at `path` also holds.

  As T5X does when it restores a train state: a slot (`param_states/<param>/v_row`, `v_col`, `v`,
  `m`) is taken from the checkpoint when it is there with the same shape; the rest keep their fresh
  value (a new prompt, another factorization, another optimizer). Parameters that `assignment_map`
  maps to None are not looked up; a renamed parameter takes the slots of its source. Slots that
  hold no statistics (shape `(1,)`) are skipped. Other checkpoint formats carry no optimizer state
  for the parameters being trained and leave `opt_state` as it is.

  Returns:
    `(opt_state, restored, kept)`: restored and kept-fresh slot names.
  """
  ckpt = formats.resolve(path)
  if ckpt.format != 't5x':
    return opt_state, [], []
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  state_dict = serialization.to_state_dict(opt_state.param_states)
  if not isinstance(state_dict, Mapping):
    return opt_state, [], []
  flat = params_lib.flatten_params(state_dict)
  sources: Dict[str, str] = {}
  kept: List[str] = []
  for name, leaf in flat.items():
    if leaf is None or tuple(np.shape(leaf)) == (1,):
      continue
    param, slot = name.rsplit('/', 1)
    src: Optional[str] = param
    for regex, repl in assignment_map or ():
      if re.fullmatch(regex, param):
        src = None if repl is None else re.sub(regex, repl, param)
        break
    if src is None:
      kept.append(name)
    else:
      sources[name] = f'param_states/{src}/{slot}'
  found = t5x_format.load_state_variables(ckpt.path, sorted(set(sources.values())))
  restored: List[str] = []
  for name, src in sources.items():
    value = found.get(src)
    leaf = flat[name]
    if value is None or tuple(np.shape(value)) != tuple(np.shape(leaf)):
      kept.append(name)
      continue
    value = np.asarray(value, dtype=leaf.dtype)
    sharding = getattr(leaf, 'sharding', None)
    *parents, last = name.split('/')
    node = state_dict
    for key in parents:
      node = node[key]
    node[last] = jax.device_put(value, sharding) if sharding is not None else value
    restored.append(name)
  if kept:
    logging.info(
        'Optimizer slots not in %s (or of another shape), started fresh: %s',
        path,
        ', '.join(kept[:10]) + (' ...' if len(kept) > 10 else ''),
    )
  if restored:
    logging.info('Restored %d optimizer slots from %s.', len(restored), path)
  param_states = serialization.from_state_dict(opt_state.param_states, state_dict)
  return opt_state.replace(param_states=param_states), restored, kept


def load_initial_params(
    path: str,
    init_params: Mapping[str, Any],
    *,
    assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None,
    fallback_to_scratch: bool = False,
    dtype: Optional[str] = None,
    strict: bool = True,
    only: Optional[Callable[[str], bool]] = None,
) -> Dict[str, Any]:
  """Fills `init_params` (a nested tree of arrays or shape structs) from the checkpoint at `path`.

  Parameters whose path matches an `assignment_map` regex mapped to `None`, or that are absent from
  the checkpoint, keep their initial value when `fallback_to_scratch`; otherwise it is an error.
  `only(path)` restricts which parameters are looked up (e.g. only the frozen ones).
  """
  target = params_lib.flatten_params(init_params)
  wanted: Dict[str, Optional[str]] = {}
  for p in target:
    if only is not None and not only(p):
      continue
    src: Optional[str] = p
    for regex, repl in assignment_map or ():
      if re.fullmatch(regex, p):
        src = None if repl is None else re.sub(regex, repl, p)
        break
    wanted[p] = src
  sources = sorted({s for s in wanted.values() if s is not None})
  found = load_checkpoint_params(path, variables=sources)
  out = dict(target)
  missing = []
  for p, src in wanted.items():
    if src is None or src not in found:
      if fallback_to_scratch:
        continue
      missing.append(p)
      continue
    value = np.asarray(found[src])
    if tuple(value.shape) != tuple(target[p].shape):
      raise ValueError(
          f'Parameter {p!r} has shape {tuple(value.shape)} in checkpoint {path} but the model expects '
          f'{tuple(target[p].shape)}. Likely cause: {_likely_cause(p, target[p].shape, value.shape)}.'
      )
    out[p] = value.astype(dtype or getattr(target[p], 'dtype', value.dtype))
  if missing and strict:
    raise ValueError(
        f'{len(missing)} parameter(s) are not in checkpoint {path}: {missing[:5]}. To initialize them '
        'instead (e.g. a new prompt), set utils.RestoreCheckpointConfig.fallback_to_scratch = True and '
        'assignment_map = ((r".*prompt.*", None),).'
    )
  return params_lib.unflatten_params(out)
