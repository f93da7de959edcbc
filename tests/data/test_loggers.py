"""PredictionSamplesLogger writes TensorBoard text summaries that can be read back."""

import os

import seqio
import tensorflow as tf

from prompt_tuning.data import loggers
from prompt_tuning.data import utils


def _dataset(inputs, targets):
  return tf.data.Dataset.from_tensor_slices(
      {
          utils.INPUT_TEXT: tf.constant(inputs),
          utils.TARGET_TEXT: tf.constant(targets),
      }
  )


def test_writes_random_and_wrong_samples(tmp_path):
  inputs = [f'sst2 sentence: example {i}' for i in range(6)]
  targets_text = ['positive', 'negative'] * 3
  targets = [1, 0] * 3
  outputs = ['positive', 'positive', 'positive', 'negative', 'junk', 'negative']
  predictions = [1, 1, 1, 0, -1, 0]  # examples 1 and 4 are wrong
  logger = loggers.PredictionSamplesLogger(output_dir=str(tmp_path), num_examples=-1)
  logger(
      task_name='glue_sst2_v200',
      step=7,
      metrics={},
      dataset=_dataset(inputs, targets_text),
      inferences={'output': outputs, 'prediction': predictions},
      targets=targets,
  )
  summaries = loggers.read_text_summaries(os.path.join(tmp_path, 'glue_sst2_v200'))
  assert set(summaries) == {loggers.RANDOM_TAG, loggers.WRONG_TAG}
  random_text = summaries[loggers.RANDOM_TAG][7]
  wrong_text = summaries[loggers.WRONG_TAG][7]
  for i in range(6):
    assert f'example {i}' in random_text
  assert wrong_text.startswith('2 of 6 predictions are wrong.')
  shown = [f'example {i}' in wrong_text for i in range(6)]
  assert shown == [False, True, False, False, True, False]
  assert '**prediction:** junk' in wrong_text
  assert '**prediction (postprocessed):** -1' in wrong_text


def test_examples_dicts_and_sampling(tmp_path):
  """`*_examples` predictions (dicts) and QA list targets; samples are limited and per step."""
  n = 20
  inputs = [f'question: q{i} context: c' for i in range(n)]
  predictions = [
      {
          utils.PREDICTION: 'Paris' if i % 2 else 'Rome',
          utils.PREDICTION_TEXT: 'Paris' if i % 2 else 'Rome',
          utils.INPUT_TEXT: inputs[i],
      }
      for i in range(n)
  ]
  targets = [['Paris', 'paris']] * n
  logger = loggers.PredictionSamplesLogger(output_dir=str(tmp_path), num_examples=4, seed=1)
  for step in (1, 2):
    logger(
        task_name='squad',
        step=step,
        metrics={'em': seqio.metrics.Scalar(50.0)},
        dataset=_dataset(inputs, ['Paris'] * n),
        inferences={'prediction': predictions},
        targets=targets,
    )
  summaries = loggers.read_text_summaries(os.path.join(tmp_path, 'squad'))
  for step in (1, 2):
    random_text = summaries[loggers.RANDOM_TAG][step]
    wrong_text = summaries[loggers.WRONG_TAG][step]
    assert random_text.count('**input:**') == 4
    assert wrong_text.startswith('10 of 20 predictions are wrong.')
    assert wrong_text.count('**input:**') == 4
    assert 'Rome' in wrong_text and '**prediction:** Paris' not in wrong_text
  assert summaries[loggers.RANDOM_TAG][1] != summaries[loggers.RANDOM_TAG][2]


def test_no_predictions_writes_nothing(tmp_path):
  logger = loggers.PredictionSamplesLogger(output_dir=str(tmp_path))
  logger(
      task_name='t', step=None, metrics={}, dataset=None, inferences={'score': [0.1]}, targets=[1]
  )
  assert not os.path.exists(os.path.join(tmp_path, 't'))
