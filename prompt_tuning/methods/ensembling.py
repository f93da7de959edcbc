"""Prompt ensembling (Lester et al. 2021, §6): N prompts of one task, one frozen model, one pass.

Each example is replicated N times in a `PromptBank` batch (copy i gets `prompt_ids = i`), so the
N prompts are evaluated together, and their predictions are combined:

* ``majority``: majority vote over the members' predictions (decoded token sequences, or the
  classes of rank classification). Ties go to the tied prediction that the lowest-index member
  made (the paper does not say; this makes the rule deterministic).
* ``mean_score``: rank classification with the task's class labels: each class's log-likelihood is
  averaged over the N prompts and the best class wins (members predict by their own scores).

From gin: `configs/runs/ensemble_eval.gin` (after `runs/prompt_eval.gin`) sets
`ENSEMBLE = ['library:sst2_a', 'prompt_b.npy', ...]`: the model becomes a bank of those prompts
(`bank_init`) and `EnsembleEvaluator` (a `seqio.Evaluator`) runs the one pass and reports, per task,
each member's metrics, their mean and best, and the ensemble's, as the paper's Table 3
(`ensemble_table`; also written to `EVAL_OUTPUT_DIR/ensemble.json`). `configs/runs/ensemble_infer.gin`
does the same for `python -m prompt_tuning.infer` through `EnsembleModel`, a model wrapper that
replicates, predicts and votes inside the compiled step.

The rank-classification helpers (`task_arrays`, `score_candidates`, `rank_classification_accuracy`)
are shared with SPoT and recycling, which evaluate prompts the same way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prompt_tuning import fs

RULES = ('majority', 'mean_score')


# ----------------------------------------------------------------------------------------------
# Combination rules.
# ----------------------------------------------------------------------------------------------


def _key(prediction: Any) -> Tuple:
  arr = np.asarray(prediction).reshape(-1)
  return tuple(int(x) for x in arr) if arr.dtype.kind in 'iub' else tuple(arr.tolist())


def majority_vote(predictions: Sequence[Sequence[Any]]) -> List[Any]:
  """Majority vote per example.

  Args:
    predictions: `[num_examples][num_members]` predictions (token sequences, strings or class
      ids; compared for exact equality, token sequences after removing trailing padding 0s).

  Returns:
    Per example, the most frequent prediction; among equally frequent ones, the one the
    lowest-index member made.
  """
  out = []
  for members in predictions:
    keys = [_strip(_key(p)) for p in members]
    counts: Dict[Tuple, int] = {}
    for k in keys:
      counts[k] = counts.get(k, 0) + 1
    best = max(range(len(keys)), key=lambda i: (counts[keys[i]], -i))
    out.append(members[best])
  return out


def _strip(key: Tuple) -> Tuple:
  key = list(key)
  while key and key[-1] == 0:
    key.pop()
  return tuple(key)


def mean_score_vote(scores: np.ndarray) -> np.ndarray:
  """`scores [num_examples, num_members, num_classes]` -> `[num_examples]` argmax of the mean over
  members (ties to the lowest class index)."""
  scores = np.asarray(scores, np.float64)
  return np.argmax(scores.mean(axis=1), axis=-1)


def replicate(batch: Mapping[str, np.ndarray], num_prompts: int) -> Dict[str, np.ndarray]:
  """Each example N times: row `b * N + i` is example b with `prompt_ids = i`."""
  out = {}
  size = None
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim >= 1:
      size = value.shape[0]
      out[key] = np.repeat(value, num_prompts, axis=0)
    else:
      out[key] = value
  if size is None:
    raise ValueError('replicate needs batched features.')
  out['prompt_ids'] = np.tile(np.arange(num_prompts, dtype=np.int32), size)
  return out


# ----------------------------------------------------------------------------------------------
# Rank classification of prompts (shared with SPoT and recycling).
# ----------------------------------------------------------------------------------------------


def task_arrays(
    task_name: str,
    split: str,
    input_length: int,
    num_examples: Optional[int] = None,
    module: Optional[str] = None,
) -> Dict[str, Any]:
  """`{'encoder_input_tokens' [n, L] int32, 'targets': [n] str, 'vocabulary'}` of a seqio task."""
  import seqio  # pylint: disable=g-import-not-at-top

  if module:
    import importlib  # pylint: disable=g-import-not-at-top

    importlib.import_module(module)
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(
      sequence_length={'inputs': input_length, 'targets': 64},
      split=split,
      shuffle=False,
      num_epochs=1,
      use_cached=False,
  )
  tokens, targets = [], []
  for ex in ds.as_numpy_iterator():
    ids = list(ex['inputs'])[:input_length]
    tokens.append(ids + [0] * (input_length - len(ids)))
    text = ex.get('targets_pretokenized')
    targets.append(text.decode('utf-8') if isinstance(text, bytes) else str(text))
    if num_examples is not None and len(tokens) >= num_examples:
      break
  return {
      'encoder_input_tokens': np.asarray(tokens, np.int32),
      'targets': targets,
      'vocabulary': task.output_features['targets'].vocabulary,
  }


def candidate_tokens(vocabulary: Any, class_labels: Sequence[str]) -> np.ndarray:
  """`[C, T]` EOS-terminated, 0-padded token ids of the class labels."""
  from prompt_tuning.runtime import rank_classification  # pylint: disable=g-import-not-at-top

  return rank_classification.pad_candidates(
      [vocabulary.encode(label) for label in class_labels], eos_id=vocabulary.eos_id
  )


def score_candidates(
    model: Any,
    params: Any,
    encoder_input_tokens: np.ndarray,
    candidates: np.ndarray,
    *,
    num_prompts: Optional[int] = None,
    batch_size: int = 32,
) -> np.ndarray:
  """Log-likelihood of every candidate target, for every example (and every prompt of a bank).

  Args:
    model: an `EncoderDecoderModel` (its `score_batch`).
    params: its parameters (with a `PromptBank` of `num_prompts` prompts when given).
    encoder_input_tokens: `[n, L]`.
    candidates: `[C, T]` (`candidate_tokens`).
    num_prompts: with a prompt bank, every example is scored with each prompt (one pass).
    batch_size: examples per compiled step.

  Returns:
    `[n, C]`, or `[n, N, C]` with `num_prompts`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import rank_classification  # pylint: disable=g-import-not-at-top

  score = jax.jit(model.score_batch)
  n = encoder_input_tokens.shape[0]
  reps = num_prompts or 1
  num_cands = candidates.shape[0]
  out = []
  for start in range(0, n, batch_size):
    chunk = encoder_input_tokens[start : start + batch_size]
    real = chunk.shape[0]
    if real < batch_size:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
    batch = {'encoder_input_tokens': chunk}
    if num_prompts:
      batch = replicate(batch, num_prompts)
    expanded = rank_classification.build_rank_classification_batch(batch, candidates)
    scores = np.asarray(jax.device_get(score(params, expanded)), np.float64)
    out.append(scores.reshape(batch_size, reps, num_cands)[:real])
  scores = np.concatenate(out, axis=0)
  return scores if num_prompts else scores[:, 0]


def labels_index(targets: Sequence[str], class_labels: Sequence[str]) -> np.ndarray:
  """Index of each target string in `class_labels` (-1 when it is none of them)."""
  lookup = {label: i for i, label in enumerate(class_labels)}
  return np.asarray([lookup.get(t.strip(), -1) for t in targets], np.int64)


def rank_classification_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Percent of examples whose best-scoring candidate is the label (`scores [n, C]`)."""
  return 100.0 * float(np.mean(np.argmax(scores, axis=-1) == labels))


def prompted_model(params: Mapping[str, Any], prompt: Optional[np.ndarray], vocabulary: Any):
  """`(model, params)`: the backbone of `params` (config read from its shapes, no dropout) with
  `prompt` (`[P, H]`, or a `[N, P, H]` bank; None: no prompt) in its encoder, as an
  `EncoderDecoderModel`."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top

  flat = {k: v for k, v in params_lib.flatten_params(params).items() if '/prompt/' not in f'/{k}/'}
  config = t5.config_from_shapes(flat, dropout_rate=0.0)
  if prompt is None:
    model = models.EncoderDecoderModel(t5.EncoderDecoder(config), vocabulary, vocabulary)
    return model, params_lib.unflatten_params(flat)
  prompt = np.asarray(prompt, np.float32)
  bank = prompt.ndim == 3
  module = prompted.PromptEncoderDecoder(
      config,
      prompt_length=prompt.shape[-2],
      num_prompts=prompt.shape[0] if bank else None,
  )
  flat['encoder/prompt/prompt/prompt'] = prompt
  model = models.EncoderDecoderModel(module, vocabulary, vocabulary)
  return model, params_lib.unflatten_params(flat)


# ----------------------------------------------------------------------------------------------
# Table 3.
# ----------------------------------------------------------------------------------------------


def ensemble_table(
    member_metrics: Sequence[Mapping[str, float]], ensemble_metrics: Mapping[str, float]
) -> Dict[str, Dict[str, float]]:
  """`{metric: {'members': [...], 'mean': ..., 'best': ..., 'ensemble': ...}}` (the paper's
  Table 3: average and best of the N prompts, and their ensemble)."""
  table = {}
  for name in ensemble_metrics:
    values = [float(m[name]) for m in member_metrics if name in m]
    if not values:
      continue
    table[name] = {
        'members': values,
        'mean': float(np.mean(values)),
        'best': float(np.max(values)),
        'ensemble': float(ensemble_metrics[name]),
    }
  return table


def format_table(task: str, table: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
  lines = [f'{task}: {len(names)} prompts']
  for metric, row in table.items():
    members = ', '.join(f'{n}={v:.2f}' for n, v in zip(names, row['members']))
    lines.append(
        f'  {metric}: mean {row["mean"]:.2f}, best {row["best"]:.2f}, ensemble '
        f'{row["ensemble"]:.2f} ({members})'
    )
  return '\n'.join(lines)
