"""T5X-style `Trainer`: the jitted train/eval steps, microbatching, metrics, progress and actions.

The train step is pure functions, as in T5X: `accumulate_grads_microbatched` (gradients of the
trainable parameters only, summed over microbatches, with the metrics merged by their own
reductions), `apply_grads` (the optimizer update) and `train_with_lr` (both). They are usable and
testable without a `Trainer`. Gradients are taken with respect to `TrainState.trainable` only;
the frozen parameters enter as constants, so no backbone weight gradient is ever computed.

For a float32 model on one CPU device without microbatches, `Trainer` can compile the step as two
executables (`SplitTrainStep`, from `split_train_step_fns`): the forward (`forward_with_vjp`: loss,
metrics and the VJP's residuals) with XLA's Eigen dots, and the backward plus `apply_grads` with
XLA's default YNNPACK dots, each where it is faster (`xla_options.py`): 5-15% faster steps on an
Intel Xeon, the same speed on an AMD EPYC; peak memory about twice the one-executable step's under
glibc's allocator, the same under tcmalloc (the frozen kernels among the residuals are passed to
the backward, not copied). It does so by default on an Intel CPU with tcmalloc loaded
(`training_forward_compiler_options.cpu_float32_dots = 'auto'`); `'eigen'` asks for it everywhere,
`'ynnpack'` never. Results equal the one-executable step's within float32 rounding.
"""

import contextlib
import enum
from absl import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.runtime import launch
from prompt_tuning.runtime import metrics as metrics_lib
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime import xla_options

PyTree = Any


class ActionMode(enum.Enum):
  TRAIN = 1
  TRAIN_EVAL = 2
  INFER_EVAL = 3


class BaseAction:
  """Runs after a stage; returning True asks training to stop."""

  def run(self, train_state, metrics_by_task: Mapping[str, Mapping[str, float]]) -> bool:
    raise NotImplementedError


class EarlyStoppingAction(BaseAction):
  """Stops when `metric = (task, name)` has not improved for `patience` evaluations."""

  def __init__(
      self, metric, mode: str = 'max', patience: int = 3, atol: float = 0.0, rtol: float = 0.0
  ):
    if mode not in ('min', 'max'):
      raise ValueError(f"EarlyStoppingAction mode must be 'min' or 'max', got {mode!r}.")
    self._task, self._name = metric
    self._mode, self._patience, self._atol, self._rtol = mode, patience, atol, rtol
    self._best = None
    self._bad = 0

  def run(self, train_state, metrics_by_task) -> bool:
    value = metrics_by_task.get(self._task, {}).get(self._name)
    if value is None:
      logging.warning('EarlyStoppingAction: metric %s/%s not found.', self._task, self._name)
      return False
    value = float(value)
    if self._best is None:
      self._best = value
      return False
    tol = self._atol + self._rtol * abs(self._best)
    better = value > self._best + tol if self._mode == 'max' else value < self._best - tol
    if better:
      self._best, self._bad = value, 0
    else:
      self._bad += 1
    if self._bad >= self._patience:
      logging.info(
          'Early stopping: %s/%s did not improve for %d evaluations.',
          self._task,
          self._name,
          self._patience,
      )
      return True
    return False


class NanLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class TerminateOnNanAction(BaseAction):
  """Stops training when `(task, metric)` is NaN or infinite."""

  def __init__(self, task: str = 'train', metric: str = 'loss'):
    self._task, self._metric = task, metric

  def run(self, train_state, metrics_by_task) -> bool:
    value = metrics_by_task.get(self._task, {}).get(self._metric)
    if value is not None and not np.isfinite(float(value)):
      raise NanLossError(
          f'{self._task}/{self._metric} is {value} at step {int(train_state.step)}: training stopped. '
          'The last good checkpoint is kept. Lower the learning rate, check the data, or use float32 '
          'activations (ACTIVATION_DTYPE = "float32").'
      )
    return False


class _Prefetch:
  """Converts and places the next batches on a background thread (host/device overlap).

  It reads at most `limit` batches from `iterator`: a prefetcher must never take batches that its
  caller will not consume, or they would be lost to the next `Trainer.train` call (which skipped
  batches at every eval/checkpoint boundary and made resumed runs see different data).
  """

  def __init__(
      self, iterator: Iterator, place: Callable, size: int = 2, limit: Optional[int] = None
  ):
    self._it, self._place, self._limit = iterator, place, limit
    self._q: queue.Queue = queue.Queue(maxsize=size)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    try:
      n = 0
      while self._limit is None or n < self._limit:
        try:
          batch = next(self._it)
        except StopIteration:
          break
        self._q.put(self._place(batch))
        n += 1
    except Exception as e:  # pylint: disable=broad-except
      self._q.put(e)
    self._q.put(StopIteration())

  def __next__(self):
    item = self._q.get()
    if isinstance(item, StopIteration):
      raise StopIteration
    if isinstance(item, Exception):
      raise item
    return item

  def __iter__(self):
    return self


def _summary_writer(path: Optional[str]):
  if path is None or jax.process_index() != 0:
    return None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.summary.create_file_writer(path)


def write_scalars(writer, step: int, scalars: Mapping[str, float]) -> None:
  if writer is None:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with writer.as_default():
    for k, v in scalars.items():
      tf.summary.scalar(k, float(v), step=step)
  writer.flush()


def _loss_of(model, frozen: PyTree) -> Callable:
  """`(trainable, batch, dropout_rng) -> (loss, metrics)`: the model's loss with `frozen` fixed."""

  def loss_of(trainable, batch, rng):
    loss, metrics = model.loss_fn(train_state_lib.merge_params(trainable, frozen), batch, rng)
    return loss, metrics_lib.as_metrics(metrics)

  return loss_of


def accumulate_grads_microbatched(
    model,
    train_state: train_state_lib.TrainState,
    batch: Mapping[str, Any],
    dropout_rng: Optional[jax.Array],
    num_microbatches: Optional[int] = None,
) -> Tuple[PyTree, Dict[str, metrics_lib.Metric]]:
  """Gradients of `model.loss_fn` w.r.t. `train_state.trainable`, and the step's metrics.

  With `num_microbatches > 1` the batch is split along its first axis into equal microbatches,
  run one after another (`lax.scan`; microbatch `i` uses `fold_in(dropout_rng, i)`), and the
  gradients are summed in float32 while the metrics are merged by their own reductions (a ratio
  over the microbatches equals the ratio over the whole batch). The metrics are finalized as one
  step's.

  Returns:
    `(grads, metrics)`: `grads` has the structure and dtypes of `train_state.trainable`.
  """
  grad_fn = jax.value_and_grad(_loss_of(model, train_state.frozen), has_aux=True)
  if num_microbatches is None or num_microbatches <= 1:
    (_, metrics), grads = grad_fn(train_state.trainable, batch, dropout_rng)
    return grads, metrics_lib.finalize_step(metrics)
  nmb = int(num_microbatches)
  size = next(iter(batch.values())).shape[0]
  if size % nmb:
    raise ValueError(f'Batch size {size} is not divisible by num_microbatches={nmb}.')
  mbs = jax.tree_util.tree_map(lambda x: x.reshape((nmb, size // nmb) + x.shape[1:]), batch)

  def microbatch(i):
    mb = jax.tree_util.tree_map(lambda x: x[i], mbs)
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    return grad_fn(train_state.trainable, mb, rng)

  def body(carry, i):
    acc_grads, acc_metrics = carry
    (_, m), g = microbatch(i)
    acc_grads = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), acc_grads, g)
    return (acc_grads, metrics_lib.merge(acc_metrics, m)), None

  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), train_state.trainable)
  metric_shapes = jax.eval_shape(lambda: microbatch(0)[0][1])
  empty = {k: metrics_lib.empty_like(m) for k, m in metric_shapes.items()}
  (grads, metrics), _ = jax.lax.scan(body, (zeros, empty), jnp.arange(nmb))
  grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, train_state.trainable)
  return grads, metrics_lib.finalize_step(metrics)


def apply_grads(
    train_state: train_state_lib.TrainState,
    grads: PyTree,
    metrics: Mapping[str, metrics_lib.Metric],
    learning_rate: Any,
    optimizer_def,
) -> Tuple[train_state_lib.TrainState, Dict[str, metrics_lib.Metric]]:
  """Applies the optimizer to the trainable parameters; adds `learning_rate` to the metrics."""
  lr = jnp.asarray(learning_rate, jnp.float32)
  hyper_params = optimizer_def.update_hyper_params(learning_rate=lr)
  new_trainable, new_opt_state = optimizer_def.apply_gradient(
      hyper_params, train_state.trainable, train_state.opt_state, grads
  )
  metrics = dict(metrics)
  metrics['learning_rate'] = metrics_lib.AveragePerStep.from_value(lr).finalize_step()
  new_state = train_state.replace(
      step=train_state.step + 1, trainable=new_trainable, opt_state=new_opt_state
  )
  return new_state, metrics


def train_with_lr(
    train_state: train_state_lib.TrainState,
    batch: Mapping[str, Any],
    learning_rate: Any,
    dropout_rng: Optional[jax.Array],
    model,
    num_microbatches: Optional[int] = None,
) -> Tuple[train_state_lib.TrainState, Dict[str, metrics_lib.Metric]]:
  """One training step: `accumulate_grads_microbatched` then `apply_grads` (T5X's names)."""
  grads, metrics = accumulate_grads_microbatched(
      model, train_state, batch, dropout_rng, num_microbatches
  )
  return apply_grads(train_state, grads, metrics, learning_rate, model.optimizer_def)


def forward_with_vjp(
    model,
    train_state: train_state_lib.TrainState,
    batch: Mapping[str, Any],
    dropout_rng: Optional[jax.Array],
) -> Tuple[jax.Array, Dict[str, metrics_lib.Metric], Callable]:
  """The forward half of a step: `(loss, metrics, vjp_fn)`, the VJP w.r.t. `trainable` only.

  `vjp_fn` is a pytree (`jax.tree_util.Partial`) holding the residuals the backward needs, so it
  can leave one executable and enter another (`SplitTrainStep`). `grads_from_vjp` finishes the
  gradient; together they equal `accumulate_grads_microbatched` without microbatches.
  """
  loss_of = _loss_of(model, train_state.frozen)
  loss, vjp_fn, metrics = jax.vjp(
      lambda trainable: loss_of(trainable, batch, dropout_rng), train_state.trainable, has_aux=True
  )
  return loss, metrics, vjp_fn


def grads_from_vjp(loss: jax.Array, vjp_fn: Callable) -> PyTree:
  """The backward half: the gradient of the loss w.r.t. `trainable` from `forward_with_vjp`."""
  (grads,) = vjp_fn(jnp.ones_like(loss))
  return grads


class _FrozenLeaf:
  """Stands, in the forward's residuals, for the frozen parameter at `index` (in leaf order).

  A pytree node without children: returned from a jitted forward it costs no output buffer. The
  backward receives the frozen parameters anyway and puts them back (`_with_frozen_residuals`).
  """

  __slots__ = ('index',)

  def __init__(self, index: int):
    self.index = index

  def __repr__(self):
    return f'_FrozenLeaf({self.index})'


jax.tree_util.register_pytree_node(
    _FrozenLeaf, lambda leaf: ((), leaf.index), lambda index, _: _FrozenLeaf(index)
)


def _without_frozen_residuals(vjp_fn: PyTree, frozen: PyTree) -> PyTree:
  """`vjp_fn` with every residual that *is* a frozen parameter replaced by a `_FrozenLeaf`.

  The VJP keeps the kernels its backward multiplies by (`dx = dy @ kernel.T`) among its residuals;
  an executable returning them would copy them to new output buffers every step (117 MiB for T5
  1.1 small at prompt length 100). Traced inside the forward, where a residual that is a parameter
  is the very tracer of that parameter.
  """
  index = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(frozen))}
  leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
  marked = [_FrozenLeaf(index[id(leaf)]) if id(leaf) in index else leaf for leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, marked)


def _with_frozen_residuals(vjp_fn: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `_without_frozen_residuals`: each `_FrozenLeaf` becomes its frozen parameter."""
  params = jax.tree_util.tree_leaves(frozen)
  is_frozen_leaf = lambda x: isinstance(x, _FrozenLeaf)
  leaves, treedef = jax.tree_util.tree_flatten(vjp_fn, is_leaf=is_frozen_leaf)
  restored = [params[leaf.index] if is_frozen_leaf(leaf) else leaf for leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, restored)


@contextlib.contextmanager
def _no_logical_constraints_on_one_device() -> Iterator[None]:
  """Inside a one-device mesh (or none), logical sharding constraints are dropped while tracing.

  On one device a sharding constraint changes nothing, but flax's `param_with_axes` puts one on
  every parameter it returns, so the kernels among the VJP's residuals would be new values, not
  the frozen parameters `_without_frozen_residuals` recognises. On a larger mesh the rules stay.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    with nn_partitioning.axis_rules(()):
      yield
  else:
    yield


def split_train_step_fns(
    model, learning_rate_fn: Callable[[Any], Any]
) -> Tuple[Callable, Callable]:
  """The two pure halves of `SplitTrainStep` (one step of `train_with_lr`, no microbatches).

  * `forward(state, batch, base_rng) -> (loss, metrics, vjp_fn)`; dropout uses
    `fold_in(base_rng, state.step)` as the one-executable step does (no dropout rng if `base_rng`
    is None);
  * `backward(mutable, frozen, loss, metrics, vjp_fn) -> (new mutable, metrics)`, where `mutable`
    is the state with `frozen={}`: the gradient, then `apply_grads` at
    `learning_rate_fn(state.step)`.

  The residuals `vjp_fn` carries from one to the other leave out the frozen parameters among them
  (`_FrozenLeaf` placeholders): `backward` takes those from `frozen` instead of copies.
  """

  def forward(state, batch, base_rng):
    dropout_rng = None if base_rng is None else jax.random.fold_in(base_rng, state.step)
    with _no_logical_constraints_on_one_device():
      loss, metrics, vjp_fn = forward_with_vjp(model, state, batch, dropout_rng)
    return loss, metrics, _without_frozen_residuals(vjp_fn, state.frozen)

  def backward(mutable, frozen, loss, metrics, vjp_fn):
    state = mutable.replace(frozen=frozen)
    grads = grads_from_vjp(loss, _with_frozen_residuals(vjp_fn, frozen))
    lr = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    new_state, metrics = apply_grads(
        state, grads, metrics_lib.finalize_step(metrics), lr, model.optimizer_def
    )
    return new_state.replace(frozen={}), metrics

  return forward, backward


class SplitTrainStep:
  """One training step as two executables, called like the one-executable step.

  `forward(state, batch, base_rng) -> (loss, metrics, vjp_fn)` is compiled with its own compiler
  options (`xla_options.training_forward_compiler_options`: XLA's Eigen dots for a float32 model on
  the CPU, which run the forward faster than YNNPACK's); `backward(mutable, frozen, loss, metrics,
  vjp_fn) -> (new mutable, metrics)` takes the gradient and applies the optimizer with XLA's
  default options (YNNPACK's dots run the backward products faster). `mutable` is the state without
  its frozen parameters and is donated, as the one-executable step donates the state; the frozen
  parameters pass through unchanged. The residuals live between the two calls, where one executable
  keeps them in its temporary buffers.
  """

  def __init__(self, forward, backward, mesh: Optional[jax.sharding.Mesh] = None):
    self.forward = forward
    self.backward = backward
    self.mesh = mesh  # the one-device mesh the forward's outputs are placed on

  @staticmethod
  def _halves(state: train_state_lib.TrainState):
    return state.replace(frozen={}), state.frozen

  def __call__(self, state: train_state_lib.TrainState, batch, base_rng):
    loss, metrics, vjp_fn = self.forward(state, batch, base_rng)
    mutable, frozen = self._halves(state)
    new_mutable, metrics = self.backward(mutable, frozen, loss, metrics, vjp_fn)
    return new_mutable.replace(frozen=frozen), metrics

  def compile(self, state: train_state_lib.TrainState, batch, base_rng) -> Tuple[Any, Any]:
    """Both executables, compiled ahead of time (`(forward, backward)` `jax.stages.Compiled`)."""
    lowered = self.forward.lower(state, batch, base_rng)
    forward = lowered.compile()
    # Shapes and dtypes of the outputs, placed as the forward places them (unspecified shardings
    # are the mesh's replicated one), so that the backward compiled here is the one a call finds.
    replicated = (
        None
        if self.mesh is None
        else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    )
    loss, metrics, vjp_fn = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding or replicated, weak_type=x.weak_type
        ),
        lowered.out_info,
    )
    mutable, frozen = self._halves(state)
    backward = self.backward.lower(mutable, frozen, loss, metrics, vjp_fn).compile()
    return forward, backward

  def cache_size(self) -> int:
    """Compiled shapes: one per batch shape, each a forward and a backward executable (the larger
    of the two counts, so a backward that compiles again shows)."""
    return max(self.forward.cache_size(), self.backward.cache_size())


# Below this median step time the default `Trainer` stops waiting for each step (see the `Trainer`).
QUICK_STEP_S = 0.05


def wait_for_each_step_by_default() -> bool:
  """`Trainer.wait_for_each_step`'s default: on the CPU under an allocator that keeps freed blocks
  (tcmalloc, mimalloc; see the `Trainer`)."""
  return jax.default_backend() == 'cpu' and launch.caching_allocator_loaded()


def wait_for_step(train_state) -> None:
  """Waits until the step that outputs `train_state` is done, and 1 ms more: XLA frees the step's
  temporaries just after its outputs are ready, and the next step should find them freed."""
  jax.block_until_ready(train_state)
  time.sleep(0.001)


class Trainer:
  """Runs the partitioned training and evaluation steps (T5X's `trainer.Trainer`)."""

  def __init__(
      self,
      model,
      train_state: train_state_lib.TrainState,
      partitioner,
      eval_names: Sequence[str],
      summary_dir: Optional[str],
      train_state_axes: Any,
      rng: jax.Array,
      learning_rate_fn: Callable[[Any], Any],
      num_microbatches: Optional[int] = None,
      log_period: int = 10,
      weight_metrics_computer=None,
      wait_for_each_step: Optional[bool] = None,
  ):
    """See T5X's `Trainer`; `wait_for_each_step` is this runtime's own.

    `wait_for_each_step`: wait until each step is done (and 1 ms more) before starting the next one.
    On the CPU, XLA frees a step's temporaries (one block, 597 MiB for T5 1.1 small at prompt
    length 100) just after its outputs are ready; an allocator that keeps freed blocks (tcmalloc,
    mimalloc) then hands the next step, started at once, a second block and keeps both resident.
    Waiting keeps one: peak memory as glibc's, and steps 1.0-1.2x as fast (measured on an AMD EPYC,
    2 cores). None (the default): wait on the CPU under such an allocator
    (`launch.caching_allocator_loaded`), as `launch.tune_malloc` preloads one by default, unless
    the steps are quick (the median of the first three after compiling under `QUICK_STEP_S`: a
    small model, whose temporaries are small too, and whose steps the wait would slow by a third
    or more); elsewhere steps are dispatched without waiting.
    """
    del weight_metrics_computer
    self._model = model
    self.train_state = train_state
    self._partitioner = partitioner
    self._eval_names = list(eval_names)
    self._summary_dir = summary_dir
    self._train_state_axes = train_state_axes
    self._base_rng = rng
    self._learning_rate_fn = learning_rate_fn
    self._num_microbatches = num_microbatches
    self._log_period = max(1, int(log_period))
    self.stop_training = False
    self._train_writer = _summary_writer(
        os.path.join(summary_dir, 'train') if summary_dir else None
    )
    self._eval_writers: Dict[str, Any] = {}
    self._partitioned_train_step = None
    self._partitioned_eval_step = None
    self._compiled = False
    self.loss_history: Dict[int, float] = {}
    self._timed_waits = [] if wait_for_each_step is None else None  # None: the user decided
    if wait_for_each_step is None:
      wait_for_each_step = wait_for_each_step_by_default()
    self.wait_for_each_step = bool(wait_for_each_step)

  # -------------------------------------------------------------------- steps
  def _make_train_step(self):
    model, lr_fn, nmb = self._model, self._learning_rate_fn, self._num_microbatches

    def train_step(state: train_state_lib.TrainState, batch, base_rng):
      lr = jnp.asarray(lr_fn(state.step), jnp.float32)
      dropout_rng = jax.random.fold_in(base_rng, state.step)
      return train_with_lr(state, batch, lr, dropout_rng, model, nmb)

    return train_step

  def _batch_sharding(self, batch_spec):
    return jax.tree_util.tree_map(lambda _: self._partitioner.data_partition_spec, batch_spec)

  def _forward_compiler_options(self) -> Optional[Dict[str, Any]]:
    """The forward's options when the step is split (`SplitTrainStep`), else None.

    Split only where `xla_options.training_forward_compiler_options` gives options (float32 on
    the CPU: by default an Intel CPU under tcmalloc, or where `'eigen'` is bound) and nothing else
    changes: no microbatching (its scan keeps the forward and backward of each microbatch
    together) and a one-device mesh (the residuals then need no sharding of their own)."""
    if self._model is None or (self._num_microbatches or 1) > 1:
      return None
    mesh = getattr(self._partitioner, 'mesh', None)
    if mesh is None or mesh.devices.size != 1:
      return None
    return xla_options.training_forward_compiler_options(self._model)

  def _make_split_train_step(self, batch, forward_options) -> SplitTrainStep:
    forward, backward = split_train_step_fns(self._model, self._learning_rate_fn)
    axes = self._train_state_axes
    mutable_axes, frozen_axes = (None, None) if axes is None else SplitTrainStep._halves(axes)
    return SplitTrainStep(
        self._partitioner.partition(
            forward,
            in_axis_resources=(axes, self._batch_sharding(batch), None),
            out_axis_resources=None,
            compiler_options=forward_options,
        ),
        self._partitioner.partition(
            backward,
            in_axis_resources=(mutable_axes, frozen_axes, None, None, None),
            out_axis_resources=(mutable_axes, None),
            donate_argnums=(0,),
        ),
        mesh=getattr(self._partitioner, 'mesh', None),
    )

  def _get_train_step(self, batch):
    if self._partitioned_train_step is None:
      forward_options = self._forward_compiler_options()
      if forward_options:
        logging.info(
            'Training step split in two executables (forward with %s; '
            "training_forward_compiler_options.cpu_float32_dots = 'ynnpack' keeps one).",
            forward_options,
        )
        self._partitioned_train_step = self._make_split_train_step(batch, forward_options)
      else:
        self._partitioned_train_step = self._partitioner.partition(
            self._make_train_step(),
            in_axis_resources=(self._train_state_axes, self._batch_sharding(batch), None),
            out_axis_resources=(self._train_state_axes, None),
            donate_argnums=(0,),
        )
    return self._partitioned_train_step

  def compile_train(self, batch) -> None:
    step = self._get_train_step(batch)
    if isinstance(step, SplitTrainStep):
      step.compile(self.train_state, batch, self._base_rng)
    else:
      self._partitioner.compile(step, self.train_state, batch, self._base_rng)

  def _make_eval_step(self):
    model = self._model

    def eval_step(state, batch):
      return metrics_lib.finalize_step(
          metrics_lib.as_metrics(model.eval_fn(state.params, batch)[1])
      )

    return eval_step

  # -------------------------------------------------------------------- loops
  def place_batch(self, batch: Mapping[str, Any]):
    batch = {k: np.asarray(v) for k, v in batch.items()}
    check = getattr(self._model, 'check_conditioning_features', None)
    if check is not None:
      check(batch)  # Out-of-range ids (e.g. prompt_ids past the bank) fail here, not as NaN.
    return self._partitioner.shard_host_batch(batch)

  def train(
      self,
      batch_iter: Iterator,
      num_steps: int,
      start_step: Optional[int] = None,
      total_steps: Optional[int] = None,
  ) -> Dict[str, float]:
    """Runs `num_steps` steps. Logs step, loss, steps/s, examples/s and ETA every `log_period` steps.

    The rates (and so the ETA) leave out the first step of the trainer, which compiles. Training
    stops after the current step once `stop_training` is set (an action, or a signal handler); the
    metrics of every step run are written.
    """
    start_step = int(self.train_state.step) if start_step is None else start_step
    it = _Prefetch(batch_iter, self.place_batch, limit=num_steps)
    pending = []
    summary = {}
    t_last, step_last = time.time(), start_step
    total_steps = total_steps or (start_step + num_steps)
    for i in range(num_steps):
      if self.stop_training:
        break
      try:
        batch = next(it)
      except StopIteration:
        logging.warning('Training data ran out after %d steps.', i)
        break
      step_fn = self._get_train_step(batch)
      if not self._compiled and (isinstance(step_fn, SplitTrainStep) or hasattr(step_fn, 'lower')):
        # Compile first and hand back what loading and compiling freed, so that the first step's
        # temporaries are not allocated on top of it (that was the run's peak memory). The call
        # below then finds the executable in JAX's compilation cache.
        self.compile_train(batch)
        launch.release_free_memory()
      t_step = time.perf_counter()
      self.train_state, metrics = step_fn(self.train_state, batch, self._base_rng)
      pending.append((start_step + i + 1, metrics))
      step_now = start_step + i + 1
      if self.wait_for_each_step or not self._compiled:
        wait_for_step(self.train_state)
        if self._compiled and self._timed_waits is not None:  # the default, deciding
          self._decide_waiting(time.perf_counter() - t_step)
      if not self._compiled:
        # The first step compiles: time the steps after it, so the first ETA is not inflated.
        jax.block_until_ready(metrics)
        self._compiled = True
        # What loading and compiling freed goes back to the system before the steps' own blocks.
        launch.release_free_memory()
        t_last, step_last = time.time(), step_now
      if (step_now % self._log_period == 0) or i == num_steps - 1 or self.stop_training:
        summary = self._flush(pending, batch)
        pending = []
        now = time.time()
        timed = step_now - step_last
        steps_per_sec = timed / max(now - t_last, 1e-9) if timed else float('nan')
        batch_size = next(iter(batch.values())).shape[0]
        eta = (total_steps - step_now) / steps_per_sec if timed else float('nan')
        summary.update(
            {
                'timing/steps_per_second': steps_per_sec,
                'timing/seqs_per_second': steps_per_sec * batch_size,
            }
        )
        write_scalars(
            self._train_writer,
            step_now,
            {k: v for k, v in summary.items() if k.startswith('timing/') and np.isfinite(v)},
        )
        logging.info(
            'step %d/%d: loss=%.4f accuracy=%.4f lr=%.3g | %.2f steps/s, %.1f examples/s, ETA %s',
            step_now,
            total_steps,
            summary.get('loss', float('nan')),
            summary.get('accuracy', float('nan')),
            summary.get('learning_rate', float('nan')),
            steps_per_sec,
            steps_per_sec * batch_size,
            _fmt_eta(eta),
        )
        t_last, step_last = now, step_now
        if not np.isfinite(summary.get('loss', 0.0)):
          bad = [s for s, l in self.loss_history.items() if not np.isfinite(l)]
          raise NanLossError(
              f'The training loss became {summary.get("loss")} at step {min(bad) if bad else step_now}: '
              'training stopped and the last good checkpoint is kept. Lower the learning rate, check the '
              'inputs, or use float32 activations (--gin.ACTIVATION_DTYPE="\'float32\'").'
          )
    if pending:
      summary = self._flush(pending, batch)
    return summary

  def _decide_waiting(self, seconds: float) -> None:
    """The default `wait_for_each_step`: stop waiting once three timed steps show quick steps."""
    self._timed_waits.append(seconds)
    if len(self._timed_waits) == 3:
      if float(np.median(self._timed_waits)) < QUICK_STEP_S:
        self.wait_for_each_step = False
      self._timed_waits = None

  def _flush(self, pending, batch) -> Dict[str, float]:
    host = jax.device_get([m for _, m in pending])
    last = {}
    for (step, _), m in zip(pending, host):
      scalars = metrics_lib.compute(m)
      self.loss_history[step] = scalars['loss']
      write_scalars(self._train_writer, step, scalars)
      last = scalars
    return last

  def eval(
      self, batch_iters: Mapping[str, Iterator], step: Optional[int] = None
  ) -> Dict[str, Dict[str, float]]:
    """Teacher-forced evaluation: metrics averaged over each task's batches."""
    if self._partitioned_eval_step is None:
      self._partitioned_eval_step = self._partitioner.partition(
          self._make_eval_step(),
          in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
          out_axis_resources=None,
          compiler_options=xla_options.inference_compiler_options(self._model),
      )
    step = int(self.train_state.step) if step is None else step
    results = {}
    for name, batches in batch_iters.items():
      merged = None
      for batch in batches:
        m = jax.device_get(self._partitioned_eval_step(self.train_state, self.place_batch(batch)))
        merged = m if merged is None else metrics_lib.merge(merged, m)
      if merged is None:
        continue
      # Each metric reduces over the batches its own way (per-batch mean, weighted mean, sum).
      results[name] = metrics_lib.compute(merged)
      if self._summary_dir:
        if name not in self._eval_writers:
          self._eval_writers[name] = _summary_writer(
              os.path.join(self._summary_dir, 'training_eval', name)
          )
        write_scalars(self._eval_writers[name], step, results[name])
      logging.info(
          'training eval %s at step %d: %s',
          name,
          step,
          ', '.join(f'{k}={v:.4f}' for k, v in sorted(results[name].items())),
      )
    return results

  def close(self):
    for w in [self._train_writer] + list(self._eval_writers.values()):
      if w is not None:
        w.flush()


def _fmt_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
