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

import contextlib
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
from prompt_tuning.runtime import faults
from prompt_tuning.runtime import partitioning
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
  try:
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
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(model_dir, step, e) from None
  _barrier('pt_ckpt_done')
  return final


def _write_error(model_dir: str, step: int, e: BaseException) -> faults.CheckpointWriteError:
  """Removes what the failed save of `step` left and says which checkpoints are intact."""
  if jax.process_index() == 0:
    for name in fs.listdir(model_dir, missing_ok=True):
      m = _TMP_RE.match(name)
      if m and int(m.group(1)) == step:
        with contextlib.suppress(Exception):
          fs.rmtree(fs.join(model_dir, name), missing_ok=True)
  steps = all_steps(model_dir)
  intact = (
      f'checkpoints up to step {steps[-1]} are intact ({fs.join(model_dir, f"checkpoint_{steps[-1]}")})'
      if steps
      else 'no earlier checkpoint exists'
  )
  partial = ''
  if step in steps:
    partial = ' (the checkpoint itself was committed; its .npy prompt export was not)'
  return faults.CheckpointWriteError(
      f'{faults.describe_os_error(e)} writing checkpoint_{step} in {model_dir}{partial}; {intact}. '
      'Free space (or fix the cause) and rerun the same command to resume.'
  )


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


class DamagedCheckpointError(RuntimeError):
  """MODEL_DIR has checkpoints, but none of them can be read."""


def _first_line(e: BaseException, limit: int = 240) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + '...'


def _move_aside(path: str) -> str:
  target, n = f'{path}.damaged', 1
  while fs.exists(target):
    n += 1
    target = f'{path}.damaged-{n}'
  fs.rename(path, target)
  return target


def restore_latest(model_dir: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
  """The newest checkpoint of `model_dir` that reads back whole, and its contents.

  Every `checkpoint_<step>` directory, newest first, is read completely. One that cannot be read
  (data or orbax metadata missing or corrupt), or that lacks the commit marker this project
  writes last (`prompt_tuning_checkpoint.json`), is damaged: once an older usable one is found,
  the damaged newer ones are moved aside to `checkpoint_<step>.damaged` (never deleted) with a
  warning naming each, so a later save of the same step cannot overwrite them. T5X checkpoints and
  unfinished `.tmp` saves are not considered.

  Returns:
    `(path, raw)` (see `restore_checkpoint`), or `(None, None)` when there is no checkpoint.

  Raises:
    DamagedCheckpointError: checkpoints exist but none can be read (nothing is moved then).
  """
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  faults.quiet_closed_event_loop()
  candidates = []
  for name in fs.listdir(model_dir, missing_ok=True):
    m = orbax_format.STEP_DIR_RE.match(name)
    path = fs.join(model_dir, name)
    if m and not fs.isfile(fs.join(path, t5x_format.CHECKPOINT_FILENAME)):
      candidates.append((int(m.group(1)), path))
  damaged: List[Tuple[str, str]] = []
  for _, path in sorted(candidates, reverse=True):
    if not orbax_format.is_complete_checkpoint(path):
      damaged.append((path, f'it has no {METADATA_FILE}, which a save writes last'))
      continue
    try:
      read_metadata(path)
      raw = restore_checkpoint(path)
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((path, f'it cannot be read: {_first_line(e)}'))
      continue
    _barrier('pt_restore_latest')
    for bad, why in damaged:
      moved = _move_aside(bad) if jax.process_index() == 0 else f'{bad}.damaged'
      logging.warning(
          'Checkpoint %s is damaged (%s): moved it aside to %s and resuming from %s.',
          bad,
          why,
          moved,
          path,
      )
    return path, raw
  if damaged:
    listed = '; '.join(f'{p}: {why}' for p, why in damaged)
    raise DamagedCheckpointError(
        f'MODEL_DIR {model_dir} has checkpoints but none can be resumed from ({listed}). Nothing '
        'was changed. Restore them from a backup, or move them away to start again from '
        'INITIAL_CHECKPOINT_PATH.'
    )
  return None, None


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
    node[last] = partitioning.device_put_owned(value, sharding) if sharding is not None else value
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


class CheckpointMismatchError(ValueError):
  """The initial checkpoint does not hold the model's frozen parameters, or holds others."""


def _source(path: str, assignment_map) -> Tuple[Optional[str], bool]:
  """The checkpoint name of model parameter `path` and whether `assignment_map` maps it to None."""
  for regex, repl in assignment_map or ():
    if re.fullmatch(regex, path):
      return (None, True) if repl is None else (re.sub(regex, repl, path), False)
  return path, False


def _layer_counts(names) -> Dict[str, int]:
  counts: Dict[str, int] = {}
  for name in names:
    m = re.match(r'^(encoder|decoder)/layers_(\d+)/', name)
    if m:
      counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
  return counts


def _mismatch_causes(
    model_names: Sequence[str],
    ckpt: 'formats.Checkpoint',
    ckpt_shapes: Mapping[str, Optional[Tuple[int, ...]]],
) -> List[str]:
  """Likely causes of a checkpoint whose parameter names differ from the model's."""
  causes = []
  model, found = set(model_names), set(ckpt_shapes)
  has = lambda names, pattern: any(re.search(pattern, n) for n in names)
  relu_ckpt, gated_ckpt = has(found, r'/mlp/wi/kernel$'), has(found, r'/mlp/wi_0/kernel$')
  relu_model, gated_model = has(model, r'/mlp/wi/kernel$'), has(model, r'/mlp/wi_0/kernel$')
  logits_model = 'decoder/logits_dense/kernel' in model
  logits_ckpt = 'decoder/logits_dense/kernel' in found
  decoder_ckpt = has(found, r'^decoder/')
  if (
      (relu_ckpt and gated_model)
      or (gated_ckpt and relu_model)
      or (decoder_ckpt and logits_model != logits_ckpt)
  ):
    if relu_ckpt or (decoder_ckpt and not logits_ckpt):
      kinds = (
          'T5 1.0 (ReLU mlp/wi, output logits tied to the token embedding)',
          'T5 1.1 (gated mlp/wi_0 and wi_1, a separate decoder/logits_dense)',
          'a T5 1.1 / LM-adapted checkpoint, or a T5 1.0 model gin (architectures/t5_1_0.gin)',
      )
    else:
      kinds = (
          'T5 1.1 (gated mlp/wi_0 and wi_1, a separate decoder/logits_dense)',
          'T5 1.0 (ReLU mlp/wi, output logits tied to the token embedding)',
          'a T5 1.0 checkpoint, or a T5 1.1 model gin (models/t5_1_1_*_prompt.gin)',
      )
    causes.append(
        f'T5 1.0 vs 1.1: the checkpoint is {kinds[0]} but the model is {kinds[1]}; use {kinds[2]}'
    )
  model_layers, ckpt_layers = _layer_counts(model), _layer_counts(found)
  diffs = [
      f'{ckpt_layers.get(stack, 0)} {stack} layers in the checkpoint, {n} in the model'
      for stack, n in sorted(model_layers.items())
      if ckpt_layers.get(stack) is not None and ckpt_layers[stack] != n
  ]
  if diffs:
    causes.append(
        f'wrong size gin: {"; ".join(diffs)} (NUM_ENCODER_LAYERS / NUM_DECODER_LAYERS, set by the '
        'models/*_<size>_prompt.gin or sizes/<size>.gin file, must match the checkpoint)'
    )
  shapes = {n: s for n, s in ckpt_shapes.items() if s is not None}
  if shapes and causes:
    from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

    try:
      fields = t5.config_fields_from_shapes(shapes)
      presets = t5._matching_presets(fields, t5._attention_width(shapes))  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      presets = []
    if presets:
      causes.append(f'the checkpoint matches the preset(s) {", ".join(presets)}')
  if ckpt.is_ours:
    meta = read_metadata(ckpt.path)
    source = meta.get('initial_checkpoint_path')
    causes.append(
        'this is a checkpoint of this project, which holds only the parameters its run trained '
        f'({", ".join(meta.get("trainable_paths", [])[:3])}); its frozen parameters came from '
        + (f'{source}: pass that as INITIAL_CHECKPOINT_PATH' if source else 'another checkpoint')
    )
  if not causes:
    causes.append(
        'the checkpoint is of another model: check that the model gin (architecture, size) '
        'matches the checkpoint'
    )
  return causes


def _names(names: Sequence[str], limit: int = 6) -> str:
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def load_initial_params(
    path: str,
    init_params: Mapping[str, Any],
    *,
    assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None,
    fallback_to_scratch: bool = False,
    dtype: Optional[str] = None,
    strict: bool = True,
    only: Optional[Callable[[str], bool]] = None,
    trainable: Optional[Callable[[str], bool]] = None,
    allow_partial_frozen: bool = False,
) -> Dict[str, Any]:
  """Fills `init_params` (a nested tree of arrays or shape structs) from the checkpoint at `path`.

  A parameter that `assignment_map` maps to `None` keeps its initializer's value (it is
  deliberately not read: the prompt, or a method's parameters read from a file). Of the others,
  only *trainable* ones (`trainable(path)`, the optimizer's `trainable_filter`) may keep their
  initial value when the checkpoint lacks them, with `fallback_to_scratch` (otherwise, with
  `strict`, they are an error). Every other frozen parameter must come from the checkpoint, and
  every parameter of the checkpoint must be one the model has (under `assignment_map`): a
  checkpoint of another architecture or size (T5 1.0 into T5 1.1, 3 layers into 2) is a
  `CheckpointMismatchError` listing the parameters and naming the likely cause, unless
  `allow_partial_frozen` (then those frozen parameters keep their random initialization and unused
  checkpoint parameters are ignored, with a warning). `trainable=None` counts every parameter as
  trainable (T5X's rule: `fallback_to_scratch` applies to all).
  `only(path)` restricts which parameters are looked up (e.g. only the frozen ones on resume).

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointMismatchError: see above; also for shape mismatches.
  """
  ckpt = formats.resolve(path)
  target = params_lib.flatten_params(init_params)
  may_start_fresh = trainable or (lambda p: True)
  wanted: Dict[str, Optional[str]] = {}
  known = set()
  for p in target:
    src, _ = _source(p, assignment_map)
    known.add(p if src is None else src)
    if only is None or only(p):
      wanted[p] = src
  if ckpt.format == 'huggingface':
    everything = params_lib.flatten_params(formats.load_params(ckpt))
    available = {n: tuple(v.shape) for n, v in everything.items()}
    found = {s: everything[s] for s in wanted.values() if s is not None and s in everything}
  else:
    available = formats.list_params(ckpt)
    sources = sorted({s for s in wanted.values() if s is not None and s in available})
    found = params_lib.flatten_params(formats.load_params(ckpt, sources, missing_ok=True))
  out = dict(target)
  fresh, missing_trainable, missing_frozen, mismatched = [], [], [], []
  for p, src in wanted.items():
    if src is None:  # Mapped to None on purpose: keeps its initializer (e.g. a prompt file).
      fresh.append(p)
      continue
    if src not in found:
      if not may_start_fresh(p):
        missing_frozen.append(p)
      elif fallback_to_scratch:
        fresh.append(p)
      else:
        missing_trainable.append(p)
      continue
    value = np.asarray(found[src])
    if tuple(value.shape) != tuple(target[p].shape):
      mismatched.append((p, tuple(value.shape), tuple(target[p].shape)))
      continue
    out[p] = value.astype(dtype or getattr(target[p], 'dtype', value.dtype))
  skipped = lambda n: _source(n, assignment_map)[1]
  unused = [n for n in available if n not in known and not skipped(n)]
  if mismatched:
    p, got, want = mismatched[0]
    shown = '; '.join(f'{q}: {g} in the checkpoint, {w} in the model' for q, g, w in mismatched[:4])
    more = f' ({len(mismatched) - 4} more)' if len(mismatched) > 4 else ''
    raise CheckpointMismatchError(
        f'Checkpoint {ckpt.path} has parameters of other shapes than the model: {shown}{more}. '
        f'Likely cause: {_likely_cause(p, want, got)}.'
    )
  if (missing_frozen or unused) and not allow_partial_frozen:
    parts = []
    if missing_frozen:
      parts.append(
          f'{len(missing_frozen)} frozen parameter(s) of the model are not in it '
          f'({_names(missing_frozen)})'
      )
    if unused:
      parts.append(f'{len(unused)} of its parameters are not used by the model ({_names(unused)})')
    causes = _mismatch_causes(list(target), ckpt, available)
    raise CheckpointMismatchError(
        f'Checkpoint {ckpt.path} does not match the model: {" and ".join(parts)}. Likely cause: '
        f'{"; ".join(causes)}. Frozen parameters must all come from the checkpoint (only trained '
        'ones, such as the prompt, or those assignment_map maps to None may start from their '
        'initializer); to run with a partly random frozen model on purpose, set '
        '--gin.utils.RestoreCheckpointConfig.allow_partial_frozen=True.'
    )
  if missing_frozen:
    logging.warning(
        'allow_partial_frozen: %d frozen parameter(s) are not in %s and keep their random '
        'initialization: %s',
        len(missing_frozen),
        ckpt.path,
        _names(missing_frozen),
    )
  if unused and allow_partial_frozen:
    logging.warning(
        'allow_partial_frozen: %d parameter(s) of %s are not used by the model: %s',
        len(unused),
        ckpt.path,
        _names(unused),
    )
  if missing_trainable and strict:
    raise CheckpointMismatchError(
        f'{len(missing_trainable)} trained parameter(s) are not in checkpoint {ckpt.path}: '
        f'{_names(missing_trainable)}. To initialize them instead (e.g. a new prompt), set '
        'utils.RestoreCheckpointConfig.fallback_to_scratch = True and assignment_map = '
        '((r".*prompt.*", None),).'
    )
  if fresh:
    logging.info('Initialized from scratch (not in the checkpoint): %s', _names(fresh))
  return params_lib.unflatten_params(out)
