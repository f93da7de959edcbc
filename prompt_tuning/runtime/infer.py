"""T5X-style inference entry point: writes JSONL predictions (or scores) with their inputs.

`python -m prompt_tuning.infer --gin_file=... --gin.CHECKPOINT_PATH=... --gin.INFER_OUTPUT_DIR=...`
writes `INFER_OUTPUT_DIR/<task>-<split>.jsonl`, one line per example: the pretokenized `inputs`, the
decoded `prediction` (or `score` in `mode='score'`) and the `targets` when the split has them. With
`mode='predict_with_aux'` each row also has `aux`: the beam `score` and every per-example output
the model returned (what its modules sowed into `hooks.PER_EXAMPLE_OUTPUTS`, e.g. ATTEMPT's
`mixture_weights`), as lists.
"""

import json
from absl import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.runtime import eval as eval_lib
from prompt_tuning.runtime import inference
from prompt_tuning.runtime import partitioning
from prompt_tuning.runtime import utils


def _decode(vocab, tokens):
  tokens = [int(t) for t in tokens]
  if vocab.eos_id in tokens:
    tokens = tokens[: tokens.index(vocab.eos_id)]
  return vocab.decode([t for t in tokens if t > 0])


def infer(
    *,
    mode: str,
    model,
    dataset_cfg: utils.DatasetConfig,
    restore_checkpoint_cfg: Optional[utils.RestoreCheckpointConfig],
    partitioner: Optional[partitioning.PjitPartitioner] = None,
    output_dir: str,
    checkpoint_period: int = 100,
    shard_id: int = 0,
    num_shards: int = 1,
    merge_chunked_results: bool = True,
    write_fn=None,
    checkpoint_ds_iter: bool = True,
    fallback_init_rng: Optional[int] = None,
    output_vocab_feature_name: str = 'targets',
    file_extension: str = 'jsonl',
    keep_aux_as_numpy: bool = False,
    use_orbax: bool = True,
    summarize_config_fn=None,
    train_state_initializer_cls=None,
) -> str:
  """Predicts or scores every example of `dataset_cfg` and writes JSONL. Returns the output path."""
  del checkpoint_period, merge_chunked_results, write_fn, checkpoint_ds_iter, use_orbax
  del summarize_config_fn, train_state_initializer_cls, keep_aux_as_numpy
  if mode not in ('predict', 'score', 'predict_with_aux'):
    raise ValueError(f"infer mode must be 'predict', 'score' or 'predict_with_aux', got {mode!r}.")
  if output_dir is None:
    raise ValueError('INFER_OUTPUT_DIR is not set: pass --gin.INFER_OUTPUT_DIR="\'/path\'".')
  partitioner = partitioner or partitioning.PjitPartitioner(num_partitions=1)
  utils.import_module(dataset_cfg.module)
  provider = utils.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  params, axes = eval_lib.restore_params(
      model, restore_checkpoint_cfg, partitioner, dataset_cfg.batch_size, fallback_init_rng
  )
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(output_dir)
  fc = model.FEATURE_CONVERTER_CLS(pack=False)
  last_path = None
  for task in tasks:
    task_ds = task.get_dataset(
        sequence_length=dataset_cfg.task_feature_lengths,
        split=dataset_cfg.split,
        shuffle=False,
        num_epochs=1,
        seed=dataset_cfg.seed,
        shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
        use_cached=dataset_cfg.use_cached,
    )
    examples = list(task_ds.as_numpy_iterator())
    lengths = dataset_cfg.task_feature_lengths
    if lengths is None:
      lengths = {
          k: max(len(e[k]) for e in examples)
          for k in ('inputs', 'targets')
          if examples and k in examples[0]
      }
    model_ds = fc(task_ds, lengths).enumerate()
    if mode == 'score':
      fn = inference.get_infer_fn(
          lambda p, b: model.score_batch(p, b),
          dataset_cfg.batch_size,
          partitioner,
          params,
          state_axes=axes,
      )
    else:
      fn = inference.get_infer_fn(
          lambda p, b: model.predict_batch_with_aux(p, b),
          dataset_cfg.batch_size,
          partitioner,
          params,
          state_axes=axes,
      )
    out = fn(model_ds)
    results = out[0] if isinstance(out, tuple) else out
    aux = out[1] if isinstance(out, tuple) else {}
    results = sorted(results, key=lambda x: x[0])
    vocab = task.output_features[output_vocab_feature_name].vocabulary
    path = os.path.join(output_dir, f'{task.name}-{dataset_cfg.split}.{file_extension}')
    last_path = path
    if jax.process_index() != 0:
      continue
    tmp = path + '.tmp'
    with tf.io.gfile.GFile(tmp, 'w') as f:
      for (idx, value), ex in zip(results, examples):
        row = {'inputs': _text(ex, 'inputs'), 'targets': _text(ex, 'targets')}
        if mode == 'score':
          row['score'] = float(value)
        else:
          row['prediction'] = _decode(vocab, value)
          if mode == 'predict_with_aux' and 'scores' in aux:
            row['aux'] = {'score': float(aux['scores'][idx])}
            row['aux'].update({k: v[idx] for k, v in aux.items() if k != 'scores'})
        f.write(json.dumps(row) + '\n')
    tf.io.gfile.rename(tmp, path, overwrite=True)
    logging.info('Wrote %d %s results to %s', len(results), mode, path)
  return last_path


def _text(example, key):
  v = example.get(f'{key}_pretokenized')
  if v is None:
    return None
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)
