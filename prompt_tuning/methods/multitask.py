"""Shared + per-task prompts: the original prompt-tuning code's `MultiTaskPrompt` family.

One prompt shared by every task plus a small part per task, composed per example, so a batch can
mix tasks (google-research/prompt-tuning `extended/multitask_prompts.py`). With `S` the shared
prompt `[P_s, H_s]` and `T[t]` the flattened task part of task `t` (a row of a `[num_tasks, size]`
table), example `b` of task `t_b` gets:

| class (`mode`)                               | prompt of example b                        | task part size  |
|----------------------------------------------|--------------------------------------------|-----------------|
| `AddMultiTaskPrompt` (`'add'`)               | `S + reshape(T[t_b], [P_s, H])`            | `P_s * H`       |
| `ConcatMultiTaskPrompt` (`'concat'`)         | `[S; reshape(T[t_b], [P_t, H])]` (P_s+P_t) | `P_t * H`       |
| `ConcatFeaturesMultiTaskPrompt` (`'concat_features'`) | `[S, reshape(T[t_b], [P_s, H_t])]` along features, `H_s + H_t = H` | `P_s * H_t` |
| `ProjectMultiTaskPrompt` (`'project'`)       | `S @ K_b^T + c_b`, `K_b = reshape(T[t_b][:H*H_s], [H, H_s])`, `c_b = T[t_b][H*H_s:]` | `H * H_s + H` |

Parameters keep the original paths: `.../prompt/prompt/shared_prompt` `[P_s, H_s]` and
`.../prompt/prompt/task_prompts/embedding` `[num_tasks, size]` (so training a mixture updates the
shared prompt and the rows of the tasks in the batch only). The logical axes are the replicated
`('prompt', 'prompt_embed')` and `('tasks', 'prompt_embed')`.

The task of each example comes from the `task_ids` feature (`id_source='feature'`, the default),
or, for the `task_index_*` tasks, from the first input token (`<extra_id_k>` is task k; the token
is removed before the prompt is combined in): `id_source='first_token'`.

Use from gin (`configs/methods/multitask.gin`):
`prompted.PromptEncoderDecoder.prompt_factory = @multitask.multitask_prompt_factory()`.
"""

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from prompt_tuning import prompts
from prompt_tuning.methods import composition

Array = Any
DType = Any
Initializer = prompts.Initializer

MODES = ('add', 'concat', 'concat_features', 'project')
SHARED_AXES = ('prompt', 'prompt_embed')
TASK_AXES = ('tasks', 'prompt_embed')


class MultiTaskPrompt(nn.Module):
  """Base class: a shared prompt and a per-task table, combined per example (see module doc).

  Attributes:
    shared_length: P_s, the length of the shared prompt.
    num_tasks: the number of tasks (rows of the task table).
    shared_init: initializer of the shared prompt `[P_s, H_s]`.
    tasks_init: initializer of the task table `[num_tasks, size]`.
    id_source: `'feature'` (the `task_feature` feature) or `'first_token'` (a leading
      `<extra_id_k>` sentinel; see `composition`).
    task_feature: the per-example feature naming the task.
    vocab_size: vocabulary size (with sentinels) for `id_source='first_token'`.
    embed_dim: H (inferred from the embedded inputs when None).
    dtype: activation dtype of the returned prompt.
    params_dir: serve from exported `.npy` parameters (see `composition.param`).
  """

  shared_length: int
  num_tasks: int
  shared_init: Initializer = prompts.uniform(0.5)
  tasks_init: Initializer = prompts.uniform(0.5)
  id_source: str = 'feature'
  task_feature: str = 'task_ids'
  vocab_size: int = composition.T5_VOCAB_SIZE
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  params_dir: Optional[str] = None

  # ---- what the subclasses define ----

  @property
  def length(self) -> int:
    """Length of the composed prompt."""
    return self.shared_length

  def shared_features(self, embed_dim: int) -> int:
    """H_s."""
    return embed_dim

  def task_size(self, embed_dim: int) -> int:
    """Size of one flattened task part."""
    raise NotImplementedError

  def combine_shared_and_tasks(self, shared: Array, tasks: Array, embed_dim: int) -> Array:
    """`shared [P_s, H_s]`, `tasks [B, size]` -> `[B, length, H]`."""
    raise NotImplementedError

  # ----

  def task_ids(
      self, tokens: Optional[Array], batch_size: int, features: Optional[Mapping[str, Array]]
  ) -> Array:
    """`[B]` task index of each example."""
    composition.check_id_source(self.id_source, type(self).__name__)
    if self.id_source == 'first_token':
      return composition.sentinel_to_index(tokens[:, 0], self.vocab_size)
    return composition.example_ids(self, features, self.task_feature, batch_size, self.num_tasks)

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns the composed prompts `[B, length, H]`."""
    del prompt_ids
    embed_dim = self.embed_dim or embedded.shape[-1]
    h_s = self.shared_features(embed_dim)
    shared = composition.param(
        self, 'shared_prompt', self.shared_init, (self.shared_length, h_s), SHARED_AXES
    )
    batch = (tokens if tokens is not None else embedded).shape[0]
    ids = self.task_ids(tokens, batch, features)
    tasks = composition.Table(
        self.num_tasks,
        self.task_size(embed_dim),
        self.tasks_init,
        TASK_AXES,
        params_dir=self.params_dir,
        name='task_prompts',
    )(ids)
    prompt = self.combine_shared_and_tasks(shared, tasks, embed_dim)
    if prompt.shape[-1] != embed_dim:
      raise ValueError(
          f'{type(self).__name__} made prompts of width {prompt.shape[-1]}, the model has '
          f'{embed_dim}: check shared_features / task_features.'
      )
    return prompt.astype(self.dtype)


class AddMultiTaskPrompt(MultiTaskPrompt):
  """`S + T[t]`: the task part has the shape of the shared prompt (the original gin default)."""

  def task_size(self, embed_dim: int) -> int:
    return self.shared_length * embed_dim

  def combine_shared_and_tasks(self, shared, tasks, embed_dim):
    return shared[None] + tasks.reshape(-1, self.shared_length, embed_dim)


class ConcatMultiTaskPrompt(MultiTaskPrompt):
  """`[S; T[t]]` along the sequence: P_s shared positions then `task_length` task positions.

  Attributes:
    task_length: P_t (defaults to P_s).
  """

  task_length: Optional[int] = None

  @property
  def length(self) -> int:
    return self.shared_length + self._task_length

  @property
  def _task_length(self) -> int:
    return self.shared_length if self.task_length is None else self.task_length

  def task_size(self, embed_dim: int) -> int:
    return self._task_length * embed_dim

  def combine_shared_and_tasks(self, shared, tasks, embed_dim):
    tasks = tasks.reshape(-1, self._task_length, embed_dim)
    shared = jnp.broadcast_to(shared[None], (tasks.shape[0],) + shared.shape)
    return jnp.concatenate([shared, tasks], axis=1)


def _split_features(module, embed_dim: int):
  """(H_s, H_t) of `ConcatFeaturesMultiTaskPrompt`: they must add up to H."""
  h_s, h_t = module.shared_features_size, module.task_features
  if h_s is None and h_t is None:
    h_s = embed_dim // 2
  if h_s is None:
    h_s = embed_dim - h_t
  if h_t is None:
    h_t = embed_dim - h_s
  if h_s + h_t != embed_dim or h_s <= 0 or h_t <= 0:
    raise ValueError(
        f'ConcatFeaturesMultiTaskPrompt: shared_features ({h_s}) + task_features ({h_t}) must '
        f'equal the model width {embed_dim}, both positive.'
    )
  return h_s, h_t


class ConcatFeaturesMultiTaskPrompt(MultiTaskPrompt):
  """`[S, T[t]]` along the features: each position is H_s shared features then H_t task ones.

  Attributes:
    shared_features_size: H_s (default H - H_t, or H // 2 when neither is given).
    task_features: H_t (default H - H_s).
  """

  shared_features_size: Optional[int] = None
  task_features: Optional[int] = None

  def shared_features(self, embed_dim: int) -> int:
    return _split_features(self, embed_dim)[0]

  def task_size(self, embed_dim: int) -> int:
    return self.shared_length * _split_features(self, embed_dim)[1]

  def combine_shared_and_tasks(self, shared, tasks, embed_dim):
    h_t = _split_features(self, embed_dim)[1]
    tasks = tasks.reshape(-1, self.shared_length, h_t)
    shared = jnp.broadcast_to(shared[None], (tasks.shape[0],) + shared.shape)
    return jnp.concatenate([shared, tasks], axis=2)


class ProjectMultiTaskPrompt(MultiTaskPrompt):
  """`S @ K_t^T + c_t`: a per-task affine map of the shared prompt `[P_s, H_s]` to width H.

  The task row holds the kernel `K_t` `[H, H_s]` (row-major, flattened) followed by the bias
  `c_t` `[H]`, as in the original code.

  Attributes:
    shared_features_size: H_s, the width of the shared prompt (default H).
  """

  shared_features_size: Optional[int] = None

  def shared_features(self, embed_dim: int) -> int:
    return self.shared_features_size or embed_dim

  def task_size(self, embed_dim: int) -> int:
    return embed_dim * self.shared_features(embed_dim) + embed_dim

  def combine_shared_and_tasks(self, shared, tasks, embed_dim):
    h_s = shared.shape[-1]
    kernel = tasks[:, : embed_dim * h_s].reshape(-1, embed_dim, h_s)  # [B, H, H_s]
    bias = tasks[:, embed_dim * h_s :]  # [B, H]
    return jnp.einsum('ps,bhs->bph', shared, kernel) + bias[:, None, :]


CLASSES = {
    'add': AddMultiTaskPrompt,
    'concat': ConcatMultiTaskPrompt,
    'concat_features': ConcatFeaturesMultiTaskPrompt,
    'project': ProjectMultiTaskPrompt,
}


def multitask_prompt_factory(
    length: int,
    num_tasks: int,
    mode: str = 'add',
    *,
    task_length: Optional[int] = None,
    shared_features: Optional[int] = None,
    task_features: Optional[int] = None,
    shared_init: Initializer = prompts.uniform(0.5),
    tasks_init: Initializer = prompts.uniform(0.5),
    id_source: str = 'feature',
    task_feature: str = 'task_ids',
    vocab_size: int = composition.T5_VOCAB_SIZE,
    combine: Callable[..., Array] = prompts.prefix_prompt,
    attention_policy: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
    params_dir: Optional[str] = None,
) -> Callable[[], nn.Module]:
  """A `prompt_factory` of shared + per-task prompts (`mode` picks the class, see module doc).

  Args:
    length: P_s, the shared prompt length.
    num_tasks: number of tasks.
    mode: `'add'`, `'concat'`, `'concat_features'` or `'project'`.
    task_length: `'concat'`: P_t (default P_s).
    shared_features: `'concat_features'` / `'project'`: H_s.
    task_features: `'concat_features'`: H_t.
    shared_init: initializer of the shared prompt.
    tasks_init: initializer of the task table.
    id_source: `'feature'` (`task_feature`) or `'first_token'` (`task_index_*` tasks).
    task_feature: the feature naming each example's task.
    vocab_size: for `'first_token'`: `<extra_id_k>` = `vocab_size - 1 - k`.
    combine: where the composed prompt goes (`prompts.prefix_prompt`, ...).
    attention_policy: optional `masks.AttentionPolicy` (`methods/prompt_masks.py`).
    dtype: activation dtype.
    params_dir: serve from a run's exported parameters (`configs/methods/from_params_dir.gin`).

  Returns:
    A zero-argument factory of the backbone's prompt module.
  """
  if mode not in CLASSES:
    raise ValueError(f'multitask_prompt_factory: mode must be one of {MODES}, got {mode!r}.')
  kwargs = dict(
      shared_length=length,
      num_tasks=num_tasks,
      shared_init=shared_init,
      tasks_init=tasks_init,
      id_source=id_source,
      task_feature=task_feature,
      vocab_size=vocab_size,
      dtype=dtype,
      params_dir=params_dir,
  )
  if mode == 'concat':
    kwargs['task_length'] = task_length
  elif mode == 'concat_features':
    kwargs.update(shared_features_size=shared_features, task_features=task_features)
  elif mode == 'project':
    kwargs['shared_features_size'] = shared_features
  cls = CLASSES[mode]
  composition.check_id_source(id_source, cls.__name__)
  total = length + (length if task_length is None else task_length) if mode == 'concat' else length
  return composition.make_factory(
      lambda: cls(parent=None, **kwargs),
      composition.combine_for(id_source, combine, 1),
      total,
      attention_policy,
  )
