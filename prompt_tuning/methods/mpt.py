"""Multitask prompt tuning (MPT; Wang et al. 2023), with Hugging Face PEFT's state format.

Task `k`'s prompt is a shared prompt `P*` `[n, H]` times a rank-`r` task matrix:

    P_k = P* * (U_k @ V_k),   U_k = prefix_task_cols[k] [n, r],   V_k = prefix_task_rows[k] [r, H]

(`*` elementwise; PEFT's `MultitaskPromptEmbedding`). Each example uses its task's prompt, picked
by its `task_ids` feature, so one batch can mix tasks. Parameters (paths under
`.../prompt/prompt/`): `shared_prompt` `[n, H]`, `prefix_task_cols` `[N, n, r]`,
`prefix_task_rows` `[N, r, H]` (PEFT's names; PEFT calls `P*` `prompt_embeddings`). Defaults as
PEFT: `U`, `V` ~ N(0, 0.02^2), rank 1.

The two stages (`configs/methods/mpt.gin`, `mpt_target.gin`):

* source: `P*`, `U`, `V` trained on a mixture of source tasks, optionally distilling per-task
  teacher prompts (`PromptDistillation`, a loss term: KL from the teacher's output distribution
  plus a mean squared error between the teacher's and the student's encoder outputs);
* target: `P*` initialized from the source (`from_source`; PEFT's `ONLY_SOURCE_SHARED`, or with
  `U`, `V` averaged over the source tasks: `AVERAGE_SOURCE_TASKS`, or one task's:
  `EXACT_SOURCE_TASK`), new `U`, `V` learned on the target task.

PEFT interchange: `read_peft_state` / `import_peft_state` turn a PEFT MPT adapter
(`adapter_model.safetensors` with `prompt_embeddings`, `prefix_task_cols`, `prefix_task_rows`) into
these parameters (for a sequence-to-sequence adapter with two transformer submodules, the encoder
half: the first `num_virtual_tokens` rows, which is what PEFT's `generate` uses); `export_peft`
writes them as a PEFT adapter directory (`num_transformer_submodules=1`, encoder prompt only) that
`peft.PeftModel.from_pretrained` loads.
"""

import json
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning import prompts
from prompt_tuning.methods import composition

Array = Any
DType = Any
Initializer = prompts.Initializer

SHARED_AXES = ('prompt', 'prompt_embed')
# Every axis replicated (the partitioning and Adafactor rules know these names; the rank is unnamed).
COLS_AXES = ('tasks', 'prompt', None)
ROWS_AXES = ('tasks', None, 'prompt_embed')
PEFT_KEYS = ('prompt_embeddings', 'prefix_task_cols', 'prefix_task_rows')
PARAM_NAMES = {
    'prompt_embeddings': 'shared_prompt',
    'prefix_task_cols': 'prefix_task_cols',
    'prefix_task_rows': 'prefix_task_rows',
}


def normal(stddev: float = 0.02) -> Initializer:
  """N(0, stddev^2) (PEFT's init of `prefix_task_cols` / `prefix_task_rows`)."""

  def init(rng, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(rng, tuple(shape), dtype)

  return init


class MPTPrompt(nn.Module):
  """`P* * (U[t] @ V[t])` per example (see the module docstring).

  Attributes:
    length: n, the prompt length.
    num_tasks: N.
    num_ranks: r.
    shared_init: initializer of `P*` `[n, H]`.
    cols_init: initializer of `U` `[N, n, r]`.
    rows_init: initializer of `V` `[N, r, H]`.
    task_feature: the per-example feature naming the task (not needed when N == 1).
    embed_dim: H (inferred when None).
    dtype: activation dtype.
    params_dir: serve from exported `.npy` parameters (see `composition.param`).
  """

  length: int
  num_tasks: int
  num_ranks: int = 1
  shared_init: Initializer = prompts.uniform(0.5)
  cols_init: Initializer = normal(0.02)
  rows_init: Initializer = normal(0.02)
  task_feature: str = 'task_ids'
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  params_dir: Optional[str] = None

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns `[B, n, H]`."""
    del prompt_ids
    h = self.embed_dim or embedded.shape[-1]
    n, r, num = self.length, self.num_ranks, self.num_tasks
    shared = composition.param(self, 'shared_prompt', self.shared_init, (n, h), SHARED_AXES)
    cols = composition.param(self, 'prefix_task_cols', self.cols_init, (num, n, r), COLS_AXES)
    rows = composition.param(self, 'prefix_task_rows', self.rows_init, (num, r, h), ROWS_AXES)
    batch = (tokens if tokens is not None else embedded).shape[0]
    ids = composition.example_ids(self, features, self.task_feature, batch, num)
    task = jnp.einsum(
        'bnr,brh->bnh', composition.take_rows(cols, ids), composition.take_rows(rows, ids)
    )
    return (shared[None] * task).astype(self.dtype)


def mpt_prompt_factory(
    length: int,
    num_tasks: int,
    num_ranks: int = 1,
    *,
    shared_init: Initializer = prompts.uniform(0.5),
    cols_init: Initializer = normal(0.02),
    rows_init: Initializer = normal(0.02),
    task_feature: str = 'task_ids',
    combine: Callable[..., Array] = prompts.prefix_prompt,
    attention_policy: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
    params_dir: Optional[str] = None,
) -> Callable[[], nn.Module]:
  """A `prompt_factory` of MPT prompts (arguments: `MPTPrompt`)."""
  kwargs = dict(
      length=length,
      num_tasks=num_tasks,
      num_ranks=num_ranks,
      shared_init=shared_init,
      cols_init=cols_init,
      rows_init=rows_init,
      task_feature=task_feature,
      dtype=dtype,
      params_dir=params_dir,
  )
  return composition.make_factory(
      lambda: MPTPrompt(parent=None, **kwargs), combine, length, attention_policy
  )


# ------------------------------------------------------------------- source -> target init --


def from_source(
    source: Union[Array, Callable[[], Array]], tasks: Union[None, str, int] = None
) -> Initializer:
  """Initializer from a source-stage array, optionally reduced over its task axis (axis 0).

  `tasks=None` keeps the array as it is (`P*`: PEFT's `ONLY_SOURCE_SHARED`); `'mean'` averages
  `U` or `V` over the source tasks keeping a task axis of 1 (`AVERAGE_SOURCE_TASKS`); an int `k`
  takes source task k's `U` or `V` (`EXACT_SOURCE_TASK`). With a target of several tasks the one
  reduced row is repeated.

  Args:
    source: the array (or a loader: `prompts.np_load(path)` of an exported `.npy`, or
      `peft_array(path, key)`).
    tasks: None, 'mean' or a task index.
  """

  def init(rng, shape, dtype=jnp.float32):
    del rng
    value = np.asarray(prompts._resolve(source), np.float32)  # pylint: disable=protected-access
    if tasks == 'mean':
      value = value.mean(axis=0, keepdims=True)
    elif tasks is not None:
      k = int(tasks)
      if not 0 <= k < value.shape[0]:
        raise ValueError(f'from_source: task {k} is not one of the {value.shape[0]} source tasks.')
      value = value[k : k + 1]
    if tasks is not None and value.shape[1:] == tuple(shape[1:]) and shape[0] != 1:
      value = np.repeat(value, shape[0], axis=0)
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f'from_source: the source array has shape {tuple(value.shape)} (tasks={tasks!r}) but '
          f'the target parameter has shape {tuple(shape)}: prompt length, rank and width must '
          'match the source run.'
      )
    return jnp.asarray(value, dtype)

  return init


# ------------------------------------------------------------------------- PEFT interchange --


def _adapter_file(path: str) -> str:
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  if fs.isdir(path):
    for name in ('adapter_model.safetensors', 'adapter_model.bin'):
      if fs.exists(fs.join(path, name)):
        return fs.join(path, name)
    raise FileNotFoundError(
        f'{path!r} has no adapter_model.safetensors (or adapter_model.bin): not a PEFT adapter '
        'directory (peft_model.save_pretrained writes one).'
    )
  if not fs.exists(path):
    raise FileNotFoundError(f'PEFT adapter {path!r} does not exist.')
  return path


def read_peft_state(path: str) -> Dict[str, np.ndarray]:
  """The arrays of a PEFT adapter: a directory, or its `.safetensors` / `.bin` file."""
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  path = _adapter_file(path)
  data = fs.read_bytes(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import load as st_load  # pylint: disable=g-import-not-at-top

    return {k: np.asarray(v) for k, v in st_load(data).items()}
  import io  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  state = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _peft_config(path: str) -> Dict[str, Any]:
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  if fs.isdir(path) and fs.exists(fs.join(path, 'adapter_config.json')):
    return json.loads(fs.read_text(fs.join(path, 'adapter_config.json')))
  return {}


def import_peft_state(
    state: Mapping[str, np.ndarray], num_virtual_tokens: Optional[int] = None
) -> Dict[str, np.ndarray]:
  """PEFT MPT arrays -> `{'shared_prompt', 'prefix_task_cols', 'prefix_task_rows'}`.

  Keys may carry PEFT's module prefixes (`prompt_encoder.default.embedding.weight`, ...). With
  `num_virtual_tokens` smaller than the stored rows (a sequence-to-sequence adapter with two
  transformer submodules stores `2 * num_virtual_tokens`), the encoder half is taken.
  """
  found = {}
  for key, value in state.items():
    for peft_key in PEFT_KEYS + ('embedding.weight',):
      if key == peft_key or key.endswith('.' + peft_key):
        found['prompt_embeddings' if peft_key == 'embedding.weight' else peft_key] = np.asarray(
            value, np.float32
        )
  missing = [k for k in PEFT_KEYS if k not in found]
  if missing:
    raise ValueError(
        f'Not a PEFT multitask prompt tuning state: {missing} missing (found {sorted(state)}).'
    )
  shared, cols, rows = (found[k] for k in PEFT_KEYS)
  if num_virtual_tokens is not None and shared.shape[0] != num_virtual_tokens:
    if shared.shape[0] % num_virtual_tokens:
      raise ValueError(
          f'The PEFT prompt has {shared.shape[0]} rows, not a multiple of num_virtual_tokens '
          f'{num_virtual_tokens}.'
      )
    shared, cols = shared[:num_virtual_tokens], cols[:, :num_virtual_tokens]
  return {'shared_prompt': shared, 'prefix_task_cols': cols, 'prefix_task_rows': rows}


def load_peft(path: str) -> Dict[str, np.ndarray]:
  """`import_peft_state` of the adapter at `path` (its config gives `num_virtual_tokens`)."""
  config = _peft_config(path)
  if config and config.get('peft_type') not in (None, 'MULTITASK_PROMPT_TUNING'):
    raise ValueError(
        f'{path!r} is a PEFT {config.get("peft_type")} adapter, not MULTITASK_PROMPT_TUNING.'
    )
  return import_peft_state(read_peft_state(path), config.get('num_virtual_tokens'))


def peft_array(path: str, name: str) -> Callable[[], np.ndarray]:
  """A loader of one imported array (`shared_prompt`, `prefix_task_cols`, `prefix_task_rows`)
  of a PEFT MPT adapter, for `from_source` / `prompts.from_array` in gin."""
  if name not in PARAM_NAMES.values():
    raise ValueError(f'peft_array: name must be one of {sorted(PARAM_NAMES.values())}.')

  def load():
    return load_peft(path)[name]

  return load


def export_peft(
    path: str,
    params: Mapping[str, Array],
    *,
    task_type: str = 'SEQ_2_SEQ_LM',
    extra_config: Optional[Mapping[str, Any]] = None,
) -> str:
  """Writes MPT parameters as a PEFT adapter directory (`adapter_model.safetensors` +
  `adapter_config.json`, `num_transformer_submodules=1`); returns `path`.

  `params` is the generator's parameter dict (`shared_prompt`, `prefix_task_cols`,
  `prefix_task_rows`), e.g. `params['encoder']['prompt']['prompt']` of a trained model, or the
  `.npy` files of a run. Files are written atomically.
  """
  from safetensors.numpy import save as st_save  # pylint: disable=g-import-not-at-top
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  arrays = {
      peft: np.ascontiguousarray(np.asarray(params[ours], np.float32))
      for peft, ours in PARAM_NAMES.items()
  }
  n, h = arrays['prompt_embeddings'].shape
  num_tasks, _, r = arrays['prefix_task_cols'].shape
  config = {
      'peft_type': 'MULTITASK_PROMPT_TUNING',
      'task_type': task_type,
      'num_virtual_tokens': int(n),
      'num_transformer_submodules': 1,
      'token_dim': int(h),
      'num_tasks': int(num_tasks),
      'num_ranks': int(r),
      'prompt_tuning_init': 'RANDOM',
      'prompt_tuning_init_state_dict_path': None,
      'prompt_tuning_init_task': 0,
      'prompt_tuning_init_text': None,
      'tokenizer_name_or_path': None,
      'tokenizer_kwargs': None,
      'inference_mode': True,
      'base_model_name_or_path': None,
      'revision': None,
      'auto_mapping': None,
      'modules_to_save': None,
      **dict(extra_config or {}),
  }
  fs.makedirs(path)
  fs.write_bytes(fs.join(path, 'adapter_model.safetensors'), st_save(arrays))
  fs.write_text(fs.join(path, 'adapter_config.json'), json.dumps(config, indent=2))
  return path


# ------------------------------------------------------------------------------ distillation --


class PromptDistillation:
  """MPT's source-stage distillation from per-task teacher prompts, as a loss term.

  `(params, batch, outputs) -> (scalar, metrics)` for `models.EncoderDecoderModel(loss_terms=...)`.
  The teacher is the same frozen backbone with teacher prompt `teacher_prompts[t]` `[n_t, H]`
  (one trained prompt per source task, e.g. a bank from `scripts/make_prompt_bank.py`) for each
  example of task t; its outputs carry no gradient. The term is

      weight * (sum over target tokens of KL(p_teacher || p_student) at `temperature`
                + hidden_weight * mean squared difference of the encoder outputs)

  summed over the target tokens as the cross entropy is (`decoder_loss_weights`), the encoder
  outputs compared at the input positions after the prompt (both prompts are prepended, so the
  inputs sit at the same offsets when the lengths agree; a different teacher prompt length
  compares the last L positions).

  The paper adds a logits KL and a hidden-state MSE with one weight; which hidden states and the
  weights are not taken from the paper here (not verified): the defaults are ours.

  Attributes:
    module: the student's backbone module (`%ARCHITECTURE`).
    teacher_prompts: `[num_tasks, n_t, H]` array or loader.
    weight: overall weight of the term.
    hidden_weight: weight of the encoder-output MSE inside the term (0 skips it and its
      forward pass).
    temperature: softmax temperature of both distributions (the KL is scaled by T^2).
    task_feature: the feature naming the task of each example.
    name: the loss term's name in the metrics.
  """

  def __init__(
      self,
      module: nn.Module,
      teacher_prompts: Union[Array, Callable[[], Array]],
      weight: float = 1.0,
      hidden_weight: float = 1.0,
      temperature: float = 1.0,
      task_feature: str = 'task_ids',
      name: str = 'mpt_distillation',
  ):
    self.module = module
    self._teacher = teacher_prompts
    self.weight = float(weight)
    self.hidden_weight = float(hidden_weight)
    self.temperature = float(temperature)
    self.task_feature = task_feature
    self.name = name
    self._teacher_module = None
    self._teacher_shape = None

  def teacher_bank(self) -> np.ndarray:
    value = np.asarray(prompts._resolve(self._teacher), np.float32)  # pylint: disable=protected-access
    if value.ndim != 3:
      raise ValueError(
          f'PromptDistillation needs teacher prompts [num_tasks, length, H], got {value.shape}.'
      )
    return value

  def _teacher_model(self, num: int, length: int) -> nn.Module:
    """The backbone with a bank of the teacher prompts (`prompt_ids` = task) as its prompt."""
    if self._teacher_module is None or self._teacher_shape != (num, length):
      from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
      from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top

      factory = prompted.make_prompt_factory(length, num_prompts=num)
      self._teacher_module = t5.EncoderDecoder(self.module.config, prompt_factory=factory)
      self._teacher_shape = (num, length)
    return self._teacher_module

  def __call__(self, params, batch, outputs) -> Tuple[Array, Dict[str, Any]]:
    from prompt_tuning.runtime import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

    bank = jnp.asarray(self.teacher_bank())
    if self.task_feature not in batch:
      raise ValueError(
          f'PromptDistillation needs the per-example `{self.task_feature}` feature in the batch.'
      )
    ids = jnp.asarray(batch[self.task_feature]).astype(jnp.int32).reshape(-1)
    teacher = self._teacher_model(bank.shape[0], bank.shape[1])
    teacher_params = dict(params)
    teacher_params['encoder'] = dict(params['encoder'])
    teacher_params['encoder']['prompt'] = {'prompt': {'prompt': bank}}
    teacher_params = jax.lax.stop_gradient(teacher_params)
    args = (
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
    )
    t_logits = teacher.apply(
        {'params': teacher_params}, *args, enable_dropout=False, prompt_ids=ids
    )
    t_logits = jax.lax.stop_gradient(t_logits)
    temp = self.temperature
    log_p_t = jax.nn.log_softmax(t_logits / temp, axis=-1)
    log_p_s = jax.nn.log_softmax(outputs['logits'] / temp, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1) * temp**2
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] > 0
    weights = jnp.asarray(weights, jnp.float32)
    kl_sum = jnp.sum(kl * weights)
    total = kl_sum
    metrics = {'kl': metrics_lib.AveragePerStep.from_value(kl_sum)}
    if self.hidden_weight:
      features = {k: batch[k] for k in ('task_ids', 'lang_ids', 'prompt_ids') if k in batch}
      student = self.module.apply(
          {'params': params},
          batch['encoder_input_tokens'],
          enable_dropout=False,
          method=self.module.encode,
          **({'features': features} if features else {}),
      )
      t_enc = teacher.apply(
          {'params': teacher_params},
          batch['encoder_input_tokens'],
          enable_dropout=False,
          method=teacher.encode,
          prompt_ids=ids,
      )
      length = batch['encoder_input_tokens'].shape[1]
      real = (batch['encoder_input_tokens'] > 0).astype(jnp.float32)[..., None]
      diff = (student[:, -length:] - jax.lax.stop_gradient(t_enc[:, -length:])) * real
      mse = jnp.sum(diff**2) / (jnp.maximum(jnp.sum(real), 1.0) * diff.shape[-1])
      total = total + self.hidden_weight * mse
      metrics['hidden_mse'] = metrics_lib.AveragePerStep.from_value(mse)
    return self.weight * total, metrics
