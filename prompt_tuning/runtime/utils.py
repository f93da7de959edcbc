"""T5X's `utils` vocabulary: dataset/checkpoint configs, learning-rate schedules and dataset helpers."""
import dataclasses
import importlib
import logging
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import seqio
import tensorflow as tf

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


@dataclasses.dataclass
class RestoreCheckpointConfig:
  """What to restore (T5X's `utils.RestoreCheckpointConfig`).

  `path` may be a T5X legacy checkpoint, a Hugging Face T5 directory or one of our orbax checkpoints
  (recognised automatically). `assignment_map` is a sequence of `(regex, replacement_or_None)`: a
  parameter whose path matches a regex mapped to `None` is not read from the checkpoint (with
  `fallback_to_scratch=True` it keeps its initializer's value, e.g. the prompt).
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

  def __post_init__(self):
    if self.mode not in ('specific', 'latest', 'all'):
      raise ValueError(f"RestoreCheckpointConfig.mode must be 'specific', 'latest' or 'all', got {self.mode!r}.")


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
        f"--gin.MIXTURE_OR_TASK_MODULE=\"'tasks.glue'\" or an `import tasks.glue` line in your gin file "
        f'({len(names)} tasks/mixtures are registered now).') from None


def get_vocabulary(cfg: DatasetConfig) -> Tuple[seqio.Vocabulary, seqio.Vocabulary]:
  import_module(cfg.module)
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  features = provider.output_features
  return features['inputs'].vocabulary if 'inputs' in features else features['targets'].vocabulary, \
      features['targets'].vocabulary


def _check_lengths(cfg: DatasetConfig, feature_converter) -> None:
  if cfg.task_feature_lengths is None:
    return
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  missing = [k for k in provider.output_features if provider.output_features[k].required
             and k not in cfg.task_feature_lengths]
  if missing and not isinstance(feature_converter, seqio.DecoderFeatureConverter):
    raise ValueError(f'TASK_FEATURE_LENGTHS has no length for feature(s) {missing} of '
                     f'{provider.name!r}; set e.g. --gin.TASK_FEATURE_LENGTHS="{{\'inputs\': 512, '
                     f'\'targets\': 8}}".')


def get_dataset(cfg: DatasetConfig, shard_id: int, num_shards: int, feature_converter_cls,
                num_epochs: Optional[int] = None, continue_from_last_checkpoint: bool = False,
                seed: Optional[int] = None) -> tf.data.Dataset:
  """Host-local batched dataset (T5X's `utils.get_dataset`); batch size is `cfg.batch_size // num_shards`."""
  del continue_from_last_checkpoint
  import_module(cfg.module)
  if cfg.batch_size % num_shards:
    raise ValueError(f'Batch size ({cfg.batch_size}) must be divisible by the number of shards ({num_shards}).')
  feature_converter = feature_converter_cls(pack=cfg.pack, use_custom_packing_ops=cfg.use_custom_packing_ops)
  _check_lengths(cfg, feature_converter)
  get_mixture_or_task(cfg.mixture_or_task_name)
  ds_seed = cfg.seed if cfg.seed is not None else seed
  return seqio.get_dataset(
      mixture_or_task_name=cfg.mixture_or_task_name,
      task_feature_lengths=cfg.task_feature_lengths,
      dataset_split=cfg.split,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      feature_converter=feature_converter,
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
      use_cached=cfg.use_cached,
      seed=ds_seed,
      trim_output_features=cfg.trim_output_features,
      batch_size=cfg.batch_size // num_shards)


def get_training_eval_datasets(cfg: DatasetConfig, shard_id: int, num_shards: int, eval_steps: int,
                               feature_converter_cls) -> Mapping[str, tf.data.Dataset]:
  """Teacher-forced eval datasets, one per task of a mixture (plus the mixture itself)."""
  import_module(cfg.module)
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  names = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]
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
