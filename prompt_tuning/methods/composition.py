"""Shared pieces of the composed prompt generators (`multitask`, `factorized`, `mpt`, `attempt`).

A composed prompt is built per example from parts (a shared prompt and a task prompt, a language
prompt and a task prompt, a shared prompt and low-rank task factors, a mixture of source prompts),
so one batch can mix tasks and languages. The generators are prompt modules of the backbone's
prompt door (`prompted.CombinedPrompt`), and read which parts each example uses from

* its per-example integer features (`task_ids`, `lang_ids`: the models' `conditioning_features`,
  passed through the feature converters from the seqio task), or
* the original prompt-tuning code's `task_index_*` convention: the first input token(s) of the
  example are sentinels `<extra_id_k>` naming the task (and language), mapped to `k` by
  `sentinel_to_index` and removed before the prompt is combined in (`StripLeadingTokens`, which
  also moves the masks, so the backbone never sees the sentinels). Encoder inputs only.

This module also gives every composed generator the same way to be served from the artifacts of a
training run: with `params_dir` set (the run's `MODEL_DIR/numpy_checkpoints/checkpoint_<step>`),
each trained parameter is read from its `.npy` there (the file the trainer exports for it) instead
of being initialized (`configs/methods/from_params_dir.gin`).
"""

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
from flax.linen import partitioning
import jax.numpy as jnp

from prompt_tuning import prompts

Array = Any
Initializer = prompts.Initializer

# The vocabulary size of T5's SentencePiece model with its 100 sentinels (32000 + 100): the
# original code maps `<extra_id_k>` = 32099 - k to task k with it.
T5_VOCAB_SIZE = 32100
ID_SOURCES = ('feature', 'first_token')


def sentinel_to_index(tokens: Array, vocab_size: int = T5_VOCAB_SIZE) -> Array:
  """`<extra_id_k>` token ids -> k (`vocab_size - 1 - token`), as the original code."""
  return vocab_size - 1 - jnp.asarray(tokens).astype(jnp.int32)


def check_id_source(source: str, who: str) -> None:
  if source not in ID_SOURCES:
    raise ValueError(f'{who}: id_source must be one of {ID_SOURCES}, got {source!r}.')


def example_ids(
    module: nn.Module,
    features: Optional[Mapping[str, Array]],
    name: str,
    batch_size: int,
    num: int,
) -> Array:
  """`[B]` int32 ids of feature `name` (which task / language each example uses).

  Missing features are an error, except while the parameters are initialized (`init` needs no
  features) or when there is only one choice (`num == 1`), where every example uses 0.
  """
  if features and name in features and features[name] is not None:
    ids = jnp.asarray(features[name]).astype(jnp.int32).reshape(-1)
    if ids.shape[0] != batch_size:
      raise ValueError(
          f'{type(module).__name__}: feature {name!r} has {ids.shape[0]} entries for a batch of '
          f'{batch_size} (one int per example).'
      )
    return ids
  if num == 1 or module.is_initializing():
    return jnp.zeros((batch_size,), jnp.int32)
  raise ValueError(
      f'{type(module).__name__} needs a per-example `{name}` feature (an int32 scalar in each '
      f'example of the seqio task, e.g. a constant per task of a mixture): it picks which of the '
      f'{num} prompts each example uses. The models pass it from the batch '
      "(`conditioning_features`); in Python pass features={'" + name + "': ids}."
  )


def take_rows(table: Array, ids: Array) -> Array:
  """`table[ids]`; ids outside the table give NaN (never a silent clamp to the last row)."""
  return jnp.take(table, ids, axis=0, mode='fill', fill_value=jnp.nan)


@dataclasses.dataclass(frozen=True)
class StripLeadingTokens:
  """A combine function that drops the first `num_tokens` inputs, then combines as `combine`.

  The `task_index_*` convention: the leading sentinels name the task (and language) and are not
  part of the text. Because the backbone computes the masks by running the combine function on
  them (`prompts.combine_mask`), the masks drop the same positions.
  """

  combine: Callable[..., Array] = prompts.prefix_prompt
  num_tokens: int = 1

  def __call__(self, prompt: Array, embedded: Array, tokens: Array) -> Array:
    n = self.num_tokens
    return self.combine(prompt, embedded[:, n:], tokens[:, n:])


def combine_for(id_source: str, combine: Callable[..., Array], num_tokens: int):
  """The combine function of a generator reading its ids from `id_source`."""
  if id_source == 'first_token':
    return StripLeadingTokens(combine, num_tokens)
  return combine


# ------------------------------------------------------------------------------ parameters --


def saved_param_file(scope_path: Sequence[str], name: str) -> str:
  """The `.npy` name the trainer exports a parameter under (`checkpoints.prompt_file_name`)."""
  return '.'.join(tuple(scope_path) + (name,)) + '.npy'


def _from_dir(directory: str, filename: str, who: str) -> Initializer:
  path = os.path.join(directory, filename)

  def init(rng, shape, dtype=jnp.float32):
    del rng
    from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

    if not fs.exists(path):
      found = (
          sorted(n for n in fs.listdir(directory) if n.endswith('.npy'))[:8]
          if fs.exists(directory)
          else []
      )
      raise FileNotFoundError(
          f'{who}: no {filename} in params_dir {directory!r} (found {found}). Point '
          'PARAMS_DIR at MODEL_DIR/numpy_checkpoints/checkpoint_<step> of a run of the same '
          'method and configuration.'
      )
    value = prompts.np_load(path)
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f'{who}: {path} has shape {tuple(value.shape)} but the model expects {tuple(shape)}: '
          'the run that wrote it used other sizes (prompt lengths, number of tasks, embed dim).'
      )
    return jnp.asarray(value, dtype)

  return init


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Tuple[int, ...],
    axes: Tuple[str, ...],
    *,
    saved: bool = True,
) -> Array:
  """A float32 parameter with logical axes, read from `module.params_dir` when that is set.

  Args:
    module: the generator (or one of its submodules) creating the parameter; its `params_dir`
      attribute (None: initialize) names a directory of exported `.npy` parameters.
    name: the parameter name.
    init: `init(rng, shape)`.
    shape: its shape.
    axes: logical axis names.
    saved: whether the trainer exports it (a trained part). Frozen inputs of a method (ATTEMPT's
      source prompts) are `saved=False` and always come from `init`.
  """
  directory = getattr(module, 'params_dir', None)
  if directory and saved:
    init = _from_dir(directory, saved_param_file(module.scope.path, name), type(module).__name__)
  who = f'{type(module).__name__}.{name}'

  def checked(rng, shape):
    value = jnp.asarray(init(rng, shape), jnp.float32)
    if value.shape != tuple(shape):
      raise ValueError(f'{who}: the initializer returned shape {value.shape}, expected {shape}.')
    return value

  return partitioning.param_with_axes(name, checked, tuple(shape), axes=tuple(axes))


class Table(nn.Module):
  """`num` flattened prompts in one `[num, size]` parameter named `embedding`.

  The layout of the original code's per-task and per-language prompt tables (a flaxformer `Embed`
  named `task_prompts` / `lang_prompts`), so its checkpoints keep their paths.
  """

  num: int
  size: int
  init: Initializer = prompts.uniform(0.5)
  axes: Tuple[str, str] = ('tasks', 'prompt_embed')
  params_dir: Optional[str] = None

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    """`[B]` ids -> `[B, size]` rows."""
    table = param(self, 'embedding', self.init, (self.num, self.size), self.axes)
    return take_rows(table, ids)


def make_factory(
    build: Callable[[], nn.Module], combine: Callable[..., Array], length: int, policy
):
  """A `prompt_factory` whose `CombinedPrompt` owns the generator `build()`."""
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top

  def factory():
    return prompted.CombinedPrompt(prompt=build(), combine=combine, attention_policy=policy)

  factory.length = length
  factory.combine = combine
  factory.attention_policy = policy
  return factory
