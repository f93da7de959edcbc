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
from typing import Any, List, Mapping, Optional, Tuple

import jax
import seqio

from prompt_tuning import fs
from prompt_tuning.runtime import eval as eval_lib
from prompt_tuning.runtime import faults
from prompt_tuning.runtime import inference
from prompt_tuning.runtime import partitioning
from prompt_tuning.runtime import utils
from prompt_tuning.runtime import xla_options


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
  if jax.process_index() == 0:
    faults.check_output_dir(output_dir, 'INFER_OUTPUT_DIR')  # Before any work.
  partitioner = partitioner or partitioning.PjitPartitioner(num_partitions=1)
  utils.import_module(dataset_cfg.module)
  provider = utils.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  params, axes = eval_lib.restore_params(
      model, restore_checkpoint_cfg, partitioner, dataset_cfg.batch_size, fallback_init_rng
  )
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  fc = model.FEATURE_CONVERTER_CLS(pack=False)
  loaded = []
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
    loaded.append((task, task_ds, list(task_ds.as_numpy_iterator())))

  names: List[Optional[str]] = [None]

  def check_batch(indices, batch):
    if names[0] is None:  # Mixed batches: the task is in the key.
      task_of = lambda row: tasks[inference.task_of_key(indices[row])].name
    else:
      task_of = lambda row: names[0]
    model.check_conditioning_features(batch, task_of=task_of)

  if mode == 'score':
    step = lambda p, b: model.score_batch(p, b)
  else:
    step = lambda p, b: model.predict_batch_with_aux(p, b)
  fn = inference.get_infer_fn(
      step,
      dataset_cfg.batch_size,
      partitioner,
      params,
      state_axes=axes,
      check_batch=check_batch,
      bucketing=dataset_cfg.bucketing,
      bucketed_features=(
          ('inputs', 'targets') if mode == 'score' else inference.PREDICT_BUCKETED_FEATURES
      ),
      compiler_options=xla_options.inference_compiler_options(model),
  )
  # With a prompt bank, every batch mixes the tasks (one prompt per example), as in serving.
  mix = bool(model.conditioning_feature_sizes().get('prompt_ids')) and len(tasks) > 1
  if mix:
    lengths = dataset_cfg.task_feature_lengths or _lengths([e for _, _, ex in loaded for e in ex])
    names[0] = None
    mixed = _run(
        fn, inference.interleave_tasks([fc(ds, lengths).enumerate() for _, ds, _ in loaded])
    )
    per_task = inference.split_by_task(mixed, len(tasks))
    logging.info('Ran %d tasks in mixed batches (prompt bank).', len(tasks))
  else:
    per_task = []
    for task, task_ds, examples in loaded:
      names[0] = task.name
      lengths = dataset_cfg.task_feature_lengths or _lengths(examples)
      per_task.append(_run(fn, fc(task_ds, lengths).enumerate()))
  last_path = None
  for (task, _, examples), results in zip(loaded, per_task):
    results = sorted(results, key=lambda x: x[0])
    vocab = task.output_features[output_vocab_feature_name].vocabulary
    path = fs.join(output_dir, f'{task.name}-{dataset_cfg.split}.{file_extension}')
    last_path = path
    if jax.process_index() != 0:
      continue
    rows = []
    for (_, (value, aux_row)), ex in zip(results, examples):
      row = {'inputs': _text(ex, 'inputs'), 'targets': _text(ex, 'targets')}
      if mode == 'score':
        row['score'] = float(value)
      else:
        row['prediction'] = _decode(vocab, value)
        if mode == 'predict_with_aux' and aux_row:
          # The sequence score, then what the model's modules sowed per example (hooks'
          # PER_EXAMPLE_OUTPUTS, e.g. ATTEMPT's mixture weights).
          row['aux'] = {'score': float(aux_row['scores'])} if 'scores' in aux_row else {}
          row['aux'].update({k: v for k, v in aux_row.items() if k != 'scores'})
      rows.append(json.dumps(row) + '\n')
    fs.write_text(path, ''.join(rows))
    logging.info('Wrote %d %s results to %s', len(results), mode, path)
  return last_path


def _lengths(examples) -> Mapping[str, int]:
  """The longest `inputs` and `targets` of `examples` (TASK_FEATURE_LENGTHS = None)."""
  return {
      k: max(len(e[k]) for e in examples)
      for k in ('inputs', 'targets')
      if examples and k in examples[0]
  }


def _run(fn, model_ds) -> List[Tuple[int, Tuple[Any, Mapping[str, Any]]]]:
  """`[(index, (output, {aux name: this example's value}))]` of `fn` over an enumerated dataset."""
  out = fn(model_ds)
  # In example (key) order, the order of the aux values (bucketed batches leave dataset order).
  results = sorted(out[0] if isinstance(out, tuple) else out, key=lambda x: x[0])
  aux = (out[1] if isinstance(out, tuple) else None) or {}
  return [
      (idx, (value, {k: v[pos] for k, v in aux.items()}))
      for pos, (idx, value) in enumerate(results)
  ]


def _text(example, key):
  v = example.get(f'{key}_pretokenized')
  if v is None:
    return None
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)
