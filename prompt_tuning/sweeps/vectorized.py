"""Vectorized runs: K prompt-tuning runs trained at once, as one job, each exactly as alone.

Runs of a sweep that differ only in the prompt's initialization, the seed or the learning rate
(same model, prompt length, data and steps) are trained by one process:

* one backbone in memory and one input pipeline: every step reads one batch, which all K runs
  train on (so the runs must see the same data order: fix the data seed,
  `train/utils.DatasetConfig.seed`, when the seed is swept);
* one compilation: the training step is the runtime's own pure step (`trainer.train_with_lr`)
  under `jax.vmap` over the runs' trainable parameters, optimizer states, learning rates and
  dropout keys, with the frozen parameters and the batch shared. Each run's optimizer sees only
  its own parameters, so Adafactor's factored statistics, update clipping and parameter scaling
  never mix runs, each run has its own learning-rate schedule, and each its own dropout masks;
  the loss is each run's own (any loss normalization). Every run's trajectory therefore equals
  its separate run's (the same batches, the same initial values from the same seed) up to
  floating-point reassociation (tested within 1e-5).

Each run keeps its own `MODEL_DIR` with what a separate run would write: checkpoints (resumable by
this job, or by `prompt_tuning.train` alone), `.npy` prompts, TensorBoard summaries, its inference
evaluations (`inference_eval/*-metrics.jsonl`) and its gin configuration, so `status` and `collect`
treat them as K ordinary runs. Checkpoints of all runs are written before any older one is deleted,
so a job killed mid-save resumes every run from the same step.

`python -m prompt_tuning.sweeps.vectorized JOB.json` (written by the sweep under
`ROOT/vectorized/<group>/job.json`: each member's run directory, gin files, bindings and flags).
The job checks that the members are compatible and names the first difference when they are not.
"""

import dataclasses
import inspect
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from prompt_tuning import fs
from prompt_tuning.sweeps import check


class IncompatibleRunsError(ValueError):
  """The runs of a vectorized job differ in more than the prompt init, seed or learning rate."""


@dataclasses.dataclass
class Member:
  """One run of the job: its directory and its gin-configured training arguments."""

  name: str
  run_dir: str
  kwargs: Dict[str, Any]
  learning_rate_fn: Callable[[Any], Any]
  num_microbatches: Optional[int]
  config_text: str


def _train_defaults() -> Dict[str, Any]:
  from prompt_tuning.runtime import train as train_lib  # pylint: disable=g-import-not-at-top

  return {
      k: p.default
      for k, p in inspect.signature(train_lib.train).parameters.items()
      if p.default is not inspect.Parameter.empty
  }


def _parse_member(spec: Mapping[str, Any], search_paths: Sequence[str]) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  bindings = [f'{k} = {v}' for k, v in spec['bindings']]
  with check.entry_main('prompt_tuning.train'):
    gin_utils.parse_gin_flags(search_paths, spec['gin_files'], bindings)


def capture_member(spec: Mapping[str, Any], search_paths: Sequence[str]) -> Member:
  """Reads one member's gin configuration into its training arguments (nothing is trained)."""
  import gin  # pylint: disable=g-import-not-at-top

  _parse_member(spec, search_paths)
  text = gin.config_str()
  with check.entry_main('prompt_tuning.train'):
    kwargs = dict(_train_defaults())
    kwargs.update(gin.get_configurable(check.train)())
  trainer = kwargs['trainer_cls'](
      model=kwargs['model'],
      train_state=None,
      partitioner=kwargs.get('partitioner'),
      eval_names=[],
      summary_dir=None,
      train_state_axes=None,
      rng=None,
  )
  # The trainer's gin-bound schedule and microbatching (read while this member's config is live).
  lr_fn = trainer._learning_rate_fn  # pylint: disable=protected-access
  nmb = trainer._num_microbatches  # pylint: disable=protected-access
  return Member(spec['name'], spec['run_dir'], kwargs, lr_fn, nmb, text)


# ------------------------------------------------------------------------------------ compatibility

_SKIP = frozenset(
    {
        'prompt_init',
        'bank_init',
        'prompt_factory',
        'parent',
        'name',
        'learning_rate',
        '_init_shapes',
    }
)


def describe(obj: Any, depth: int = 0, seen: Optional[set] = None) -> Any:
  """A comparable description of a configured object (models, optimizers, configs)."""
  seen = set() if seen is None else seen
  if depth > 12:
    return '...'
  if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
    return obj
  if isinstance(obj, np.ndarray) or type(obj).__module__.startswith(('jax', 'jaxlib')):
    try:
      a = np.asarray(obj)
      return ('array', a.shape, str(a.dtype), hash(a.tobytes()))
    except Exception:  # pylint: disable=broad-except
      return type(obj).__name__
  if isinstance(obj, (list, tuple)):
    return [describe(v, depth + 1, seen) for v in obj]
  if isinstance(obj, Mapping):
    return {str(k): describe(v, depth + 1, seen) for k, v in obj.items() if str(k) not in _SKIP}
  if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
    cells = []
    for cell in getattr(obj, '__closure__', None) or ():
      try:
        cells.append(describe(cell.cell_contents, depth + 1, seen))
      except ValueError:
        cells.append(None)
    return ('fn', getattr(obj, '__module__', ''), getattr(obj, '__qualname__', str(obj)), cells)
  if inspect.isclass(obj):
    return ('class', obj.__module__, obj.__qualname__)
  if hasattr(type(obj), 'vocab_size') and hasattr(type(obj), 'encode'):
    # A vocabulary, by what defines it (reading `vocab_size` would load the model file).
    fields = {
        k: describe(v, depth + 1, seen)
        for k, v in vars(obj).items()
        if not k.startswith('__') and isinstance(v, (str, int, float, bool, type(None), tuple))
    }
    return ('vocabulary', type(obj).__name__, fields)
  if id(obj) in seen:
    return ('cycle', type(obj).__name__)
  seen.add(id(obj))
  if dataclasses.is_dataclass(obj):
    fields = {
        f.name: describe(getattr(obj, f.name, None), depth + 1, seen)
        for f in dataclasses.fields(obj)
        if f.name not in _SKIP
    }
    return (type(obj).__name__, fields)
  if hasattr(obj, '__dict__'):
    state = {
        k: describe(v, depth + 1, seen)
        for k, v in vars(obj).items()
        if k not in _SKIP and not k.startswith('__')
    }
    return (type(obj).__name__, state)
  return (type(obj).__name__, repr(obj))


def first_difference(a: Any, b: Any, path: str = '') -> Optional[str]:
  if type(a) is not type(b):
    return f'{path or "value"}: {_short(a)} vs {_short(b)}'
  if isinstance(a, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f'{path}.{k}: only in one of them'
      d = first_difference(a[k], b[k], f'{path}.{k}' if path else k)
      if d:
        return d
    return None
  if isinstance(a, (list, tuple)):
    if len(a) != len(b):
      return f'{path}: {_short(a)} vs {_short(b)}'
    for i, (x, y) in enumerate(zip(a, b)):
      d = first_difference(x, y, f'{path}[{i}]')
      if d:
        return d
    return None
  return None if a == b else f'{path}: {_short(a)} vs {_short(b)}'


def _short(x: Any) -> str:
  text = repr(x)
  return text if len(text) < 120 else text[:117] + '...'


_SAME_KWARGS = (
    'train_eval_dataset_cfg',
    'infer_eval_dataset_cfg',
    'checkpoint_cfg',
    'total_steps',
    'relative_steps',
    'eval_steps',
    'eval_period',
    'run_eval_before_training',
    'get_dataset_fn',
    'train_eval_get_dataset_fn',
    'inference_evaluator_cls',
)


def check_compatible(members: Sequence[Member]) -> None:
  """Raises IncompatibleRunsError naming the first difference beyond init, seed and learning rate."""
  base = members[0]

  def fail(other: Member, what: str) -> None:
    raise IncompatibleRunsError(
        f'Runs {base.name!r} and {other.name!r} cannot be trained as one vectorized job: they '
        f'differ in {what}. A vectorized job trains runs that differ only in the prompt '
        "initialization, the seed or the learning rate; remove the axis from the spec's "
        '`vectorize` (its runs then train separately).'
    )

  base_model = describe(base.kwargs['model'])
  for m in members[1:]:
    diff = first_difference(base_model, describe(m.kwargs['model']), 'model')
    if diff:
      fail(m, diff)
    for key in _SAME_KWARGS:
      diff = first_difference(describe(base.kwargs.get(key)), describe(m.kwargs.get(key)), key)
      if diff:
        fail(m, diff)
    cfg0, cfg = base.kwargs['train_dataset_cfg'], m.kwargs['train_dataset_cfg']
    diff = first_difference(
        describe(dataclasses.replace(cfg0, seed=None)),
        describe(dataclasses.replace(cfg, seed=None)),
        'train_dataset_cfg',
    )
    if diff:
      fail(m, diff)
    if data_seed(base) != data_seed(m):
      fail(
          m,
          f'the training data order (data seeds {data_seed(base)} and {data_seed(m)}: the seed '
          'orders the data unless train/utils.DatasetConfig.seed fixes it; bind it in the spec '
          'to vectorize over seeds with one data order)',
      )
    if m.num_microbatches != base.num_microbatches:
      fail(m, f'num_microbatches ({base.num_microbatches} vs {m.num_microbatches})')
    if base.kwargs.get('actions') or m.kwargs.get('actions'):
      fail(m, 'actions (early stopping is not supported in a vectorized job)')
  seeds = {m.kwargs.get('random_seed') for m in members}
  if any(s is None for s in seeds):
    raise IncompatibleRunsError(
        'Every run of a vectorized job needs RANDOM_SEED (its prompt initialization and dropout '
        'derive from it).'
    )
  from prompt_tuning.runtime import train as train_lib  # pylint: disable=g-import-not-at-top

  restore = base.kwargs['checkpoint_cfg'].restore if base.kwargs['checkpoint_cfg'] else None
  if len(seeds) > 1 and not train_lib._initial_path(restore):  # pylint: disable=protected-access
    raise IncompatibleRunsError(
        'The runs have different seeds and no INITIAL_CHECKPOINT_PATH: their frozen parameters '
        'would be initialized differently. Vectorize over seeds only when the frozen model comes '
        'from a checkpoint.'
    )


def data_seed(member: Member) -> Optional[int]:
  cfg = member.kwargs['train_dataset_cfg']
  return cfg.seed if cfg.seed is not None else member.kwargs.get('random_seed')


# ------------------------------------------------------------------------------------ training


def _stack(trees: Sequence[Any]):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _index(tree: Any, k: int):
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(lambda x: x[k], tree)


def _stacked_spec(tree: Any):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  return jax.tree_util.tree_map(
      lambda p: P(None, *p) if isinstance(p, P) else P(None),
      tree,
      is_leaf=lambda x: x is None or isinstance(x, P),
  )


class _MemberEvaluator:
  """seqio inference evaluation of each member, into its own directory, with one compiled step."""

  def __init__(self, cfg, evaluator_cls, model, partitioner, run_dirs, params_axes):
    from prompt_tuning.runtime import inference  # pylint: disable=g-import-not-at-top

    self._evaluators = []
    for i, run_dir in enumerate(run_dirs):
      ev = inference.InferenceEvaluator(
          cfg, evaluator_cls, model, partitioner, log_dir=run_dir, params_axes=params_axes
      )
      if i:
        # Share the first evaluator's jitted decoding and scoring steps (compiled once).
        ev._predict_fn = self._evaluators[0]._predict_fn  # pylint: disable=protected-access
        ev._score_fn = self._evaluators[0]._score_fn  # pylint: disable=protected-access
      self._evaluators.append(ev)

  @property
  def active(self) -> bool:
    return bool(self._evaluators and self._evaluators[0].eval_tasks)

  def evaluate(self, k: int, params, step: int):
    return self._evaluators[k].evaluate(params, step)


def train_members(members: Sequence[Member], group: str = '') -> int:
  """Trains the members together; returns the last step. Mirrors `runtime.train.train`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train as train_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  check_compatible(members)
  K = len(members)  # pylint: disable=invalid-name
  base = members[0].kwargs
  model = base['model']
  partitioner = base['partitioner'] or partitioning.PjitPartitioner(num_partitions=1)
  cfg = base['train_dataset_cfg']
  checkpoint_cfg = base['checkpoint_cfg']
  restore_cfg = checkpoint_cfg.restore if checkpoint_cfg else None
  save_cfg = checkpoint_cfg.save if checkpoint_cfg else None
  total_steps = int(base['total_steps'])
  relative_steps = base['relative_steps']
  eval_steps, eval_period = base['eval_steps'], base['eval_period']
  run_dirs = [fs.abspath(m.run_dir) for m in members]
  seeds = [int(m.kwargs['random_seed']) for m in members]
  train_lib._check_restore_path(restore_cfg)  # pylint: disable=protected-access
  init_path = train_lib._initial_path(restore_cfg)  # pylint: disable=protected-access

  layout = partitioner.get_data_layout(cfg.batch_size)
  fc = model.FEATURE_CONVERTER_CLS
  input_shapes, input_types = train_lib._input_shapes(  # pylint: disable=protected-access
      cfg, fc, layout.num_shards
  )
  builder = train_state_lib.StateBuilder(model, partitioner, input_shapes, input_types)
  keys = [jax.random.split(jax.random.PRNGKey(s)) for s in seeds]
  init_rngs = [k[0] for k in keys]
  trainer_rngs = jnp.stack([k[1] for k in keys])

  # Frozen parameters: as a separate run builds them (from the checkpoint, else the seeded init).
  params0 = train_lib._restore_params(  # pylint: disable=protected-access
      builder, restore_cfg, init_rngs[0], only_frozen=True
  )
  _, frozen = train_state_lib.split_params(params0, builder.is_trainable)
  del params0

  def initial_trainable(m: Member, rng):
    """Member m's initial trainable parameters, exactly as its separate run computes them."""
    mb = train_state_lib.StateBuilder(m.kwargs['model'], partitioner, input_shapes, input_types)

    def init(r):
      params = m.kwargs['model'].get_initial_variables(r, input_shapes, input_types)['params']
      return train_state_lib.split_params(params, mb.is_trainable)[0]

    trainable = jax.jit(init)(rng)  # only the trainable part is computed
    if init_path:
      # Matched against the whole model (the checkpoint also holds the frozen parameters, which
      # are the model's too, not unused ones), but only the trainable parameters are read.
      full = params_lib.flatten_params(mb.params_shape)
      full.update(params_lib.flatten_params(jax.device_get(trainable)))
      loaded = checkpoints.load_initial_params(
          init_path,
          params_lib.unflatten_params(full),
          assignment_map=restore_cfg.assignment_map,
          fallback_to_scratch=restore_cfg.fallback_to_scratch,
          dtype=restore_cfg.dtype,
          strict=restore_cfg.strict,
          only=mb.is_trainable,
          trainable=mb.is_trainable,
          allow_partial_frozen=restore_cfg.allow_partial_frozen,
      )
      trainable = train_state_lib.split_params(loaded, mb.is_trainable)[0]
    return trainable

  axes = builder.state_axes
  opt = model.optimizer_def
  latest = [checkpoints.latest_checkpoint_path(d) for d in run_dirs]
  resume_step = None
  if all(latest):
    resume_step = min(checkpoints.checkpoint_step(p) for p in latest)
  elif any(latest):
    logging.warning(
        'Only some runs of the group have checkpoints (a first save was interrupted): all start '
        'from the beginning.'
    )
  member_states = []
  data_start_step = batches_consumed = 0
  if resume_step is not None:
    logging.info('Resuming every run of the group from step %d.', resume_step)
    for m, d in zip(members, run_dirs):
      state = builder.build(
          train_state_lib.merge_params(initial_trainable(m, init_rngs[0]), frozen)
      )
      raw = checkpoints.restore_checkpoint(fs.join(d, f'checkpoint_{resume_step}'))
      member_states.append(checkpoints.restore_into_state(state, raw))
      data = raw.get('data', {})
    data_start_step = int(np.asarray(data.get('start_step', 0)))
    batches_consumed = int(np.asarray(data.get('batches_consumed', resume_step - data_start_step)))
    if relative_steps is not None:
      recorded = checkpoints.read_metadata(latest[0]).get('total_steps')
      total_steps = int(recorded) if recorded is not None else data_start_step + relative_steps
  else:
    initial_step = train_lib._initial_checkpoint_step(restore_cfg)  # pylint: disable=protected-access
    for k, m in enumerate(members):
      state = builder.build(
          train_state_lib.merge_params(initial_trainable(m, init_rngs[k]), frozen),
          step=initial_step,
      )
      if init_path:
        opt_state, _, _ = checkpoints.load_initial_optimizer_state(
            init_path, state.opt_state, assignment_map=restore_cfg.assignment_map
        )
        state = state.replace(opt_state=opt_state)
      member_states.append(state)
    data_start_step = initial_step
    if relative_steps is not None:
      total_steps = initial_step + relative_steps
    elif initial_step >= total_steps:
      raise ValueError(
          f'TRAIN_STEPS={total_steps} is not beyond the step of INITIAL_CHECKPOINT_PATH '
          f'({initial_step}); set TRAIN_STEPS_RELATIVE or a larger TRAIN_STEPS.'
      )
  for m, d in zip(members, run_dirs):
    fs.makedirs(d)
    fs.write_text(fs.join(d, 'config.gin'), m.config_text)

  stacked_axes = train_state_lib.TrainState(
      step=P(),
      trainable=_stacked_spec(axes.trainable),
      frozen=axes.frozen,
      opt_state=_stacked_spec(axes.opt_state),
  )
  shardings = partitioner.mesh_axes_to_sharding(stacked_axes)
  state = train_state_lib.TrainState(
      step=member_states[0].step,
      trainable=_stack([s.trainable for s in member_states]),
      frozen=member_states[0].frozen,
      opt_state=_stack([s.opt_state for s in member_states]),
  )
  state = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), state, shardings)
  del member_states
  lr_fns = [m.learning_rate_fn for m in members]
  nmb = members[0].num_microbatches

  def member_step(trainable, opt_state, frozen, step, batch, lr, base_rng):
    one = train_state_lib.TrainState(
        step=step, trainable=trainable, frozen=frozen, opt_state=opt_state
    )
    new, metrics = trainer_lib.train_with_lr(
        one, batch, lr, jax.random.fold_in(base_rng, step), model, nmb
    )
    return new.trainable, new.opt_state, metrics

  vstep = jax.vmap(member_step, in_axes=(0, 0, None, None, None, 0, 0))

  def train_step(st, batch, base_rngs):
    lrs = jnp.stack([jnp.asarray(fn(st.step), jnp.float32) for fn in lr_fns])
    trainable, opt_state, metrics = vstep(
        st.trainable, st.opt_state, st.frozen, st.step, batch, lrs, base_rngs
    )
    return st.replace(step=st.step + 1, trainable=trainable, opt_state=opt_state), metrics

  batch_spec = {k: partitioner.data_partition_spec for k in input_shapes}
  step_fn = partitioner.partition(
      train_step,
      in_axis_resources=(stacked_axes, batch_spec, None),
      out_axis_resources=(stacked_axes, None),
      donate_argnums=(0,),
  )

  def member_eval(trainable, frozen, batch):
    params = train_state_lib.merge_params(trainable, frozen)
    return metrics_lib.finalize_step(metrics_lib.as_metrics(model.eval_fn(params, batch)[1]))

  eval_fn = partitioner.partition(
      jax.vmap(member_eval, in_axes=(0, None, None)),
      in_axis_resources=(stacked_axes.trainable, axes.frozen, partitioner.data_partition_spec),
      out_axis_resources=None,
  )

  # Data: one pipeline, the data order of every member (checked equal).
  ds_seed = data_seed(members[0])
  train_ds = utils.get_dataset(
      cfg, layout.shard_id, layout.num_shards, fc, num_epochs=None, seed=ds_seed
  )
  if batches_consumed:
    train_ds = train_ds.skip(batches_consumed)
  train_iter = train_ds.as_numpy_iterator()
  train_eval_iters = {}
  if base['train_eval_dataset_cfg'] is not None and eval_steps:
    train_eval_iters = base['train_eval_get_dataset_fn'](
        base['train_eval_dataset_cfg'], layout.shard_id, layout.num_shards, eval_steps, fc
    )
  evaluator = None
  if base['infer_eval_dataset_cfg'] is not None:
    evaluator = _MemberEvaluator(
        base['infer_eval_dataset_cfg'],
        base['inference_evaluator_cls'],
        model,
        partitioner,
        run_dirs,
        builder.params_mesh_axes,
    )
    if not evaluator.active:
      evaluator = None

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  writers = [tf.summary.create_file_writer(fs.join(d, 'train')) for d in run_dirs]
  eval_writers: Dict[Tuple[int, str], Any] = {}
  params_shardings = partitioner.mesh_axes_to_sharding(builder.params_mesh_axes)

  def member_params(k: int):
    trainable = _index(state.trainable, k)
    params = train_state_lib.merge_params(trainable, state.frozen)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params, params_shardings)

  def run_evals(step: int) -> None:
    for name, ds in train_eval_iters.items():
      merged = None
      for batch in ds.as_numpy_iterator():
        m = jax.device_get(
            eval_fn(state.trainable, state.frozen, partitioner.shard_host_batch(batch))
        )
        merged = m if merged is None else metrics_lib.merge(merged, m)
      if merged is None:
        continue
      for k in range(K):
        scalars = metrics_lib.compute(_index(merged, k))
        key = (k, name)
        if key not in eval_writers:
          eval_writers[key] = tf.summary.create_file_writer(
              fs.join(run_dirs[k], 'training_eval', name)
          )
        trainer_lib.write_scalars(eval_writers[key], step, scalars)
        logging.info('training eval %s of %s at step %d: %s', name, members[k].name, step, scalars)
    if evaluator is not None:
      for k in range(K):
        results = evaluator.evaluate(k, member_params(k), step)
        for task, metrics in results.items():
          logging.info(
              'inference eval %s of %s at step %d: %s', task, members[k].name, step, metrics
          )

  period = save_cfg.period if save_cfg and save_cfg.period else None
  keep = save_cfg.keep if save_cfg else None
  checkpoint_steps = set(save_cfg.checkpoint_steps or ()) if save_cfg else set()

  def save() -> None:
    if save_cfg is None:
      return
    step = int(jax.device_get(state.step))
    for k, d in enumerate(run_dirs):
      one = train_state_lib.TrainState(
          step=state.step,
          trainable=_index(state.trainable, k),
          frozen=state.frozen,
          opt_state=_index(state.opt_state, k),
      )
      checkpoints.save_checkpoint(
          d,
          one,
          data_state={'batches_consumed': step - data_start_step, 'start_step': data_start_step},
          keep=None,  # older checkpoints go only once every run has this one (below)
          dtype=save_cfg.dtype,
          extra_metadata={
              'initial_checkpoint_path': str(restore_cfg.path) if restore_cfg else None,
              'random_seed': seeds[k],
              'total_steps': int(total_steps),
              'vectorized_group': group,
          },
      )
    if keep:
      for d in run_dirs:
        for old in checkpoints.all_steps(d)[:-keep]:
          fs.rmtree(fs.join(d, f'checkpoint_{old}'), missing_ok=True)

  host_step = int(jax.device_get(state.step))
  logging.info(
      'Vectorized job %s: %d runs (%s), step %d of %d.',
      group,
      K,
      ', '.join(m.name for m in members),
      host_step,
      total_steps,
  )
  if base['run_eval_before_training']:
    run_evals(host_step)
  log_period = 10
  pending = []
  t_last, step_last = time.time(), host_step
  while host_step < total_steps:
    try:
      batch = next(train_iter)
    except StopIteration:
      logging.warning('The training data ran out at step %d.', host_step)
      break
    state, metrics = step_fn(state, partitioner.shard_host_batch(batch), trainer_rngs)
    host_step += 1
    pending.append((host_step, metrics))
    boundary = (
        (period and host_step % period == 0)
        or host_step in checkpoint_steps
        or (eval_period and host_step % eval_period == 0)
        or host_step == total_steps
    )
    if host_step % log_period == 0 or boundary:
      now = time.time()
      losses = []
      for step, m in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
        for k in range(K):
          scalars = metrics_lib.compute(_index(m, k))
          trainer_lib.write_scalars(writers[k], step, scalars)
          if step == host_step:
            losses.append(scalars.get('loss', float('nan')))
      pending = []
      rate = (host_step - step_last) / max(now - t_last, 1e-9)
      timing = {
          'timing/steps_per_second': rate,
          'timing/seqs_per_second': rate * cfg.batch_size,
      }
      for w in writers:
        trainer_lib.write_scalars(w, host_step, timing)
      logging.info(
          'step %d/%d: loss per run %s | %.2f steps/s (%d runs), ETA %s',
          host_step,
          total_steps,
          '[' + ', '.join(f'{l:.4f}' for l in losses) + ']',
          rate,
          K,
          trainer_lib._fmt_eta((total_steps - host_step) / max(rate, 1e-9)),  # pylint: disable=protected-access
      )
      t_last, step_last = now, host_step
      if not all(np.isfinite(losses)):
        bad = [members[k].name for k, l in enumerate(losses) if not np.isfinite(l)]
        raise trainer_lib.NanLossError(
            f'The training loss of {bad} became NaN or infinite at step {host_step}; the last '
            'good checkpoints are kept. Lower the learning rate of those runs.'
        )
    if (period and host_step % period == 0) or host_step in checkpoint_steps:
      save()
    if eval_period and host_step % eval_period == 0 and host_step < total_steps:
      run_evals(host_step)
  if save_cfg is not None and host_step not in set(checkpoints.all_steps(run_dirs[-1])):
    save()
  if train_eval_iters or evaluator is not None:
    run_evals(host_step)
  for w in writers + list(eval_writers.values()):
    w.flush()
  return host_step


def main(argv: Sequence[str]) -> int:
  """`python -m prompt_tuning.sweeps.vectorized JOB.json`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  if len(argv) != 2:
    print('usage: python -m prompt_tuning.sweeps.vectorized JOB.json', file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    job = json.load(f)
  specs = job['members']
  member_flags = {json.dumps(s['flags']) for s in specs}
  if len(member_flags) != 1:
    print(
        'ERROR: the runs of a vectorized job must have the same command-line flags.',
        file=sys.stderr,
    )
    return 2
  launch.define_flags()
  flags.FLAGS([argv[0]] + list(specs[0]['flags']))
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.experimental.set_visible_devices([], 'GPU')
  if flags.FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top

    seqio.set_tfds_data_dir_override(flags.FLAGS.tfds_data_dir)
  if flags.FLAGS.seqio_additional_cache_dirs:
    import seqio  # pylint: disable=g-import-not-at-top

    seqio.add_global_cache_dirs(flags.FLAGS.seqio_additional_cache_dirs)
  search_paths = list(flags.FLAGS.gin_search_paths)
  traceback_wanted = bool(os.environ.get('PROMPT_TUNING_TRACEBACK'))
  try:
    members = [capture_member(s, search_paths) for s in specs]
    # The first member's configuration stays live while training (seqio loggers, length checks).
    _parse_member(specs[0], search_paths)
    launch.initialize_distributed()
    train_members(members, job.get('group', ''))
  except gin_utils.GinConfigError as e:
    if traceback_wanted:
      raise
    print(f'\nERROR: {e}', file=sys.stderr)
    return 2
  except launch._user_error_types() as e:  # pylint: disable=catching-non-exception,protected-access
    if traceback_wanted:
      raise
    print(f'\nERROR: {type(e).__name__}: {launch._message(e)}', file=sys.stderr)  # pylint: disable=protected-access
    return 1
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # first: it may restart the process
  launch.fast_shutdown()
  sys.exit(main(sys.argv))
