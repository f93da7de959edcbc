"""T5X's `utils` vocabulary: dataset/checkpoint configs, learning-rate schedules and dataset helpers."""

import dataclasses
import importlib
from absl import logging
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.data import bucketing as bucketing_lib
from prompt_tuning.runtime.schedules import create_learning_rate_scheduler  # pylint: disable=unused-import


@dataclasses.dataclass
class DatasetConfig:
  """Configuration for one seqio dataset (T5X's `utils.DatasetConfig`). `batch_size` is global."""

  mixture_or_task_name: Union[str, seqio.Task, seqio.Mixture]
  task_feature_lengths: Optional[Mapping[str, int]]
  split: str
  batch_size: int
  shuffle: bool
  seed: Optional[int]
  use_cached: bool = False
  pack: bool = False
  use_custom_packing_ops: bool = False
  module: Optional[str] = None
  use_memory_cache: bool = True
  trim_output_features: bool = True
  # Not in T5X. False (default): with several processes, every process reads the same global stream and
  # keeps its own rows of each global batch, so a run's batches (and losses) do not depend on the number
  # of processes. True: T5X's behaviour, each process reads only its shard of the data source (cheaper
  # for huge corpora, but the data order then depends on the process count).
  shard_data_source: bool = False
  # Not in T5X. Length-bucketed batches (`prompt_tuning.data.bucketing.BucketConfig`; see
  # configs/runs/bucketing.gin): each batch is padded to one of a few lengths chosen from the data
  # instead of TASK_FEATURE_LENGTHS. None (default): T5X's fixed padding.
  bucketing: Optional[bucketing_lib.BucketConfig] = None


@dataclasses.dataclass
class SaveCheckpointConfig:
  """When and what to save (T5X's `utils.SaveCheckpointConfig`)."""

  dtype: str = 'float32'
  period: Optional[int] = None
  checkpoint_steps: Optional[Sequence[int]] = None
  keep: Optional[int] = None
  keep_dataset_checkpoints: Optional[int] = None
  save_dataset: bool = False
  checkpointer_cls: Any = None
  state_transformation_fns: Sequence[Callable] = ()
  checkpoint_manager_cls: Any = None
  # Not in T5X. `export_fn(model, params) -> {path: array}`: the arrays each save writes as `.npy`
  # under MODEL_DIR/numpy_checkpoints/checkpoint_<step>/ (`path` with '/' -> '.'), instead of the
  # trainable parameters whose path contains 'prompt'. A method whose trained parameters are not
  # what inference needs (P-tuning's reparameterisation network, prefix tuning's projection)
  # exports the inference parameters it computes from them.
  export_fn: Optional[Callable[[Any, Any], Mapping[str, Any]]] = None


@dataclasses.dataclass
class RestoreCheckpointConfig:
  """What to restore (T5X's `utils.RestoreCheckpointConfig`).

  `path` may be a T5X legacy checkpoint, a Hugging Face T5 directory or one of our orbax checkpoints
  (recognised automatically). `assignment_map` is a sequence of `(regex, replacement_or_None)`: a
  parameter whose path matches a regex mapped to `None` is not read from the checkpoint (with
  `fallback_to_scratch=True` it keeps its initializer's value, e.g. the prompt).

  Only trained parameters (those the optimizer's `trainable_filter` selects: the prompt, a method's
  parameters) and those `assignment_map` maps to `None` may start from their initializer. A frozen
  parameter missing from the checkpoint, or a checkpoint parameter the model does not have, is an
  error naming the likely cause (T5 1.0 vs 1.1, the size gin) unless `allow_partial_frozen` (not in
  T5X) is set on purpose.
  """

  path: Union[str, Sequence[str], None]
  mode: str = 'latest'
  assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None
  strict: bool = True
  fallback_to_scratch: bool = False
  dtype: Optional[str] = None
  restore_dataset: bool = False
  checkpointer_cls: Any = None
  state_transformation_fns: Sequence[Callable] = ()
  checkpoint_manager_cls: Any = None
  allow_partial_frozen: bool = False

  def __post_init__(self):
    if self.mode not in ('specific', 'latest', 'all'):
      raise ValueError(
          f"RestoreCheckpointConfig.mode must be 'specific', 'latest' or 'all', got {self.mode!r}."
      )


@dataclasses.dataclass
class CheckpointConfig:
  save: Optional[SaveCheckpointConfig] = None
  restore: Optional[RestoreCheckpointConfig] = None


def import_module(module: Optional[str]) -> None:
  if module:
    importlib.import_module(module)


def get_mixture_or_task(name_or_obj) -> Union[seqio.Task, seqio.Mixture]:
  """Looks up a task or mixture with an error that lists what is registered."""
  if isinstance(name_or_obj, (seqio.Task, seqio.Mixture)):
    return name_or_obj
  try:
    return seqio.get_mixture_or_task(name_or_obj)
  except ValueError:
    import difflib  # pylint: disable=g-import-not-at-top

    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(str(name_or_obj), names, n=5)
    hint = f' Close matches: {close}.' if close else ''
    raise ValueError(
        f'Unknown seqio task or mixture {name_or_obj!r}.{hint} Import the module that registers it, e.g. '
        f'--gin.MIXTURE_OR_TASK_MODULE="\'tasks.glue\'" or an `import tasks.glue` line in your gin file '
        f'({len(names)} tasks/mixtures are registered now).'
    ) from None


def get_vocabulary(cfg: DatasetConfig) -> Tuple[seqio.Vocabulary, seqio.Vocabulary]:
  import_module(cfg.module)
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  features = provider.output_features
  return (
      features['inputs'].vocabulary if 'inputs' in features else features['targets'].vocabulary,
      features['targets'].vocabulary,
  )


class FeatureLengthError(ValueError):
  """TASK_FEATURE_LENGTHS is missing a feature or would cut targets short."""


def _check_lengths(cfg: DatasetConfig, feature_converter) -> None:
  """Every feature the converter needs has a length (seqio would fail deep inside tf.data otherwise)."""
  if cfg.task_feature_lengths is None:
    return
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  needed = set(getattr(feature_converter, 'TASK_FEATURES', None) or ())
  features = provider.output_features
  missing = sorted(k for k in features if k in needed and k not in cfg.task_feature_lengths)
  if missing:
    example = {
        k: cfg.task_feature_lengths.get(k, 512 if k == 'inputs' else 16)
        for k in sorted(needed)
        if k in features
    }
    raise FeatureLengthError(
        f'TASK_FEATURE_LENGTHS {dict(cfg.task_feature_lengths)} has no length for feature(s) {missing} of '
        f'{provider.name!r}. Give every feature a length, e.g. --gin.TASK_FEATURE_LENGTHS="{example}".'
    )


_LENGTHS_CHECKED = set()


@gin.configurable(module='prompt_tuning.runtime.utils')
def check_feature_lengths(
    cfg: DatasetConfig, max_examples: int = 256, error_features: Sequence[str] = ('targets',)
) -> None:
  """Fails when TASK_FEATURE_LENGTHS would silently cut targets short.

  seqio trims every feature to its length without a word; for targets this drops the EOS (or, with
  `append_eos_after_trim`, the end of the answer), so the model learns and is scored on truncated
  labels. The first `max_examples` examples of each task (untrimmed) are measured: a feature in
  `error_features` that is longer than its length is an error, any other (e.g. `inputs`) a warning.
  `--gin.utils.check_feature_lengths.max_examples=0` turns the check off.
  """
  lengths = cfg.task_feature_lengths
  if not lengths or not max_examples:
    return
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    key = (task.name, cfg.split, tuple(sorted(lengths.items())), max_examples)
    if key in _LENGTHS_CHECKED:
      continue
    _LENGTHS_CHECKED.add(key)
    try:
      if cfg.split not in task.splits:
        continue
      ds = task.get_dataset(
          sequence_length=None,
          split=cfg.split,
          shuffle=False,
          num_epochs=1,
          use_cached=cfg.use_cached,
          trim_output_features=False,
      )
      longest: dict = {}
      for ex in ds.take(max_examples).as_numpy_iterator():
        for k in lengths:
          v = ex.get(k)
          if v is not None and getattr(v, 'ndim', 0) >= 1:
            longest[k] = max(longest.get(k, 0), int(v.shape[0]))
    except Exception as e:  # pylint: disable=broad-except
      # Some preprocessors need the lengths (e.g. span corruption); their outputs fit by construction.
      logging.info('Skipping the length check of %s (%s: %s).', task.name, type(e).__name__, e)
      continue
    too_long = {k: n for k, n in longest.items() if n > lengths[k]}
    for k, n in sorted(too_long.items()):
      if k in error_features:
        raise FeatureLengthError(
            f'TASK_FEATURE_LENGTHS[{k!r}] = {lengths[k]} is too short for task {task.name!r} ({cfg.split} '
            f'split): some {k} have {n} tokens including EOS, so seqio would cut them and drop the EOS. '
            f'Raise it, e.g. --gin.TASK_FEATURE_LENGTHS="{dict(lengths, **{k: n})}" (or turn this check off '
            'with --gin.utils.check_feature_lengths.max_examples=0 to truncate on purpose).'
        )
      logging.warning(
          'TASK_FEATURE_LENGTHS[%r] = %d truncates some %s of task %s (up to %d tokens seen).',
          k,
          lengths[k],
          k,
          task.name,
          n,
      )


def get_dataset(
    cfg: DatasetConfig,
    shard_id: int,
    num_shards: int,
    feature_converter_cls,
    num_epochs: Optional[int] = None,
    continue_from_last_checkpoint: bool = False,
    seed: Optional[int] = None,
) -> tf.data.Dataset:
  """Host-local batched dataset (T5X's `utils.get_dataset`); batch size is `cfg.batch_size // num_shards`."""
  del continue_from_last_checkpoint
  import_module(cfg.module)
  if cfg.batch_size % num_shards:
    raise ValueError(
        f'Batch size ({cfg.batch_size}) must be divisible by the number of shards ({num_shards}).'
    )
  feature_converter = feature_converter_cls(
      pack=cfg.pack, use_custom_packing_ops=cfg.use_custom_packing_ops
  )
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  try:
    splits = list(provider.splits)
  except Exception:  # pylint: disable=broad-except
    splits = None  # e.g. TFDS metadata that is not available yet; seqio reports it below.
  if splits is not None and cfg.split not in splits:
    raise ValueError(
        f'{provider.name!r} has no split {cfg.split!r} (it has {splits}); set the DatasetConfig '
        'split to one of them.'
    )
  _check_lengths(cfg, feature_converter)
  if cfg.trim_output_features:
    check_feature_lengths(cfg)
  ds_seed = cfg.seed if cfg.seed is not None else seed
  slice_batches = num_shards > 1 and not cfg.shard_data_source
  if cfg.bucketing is not None:
    return _get_bucketed_dataset(cfg, shard_id, num_shards, feature_converter, num_epochs, ds_seed)
  shard_info = None if slice_batches else seqio.ShardInfo(index=shard_id, num_shards=num_shards)
  batch_size = cfg.batch_size if slice_batches else cfg.batch_size // num_shards
  passthrough = list(getattr(feature_converter, 'conditioning_features', ()) or ())
  if isinstance(provider, seqio.Mixture) and passthrough:
    # seqio.get_dataset drops a mixture's features other than its output features: keep the
    # per-example conditioning features (a prompt bank's `prompt_ids`), as a Task keeps them.
    ds = provider.get_dataset(
        cfg.task_feature_lengths,
        split=cfg.split,
        use_cached=cfg.use_cached,
        shuffle=cfg.shuffle,
        seed=ds_seed,
        shard_info=shard_info,
        num_epochs=num_epochs,
        passthrough_features=passthrough,
        trim_output_features=cfg.trim_output_features,
    )
    ds = feature_converter(ds, task_feature_lengths=cfg.task_feature_lengths)
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = seqio.get_dataset(
        mixture_or_task_name=cfg.mixture_or_task_name,
        task_feature_lengths=cfg.task_feature_lengths,
        dataset_split=cfg.split,
        shuffle=cfg.shuffle,
        num_epochs=num_epochs,
        feature_converter=feature_converter,
        shard_info=shard_info,
        use_cached=cfg.use_cached,
        seed=ds_seed,
        trim_output_features=cfg.trim_output_features,
        batch_size=batch_size,
    )
  if slice_batches:
    local = cfg.batch_size // num_shards
    lo = shard_id * local
    ds = ds.map(lambda b: {k: v[lo : lo + local] for k, v in b.items()})
  return ds


# Seed of the shuffled read whose first examples choose the bucket lengths: fixed, so that every
# process and every (resumed) run of the same data choose the same lengths.
BUCKET_SAMPLE_SEED = 0


def _check_bucketing(cfg: DatasetConfig, num_shards: int) -> None:
  if cfg.pack:
    raise bucketing_lib.BucketError(
        'Length bucketing and packing do not combine (packing already fills the rows with several '
        'examples; prompt tuning needs one example per row). Set pack=False '
        '(utils.DatasetConfig.pack = False) or drop utils.DatasetConfig.bucketing.'
    )
  if num_shards > 1 and cfg.shard_data_source:
    raise bucketing_lib.BucketError(
        'Length bucketing needs every process to read the same global stream (so that all pick the '
        'same bucket at every step), but shard_data_source=True gives each process its own shard. '
        'Set utils.DatasetConfig.shard_data_source = False, or drop utils.DatasetConfig.bucketing.'
    )


def _converted(
    cfg: DatasetConfig, feature_converter, *, shuffle, seed, num_epochs, shard_info=None
):
  """The feature-converted, unbatched examples of `cfg`."""
  return seqio.get_dataset(
      mixture_or_task_name=cfg.mixture_or_task_name,
      task_feature_lengths=cfg.task_feature_lengths,
      dataset_split=cfg.split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      feature_converter=feature_converter,
      shard_info=shard_info,
      use_cached=cfg.use_cached,
      seed=seed,
      trim_output_features=cfg.trim_output_features,
      batch_size=None,
  )


def resolve_buckets(cfg: DatasetConfig, feature_converter_cls) -> bucketing_lib.Buckets:
  """The bucket lengths of `cfg.bucketing` for `cfg`'s data (explicit, or chosen from a sample).

  The sample is the first `sample_size` examples of the split read in a shuffled order with a
  fixed seed (`BUCKET_SAMPLE_SEED`), the same in every process and every run.
  """
  import_module(cfg.module)
  config = cfg.bucketing
  if config is None:
    raise ValueError('resolve_buckets needs a DatasetConfig with bucketing.')
  _check_bucketing(cfg, 1)
  if not cfg.task_feature_lengths:
    raise bucketing_lib.BucketError(
        'Length bucketing of a training dataset needs TASK_FEATURE_LENGTHS (the longest bucket of '
        'each feature is its TASK_FEATURE_LENGTHS entry).'
    )
  feature_converter = feature_converter_cls(pack=False, use_custom_packing_ops=False)
  spec = _converted(
      cfg, feature_converter, shuffle=False, seed=BUCKET_SAMPLE_SEED, num_epochs=1
  ).element_spec
  groups = bucketing_lib.model_feature_groups(k for k, v in spec.items() if v.shape.rank >= 1)
  full = {f: int(spec[names[0]].shape[-1]) for f, names in groups.items()}
  features = config.bucketed_features(list(groups))
  need = [f for f in features if not (config.lengths and f in config.lengths)]
  sample = None
  if need:
    ds = _converted(cfg, feature_converter, shuffle=True, seed=BUCKET_SAMPLE_SEED, num_epochs=1)
    sample = {f: [] for f in need}
    for batch in ds.take(config.sample_size).batch(256).as_numpy_iterator():
      for f in need:
        sample[f].append(bucketing_lib.row_lengths(batch, groups[f]))
    sample = {f: np.concatenate(v) if v else np.zeros((0,), np.int64) for f, v in sample.items()}
  buckets = bucketing_lib.resolve(config, full, {f: groups[f] for f in groups}, sample)
  multihost_assert_equal(
      np.asarray([n for f in buckets.features for n in buckets.lengths[f]], np.int32),
      'The bucket lengths differ between processes.',
  )
  return buckets


def with_buckets(cfg: DatasetConfig, buckets: bucketing_lib.Buckets) -> DatasetConfig:
  """`cfg` with its bucket lengths fixed to `buckets` (no sampling when it is read)."""
  config = dataclasses.replace(
      cfg.bucketing, lengths=buckets.as_json(), features=tuple(buckets.features)
  )
  return dataclasses.replace(cfg, bucketing=config)


def _get_bucketed_dataset(
    cfg: DatasetConfig, shard_id: int, num_shards: int, feature_converter, num_epochs, seed
):
  """`get_dataset` with length buckets: the global stream, bucketed, then this process's rows."""
  _check_bucketing(cfg, num_shards)
  buckets = resolve_buckets(cfg, type(feature_converter))
  logging.info(
      'Length buckets of %s (%s split): %s (at most %d padded shapes).',
      getattr(cfg.mixture_or_task_name, 'name', cfg.mixture_or_task_name),
      cfg.split,
      buckets.describe(),
      buckets.num_shapes,
  )
  ds = _converted(cfg, feature_converter, shuffle=cfg.shuffle, seed=seed, num_epochs=num_epochs)
  ds = bucketing_lib.bucket_batches(
      ds,
      buckets,
      cfg.batch_size,
      shuffle_window=cfg.bucketing.shuffle_window if cfg.shuffle else 0,
      seed=seed,
  )
  if num_shards > 1:
    local = cfg.batch_size // num_shards
    lo = shard_id * local
    ds = ds.map(lambda b: {k: v[lo : lo + local] for k, v in b.items()})
  return ds


def get_training_eval_datasets(
    cfg: DatasetConfig, shard_id: int, num_shards: int, eval_steps: int, feature_converter_cls
) -> Mapping[str, tf.data.Dataset]:
  """Teacher-forced eval datasets, one per task of a mixture (plus the mixture itself)."""
  import_module(cfg.module)
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  names = (
      [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]
  )
  out = {}
  for name in names + ([provider.name] if isinstance(provider, seqio.Mixture) else []):
    task = seqio.get_mixture_or_task(name)
    if cfg.split not in task.splits:
      logging.info('Task %s has no split %s; skipping its training eval.', name, cfg.split)
      continue
    sub = dataclasses.replace(cfg, mixture_or_task_name=name)
    ds = get_dataset(sub, shard_id, num_shards, feature_converter_cls, num_epochs=None)
    out[name] = ds.take(eval_steps).cache() if eval_steps else ds
  return out


def batch_to_numpy(batch: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}


def round_vocab_size_to_multiple(vocabulary: seqio.Vocabulary, divisor: int = 128) -> int:
  size = vocabulary.vocab_size
  return size + (-size) % divisor


def multihost_assert_equal(value: Any, message: str = '') -> None:
  """Checks that every process holds the same value (no-op on one process)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.assert_equal(value, message)
