"""Factorized language x task prompts (Vu et al. 2022, "Overcoming Catastrophic Forgetting in
Zero-Shot Cross-Lingual Generation").

Example b of language `l_b` and task `t_b` gets the prompt `[P_lang[l_b]; P_task[t_b]]`: a
language prompt of `lang_length` positions followed by a task prompt of `task_length` positions,
both rows of per-language / per-task tables, so one batch can mix languages and tasks. The
parameters keep the paths of the original code's (unreleased) `MultiTaskFactorizedPrompt`:
`.../prompt/prompt/lang_prompts/embedding` `[num_langs, lang_length * H]` and
`.../prompt/prompt/task_prompts/embedding` `[num_tasks, task_length * H]`.

The three-stage workflow (configs under `configs/methods/factorized*.gin`, README section
"Cross-lingual zero-shot with factorized prompts"):

a. Language prompts: `use_task_prompt=False` (the prompt is `P_lang[l]` alone, the task table is
   not created) trained on unlabeled text of each language (span corruption or prefix LM), each
   example carrying its `lang_ids`.
b. Task prompt: the language table is initialized from stage (a)'s exported `.npy` and frozen
   (only `.*/task_prompts/.*` is trained), trained on the source-language task.
c. Zero-shot: evaluate the target-language task, whose examples carry the target `lang_ids`, so
   each example uses its own language's prompt with the task prompt of stage (b).

Ids come from the `lang_ids` / `task_ids` features (default), or with `id_source='first_token'`
from two leading sentinels as in the original code (language `<extra_id_l>` first, task
`<extra_id_t>` second, both removed before the prompt is combined in).
"""

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_tuning import prompts
from prompt_tuning.methods import composition

Array = Any
DType = Any
Initializer = prompts.Initializer

LANG_AXES = ('tasks', 'prompt_embed')
TASK_AXES = ('tasks', 'prompt_embed')


class FactorizedPrompt(nn.Module):
  """`[P_lang[l]; P_task[t]]` per example (see the module docstring).

  Attributes:
    lang_length: P_l.
    task_length: P_t.
    num_langs: rows of the language table.
    num_tasks: rows of the task table.
    lang_init: initializer of the language table `[num_langs, P_l * H]`.
    task_init: initializer of the task table `[num_tasks, P_t * H]`.
    use_task_prompt: False for stage (a): the prompt is the language prompt alone.
    id_source: `'feature'` or `'first_token'` (two leading sentinels: language, then task).
    lang_feature: the per-example feature naming the language.
    task_feature: the per-example feature naming the task.
    vocab_size: for `'first_token'`.
    embed_dim: H (inferred when None).
    dtype: activation dtype.
    params_dir: serve from exported `.npy` parameters (see `composition.param`).
  """

  lang_length: int
  task_length: int
  num_langs: int
  num_tasks: int
  lang_init: Initializer = prompts.uniform(0.5)
  task_init: Initializer = prompts.uniform(0.5)
  use_task_prompt: bool = True
  id_source: str = 'feature'
  lang_feature: str = 'lang_ids'
  task_feature: str = 'task_ids'
  vocab_size: int = composition.T5_VOCAB_SIZE
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  params_dir: Optional[str] = None

  @property
  def length(self) -> int:
    return self.lang_length + (self.task_length if self.use_task_prompt else 0)

  def ids(self, tokens, batch_size, features, position, feature, num):
    composition.check_id_source(self.id_source, type(self).__name__)
    if self.id_source == 'first_token':
      return composition.sentinel_to_index(tokens[:, position], self.vocab_size)
    return composition.example_ids(self, features, feature, batch_size, num)

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns `[B, length, H]`."""
    del prompt_ids
    h = self.embed_dim or embedded.shape[-1]
    batch = (tokens if tokens is not None else embedded).shape[0]
    lang_ids = self.ids(tokens, batch, features, 0, self.lang_feature, self.num_langs)
    lang = composition.Table(
        self.num_langs,
        self.lang_length * h,
        self.lang_init,
        LANG_AXES,
        params_dir=self.params_dir,
        name='lang_prompts',
    )(lang_ids).reshape(batch, self.lang_length, h)
    parts = [lang]
    if self.use_task_prompt:
      task_ids = self.ids(tokens, batch, features, 1, self.task_feature, self.num_tasks)
      task = composition.Table(
          self.num_tasks,
          self.task_length * h,
          self.task_init,
          TASK_AXES,
          params_dir=self.params_dir,
          name='task_prompts',
      )(task_ids).reshape(batch, self.task_length, h)
      parts.append(task)
    return jnp.concatenate(parts, axis=1).astype(self.dtype)


def per_row(prompt_init: Initializer, length: int) -> Initializer:
  """An initializer of a flattened `[num, length * H]` table from one of a `[length, H]` prompt.

  Each row is `prompt_init(key_i, [length, H])` flattened (each with its own key), so the prompt
  initializers of `prompt_tuning.prompts` (sampled vocabulary, class labels, a file) initialize
  language or task prompts.
  """

  def init(rng, shape, dtype=jnp.float32):
    num, size = shape
    if size % length:
      raise ValueError(f'per_row: table width {size} is not a multiple of length {length}.')
    keys = jax.random.split(rng, num)
    rows = [jnp.asarray(prompt_init(k, (length, size // length)), dtype).reshape(-1) for k in keys]
    return jnp.stack(rows)

  return init


def factorized_prompt_factory(
    lang_length: int,
    task_length: int,
    num_langs: int,
    num_tasks: int,
    *,
    lang_init: Initializer = prompts.uniform(0.5),
    task_init: Initializer = prompts.uniform(0.5),
    use_task_prompt: bool = True,
    id_source: str = 'feature',
    lang_feature: str = 'lang_ids',
    task_feature: str = 'task_ids',
    vocab_size: int = composition.T5_VOCAB_SIZE,
    combine: Callable[..., Array] = prompts.prefix_prompt,
    attention_policy: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
    params_dir: Optional[str] = None,
) -> Callable[[], nn.Module]:
  """A `prompt_factory` of factorized language x task prompts (arguments: `FactorizedPrompt`).

  `combine` places the composed prompt; `attention_policy` is an optional
  `masks.AttentionPolicy`. With `id_source='first_token'` the two leading sentinel tokens are
  removed before combining (one when `use_task_prompt=False`).
  """
  kwargs = dict(
      lang_length=lang_length,
      task_length=task_length,
      num_langs=num_langs,
      num_tasks=num_tasks,
      lang_init=lang_init,
      task_init=task_init,
      use_task_prompt=use_task_prompt,
      id_source=id_source,
      lang_feature=lang_feature,
      task_feature=task_feature,
      vocab_size=vocab_size,
      dtype=dtype,
      params_dir=params_dir,
  )
  composition.check_id_source(id_source, 'FactorizedPrompt')
  length = lang_length + (task_length if use_task_prompt else 0)
  return composition.make_factory(
      lambda: FactorizedPrompt(parent=None, **kwargs),
      composition.combine_for(id_source, combine, 2 if use_task_prompt else 1),
      length,
      attention_policy,
  )
