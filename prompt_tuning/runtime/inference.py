"""Batched inference over enumerated seqio datasets, and T5X's `InferenceEvaluator`."""

from absl import logging
import contextlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.runtime import utils
from prompt_tuning.runtime import xla_options


def _pad_batch(
    batch: Mapping[str, np.ndarray], batch_size: int
) -> Tuple[Mapping[str, np.ndarray], int]:
  n = next(iter(batch.values())).shape[0]
  if n == batch_size:
    return batch, n
  return {
      k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
      for k, v in batch.items()
  }, n


# Decoding generates up to the `targets` length of its batch, so predictions bucket only the inputs.
PREDICT_BUCKETED_FEATURES = ('inputs',)


# Keys of `interleave_tasks`: task index * _KEY_BASE + the example's index within its task.
_KEY_BASE = 1 << 32


def interleave_tasks(datasets: Sequence[tf.data.Dataset]) -> tf.data.Dataset:
  """One enumerated dataset taking the examples of `datasets` (each enumerated) in turn.

  Every batch then mixes the tasks (one prompt of a bank per example). An element's index is
  `task_index * 2**32 + its index in its task` (`split_by_task` undoes it); tasks with fewer
  examples simply run out first.
  """
  keyed = [
      ds.map(lambda i, ex, t=t: (tf.cast(i, tf.int64) + t * _KEY_BASE, ex))
      for t, ds in enumerate(datasets)
  ]
  choice = tf.data.Dataset.range(len(keyed)).repeat()
  return tf.data.Dataset.choose_from_datasets(keyed, choice, stop_on_empty_dataset=False)


def task_of_key(key: int) -> int:
  return int(key) // _KEY_BASE


def split_by_task(
    outputs: Sequence[Tuple[int, Any]], num_tasks: int
) -> List[List[Tuple[int, Any]]]:
  """`[(key, output)]` of an `interleave_tasks` dataset -> per task `[(index, output)]`."""
  out: List[List[Tuple[int, Any]]] = [[] for _ in range(num_tasks)]
  for key, value in outputs:
    out[int(key) // _KEY_BASE].append((int(key) % _KEY_BASE, value))
  return out


def get_infer_fn(
    infer_step: Callable,
    batch_size: int,
    partitioner,
    state=None,
    keep_aux_as_numpy: bool = False,
    state_axes: Any = None,
    bucketing=None,
    bucketed_features: Sequence[str] = ('inputs', 'targets'),
    check_batch: Optional[Callable[[np.ndarray, Mapping[str, np.ndarray]], None]] = None,
    compiler_options: Optional[Mapping[str, Any]] = None,
) -> Callable:
  """Returns `fn(enumerated_ds, state=state) -> [(index, output)]` (and aux) running `infer_step(state, batch)`.

  The step is compiled once (per batch shape) and reused for every call. Every process iterates the whole
  dataset in the same order and feeds its slice of each global batch (as in training), so multi-process
  inference sees each example exactly once; outputs are replicated, so every process gets all of them.
  The final partial batch is zero-padded to `batch_size` so one compiled step serves every batch.
  `state_axes` (mesh PartitionSpecs matching `state`, default replicated) keeps model-parallel
  parameters sharded during inference. `check_batch(indices, batch)` sees every host batch before
  padding (e.g. to check its conditioning ids).

  With `bucketing` (a `prompt_tuning.data.bucketing.BucketConfig`) the examples are batched within
  length buckets (windows of `bucketing.window` batches, in dataset order within a bucket) and each
  batch's padding is trimmed to its bucket; only the features in `bucketed_features` are trimmed
  (predictions keep the full `targets` length, which bounds decoding). Outputs carry their
  example's index, so the caller's results are those of the unbucketed run.

  `compiler_options` go to the step's `jax.jit` (callers pass
  `xla_options.inference_compiler_options(model)`).
  """
  jitted = partitioner.partition(
      infer_step,
      in_axis_resources=(state_axes, partitioner.data_partition_spec),
      out_axis_resources=None,
      compiler_options=compiler_options,
  )
  layout = partitioner.get_data_layout(batch_size)
  local_bs = batch_size // layout.num_shards
  lo = layout.shard_id * local_bs

  def infer_fn(ds: tf.data.Dataset, model_feature_shapes=None, rng=None, state=state):
    del model_feature_shapes, rng
    outputs: List[Tuple[int, Any]] = []
    aux_all = {}
    aux_indices: List[int] = []
    for indices, batch in _batches(ds, batch_size, bucketing, bucketed_features):
      if check_batch is not None:
        check_batch(indices, batch)
      padded, n = _pad_batch(dict(batch), batch_size)
      local = {k: v[lo : lo + local_bs] for k, v in padded.items()}
      result = jitted(state, partitioner.shard_host_batch(local))
      if isinstance(result, tuple):
        out, aux = result
      else:
        out, aux = result, None
      out = np.asarray(jax.device_get(out))[:n]
      for i, idx in enumerate(indices[:n]):
        outputs.append((int(idx), out[i].tolist() if out.ndim > 1 else float(out[i])))
      if aux is not None:
        aux_indices.extend(int(i) for i in indices[:n])
        for k, v in jax.device_get(aux).items():
          v = np.asarray(v)[:n]
          aux_all.setdefault(k, []).extend(list(v) if keep_aux_as_numpy else v.tolist())
    if aux_all:
      # Aux values in example-index order (bucketed batches come out of dataset order).
      order = np.argsort(np.asarray(aux_indices), kind='stable')
      aux_all = {k: [v[i] for i in order] for k, v in aux_all.items()}
      return outputs, aux_all
    return outputs

  return infer_fn


def _batches(ds: tf.data.Dataset, batch_size: int, bucketing, bucketed_features):
  """`(indices, batch)` of an enumerated dataset: plain batches, or batches within length buckets."""
  if bucketing is None:
    return ds.batch(batch_size).as_numpy_iterator()
  from prompt_tuning.data import bucketing as bucketing_lib  # pylint: disable=g-import-not-at-top

  return bucketing_lib.bucket_host_examples(
      ds.as_numpy_iterator(), batch_size, bucketing, allowed=tuple(bucketed_features)
  )


@contextlib.contextmanager
def measurable_scalar_features():
  """While a `seqio.Evaluator` is built, one-integer-per-example features read as length-1 vectors.

  The evaluator measures the length of every output feature of its tasks as `shape[0]` (seqio
  0.0.20, `evaluation._cache_and_measure_examples`), which raises a bare `IndexError` for a rank-0
  feature such as a task's `prompt_ids` or `task_ids`. The feature converters accept a scalar and
  a length-1 vector alike (`data/feature_converters.py`), so the evaluator's datasets carry them as
  `[1]` vectors. A seqio without that function is left as it is.
  """
  from seqio import evaluation  # pylint: disable=g-import-not-at-top

  original = getattr(evaluation, '_cache_and_measure_examples', None)
  if original is None:
    yield
    return

  def measure(*args, **kwargs):
    dataset_fn = kwargs.pop('dataset_fn')

    def with_vectors(task):
      ds = dataset_fn(task)
      spec = ds.element_spec
      if not isinstance(spec, Mapping):
        return ds
      scalars = [k for k in task.output_features if k in spec and spec[k].shape.rank == 0]
      if not scalars:
        return ds
      return ds.map(lambda ex: dict(ex, **{k: tf.reshape(ex[k], [1]) for k in scalars}))

    return original(*args, dataset_fn=with_vectors, **kwargs)

  evaluation._cache_and_measure_examples = measure  # pylint: disable=protected-access
  try:
    yield
  finally:
    evaluation._cache_and_measure_examples = original  # pylint: disable=protected-access


class InferenceEvaluator:
  """Runs seqio's Evaluator (decoding + metrics) on the current parameters.

  The decoding and scoring steps are compiled once and reused at every evaluation.
  """

  def __init__(
      self,
      infer_eval_dataset_cfg: utils.DatasetConfig,
      inference_evaluator_cls,
      model,
      partitioner,
      log_dir: Optional[str] = None,
      params_axes: Any = None,
  ):
    self._cfg = infer_eval_dataset_cfg
    self._model = model
    self._partitioner = partitioner
    utils.import_module(infer_eval_dataset_cfg.module)
    utils.get_mixture_or_task(infer_eval_dataset_cfg.mixture_or_task_name)
    if infer_eval_dataset_cfg.task_feature_lengths and infer_eval_dataset_cfg.trim_output_features:
      utils.check_feature_lengths(infer_eval_dataset_cfg)
    with measurable_scalar_features():
      self._evaluator = inference_evaluator_cls(
          mixture_or_task_name=infer_eval_dataset_cfg.mixture_or_task_name,
          feature_converter=model.FEATURE_CONVERTER_CLS(pack=False),
          eval_split=infer_eval_dataset_cfg.split,
          use_cached=infer_eval_dataset_cfg.use_cached,
          seed=infer_eval_dataset_cfg.seed,
          sequence_length=infer_eval_dataset_cfg.task_feature_lengths,
          log_dir=os.path.join(log_dir, 'inference_eval') if log_dir else None,
          use_memory_cache=infer_eval_dataset_cfg.use_memory_cache,
      )
    if not self._evaluator.eval_tasks:
      logging.warning(
          'No task of %s has metric_fns for split %s: inference evaluation is skipped.',
          infer_eval_dataset_cfg.mixture_or_task_name,
          infer_eval_dataset_cfg.split,
      )

    def predict_step(p, batch):
      return model.predict_batch_with_aux(p, batch)

    def score_step(p, batch):
      return model.score_batch(p, batch)

    bs = infer_eval_dataset_cfg.batch_size
    kw = dict(
        state_axes=params_axes,
        check_batch=self._check_batch,
        bucketing=infer_eval_dataset_cfg.bucketing,
        compiler_options=xla_options.inference_compiler_options(model),
    )
    self._predict_fn = get_infer_fn(
        predict_step, bs, partitioner, bucketed_features=PREDICT_BUCKETED_FEATURES, **kw
    )
    self._score_fn = get_infer_fn(score_step, bs, partitioner, **kw)
    self._current_task: Optional[str] = None
    self._mixed_names: Optional[List[str]] = None
    sizes = getattr(model, 'conditioning_feature_sizes', lambda: {})()
    datasets = self._evaluator.cached_model_datasets if self._evaluator.eval_tasks else {}
    specs = {str(ds.element_spec) for ds in datasets.values()}
    # With a prompt bank, every batch mixes the tasks (one prompt per example), as in serving.
    self.mix_tasks = bool(sizes.get('prompt_ids')) and len(datasets) > 1 and len(specs) == 1

  def _check_batch(self, indices, batch) -> None:
    check = getattr(self._model, 'check_conditioning_features', None)
    if check is None:
      return
    if self._mixed_names is not None:
      names = self._mixed_names
      check(batch, task_of=lambda row: names[task_of_key(indices[row])])
    else:
      check(batch, task_of=lambda row: self._current_task)

  @property
  def eval_tasks(self):
    return self._evaluator.eval_tasks

  def evaluate(self, params, step: int) -> Mapping[str, Mapping[str, Any]]:
    """Decodes and scores every eval task and computes their metrics (`{task: {metric: value}}`)."""
    if not self._evaluator.eval_tasks:
      return {}
    datasets = dict(self._evaluator.cached_model_datasets)
    name_of = {id(ds): name for name, ds in datasets.items()}
    mixed: Dict[str, Dict[str, Any]] = {}

    def run(kind: str, fn: Callable, ds) -> Any:
      name = name_of.get(id(ds))
      if not (self.mix_tasks and name is not None):
        self._current_task = name
        return fn(ds, state=params)
      if kind not in mixed:
        names = list(datasets)
        logging.info('Evaluating %d tasks in mixed batches (prompt bank): %s', len(names), names)
        self._mixed_names = names
        try:
          out = fn(interleave_tasks([datasets[n] for n in names]), state=params)
        finally:
          self._mixed_names = None
        out = out[0] if isinstance(out, tuple) else out
        mixed[kind] = dict(zip(names, split_by_task(out, len(names))))
      return mixed[kind][name]

    def predict_tokens(ds, *a, **k):
      del a, k
      out = run('predict', self._predict_fn, ds)
      return out[0] if isinstance(out, tuple) else out

    def score(ds, *a, **k):
      del a, k
      return run('score', self._score_fn, ds)

    all_metrics, _ = self._evaluator.evaluate(
        compute_metrics=jax.process_index() == 0,
        step=step,
        predict_fn=predict_tokens,
        score_fn=score,
    )
    results = all_metrics.result() if hasattr(all_metrics, 'result') else all_metrics
    return results or {}
