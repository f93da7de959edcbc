"""seqio metric functions for GLUE, SuperGLUE and QA (numpy only).

Every function follows seqio's legacy metric signature, `fn(targets,
predictions) -> {name: value}`, and reports percentages (x100) under T5's
metric names, so numbers compare with published T5 / prompt-tuning results:

=========================  ==============================================
`accuracy`                 {'accuracy'}
`f1_score_with_invalid`    {'f1'}: binary F1 of class 1; predictions that
                           are neither 0 nor 1 count as wrong
`mean_multiclass_f1(n)`    {'mean_{n}class_f1'}: macro F1 over classes 0..n-1
`matthews_corrcoef`        {'matthews_corrcoef'}
`pearson_corrcoef`         {'pearson_corrcoef'}
`spearman_corrcoef`        {'spearman_corrcoef'}
`squad`                    {'em', 'f1'}: SQuAD v1.1 normalisation, max over
                           the gold answers of each question
`multirc_f1_over_all_answers`  {'f1'} over every answer option
`mean_group_metric(all_match)` {'exact_match'}: MultiRC EM per question
`deduplicate_metric(squad)`    ReCoRD: one (max-over-answers) score per query
=========================  ==============================================

`metric_with_examples` unwraps the dict predictions of `*_examples` tasks
before calling a metric; `text_examples` returns `seqio.metrics.Text` samples
(random and wrong predictions with their inputs) that seqio's TensorBoard
logger writes. `get_glue_metric` / `get_super_glue_metric` give T5's metric
list per TFDS config.
"""

import collections
import random
import re
import string
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import seqio

from prompt_tuning.data import utils

MetricFn = Callable[..., Dict[str, Any]]


# ========== classification and regression ==========
def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> Dict[str, float]:
  """Percentage of predictions equal to their target."""
  if not targets:
    return {'accuracy': float('nan')}
  correct = sum(1 for t, p in zip(targets, predictions) if _equal(t, p))
  return {'accuracy': 100.0 * correct / len(targets)}


def _equal(a: Any, b: Any) -> bool:
  result = a == b
  if isinstance(result, np.ndarray):
    return bool(result.all())
  return bool(result)


def _f1(tp: float, fp: float, fn: float) -> float:
  denominator = 2 * tp + fp + fn
  return 2 * tp / denominator if denominator else 0.0


def binary_f1(targets: Sequence[int], predictions: Sequence[int], pos_label: int = 1) -> float:
  """F1 of `pos_label` (sklearn's `f1_score`; 0 when it is never seen nor predicted)."""
  t = np.asarray(targets) == pos_label
  p = np.asarray(predictions) == pos_label
  return _f1(float(np.sum(t & p)), float(np.sum(~t & p)), float(np.sum(t & ~p)))


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> Dict[str, float]:
  """Binary F1 (x100) where a prediction outside {0, 1} counts as the wrong class."""
  targets = np.asarray(targets, dtype=np.int64)
  predictions = np.array(predictions, dtype=np.int64)
  invalid = np.logical_and(predictions != 0, predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {'f1': 100.0 * binary_f1(targets, predictions)}


def macro_f1(
    targets: Sequence[int], predictions: Sequence[int], labels: Optional[Sequence[int]] = None
) -> float:
  """Unweighted mean of per-class F1 over `labels` (default: all seen labels)."""
  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  if labels is None:
    labels = np.unique(np.concatenate([targets, predictions]))
  scores = [binary_f1(targets, predictions, pos_label=label) for label in labels]
  return float(np.mean(scores)) if scores else 0.0


def mean_multiclass_f1(num_classes: int) -> MetricFn:
  """Macro F1 over classes 0..num_classes-1, named `mean_{num_classes}class_f1` (x100)."""

  def metric(targets, predictions):
    return {
        f'mean_{num_classes}class_f1': 100.0
        * macro_f1(targets, predictions, labels=range(num_classes))
    }

  metric.__name__ = f'mean_{num_classes}class_f1'
  return metric


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> Dict[str, float]:
  """Matthews correlation (multi-class form, as sklearn) x100; 0 when undefined."""
  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  labels, encoded = np.unique(np.concatenate([targets, predictions]), return_inverse=True)
  n = len(targets)
  k = len(labels)
  confusion = np.zeros((k, k), dtype=np.float64)
  np.add.at(confusion, (encoded[:n], encoded[n:]), 1)
  t_sum = confusion.sum(axis=1)
  p_sum = confusion.sum(axis=0)
  n_correct = np.trace(confusion)
  n_samples = confusion.sum()
  cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
  cov_ypyp = n_samples**2 - np.dot(p_sum, p_sum)
  cov_ytyt = n_samples**2 - np.dot(t_sum, t_sum)
  if cov_ypyp * cov_ytyt == 0:
    return {'matthews_corrcoef': 0.0}
  return {'matthews_corrcoef': 100.0 * float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.size < 2:
    return float('nan')
  xm = x - x.mean()
  ym = y - y.mean()
  denominator = np.sqrt(np.dot(xm, xm) * np.dot(ym, ym))
  if denominator == 0:
    return float('nan')
  return float(np.clip(np.dot(xm, ym) / denominator, -1.0, 1.0))


def rankdata(x: Sequence[float]) -> np.ndarray:
  """Ranks starting at 1, ties get their average rank (scipy's 'average')."""
  x = np.asarray(x, dtype=np.float64)
  order = np.argsort(x, kind='mergesort')
  sorted_x = x[order]
  boundaries = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1], [True]])
  starts = np.flatnonzero(boundaries)
  ranks_sorted = np.empty(len(x), dtype=np.float64)
  for begin, end in zip(starts[:-1], starts[1:]):
    ranks_sorted[begin:end] = (begin + 1 + end) / 2.0
  ranks = np.empty_like(ranks_sorted)
  ranks[order] = ranks_sorted
  return ranks


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Dict[str, float]:
  """Pearson r x100 (NaN when either side is constant, as scipy)."""
  return {'pearson_corrcoef': 100.0 * _pearson(targets, predictions)}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Dict[str, float]:
  """Spearman rho x100: Pearson r of the average ranks."""
  return {'spearman_corrcoef': 100.0 * _pearson(rankdata(targets), rankdata(predictions))}


# ========== QA ==========
_ARTICLES = re.compile(r'\b(a|an|the)\b', flags=re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(answer: str) -> str:
  """SQuAD v1.1 answer normalisation: lower, drop punctuation/articles, fix spaces."""
  answer = answer.lower()
  answer = ''.join(ch for ch in answer if ch not in _PUNCTUATION)
  answer = _ARTICLES.sub(' ', answer)
  return ' '.join(answer.split())


def _token_f1(target: str, prediction: str) -> float:
  target_tokens = target.split()
  prediction_tokens = prediction.split()
  common = collections.Counter(target_tokens) & collections.Counter(prediction_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def qa_metrics(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> Dict[str, float]:
  """EM and token F1 (x100) of already-normalised strings, max over gold answers."""
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
  if not targets:
    return {'em': float('nan'), 'f1': float('nan')}
  em = np.mean(
      [max((float(p == t) for t in ts), default=0.0) for ts, p in zip(targets, predictions)]
  )
  f1 = np.mean(
      [max((_token_f1(t, p) for t in ts), default=0.0) for ts, p in zip(targets, predictions)]
  )
  return {'em': 100.0 * float(em), 'f1': 100.0 * float(f1)}


def squad(targets: Sequence[Any], predictions: Sequence[str]) -> Dict[str, float]:
  """SQuAD EM/F1 (x100); a target is one gold answer or a list of them."""
  gold = [[normalize_squad(a) for a in ([t] if isinstance(t, str) else t)] for t in targets]
  return qa_metrics(gold, [normalize_squad(p) for p in predictions])


# ========== grouped metrics (MultiRC, ReCoRD) ==========
def all_match(targets: Sequence[Any], predictions: Sequence[Any]) -> Dict[str, float]:
  """100 if every prediction equals its target, else 0."""
  return {
      'exact_match': 100.0
      * float(
          len(targets) == len(predictions)
          and all(_equal(t, p) for t, p in zip(targets, predictions))
      )
  }


def _hashable(x: Any) -> Any:
  if isinstance(x, (list, np.ndarray)):
    return tuple(_hashable(v) for v in list(x))
  return x


def mean_group_metric(
    metric_fn: MetricFn, group_key: str = 'group', value_key: str = 'value'
) -> MetricFn:
  """Applies `metric_fn` to each group (by the target's `group_key`) and averages.

  Targets and predictions are dicts; values are read at `value_key`. E.g.
  `mean_group_metric(all_match)` is MultiRC's per-question exact match.
  """

  def metric(targets, predictions):
    grouped = collections.OrderedDict()
    for target, prediction in zip(targets, predictions):
      group = grouped.setdefault(_hashable(target[group_key]), ([], []))
      group[0].append(target[value_key])
      group[1].append(prediction[value_key])
    scores = collections.defaultdict(list)
    for group_targets, group_predictions in grouped.values():
      for name, value in metric_fn(group_targets, group_predictions).items():
        scores[name].append(value)
    return {name: float(np.mean(values)) for name, values in scores.items()}

  return metric


def deduplicate_metric(
    metric_fn: MetricFn, group_key: str = 'group', value_key: str = 'value'
) -> MetricFn:
  """Keeps one (target, prediction) per target group, then applies `metric_fn`.

  ReCoRD repeats a query once per gold answer; the score is per query.
  """

  def metric(targets, predictions):
    deduped = collections.OrderedDict()
    for target, prediction in zip(targets, predictions):
      deduped[_hashable(target[group_key])] = (target[value_key], prediction[value_key])
    return metric_fn([t for t, _ in deduped.values()], [p for _, p in deduped.values()])

  return metric


def multirc_f1_over_all_answers(
    targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]
) -> Dict[str, float]:
  """MultiRC F1a: binary F1 over every answer option (invalid outputs are wrong)."""
  return f1_score_with_invalid([t['value'] for t in targets], [p['value'] for p in predictions])


multirc_exact_match = mean_group_metric(all_match)
record_squad = deduplicate_metric(squad)


# ========== T5's metric lists ==========
def get_glue_metric(config_name: str) -> List[MetricFn]:
  """T5's metrics for a GLUE TFDS config ([] for the unlabelled AX)."""
  if config_name == 'cola':
    return [matthews_corrcoef]
  if config_name in ('mrpc', 'qqp'):
    return [f1_score_with_invalid, accuracy]
  if config_name == 'stsb':
    return [pearson_corrcoef, spearman_corrcoef]
  if config_name == 'ax':
    return []
  return [accuracy]


def get_super_glue_metric(config_name: str) -> List[MetricFn]:
  """T5's metrics for a SuperGLUE TFDS config ([] for the unlabelled AX-b/AX-g)."""
  if config_name == 'cb':
    return [mean_multiclass_f1(num_classes=3), accuracy]
  if config_name == 'multirc':
    return [multirc_f1_over_all_answers, multirc_exact_match]
  if config_name == 'record':
    return [record_squad]
  if config_name in ('axb', 'axg'):
    return []
  return [accuracy]


# ========== `*_examples` support ==========
def metric_with_examples(
    metric_fn: MetricFn,
    targets: Sequence[Any],
    predictions: Sequence[Any],
    prediction_field: str = utils.PREDICTION,
) -> Dict[str, Any]:
  """Calls `metric_fn` on the `prediction_field` of dict predictions."""
  return metric_fn(
      targets, [p[prediction_field] if isinstance(p, Mapping) else p for p in predictions]
  )


def with_examples(metric_fn: MetricFn) -> MetricFn:
  """`metric_fn` for a task whose predictions are `postprocess_with_examples` dicts."""

  def metric(targets, predictions):
    return metric_with_examples(metric_fn, targets, predictions)

  metric.__name__ = getattr(metric_fn, '__name__', 'metric')
  return metric


def safe_sample(
    num_examples: int, population: Sequence[Any], rng: Optional[random.Random] = None
) -> List[int]:
  """Indices of up to `num_examples` random elements (-1: all), in order."""
  rng = rng or random.Random(0)
  if num_examples < 0 or num_examples >= len(population):
    return list(range(len(population)))
  return sorted(rng.sample(range(len(population)), k=num_examples))


def is_wrong(target: Any, prediction: Any) -> bool:
  """Whether a postprocessed prediction misses its target.

  Lists of gold answers (QA) count a prediction as right when it matches one of
  them after SQuAD normalisation; dicts compare their `value`.
  """
  if isinstance(prediction, Mapping) and utils.PREDICTION in prediction:
    prediction = prediction[utils.PREDICTION]
  if isinstance(target, Mapping) and 'value' in target:
    target = target['value']
  if isinstance(prediction, Mapping) and 'value' in prediction:
    prediction = prediction['value']
  if isinstance(target, (list, tuple)) and isinstance(prediction, str):
    return normalize_squad(prediction) not in {normalize_squad(str(t)) for t in target}
  return not _equal(target, prediction)


def format_classification(example: Mapping[str, Any]) -> str:
  """Markdown block: input, target and prediction of a `*_examples` prediction."""
  return (
      f'**input:** {example.get(utils.INPUT_TEXT)}\n\n'
      f'**target:** {example.get(utils.TARGET_TEXT)}\n\n'
      f'**prediction:** {example.get(utils.PREDICTION_TEXT)}'
  )


def format_qa(example: Mapping[str, Any]) -> str:
  """Markdown block: context, question, gold answers and prediction."""
  answers = example.get(utils.ANSWERS_TEXT) or []
  answers = sorted({str(a) for a in answers}) if isinstance(answers, list) else [str(answers)]
  lines = []
  if example.get(utils.CONTEXT_TEXT) is not None:
    lines.append(f'**context:** {example.get(utils.CONTEXT_TEXT)}')
  lines += [
      f'**question:** {example.get(utils.QUESTION_TEXT)}',
      f'**answers:** {"; ".join(answers)}',
      f'**prediction:** {example.get(utils.PREDICTION_TEXT)}',
  ]
  return '\n\n'.join(lines)


def text_examples(
    targets: Sequence[Any],
    predictions: Sequence[Mapping[str, Any]],
    task_name: str,
    num_examples: int = 8,
    seed: Optional[int] = 0,
    find_negative: bool = True,
    format_fn: Callable[[Mapping[str, Any]], str] = format_classification,
) -> Dict[str, seqio.metrics.Text]:
  """TensorBoard text of a random sample of predictions and of wrong ones.

  Args:
    targets: postprocessed targets.
    predictions: `postprocess_with_examples` dicts.
    task_name: prefix of the metric names (`{task} samples`,
      `{task} negative samples`).
    num_examples: how many of each to show (-1: all).
    seed: sampling seed.
    find_negative: also show wrong predictions.
    format_fn: renders one prediction dict as markdown.

  Returns:
    {name: seqio.metrics.Text}.
  """
  rng = random.Random(seed)
  separator = '\n\n---\n\n'
  indices = safe_sample(num_examples, predictions, rng)
  result = {
      f'{task_name} samples': seqio.metrics.Text(
          textdata=separator.join(format_fn(predictions[i]) for i in indices)
      )
  }
  if find_negative:
    wrong = [p for t, p in zip(targets, predictions) if is_wrong(t, p)]
    indices = safe_sample(num_examples, wrong, rng)
    result[f'{task_name} negative samples'] = seqio.metrics.Text(
        textdata=separator.join(format_fn(wrong[i]) for i in indices)
    )
  return result
