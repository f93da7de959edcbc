"""Metrics: equal to scikit-learn/scipy on random inputs; hand-computed QA/MultiRC/ReCoRD."""

import numpy as np
import pytest
import scipy.stats
import seqio
from sklearn import metrics as skm

from prompt_tuning.data import metrics
from prompt_tuning.data import utils

SEEDS = range(5)


def _random_labels(rng, n, num_classes, invalid_fraction=0.0):
  y = rng.integers(0, num_classes, size=n)
  if invalid_fraction:
    mask = rng.random(n) < invalid_fraction
    y = np.where(mask, -1, y)
  return y


@pytest.mark.parametrize('seed', SEEDS)
def test_accuracy_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  t, p = _random_labels(rng, 57, 3), _random_labels(rng, 57, 3, 0.1)
  assert metrics.accuracy(list(t), list(p))['accuracy'] == pytest.approx(
      100 * skm.accuracy_score(t, p)
  )


def test_accuracy_on_strings_and_empty():
  assert metrics.accuracy(['a', 'b', 'c', 'd'], ['a', 'x', 'c', 'y']) == {'accuracy': 50.0}
  assert np.isnan(metrics.accuracy([], [])['accuracy'])


@pytest.mark.parametrize('seed', SEEDS)
def test_binary_f1_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  t, p = _random_labels(rng, 80, 2), _random_labels(rng, 80, 2)
  assert metrics.binary_f1(t, p) == pytest.approx(skm.f1_score(t, p))
  assert metrics.binary_f1(t, p, pos_label=0) == pytest.approx(skm.f1_score(t, p, pos_label=0))


@pytest.mark.parametrize('seed', SEEDS)
def test_f1_with_invalid_counts_invalid_as_wrong(seed):
  rng = np.random.default_rng(seed)
  t, p = _random_labels(rng, 80, 2), _random_labels(rng, 80, 2, invalid_fraction=0.2)
  fixed = np.where((p != 0) & (p != 1), 1 - t, p)
  assert metrics.f1_score_with_invalid(list(t), list(p))['f1'] == pytest.approx(
      100 * skm.f1_score(t, fixed)
  )
  # The input list is not modified.
  assert metrics.f1_score_with_invalid([1, 0], [-1, -1]) == {'f1': 0.0}


def test_f1_degenerate_is_zero_like_sklearn():
  t = p = np.zeros(6, dtype=int)
  expected = skm.f1_score(t, p, zero_division=0.0)
  assert metrics.binary_f1(t, p) == expected == 0.0


@pytest.mark.parametrize('seed', SEEDS)
def test_macro_f1_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  t, p = _random_labels(rng, 90, 3), _random_labels(rng, 90, 3, invalid_fraction=0.15)
  expected = skm.f1_score(t, p, labels=[0, 1, 2], average='macro')
  fn = metrics.mean_multiclass_f1(num_classes=3)
  assert fn(list(t), list(p)) == {'mean_3class_f1': pytest.approx(100 * expected)}
  assert metrics.macro_f1(t, p) == pytest.approx(
      skm.f1_score(
          t, p, labels=np.unique(np.concatenate([t, p])), average='macro', zero_division=0.0
      )
  )


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('num_classes', [2, 3])
def test_matthews_matches_sklearn(seed, num_classes):
  rng = np.random.default_rng(seed)
  t, p = _random_labels(rng, 70, num_classes), _random_labels(rng, 70, num_classes, 0.1)
  assert metrics.matthews_corrcoef(list(t), list(p))['matthews_corrcoef'] == pytest.approx(
      100 * skm.matthews_corrcoef(t, p)
  )


def test_matthews_constant_prediction_is_zero():
  assert metrics.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == {'matthews_corrcoef': 0.0}
  assert skm.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0


@pytest.mark.parametrize('seed', SEEDS)
def test_pearson_and_spearman_match_scipy(seed):
  rng = np.random.default_rng(seed)
  t = np.round(rng.uniform(0, 5, size=60) * 5) / 5  # STS-B-like: many ties
  p = np.round((t + rng.normal(0, 1, size=60)) * 5) / 5
  assert metrics.pearson_corrcoef(list(t), list(p))['pearson_corrcoef'] == pytest.approx(
      100 * scipy.stats.pearsonr(t, p)[0]
  )
  assert metrics.spearman_corrcoef(list(t), list(p))['spearman_corrcoef'] == pytest.approx(
      100 * scipy.stats.spearmanr(t, p)[0]
  )
  np.testing.assert_allclose(metrics.rankdata(p), scipy.stats.rankdata(p))


def test_pearson_constant_is_nan():
  assert np.isnan(metrics.pearson_corrcoef([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])['pearson_corrcoef'])


# ========== SQuAD ==========
@pytest.mark.parametrize(
    'text,expected',
    [
        ('The Cat!', 'cat'),
        ('  a  dog, an apple and THE end. ', 'dog apple and end'),
        ('theater', 'theater'),
        ("Tom's", 'toms'),
    ],
)
def test_normalize_squad(text, expected):
  assert metrics.normalize_squad(text) == expected


def test_squad_hand_computed():
  targets = [
      ['The cat', 'a dog'],  # prediction 'cat' matches the first: EM 1, F1 1
      ['big red ball'],  # 'red ball game': common 2, P 2/3, R 2/3 -> F1 2/3
      ['Paris', 'in Paris , France'],  # 'France': EM 0; F1 vs 2nd: P 1, R 1/3 -> 0.5
      ['seven'],  # 'eight': 0
  ]
  predictions = ['cat', 'red ball game', 'France', 'eight']
  result = metrics.squad(targets, predictions)
  assert result['em'] == pytest.approx(100 * 1 / 4)
  assert result['f1'] == pytest.approx(100 * (1 + 2 / 3 + 0.5 + 0) / 4)
  # A single string target is one gold answer.
  assert metrics.squad(['The answer'], ['answer']) == {'em': 100.0, 'f1': 100.0}


# ========== MultiRC ==========
def _mrc(value, group=None):
  return {'value': value} if group is None else {'value': value, 'group': group}


def test_multirc_hand_computed():
  # Question 1: 3 answers, all right. Question 2: 2 answers, one wrong. Question 3: invalid output.
  targets = [_mrc(1, 1), _mrc(0, 1), _mrc(1, 1), _mrc(1, 2), _mrc(0, 2), _mrc(1, 3)]
  predictions = [_mrc(1), _mrc(0), _mrc(1), _mrc(1), _mrc(1), _mrc(-1)]
  # Over all answers: tp = 3 (q1a1, q1a3, q2a1), fp = 1 (q2a2), fn = 1 (q3: invalid -> wrong).
  assert metrics.multirc_f1_over_all_answers(targets, predictions) == {
      'f1': pytest.approx(100 * 2 * 3 / (2 * 3 + 1 + 1))
  }
  assert metrics.multirc_exact_match(targets, predictions) == {
      'exact_match': pytest.approx(100 / 3)
  }


def test_mean_group_metric_averages_groups():
  fn = metrics.mean_group_metric(metrics.accuracy)
  targets = [_mrc(1, 'a'), _mrc(1, 'a'), _mrc(0, 'b')]
  predictions = [_mrc(1), _mrc(0), _mrc(0)]
  assert fn(targets, predictions) == {'accuracy': pytest.approx((50 + 100) / 2)}


# ========== ReCoRD ==========
def test_record_deduplicates_queries():
  group1, group2 = (10, 1), (10, 2)
  answers1, answers2 = ['Obama', 'Barack Obama'], ['London']
  # ReCoRD repeats a query once per gold answer; each query counts once.
  targets = [
      {'value': answers1, 'group': group1},
      {'value': answers1, 'group': group1},
      {'value': answers2, 'group': group2},
  ]
  predictions = [{'value': 'barack obama'}, {'value': 'barack obama'}, {'value': 'Paris'}]
  assert metrics.record_squad(targets, predictions) == {'em': 50.0, 'f1': 50.0}
  assert metrics.get_super_glue_metric('record')[0](targets, predictions) == {
      'em': 50.0,
      'f1': 50.0,
  }


def test_all_match():
  assert metrics.all_match([1, 0], [1, 0]) == {'exact_match': 100.0}
  assert metrics.all_match([1, 0], [1, 1]) == {'exact_match': 0.0}


# ========== metric lists and `_examples` helpers ==========
@pytest.mark.parametrize(
    'config,names',
    [
        ('cola', [{'matthews_corrcoef'}]),
        ('sst2', [{'accuracy'}]),
        ('mrpc', [{'f1'}, {'accuracy'}]),
        ('qqp', [{'f1'}, {'accuracy'}]),
        ('stsb', [{'pearson_corrcoef'}, {'spearman_corrcoef'}]),
        ('mnli_matched', [{'accuracy'}]),
        ('ax', []),
    ],
)
def test_glue_metric_names(config, names):
  fns = metrics.get_glue_metric(config)
  if config == 'stsb':
    out = [fn([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]) for fn in fns]
  else:
    out = [fn([1, 0, 1], [1, 1, 1]) for fn in fns]
  assert [set(o) for o in out] == names


def test_super_glue_metric_names():
  assert [set(fn([0, 1, 2], [0, 1, 1])) for fn in metrics.get_super_glue_metric('cb')] == [
      {'mean_3class_f1'},
      {'accuracy'},
  ]
  assert metrics.get_super_glue_metric('axb') == []
  assert metrics.get_super_glue_metric('boolq') == [metrics.accuracy]


@pytest.mark.parametrize(
    'fn',
    [
        metrics.accuracy,
        metrics.f1_score_with_invalid,
        metrics.mean_multiclass_f1(3),
        metrics.matthews_corrcoef,
        metrics.pearson_corrcoef,
        metrics.spearman_corrcoef,
        metrics.squad,
        metrics.multirc_f1_over_all_answers,
        metrics.multirc_exact_match,
        metrics.record_squad,
        metrics.with_examples(metrics.accuracy),
    ],
)
def test_seqio_accepts_signature(fn):
  metric = seqio.metrics.LegacyMetric.empty(fn, None)
  assert metric.model_output_type == seqio.metrics.ModelOutputType.PREDICTION


def test_metric_with_examples_unwraps_dicts():
  predictions = [
      {utils.PREDICTION: 1, utils.PREDICTION_TEXT: 'positive'},
      {utils.PREDICTION: 0, utils.PREDICTION_TEXT: 'negative'},
  ]
  assert metrics.metric_with_examples(metrics.accuracy, [1, 1], predictions) == {'accuracy': 50.0}
  assert metrics.with_examples(metrics.accuracy)([1, 1], predictions) == {'accuracy': 50.0}


def test_text_examples_shows_samples_and_wrong_ones():
  predictions = [
      {
          utils.PREDICTION: 1,
          utils.PREDICTION_TEXT: 'positive',
          utils.INPUT_TEXT: 'sst2 good',
          utils.TARGET_TEXT: 'positive',
      },
      {
          utils.PREDICTION: 1,
          utils.PREDICTION_TEXT: 'positive',
          utils.INPUT_TEXT: 'sst2 awful',
          utils.TARGET_TEXT: 'negative',
      },
  ]
  out = metrics.text_examples([1, 0], predictions, task_name='sst2', num_examples=5)
  assert set(out) == {'sst2 samples', 'sst2 negative samples'}
  assert all(isinstance(v, seqio.metrics.Text) for v in out.values())
  assert 'sst2 good' in out['sst2 samples'].textdata
  assert 'sst2 awful' in out['sst2 samples'].textdata
  assert 'sst2 awful' in out['sst2 negative samples'].textdata
  assert 'sst2 good' not in out['sst2 negative samples'].textdata


def test_is_wrong_handles_qa_lists_and_dicts():
  assert not metrics.is_wrong(['The Cat', 'dog'], 'cat')
  assert metrics.is_wrong(['The Cat'], 'mouse')
  assert not metrics.is_wrong({'value': 1, 'group': 3}, {'value': 1})
  assert metrics.is_wrong(1, {utils.PREDICTION: 0})


def test_format_qa():
  text = metrics.format_qa(
      {
          utils.CONTEXT_TEXT: 'ctx',
          utils.QUESTION_TEXT: 'q?',
          utils.ANSWERS_TEXT: ['b', 'a', 'b'],
          utils.PREDICTION_TEXT: 'a',
      }
  )
  assert 'ctx' in text and 'q?' in text and 'a; b' in text
