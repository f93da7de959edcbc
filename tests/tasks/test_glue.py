"""GLUE tasks under `tfds.testing.mock_data` (offline): formats, variants, metrics, mixtures.

Every task's pipeline is checked structurally (source, splits, preprocessor
chain, postprocessor kind); one version/suffix per config is materialized from
mock data (2 examples) and its texts are compared exactly with T5's format,
which, with identical pipelines over identical sources, covers every variant.
"""

import importlib

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from prompt_tuning.data import features
from prompt_tuning.data import loggers
from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import utils
from task_testlib import examples, raw_examples, describe, expected_chain
import tasks.glue as glue

VOCAB = seqio.SentencePieceVocabulary(features.seqio_test_vocabulary_path(), extra_ids=10)
GLUE_BUILDER_CONFIGS = tfds.text.glue.Glue.builder_configs
FIELDS = {  # T5's field order (sorted names).
    'cola': ('sentence',),
    'sst2': ('sentence',),
    'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'),
    'stsb': ('sentence1', 'sentence2'),
    'mnli': ('hypothesis', 'premise'),
    'mnli_mismatched': ('hypothesis', 'premise'),
    'mnli_matched': ('hypothesis', 'premise'),
    'qnli': ('question', 'sentence'),
    'rte': ('sentence1', 'sentence2'),
    'wnli': ('sentence1', 'sentence2'),
    'ax': ('hypothesis', 'premise'),
}
BENCHMARK = {c: ('mnli' if 'mnli' in c or c == 'ax' else c) for c in FIELDS}


@pytest.fixture(scope='module', autouse=True)
def mock_glue():
  glue.register(VOCAB)
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
  glue.register()  # back to the default vocabulary


def split_for(config: str) -> str:
  return {'mnli': 'validation_matched', 'ax': 'test'}.get(config, 'validation')


def all_variants():
  for ver, data_version in glue.VERSIONS.items():
    for config in FIELDS:
      for prefix in glue.PREFIXES:
        for suffix in glue.SUFFIXES:
          yield ver, data_version, config, prefix, suffix


# ========== registry ==========
def test_registered_names():
  assert len(glue.TASK_NAMES) == 2 * 12 * 3 * 2 == len(set(glue.TASK_NAMES))
  assert len(glue.MIXTURE_NAMES) == 2 * 3 * 2 * 2
  expected = {f'{p}glue_{c}_{v}{s}' for v, _, c, p, s in all_variants()}
  assert set(glue.TASK_NAMES) == expected
  for name in (
      'glue_sst2_v200_examples',
      'taskless_glue_sst2_v200_examples',
      'task_index_glue_sst2_v200_examples',
      'glue_sst2_v002',
      'glue_rte_v002_examples',
      'glue_mnli_and_dev_v200_examples',
      'task_index_glue_mnli_and_dev_v002',
      'taskless_glue_v200_examples_proportional',
      'glue_v002_proportional',
  ):
    assert seqio.get_mixture_or_task(name).name == name


def test_label_classes_are_tfds_and_t5s():
  for config, (labels, _) in glue.GLUE_CONFIGS.items():
    tfds_labels = GLUE_BUILDER_CONFIGS[config].label_classes
    assert labels == (tuple(tfds_labels) if tfds_labels else None)
  assert glue.GLUE_CONFIGS['mrpc'][0] == ('not_equivalent', 'equivalent')
  assert glue.GLUE_CONFIGS['wnli'][0] == ('not_entailment', 'entailment')


def test_task_index_mapping():
  assert glue.GLUE_TASK_INDEX == {
      'cola': 0,
      'mnli': 1,
      'mrpc': 2,
      'qnli': 3,
      'qqp': 4,
      'rte': 5,
      'sst2': 6,
      'stsb': 7,
      'wnli': 8,
      'ax': 1,
      'mnli_matched': 1,
      'mnli_mismatched': 1,
  }


def test_every_task_pipeline():
  """Source, splits and the full preprocessor chain of all 144 tasks."""
  for ver, data_version, config, prefix, suffix in all_variants():
    task = seqio.get_mixture_or_task(f'{prefix}glue_{config}_{ver}{suffix}')
    assert task.source.tfds_dataset.name == f'glue/{config}:{data_version}'
    assert tuple(task.source.splits) == glue.GLUE_CONFIGS[config][1]
    labels = GLUE_BUILDER_CONFIGS[config].label_classes
    text = prep.get_glue_text_preprocessor(config, labels)
    assert describe(task.preprocessors) == expected_chain(
        text, prefix, glue.GLUE_TASK_INDEX[config]
    )
    assert task.output_features['targets'].vocabulary is VOCAB
    target = '1.2' if config == 'stsb' else labels[1]
    out = task.postprocess_fn(
        target,
        example={utils.INPUT_TEXT: b'in', utils.TARGET_TEXT: target.encode()},
        is_target=False,
    )
    expected_value = 1.2 if config == 'stsb' else 1
    if suffix:
      assert out[utils.PREDICTION] == expected_value and out[utils.INPUT_TEXT] == 'in'
      assert out[utils.PREDICTION_TEXT] == target
    else:
      assert out == expected_value
    has_metrics = config != 'ax'
    assert bool(task.metric_objs) == has_metrics


def test_import_does_not_read_the_vocabulary():
  features.set_default_vocabulary('/nonexistent/dir/spm.model')
  try:
    glue.register()
    task = seqio.get_mixture_or_task('glue_sst2_v200')
    assert task.output_features['inputs'].vocabulary.sentencepiece_model_file == (
        '/nonexistent/dir/spm.model'
    )
  finally:
    features.set_default_vocabulary(None)
    glue.register(VOCAB)


def test_reimport_is_idempotent():
  importlib.reload(glue)  # registers again without "already registered" errors
  glue.register(VOCAB)
  assert (
      seqio.get_mixture_or_task('glue_sst2_v200_examples').output_features['inputs'].vocabulary
      is VOCAB
  )


# ========== mock data ==========
def expected_inputs(config: str, raw) -> str:
  parts = [BENCHMARK[config]]
  for field in FIELDS[config]:
    parts += [f'{field}:', raw[field]]
  return ' '.join(parts)


def expected_target(config: str, raw) -> str:
  if config == 'stsb':
    return '%.1f' % (np.round(np.float32(raw['label']) * np.float32(5)) / np.float32(5))
  labels = glue.GLUE_CONFIGS[config][0]
  return '<unk>' if raw['label'] < 0 else labels[raw['label']]


@pytest.mark.parametrize('config', list(FIELDS))
def test_formats_taskless_and_task_index(config):
  split = split_for(config)
  base = examples(f'glue_{config}_v200_examples', split)
  taskless = examples(f'taskless_glue_{config}_v200_examples', split)
  task_index = examples(f'task_index_glue_{config}_v200_examples', split)
  raw = raw_examples(f'glue_{config}_v200_examples', split)
  assert len(base) == len(taskless) == len(task_index) == len(raw) == 2
  sentinel = VOCAB.vocab_size - 1 - glue.GLUE_TASK_INDEX[config]
  for b, tl, ti, r in zip(base, taskless, task_index, raw):
    # T5's format with exact label names.
    assert b['inputs_pretokenized'] == expected_inputs(config, r)
    assert b['targets_pretokenized'] == expected_target(config, r)
    assert b['idx'] == r['idx']
    # taskless: exactly the benchmark word is gone.
    benchmark = BENCHMARK[config]
    assert b['inputs_pretokenized'] == f'{benchmark} {tl["inputs_pretokenized"]}'
    assert len(b['inputs_pretokenized'].split()) == len(tl['inputs_pretokenized'].split()) + 1
    assert len(tl['inputs']) < len(b['inputs'])
    assert tl['targets_pretokenized'] == b['targets_pretokenized']
    # task_index: the taskless example plus exactly one leading token.
    assert ti['inputs_pretokenized'] == tl['inputs_pretokenized']
    assert len(ti['inputs']) == len(tl['inputs']) + 1
    assert ti['inputs'][0] == sentinel and ti['inputs'][1:] == tl['inputs']
    assert b['inputs'][-1] == ti['inputs'][-1] == VOCAB.eos_id
  # The `_examples` postprocessor keeps the input text for metrics, targets stay values.
  task = seqio.get_mixture_or_task(f'glue_{config}_v200_examples')
  ex = {k: (v.encode() if isinstance(v, str) else v) for k, v in base[0].items()}
  prediction = task.postprocess_fn(base[0]['targets_pretokenized'], example=ex, is_target=False)
  assert prediction[utils.INPUT_TEXT] == base[0]['inputs_pretokenized']


def test_v002_builds_from_tfds_1_0_0():
  new = examples('task_index_glue_qnli_v200', 'validation')
  old = examples('task_index_glue_qnli_v002', 'validation')
  assert [e['inputs_pretokenized'] for e in old] == [e['inputs_pretokenized'] for e in new]
  assert old[0]['inputs'][0] == VOCAB.vocab_size - 1 - glue.GLUE_TASK_INDEX['qnli']


@pytest.mark.parametrize('config', ['sst2', 'mrpc', 'cola', 'stsb', 'mnli_matched'])
def test_metrics_on_mock_predictions(config):
  """Perfect predictions through the task's postprocessor and metrics, like seqio does."""
  for suffix in glue.SUFFIXES:
    task = seqio.get_mixture_or_task(f'glue_{config}_v200{suffix}')
    exs = [
        {k: (v.encode() if isinstance(v, str) else v) for k, v in e.items()}
        for e in examples(f'glue_{config}_v200_examples', split_for(config))
    ]
    texts = [e['targets_pretokenized'].decode() for e in exs]
    targets = [task.postprocess_fn(t, example=e, is_target=True) for t, e in zip(texts, exs)]
    predictions = [task.postprocess_fn(t, example=e, is_target=False) for t, e in zip(texts, exs)]
    results = {}
    for fn in task.metric_fns:
      results.update(fn(targets, predictions))
    if 'accuracy' in results:
      assert results['accuracy'] == 100.0
    if suffix:
      assert isinstance(results[f'{config} samples'], seqio.metrics.Text)
      assert exs[0]['inputs_pretokenized'].decode() in results[f'{config} samples'].textdata
    expected = (
        {m for fn in pt_metrics.get_glue_metric(config) for m in fn(targets, targets)}
        if not suffix
        else None
    )
    if expected:
      assert expected <= set(results)


# ========== mixtures ==========
@pytest.mark.parametrize('prefix', glue.PREFIXES)
@pytest.mark.parametrize('suffix', glue.SUFFIXES)
def test_mnli_and_dev_mixture(prefix, suffix):
  mixture = seqio.get_mixture_or_task(f'{prefix}glue_mnli_and_dev_v200{suffix}')
  assert {t.name for t in mixture.tasks} == {
      f'{prefix}glue_mnli_v200{suffix}',
      f'{prefix}glue_mnli_mismatched_v200{suffix}',
      f'{prefix}glue_mnli_matched_v200{suffix}',
  }
  # Training reads MNLI only; evaluation gets both dev sets under `validation`.
  assert [t.name for t in mixture.tasks if 'train' in t.splits] == [
      f'{prefix}glue_mnli_v200{suffix}'
  ]
  assert len([t for t in mixture.tasks if 'validation' in t.splits]) == 2


def test_proportional_mixture_rates():
  mixture = seqio.get_mixture_or_task('task_index_glue_v200_examples_proportional')
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates['task_index_glue_mnli_v200_examples'] == 392_702
  assert rates['task_index_glue_cola_v200_examples'] == 8_551
  assert rates['task_index_glue_ax_v200_examples'] == 0
  assert not any('wnli' in name for name in rates)
  assert len(rates) == 11


# ========== seqio.Evaluator ==========
def test_seqio_evaluator_end_to_end(tmp_path, monkeypatch):
  """Perfect predictions through seqio's Evaluator, metrics and both TensorBoard loggers."""
  # Mock TFDS data has no split sizes; the Evaluator only uses them to decide in-memory caching.
  monkeypatch.setattr(seqio.TfdsDataSource, 'num_input_examples', lambda self, split: None)
  name = 'task_index_glue_sst2_v200_examples'
  evaluator = seqio.Evaluator(
      mixture_or_task_name=name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split='validation',
      logger_cls=[seqio.TensorBoardLogger, loggers.PredictionSamplesLogger],
      log_dir=str(tmp_path),
  )

  def predict_fn(ds):
    return [(i, ex['decoder_target_tokens']) for i, ex in ds.as_numpy_iterator()]

  all_metrics, _ = evaluator.evaluate(compute_metrics=True, step=5, predict_fn=predict_fn)
  result = all_metrics.result()[name]
  # The 26-piece test vocabulary has no 'g': 'negative' decodes as 'ne ⁇ ative' (wrong).
  targets = [e['targets_pretokenized'] for e in examples(name, 'validation', 3)]
  right = sum(VOCAB.decode(VOCAB.encode(t)) == t for t in targets)
  assert result['accuracy'] == pytest.approx(100.0 * right / 3)
  assert isinstance(result['sst2 samples'], seqio.metrics.Text)
  summaries = loggers.read_text_summaries(str(tmp_path / name))
  assert 'eval/sst2 samples' in summaries  # seqio's TensorBoardLogger: the Text metric
  assert summaries[loggers.WRONG_TAG][5].startswith(f'{3 - right} of 3 predictions are wrong.')
  assert summaries[loggers.WRONG_TAG][5].count('**input:** sentence:') == 3 - right
  assert summaries[loggers.RANDOM_TAG][5].count('**input:** sentence:') == 3
