"""The training state: step, trainable and frozen parameters, optimizer state for the trainable ones.

Parameters are split once, by the optimizer's `trainable_filter` (T5X's `MultiOptimizer` traversals,
e.g. `.*/prompt/.*`). Gradients are taken with respect to `trainable` only; `frozen` enters the step
as a constant, so no backbone weight gradient is ever computed and only trainable parameters carry
optimizer state.
"""
from typing import Any, Callable, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any


def flatten(tree: Mapping[str, Any]) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def split_params(params: Mapping[str, Any], is_trainable: Callable[[str], bool]) -> Tuple[dict, dict]:
  """Splits a nested parameter dict into (trainable, frozen) nested dicts by flattened path."""
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  if not trainable:
    sample = ', '.join(list(flat)[:6])
    raise ValueError(
        'No parameter is trainable: the optimizer\'s traversal/regex matched none of the parameter paths '
        f'(e.g. {sample}). For prompt tuning use PROMPT_REGEX = [".*/prompt/.*"] and a model with a '
        'prompt; for model tuning use [".*"].')
  return unflatten(trainable), (unflatten(frozen) if frozen else {})


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Dict[str, Any]:
  flat = flatten(frozen) if frozen else {}
  flat.update(flatten(trainable))
  return unflatten(flat)


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes. `opt_state` covers `trainable` only."""
  step: jnp.ndarray
  trainable: PyTree
  frozen: PyTree
  opt_state: PyTree

  @property
  def params(self) -> PyTree:
    return merge_params(self.trainable, self.frozen)

  def replace_step(self, step) -> 'TrainState':
    return self.replace(step=jnp.asarray(step, jnp.int32))

  def state_dict(self) -> Dict[str, Any]:
    """The part saved in checkpoints (frozen weights come from their own source)."""
    return {'step': self.step, 'trainable': self.trainable,
            'opt_state': flax.serialization.to_state_dict(self.opt_state)}

  def restore_state(self, state_dict: Mapping[str, Any]) -> 'TrainState':
    opt_state = flax.serialization.from_state_dict(self.opt_state, state_dict['opt_state'])
    trainable = jax.tree_util.tree_map(lambda ref, x: jnp.asarray(x, ref.dtype).reshape(ref.shape),
                                       self.trainable, dict(state_dict['trainable']))
    return self.replace(step=jnp.asarray(state_dict['step'], jnp.int32), trainable=trainable,
                        opt_state=opt_state)
