"""Batched inference over enumerated seqio datasets, and T5X's `InferenceEvaluator`."""
import logging
import os
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.runtime import utils


def _pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> Tuple[Mapping[str, np.ndarray], int]:
  n = next(iter(batch.values())).shape[0]
  if n == batch_size:
    return batch, n
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}, n


def get_infer_fn(infer_step: Callable, batch_size: int, partitioner, state,
                 keep_aux_as_numpy: bool = False) -> Callable:
  """Returns `fn(enumerated_ds) -> [(index, output)]` (and aux) running `infer_step(state, batch)` jitted.

  The final partial batch is zero-padded to `batch_size` so one compiled step serves every batch.
  """
  jitted = partitioner.partition(infer_step, in_axis_resources=None, out_axis_resources=None)
  num_shards = jax.process_count()

  def infer_fn(ds: tf.data.Dataset, model_feature_shapes=None, rng=None):
    del model_feature_shapes, rng
    ds = ds.shard(num_shards, jax.process_index()) if num_shards > 1 else ds
    outputs: List[Tuple[int, Any]] = []
    aux_all = {}
    local_bs = batch_size // num_shards
    for indices, batch in ds.batch(local_bs).as_numpy_iterator():
      batch = {k: v for k, v in batch.items()}
      padded, n = _pad_batch(batch, local_bs)
      result = jitted(state, padded)
      if isinstance(result, tuple):
        out, aux = result
      else:
        out, aux = result, None
      out = np.asarray(jax.device_get(out))[:n]
      for i, idx in enumerate(indices):
        outputs.append((int(idx), out[i].tolist() if out.ndim > 1 else float(out[i])))
      if aux is not None:
        for k, v in jax.device_get(aux).items():
          v = np.asarray(v)[:n]
          aux_all.setdefault(k, []).extend(list(v) if keep_aux_as_numpy else v.tolist())
    if aux_all or isinstance(outputs, tuple):
      return outputs, aux_all
    return outputs

  return infer_fn


class InferenceEvaluator:
  """Runs seqio's Evaluator (decoding + metrics) on the current parameters."""

  def __init__(self, infer_eval_dataset_cfg: utils.DatasetConfig, inference_evaluator_cls, model,
               partitioner, log_dir: Optional[str] = None):
    self._cfg = infer_eval_dataset_cfg
    self._model = model
    self._partitioner = partitioner
    utils.import_module(infer_eval_dataset_cfg.module)
    self._evaluator = inference_evaluator_cls(
        mixture_or_task_name=infer_eval_dataset_cfg.mixture_or_task_name,
        feature_converter=model.FEATURE_CONVERTER_CLS(pack=False),
        eval_split=infer_eval_dataset_cfg.split,
        use_cached=infer_eval_dataset_cfg.use_cached,
        seed=infer_eval_dataset_cfg.seed,
        sequence_length=infer_eval_dataset_cfg.task_feature_lengths,
        log_dir=os.path.join(log_dir, 'inference_eval') if log_dir else None,
        use_memory_cache=infer_eval_dataset_cfg.use_memory_cache)
    if not self._evaluator.eval_tasks:
      logging.warning('No task of %s has metric_fns for split %s: inference evaluation is skipped.',
                      infer_eval_dataset_cfg.mixture_or_task_name, infer_eval_dataset_cfg.split)

  @property
  def eval_tasks(self):
    return self._evaluator.eval_tasks

  def evaluate(self, params, step: int) -> Mapping[str, Mapping[str, Any]]:
    if not self._evaluator.eval_tasks:
      return {}
    model = self._model

    def predict_step(p, batch):
      return model.predict_batch_with_aux(p, batch)

    def score_step(p, batch):
      return model.score_batch(p, batch)

    bs = self._cfg.batch_size
    predict_fn = get_infer_fn(predict_step, bs, self._partitioner, params)
    score_fn = get_infer_fn(score_step, bs, self._partitioner, params)

    def predict_tokens(ds, *a, **k):
      out = predict_fn(ds)
      return out[0] if isinstance(out, tuple) else out

    all_metrics, _ = self._evaluator.evaluate(
        compute_metrics=jax.process_index() == 0, step=step, predict_fn=predict_tokens, score_fn=score_fn)
    results = all_metrics.result() if hasattr(all_metrics, 'result') else all_metrics
    return results or {}
