"""The training state: step, trainable and frozen parameters, optimizer state for the trainable ones.

Parameters are split once, by the optimizer's `trainable_filter` (T5X's `MultiOptimizer` traversals,
e.g. `.*/prompt/.*`). Gradients are taken with respect to `trainable` only; `frozen` enters the step
as a constant, so no backbone weight gradient is ever computed and only trainable parameters carry
optimizer state.

`StateBuilder` (T5X's `TrainStateInitializer`) initializes, restores and shards that state. This
module imports neither seqio nor TensorFlow, so a process that trains from host arrays (the
benchmarks, a notebook) does not pay their ~800 MiB of resident memory.
"""

import functools
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Tuple

from absl import logging
import flax
import flax.linen.partitioning as nn_partitioning
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import partitioning

PyTree = Any


# The library's one flatten helper (`prompt_tuning/params.py`), under the names the runtime uses.
flatten = params_lib.flatten_params
unflatten = params_lib.unflatten_params


def split_params(
    params: Mapping[str, Any], is_trainable: Callable[[str], bool]
) -> Tuple[dict, dict]:
  """Splits a nested parameter dict into (trainable, frozen) nested dicts by flattened path."""
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  if not trainable:
    sample = ', '.join(list(flat)[:6])
    raise ValueError(
        "No parameter is trainable: the optimizer's traversal/regex matched none of the parameter paths "
        f'(e.g. {sample}). For prompt tuning use PROMPT_REGEX = [".*/prompt/.*"] and a model with a '
        'prompt; for model tuning use [".*"].'
    )
  return unflatten(trainable), (unflatten(frozen) if frozen else {})


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Dict[str, Any]:
  """Inverse of `split_params`: one nested dict with every leaf (trainable wins on overlap)."""
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
    return {
        'step': self.step,
        'trainable': self.trainable,
        'opt_state': flax.serialization.to_state_dict(self.opt_state),
    }

  def restore_state(self, state_dict: Mapping[str, Any]) -> 'TrainState':
    opt_state = flax.serialization.from_state_dict(self.opt_state, state_dict['opt_state'])
    trainable = jax.tree_util.tree_map(
        lambda ref, x: jnp.asarray(x, ref.dtype).reshape(ref.shape),
        self.trainable,
        dict(state_dict['trainable']),
    )
    return self.replace(
        step=jnp.asarray(state_dict['step'], jnp.int32), trainable=trainable, opt_state=opt_state
    )


def logical_axes(params_axes, params_shape):
  """Tree of logical PartitionSpecs matching `params_shape` (None where a param has no axes)."""
  names = nn_partitioning.get_axis_names(params_axes) if params_axes else {}
  flat_names = flatten(names) if names else {}
  flat = flatten(params_shape)
  out = {}
  for k, v in flat.items():
    n = flat_names.get(k)
    out[k] = P(*n) if n is not None else P(*([None] * len(v.shape)))
  return unflatten(out)


def _opt_logical_axes(opt_def, opt_state_shape, trainable_axes):
  derive = getattr(opt_def, 'derive_logical_axes', None)
  axes = None
  if derive is not None:
    try:
      axes = derive(opt_state_shape, trainable_axes)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('derive_logical_axes failed (%s); replicating the optimizer state.', e)
  if axes is None:
    return jax.tree_util.tree_map(lambda _: P(), opt_state_shape)

  def to_spec(x):
    if isinstance(x, P):
      return x
    if x is None:
      return P()
    return P(*x)

  from prompt_tuning.runtime import optimizers  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(
      to_spec, axes, is_leaf=lambda x: x is None or isinstance(x, (P, optimizers.LogicalAxes))
  )


def init_subset(
    init_fn: Callable[[Any], PyTree],
    rng,
    paths: Collection[str],
    *,
    partition: Optional[Callable[..., Callable[..., Any]]] = None,
    mesh_axes: Optional[PyTree] = None,
) -> Dict[str, Any]:
  """`{path: value}` of the parameters `init_fn(rng)` gives at `paths`, computing only those.

  The jitted function returns the listed leaves alone, so XLA drops every initializer no output
  needs (the values are those of the full initialization). `partition` (a partitioner's
  `partition`) with `mesh_axes` (the full tree's PartitionSpecs) shards the outputs.
  """
  paths = sorted(paths)

  def subset(r):
    flat = flatten(init_fn(r))
    return {p: flat[p] for p in paths}

  if partition is None:
    return jax.jit(subset)(rng)
  axes = flatten(mesh_axes)
  return partition(subset, in_axis_resources=None, out_axis_resources={p: axes[p] for p in paths})(
      rng
  )


def fill_abstract(
    params: PyTree, init_paths: Callable[[Collection[str]], Mapping[str, Any]]
) -> PyTree:
  """`params` with its `jax.ShapeDtypeStruct` leaves replaced by `init_paths(their paths)`."""
  flat = flatten(params)
  missing = [p for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    fresh = init_paths(missing)
    for p in missing:
      value = fresh[p]
      if tuple(value.shape) != tuple(flat[p].shape):
        raise ValueError(f'{p}: initialized as {value.shape}, expected {flat[p].shape}.')
      flat[p] = value
  return unflatten(flat)


class StateBuilder:
  """Initializes, restores and shards the train state (T5X's `TrainStateInitializer`)."""

  def __init__(
      self, model, partitioner: 'partitioning.PjitPartitioner', input_shapes, input_types=None
  ):
    self.model = model
    self.partitioner = partitioner
    opt = model.optimizer_def
    self.is_trainable = (
        (getattr(opt, 'trainable_filter', None) or (lambda p: True)) if opt else (lambda p: False)
    )
    init = functools.partial(
        model.get_initial_variables, input_shapes=input_shapes, input_types=input_types
    )
    self._init = init
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    self.params_shape = shapes['params']
    self.params_logical = logical_axes(shapes.get('params_axes'), self.params_shape)
    if hasattr(opt, 'set_param_axes'):
      try:
        opt.set_param_axes(self.params_logical)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('set_param_axes failed: %s', e)
    self.trainable_shape, self.frozen_shape = split_params(self.params_shape, self.is_trainable)
    self.trainable_logical, self.frozen_logical = split_params(
        self.params_logical, self.is_trainable
    )
    opt_shape = jax.eval_shape(opt.init_state, self.trainable_shape) if opt else None
    self.opt_logical = _opt_logical_axes(opt, opt_shape, self.trainable_logical) if opt else None
    to_mesh = partitioner.logical_to_mesh_axes
    self.state_axes = TrainState(
        step=P(),
        trainable=to_mesh(self.trainable_logical),
        frozen=to_mesh(self.frozen_logical),
        opt_state=self.opt_logical and to_mesh(self.opt_logical),
    )
    self.params_mesh_axes = to_mesh(self.params_logical)

  def _shard(self, tree, axes):
    shardings = self.partitioner.mesh_axes_to_sharding(axes)
    return jax.tree_util.tree_map(
        lambda x, s: partitioning.device_put_owned(np.asarray(x), s)
        if not isinstance(x, jax.Array)
        else jax.device_put(x, s),
        tree,
        shardings,
    )

  def init_params(self, rng, only: Optional[Collection[str]] = None):
    """The initializers' parameters, sharded; with `only` (flat paths) those alone, as a flat dict.

    With `only`, the compiled function returns just those parameters, so XLA leaves the other
    initializers out of it: a model restored from a checkpoint never computes (nor holds) random
    backbone weights, and compiles a much smaller function. Each parameter's value is the one the
    full initialization gives it (flax derives every parameter's random key from its own path).
    """
    if only is None:
      fn = self.partitioner.partition(
          lambda r: self._init(r)['params'],
          in_axis_resources=None,
          out_axis_resources=self.params_mesh_axes,
      )
      return fn(rng)
    return init_subset(
        lambda r: self._init(r)['params'],
        rng,
        only,
        partition=self.partitioner.partition,
        mesh_axes=self.params_mesh_axes,
    )

  def restore_or_init_params(self, rng, restore: Callable[[PyTree], PyTree]) -> PyTree:
    """`restore(abstract parameters)` (a checkpoint read into `jax.ShapeDtypeStruct`s), with every
    parameter it leaves abstract initialized (`init_params(rng, only=...)`)."""
    return fill_abstract(restore(self.params_shape), lambda paths: self.init_params(rng, paths))

  def build(self, params, step: int = 0) -> TrainState:
    """The train state at `step` (the optimizer's step counter starts there too, as in T5X)."""
    params = self._shard(params, self.params_mesh_axes)
    trainable, frozen = split_params(params, self.is_trainable)
    opt = self.model.optimizer_def
    init_opt = self.partitioner.partition(
        opt.init_state,
        in_axis_resources=(self.state_axes.trainable,),
        out_axis_resources=self.state_axes.opt_state,
    )
    opt_state = init_opt(trainable)
    if step and hasattr(opt_state, 'step') and hasattr(opt_state, 'replace'):
      opt_state = opt_state.replace(
          step=jax.device_put(
              np.full(np.shape(opt_state.step), step, np.int32), opt_state.step.sharding
          )
      )
    # The step is placed like every other leaf (replicated over the mesh): an unplaced scalar has a
    # different jit cache key than the step the train step returns, which recompiled the step once.
    step = jax.device_put(np.asarray(step, np.int32), self.partitioner.mesh_axes_to_sharding(P()))
    return TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state)
