"""T5X-style training entry point: `python -m prompt_tuning.train --gin_file=... --gin.MODEL_DIR=...`.

`train(...)` keeps T5X's keyword arguments. Restore precedence: the latest complete checkpoint in
`model_dir` (trainable parameters, optimizer state, step, data position), else
`checkpoint_cfg.restore.path` (`INITIAL_CHECKPOINT_PATH`: a T5X, Hugging Face or our checkpoint), else a
fresh initialization. Frozen parameters always come from `INITIAL_CHECKPOINT_PATH` (or the seeded
initialization when there is none), so checkpoints hold only what training changes.

As in T5X, a run started from `INITIAL_CHECKPOINT_PATH` continues from that checkpoint's step, so
TRAIN_STEPS counts the pre-training steps (TRAIN_STEPS_RELATIVE counts only the new ones). A resumed
run skips the batches already consumed (recorded in the checkpoint) and reuses the recorded random
seed when RANDOM_SEED is unset, so it sees the same data and dropout as an uninterrupted run.
"""

import dataclasses
import functools
from absl import logging
import os
import re
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import flax.linen.partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from prompt_tuning import fs
from prompt_tuning.runtime import checkpoints
from prompt_tuning.runtime import faults
from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import inference
from prompt_tuning.runtime import models as models_lib
from prompt_tuning.runtime import partitioning
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime import trainer as trainer_lib
from prompt_tuning.runtime import utils

P = partitioning.PartitionSpec


def _input_shapes(cfg: utils.DatasetConfig, feature_converter_cls, num_shards: int):
  # The full padded shapes (with bucketing, the longest bucket): parameter shapes do not depend on
  # the lengths, and the train step is compiled for each bucket shape when it first occurs.
  cfg = dataclasses.replace(cfg, bucketing=None)
  ds = utils.get_dataset(cfg, 0, num_shards, feature_converter_cls, num_epochs=1)
  spec = ds.element_spec
  shapes = {k: (cfg.batch_size,) + tuple(v.shape[1:]) for k, v in spec.items()}
  types = {k: v.dtype.as_numpy_dtype for k, v in spec.items()}
  for k, s in shapes.items():
    if any(d is None for d in s):
      raise ValueError(f'Feature {k} has an unknown length; set TASK_FEATURE_LENGTHS.')
  return shapes, types


# The state builder lives with the train state (no seqio/TensorFlow import); re-exported here.
StateBuilder = train_state_lib.StateBuilder


def _initial_path(restore_cfg: Optional[utils.RestoreCheckpointConfig]) -> Optional[str]:
  """The checkpoint training starts from (`RestoreCheckpointConfig.path`; its first entry if a list)."""
  paths = restore_cfg.path if restore_cfg is not None else None
  if isinstance(paths, (list, tuple)):
    paths = paths[0] if paths else None
  return str(paths) if paths else None


def _restore_params(
    builder: StateBuilder,
    restore_cfg: Optional[utils.RestoreCheckpointConfig],
    init_rng,
    only_frozen: bool,
):
  """Initial parameters: from `restore_cfg.path` if set (with assignment_map, fallback), else fresh.

  Only the parameters the checkpoint does not give (a new prompt, a method's parameters) are
  initialized; the backbone's initializers are never run.
  """
  paths = _initial_path(restore_cfg)
  if not paths:
    return builder.init_params(init_rng)
  only = (lambda p: not builder.is_trainable(p)) if only_frozen else None
  logging.info('Restoring %s parameters from %s', 'frozen' if only_frozen else 'all', paths)
  return builder.restore_or_init_params(
      init_rng,
      lambda abstract: checkpoints.load_initial_params(
          paths,
          abstract,
          assignment_map=restore_cfg.assignment_map,
          fallback_to_scratch=restore_cfg.fallback_to_scratch,
          dtype=restore_cfg.dtype,
          strict=restore_cfg.strict,
          only=only,
          trainable=builder.is_trainable,
          allow_partial_frozen=restore_cfg.allow_partial_frozen,
      ),
  )


def train(
    *,
    model,
    train_dataset_cfg: utils.DatasetConfig,
    train_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    infer_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    checkpoint_cfg: utils.CheckpointConfig = utils.CheckpointConfig(),
    partitioner: Optional[partitioning.PjitPartitioner] = None,
    trainer_cls: Callable = trainer_lib.Trainer,
    model_dir: str,
    total_steps: int,
    eval_steps: int = 10,
    eval_period: int = 1000,
    relative_steps: Optional[int] = None,
    stats_period: Optional[int] = None,
    random_seed: Optional[int] = None,
    use_hardware_rng: bool = False,
    summarize_config_fn: Optional[Callable] = gin_utils.summarize_gin_config,
    inference_evaluator_cls=seqio.Evaluator,
    get_dataset_fn: Callable = utils.get_dataset,
    concurrent_metrics: bool = True,
    actions: Optional[Mapping[str, Sequence[trainer_lib.BaseAction]]] = None,
    train_eval_get_dataset_fn: Callable = utils.get_training_eval_datasets,
    run_eval_before_training: bool = False,
    use_orbax: bool = True,
    gc_period: int = 0,
    train_state_initializer_cls=None,
    verify_matching_vocabs_fn=None,
    on_train_end: Sequence[Callable[..., Any]] = (),
):
  """Trains `model` (T5X's `train.train`). Returns `(last_step, train_state)`.

  Before any work `MODEL_DIR` must be a writable directory that no other run is using (a lock file
  names the holder). Ctrl-C and SIGTERM end the run with one line naming the step and the last
  complete checkpoint; on SIGTERM (preemption) the current step is saved first.

  `on_train_end` callbacks are called once training is done, as
  `callback(model_dir=..., train_state=..., step=..., metrics=...)` (`metrics`: the final
  evaluation's results), e.g. `library.AddToLibrary` (configs/runs/add_to_library.gin).
  """
  kwargs = dict(locals())
  if model_dir is None:
    raise ValueError('MODEL_DIR is not set: pass --gin.MODEL_DIR="\'/path/to/model_dir\'".')
  model_dir = os.path.abspath(model_dir) if '://' not in model_dir else model_dir
  kwargs['model_dir'] = model_dir
  faults.check_output_dir(model_dir, 'MODEL_DIR')
  lock = _lock_model_dir(model_dir)
  progress: Dict[str, Any] = {'step': None}
  interrupts = faults.Interrupts()
  if jax.process_count() == 1:
    # Several processes must stop at the same step; they keep the default handlers.
    interrupts.install()
  try:
    return _train(interrupts=interrupts, progress=progress, **kwargs)
  except faults.TrainingInterrupted as e:
    steps = checkpoints.all_steps(model_dir)
    last = (steps[-1], fs.join(model_dir, f'checkpoint_{steps[-1]}')) if steps else None
    raise faults.TrainingInterrupted(
        e.signum, faults.interrupted_message(e.signum, progress['step'], last)
    ) from None
  finally:
    interrupts.restore()
    if lock is not None:
      lock.release()


def _lock_model_dir(model_dir: str) -> Optional[faults.RunLock]:
  """Process 0 locks MODEL_DIR for the whole job; every process fails if it cannot."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = faults.RunLock(model_dir).acquire()
    except faults.ModelDirInUseError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    ok = int(multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32)))
    if not ok and error is None:
      raise faults.ModelDirInUseError(
          f'MODEL_DIR {model_dir} is in use by another run (process 0 could not lock it).'
      )
  if error is not None:
    raise error
  if lock is not None and lock.took_over is None:
    logging.info('Locked MODEL_DIR %s (%s).', model_dir, lock.path)
  return lock


def _train(
    *,
    model,
    train_dataset_cfg: utils.DatasetConfig,
    train_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    infer_eval_dataset_cfg: Optional[utils.DatasetConfig] = None,
    checkpoint_cfg: utils.CheckpointConfig = utils.CheckpointConfig(),
    partitioner: Optional[partitioning.PjitPartitioner] = None,
    trainer_cls: Callable = trainer_lib.Trainer,
    model_dir: str,
    total_steps: int,
    eval_steps: int = 10,
    eval_period: int = 1000,
    relative_steps: Optional[int] = None,
    stats_period: Optional[int] = None,
    random_seed: Optional[int] = None,
    use_hardware_rng: bool = False,
    summarize_config_fn: Optional[Callable] = gin_utils.summarize_gin_config,
    inference_evaluator_cls=seqio.Evaluator,
    get_dataset_fn: Callable = utils.get_dataset,
    concurrent_metrics: bool = True,
    actions: Optional[Mapping[str, Sequence[trainer_lib.BaseAction]]] = None,
    train_eval_get_dataset_fn: Callable = utils.get_training_eval_datasets,
    run_eval_before_training: bool = False,
    use_orbax: bool = True,
    gc_period: int = 0,
    train_state_initializer_cls=None,
    verify_matching_vocabs_fn=None,
    on_train_end: Sequence[Callable[..., Any]] = (),
    interrupts: faults.Interrupts,
    progress: Dict[str, Any],
):
  """The body of `train` (MODEL_DIR checked and locked, signal handlers installed)."""
  del use_hardware_rng, concurrent_metrics, use_orbax, gc_period, train_state_initializer_cls
  del verify_matching_vocabs_fn
  if model_dir is None:
    raise ValueError('MODEL_DIR is not set: pass --gin.MODEL_DIR="\'/path/to/model_dir\'".')
  model_dir = os.path.abspath(model_dir) if '://' not in model_dir else model_dir
  partitioner = partitioner or partitioning.PjitPartitioner(num_partitions=1)
  restore_cfg = checkpoint_cfg.restore if checkpoint_cfg else None
  save_cfg = checkpoint_cfg.save if checkpoint_cfg else None
  if restore_cfg is not None and restore_cfg.mode == 'all':
    raise ValueError("RestoreCheckpointConfig.mode='all' is for evaluation, not training.")
  _check_restore_path(restore_cfg)
  # The newest checkpoint that reads back whole; damaged newer ones are moved aside.
  latest, raw_latest = checkpoints.restore_latest(model_dir)
  if random_seed is None and latest is not None:
    # A resumed run continues with the seed of the run it resumes, so the data order and the dropout
    # masks stay those of an uninterrupted run even when RANDOM_SEED was not set.
    random_seed = checkpoints.read_metadata(latest).get('random_seed')
    if random_seed is not None:
      logging.info('Resuming with the random seed %d recorded in %s.', random_seed, latest)
  if random_seed is None:
    random_seed = _broadcast_seed(int(time.time() * 1000) % (2**31))
    logging.warning(
        'No RANDOM_SEED given: using %d. Set RANDOM_SEED for reproducible runs (the training '
        'data order and dropout derive from it).',
        random_seed,
    )
  rng = jax.random.PRNGKey(random_seed)
  init_rng, trainer_rng = jax.random.split(rng)
  if model.optimizer_def is None:
    raise ValueError(
        'The model has no optimizer_def; bind models.EncoderDecoderModel.optimizer_def = %OPTIMIZER.'
    )

  layout = partitioner.get_data_layout(train_dataset_cfg.batch_size)
  fc = model.FEATURE_CONVERTER_CLS
  train_dataset_cfg, bucket_lengths = _fix_buckets(model, train_dataset_cfg, fc, latest)
  input_shapes, input_types = _input_shapes(train_dataset_cfg, fc, layout.num_shards)
  builder = StateBuilder(model, partitioner, input_shapes, input_types)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(builder.trainable_shape))
  n_all = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(builder.params_shape))
  logging.info(
      'Trainable parameters: %d of %d (%.4f%%): %s',
      n_train,
      n_all,
      100.0 * n_train / max(n_all, 1),
      ', '.join(train_state_lib.flatten(builder.trainable_shape))[:500],
  )

  if latest is not None:
    logging.info('Resuming from %s', latest)
    params = _restore_params(builder, restore_cfg, init_rng, only_frozen=True)
    state = builder.build(params)
    raw = raw_latest
    state = checkpoints.restore_into_state(state, raw)
    state = jax.tree_util.tree_map(
        partitioning.device_put_owned,
        state,
        partitioner.mesh_axes_to_sharding(builder.state_axes),
    )
    data = raw.get('data', {})
    data_start_step = int(np.asarray(data.get('start_step', 0)))
    batches_consumed = int(
        np.asarray(data.get('batches_consumed', int(state.step) - data_start_step))
    )
    if relative_steps is not None:
      recorded = checkpoints.read_metadata(latest).get('total_steps')
      total_steps = int(recorded) if recorded is not None else data_start_step + relative_steps
  else:
    params = _restore_params(builder, restore_cfg, init_rng, only_frozen=False)
    # As in T5X, training continues from the step of the initial checkpoint: TRAIN_STEPS counts the
    # pre-training steps (e.g. 1_100_000 + 30_000 for 30k steps on an LM-adapted checkpoint).
    initial_step = _initial_checkpoint_step(restore_cfg)
    state = builder.build(params, step=initial_step)
    if _initial_path(restore_cfg):
      # As T5X restoring a train state: optimizer slots the checkpoint holds (a T5X checkpoint's
      # Adafactor statistics, when model tuning continues from it) are restored too.
      opt_state, _, _ = checkpoints.load_initial_optimizer_state(
          _initial_path(restore_cfg), state.opt_state, assignment_map=restore_cfg.assignment_map
      )
      state = state.replace(opt_state=opt_state)
    data_start_step = initial_step
    batches_consumed = 0
    if relative_steps is not None:
      total_steps = initial_step + relative_steps
    elif initial_step >= total_steps:
      raise ValueError(
          f'TRAIN_STEPS={total_steps} is not beyond the step of INITIAL_CHECKPOINT_PATH ({initial_step}): as '
          'in T5X, TRAIN_STEPS includes the pre-training steps. Set TRAIN_STEPS to '
          f'{initial_step} + the number of steps to train (e.g. {initial_step + 1000}), or set '
          'TRAIN_STEPS_RELATIVE instead.'
      )
    if initial_step:
      logging.info(
          'Starting at step %d, the step of the initial checkpoint; training until step %d.',
          initial_step,
          total_steps,
      )
  host_step = int(jax.device_get(state.step))
  progress['step'] = host_step
  if host_step >= total_steps:
    logging.info(
        'Step %d already reaches total_steps=%d; nothing to train.', host_step, total_steps
    )

  ds_seed = train_dataset_cfg.seed if train_dataset_cfg.seed is not None else random_seed
  train_ds = (
      get_dataset_fn(
          train_dataset_cfg, layout.shard_id, layout.num_shards, fc, num_epochs=None, seed=ds_seed
      )
      if get_dataset_fn is utils.get_dataset
      else get_dataset_fn(train_dataset_cfg, layout.shard_id, layout.num_shards, fc)
  )
  if batches_consumed:
    train_ds = train_ds.skip(batches_consumed)
  train_iter = train_ds.as_numpy_iterator()

  train_eval_iters = {}
  if train_eval_dataset_cfg is not None and eval_steps:
    train_eval_iters = train_eval_get_dataset_fn(
        train_eval_dataset_cfg, layout.shard_id, layout.num_shards, eval_steps, fc
    )
  evaluator = None
  if infer_eval_dataset_cfg is not None:
    evaluator = inference.InferenceEvaluator(
        infer_eval_dataset_cfg,
        inference_evaluator_cls,
        model,
        partitioner,
        log_dir=model_dir,
        params_axes=builder.params_mesh_axes,
    )
    if not evaluator.eval_tasks:
      evaluator = None

  trainer = trainer_cls(
      model=model,
      train_state=state,
      partitioner=partitioner,
      eval_names=list(train_eval_iters),
      summary_dir=model_dir,
      train_state_axes=builder.state_axes,
      rng=trainer_rng,
  )
  if summarize_config_fn is not None and jax.process_index() == 0:
    summarize_config_fn(model_dir, None, host_step)
  actions = actions or {}
  nan_action = trainer_lib.TerminateOnNanAction()

  period = save_cfg.period if save_cfg and save_cfg.period else None
  keep = save_cfg.keep if save_cfg else None
  save_dtype = save_cfg.dtype if save_cfg else None
  checkpoint_steps = set(save_cfg.checkpoint_steps or ()) if save_cfg else set()

  def save(step_state):
    if save_cfg is None:
      return
    step = int(jax.device_get(step_state.step))
    exports = None
    if save_cfg.export_fn is not None:
      exports = save_cfg.export_fn(model, step_state.params)
    with interrupts.deferred():  # A signal during a save stops the run once the save is done.
      checkpoints.save_checkpoint(
          model_dir,
          step_state,
          data_state={'batches_consumed': step - data_start_step, 'start_step': data_start_step},
          keep=keep,
          dtype=save_dtype,
          extra_metadata={
              'initial_checkpoint_path': str(restore_cfg.path) if restore_cfg else None,
              'random_seed': int(random_seed),
              'total_steps': int(total_steps),
              **({'train_bucket_lengths': bucket_lengths} if bucket_lengths else {}),
          },
          numpy_exports=exports,
      )

  def run_evals(step):
    results = {}
    if train_eval_iters:
      results.update(
          trainer.eval({k: v.as_numpy_iterator() for k, v in train_eval_iters.items()}, step)
      )
    if evaluator is not None:
      infer = evaluator.evaluate(trainer.train_state.params, step)
      for task, metrics in infer.items():
        logging.info('inference eval %s at step %d: %s', task, step, metrics)
      results.update({f'infer_eval/{k}': v for k, v in infer.items()})
    for mode, acts in actions.items():
      mode_name = mode.name if hasattr(mode, 'name') else str(mode)
      if mode_name in ('TRAIN_EVAL', 'INFER_EVAL'):
        for a in acts:
          if a.run(trainer.train_state, results):
            trainer.stop_training = True
    return results

  interrupts.on_stop = lambda: setattr(trainer, 'stop_training', True)
  try:
    _loop(
        trainer=trainer,
        train_iter=train_iter,
        host_step=host_step,
        total_steps=total_steps,
        run_evals=run_evals,
        run_eval_before_training=run_eval_before_training,
        save=save,
        eval_period=eval_period,
        period=period,
        checkpoint_steps=checkpoint_steps,
        actions=actions,
        nan_action=nan_action,
        model_dir=model_dir,
        interrupts=interrupts,
        progress=progress,
        model=model,
        train_dataset_cfg=train_dataset_cfg,
    )
  except faults.TrainingInterrupted as e:
    # As T5X on preemption: SIGTERM saves the current step first (a Ctrl-C does not).
    step = int(jax.device_get(trainer.train_state.step))
    progress['step'] = step
    if e.signum == signal.SIGTERM and save_cfg is not None and step not in all_saved(model_dir):
      logging.warning('SIGTERM: saving step %d before exiting.', step)
      save(trainer.train_state)
    raise
  host_step = progress['step']
  if save_cfg is not None and host_step not in all_saved(model_dir):
    save(trainer.train_state)
  final_metrics = run_evals(host_step) if (train_eval_iters or evaluator) else {}
  trainer.final_metrics = final_metrics
  trainer.close()
  for callback in on_train_end or ():
    callback(
        model_dir=model_dir, train_state=trainer.train_state, step=host_step, metrics=final_metrics
    )
  return host_step, trainer.train_state


def _loop(
    *,
    trainer,
    train_iter,
    host_step: int,
    total_steps: int,
    run_evals: Callable,
    run_eval_before_training: bool,
    save: Callable,
    eval_period: int,
    period: Optional[int],
    checkpoint_steps,
    actions,
    nan_action,
    model_dir: str,
    interrupts: faults.Interrupts,
    progress: Dict[str, Any],
    model,
    train_dataset_cfg: utils.DatasetConfig,
) -> None:
  """Trains from `host_step` to `total_steps` with the evals and saves in between."""
  if run_eval_before_training:
    run_evals(host_step)
  periods = [p for p in (eval_period, period) if p]
  extra_stops = sorted(checkpoint_steps)
  while host_step < total_steps and not trainer.stop_training:
    # Train up to the next step at which something happens (an eval, a checkpoint or the end).
    stops = [(host_step // p + 1) * p for p in periods] + [s for s in extra_stops if s > host_step]
    n = min(stops + [total_steps]) - host_step
    try:
      with interrupts.deferred():  # A signal stops training after the current step.
        summary = trainer.train(train_iter, n, start_step=host_step, total_steps=total_steps)
      nan_action.run(trainer.train_state, {'train': summary})
    except trainer_lib.NanLossError as e:
      last_good = checkpoints.latest_checkpoint_path(model_dir)
      raise trainer_lib.NanLossError(
          f'{e} Last good checkpoint: {last_good or "none (no checkpoint was written yet)"}.'
      ) from None
    except models_lib.ConditioningFeatureError as e:
      raise _name_the_task(e, model, train_dataset_cfg) from None
    new_step = int(jax.device_get(trainer.train_state.step))
    progress['step'] = new_step
    interrupts.check()
    if new_step == host_step:
      logging.warning(
          'The training data ran out at step %d (before TRAIN_STEPS=%d).', host_step, total_steps
      )
      break
    for mode, acts in actions.items():
      if (mode.name if hasattr(mode, 'name') else str(mode)) == 'TRAIN':
        for a in acts:
          if a.run(trainer.train_state, {'train': summary}):
            trainer.stop_training = True
    host_step = int(jax.device_get(trainer.train_state.step))
    if (period and host_step % period == 0) or host_step in checkpoint_steps:
      save(trainer.train_state)
      interrupts.check()
    if eval_period and host_step % eval_period == 0 and host_step < total_steps:
      run_evals(host_step)
  progress['step'] = host_step


def _name_the_task(
    error: Exception, model, cfg: utils.DatasetConfig
) -> models_lib.ConditioningFeatureError:
  """The error of an out-of-range id in a training batch, naming the task(s) that hold it."""
  from prompt_tuning.data import feature_converters  # pylint: disable=g-import-not-at-top

  found = feature_converters.out_of_range_ids(
      cfg.mixture_or_task_name, cfg.split, model.conditioning_feature_sizes()
  )
  if not found:
    return models_lib.ConditioningFeatureError(str(error))
  task, name, values = found[0]
  size = model.conditioning_feature_sizes()[name]
  message = models_lib.out_of_range_message(name, values[0], size, task, values)
  others = [t for t, _, _ in found[1:]]
  if others:
    message += f' Other tasks with out-of-range ids: {", ".join(others)}.'
  return models_lib.ConditioningFeatureError(message)


def _fix_buckets(model, cfg: utils.DatasetConfig, feature_converter_cls, latest: Optional[str]):
  """Fixes the training bucket lengths for the whole run: `(cfg, lengths or None)`.

  A resumed run reuses the lengths recorded in its checkpoint (so it skips its consumed batches in
  exactly the stream it trained on, even if the data or the choice of lengths changed since);
  otherwise they are resolved now (given, or chosen from the data) and recorded at every save.
  """
  if cfg.bucketing is None:
    return cfg, None
  from prompt_tuning.data import bucketing  # pylint: disable=g-import-not-at-top

  recorded = checkpoints.read_metadata(latest).get('train_bucket_lengths') if latest else None
  if recorded:
    config = dataclasses.replace(
        cfg.bucketing, lengths={k: list(v) for k, v in recorded.items()}, features=tuple(recorded)
    )
    cfg = dataclasses.replace(cfg, bucketing=config)
    logging.info('Resuming with the training bucket lengths recorded in %s: %s', latest, recorded)
  buckets = utils.resolve_buckets(cfg, feature_converter_cls)
  if 'targets' in buckets.features:
    factor = model.loss_normalizing_factor
    name = getattr(factor, 'name', factor)
    if isinstance(name, str) and name.upper() == 'NUM_TOTAL_TARGET_TOKENS':
      raise bucketing.BucketError(
          "Bucketing 'targets' changes the padded target length, by which the loss is normalized "
          '(loss_normalizing_factor = NUM_TOTAL_TARGET_TOKENS), so the loss would change with the '
          "bucket. Bucket only 'inputs' (bucketing.BucketConfig.features = ['inputs']) or "
          "normalize by 'NUM_REAL_TARGET_TOKENS'."
      )
  logging.info(
      'Training with length buckets %s (at most %d compiled shapes of the train step).',
      buckets.describe(),
      buckets.num_shapes,
  )
  return utils.with_buckets(cfg, buckets), buckets.as_json()


def all_saved(model_dir):
  return set(checkpoints.all_steps(model_dir))


def _broadcast_seed(seed: int) -> int:
  """Process 0's seed on every process (T5X broadcasts the time-based seed the same way)."""
  if jax.process_count() == 1:
    return seed
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return int(multihost_utils.broadcast_one_to_all(np.asarray(seed, np.int32)))


def _initial_checkpoint_step(restore_cfg: Optional[utils.RestoreCheckpointConfig]) -> int:
  path = _initial_path(restore_cfg)
  return int(checkpoints.checkpoint_step(path) or 0) if path else 0


def _check_restore_path(restore_cfg: Optional[utils.RestoreCheckpointConfig]) -> None:
  """Fails before any compilation when INITIAL_CHECKPOINT_PATH points nowhere."""
  if restore_cfg is None or not restore_cfg.path:
    return
  paths = restore_cfg.path if isinstance(restore_cfg.path, (list, tuple)) else [restore_cfg.path]
  for path in paths:
    if not checkpoints.path_exists(str(path)):
      raise FileNotFoundError(
          f'INITIAL_CHECKPOINT_PATH {str(path)!r} does not exist. Point --gin.INITIAL_CHECKPOINT_PATH '
          '(utils.RestoreCheckpointConfig.path) at a T5X checkpoint_<step> directory, a Hugging Face T5 '
          'directory or one of our checkpoint_<step> directories; to train from scratch instead, bind '
          'utils.CheckpointConfig.restore = None.'
      )
