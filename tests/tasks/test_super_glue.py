"""SuperGLUE/WSC/DPR tasks under `tfds.testing.mock_data` (offline).

Every task's pipeline is checked structurally; one suffix per dataset is
materialized from mock data and compared exactly with T5's formats.
"""

import re

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from prompt_tuning.data import features
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import utils
from task_testlib import examples, raw_examples, describe, expected_chain
import tasks.super_glue as sg

VOCAB = seqio.SentencePieceVocabulary(features.seqio_test_vocabulary_path(), extra_ids=10)
SG_BUILDER_CONFIGS = tfds.text.super_glue.SuperGlue.builder_configs
FIELDS = {  # T5's field order: sorted names, except MultiRC and WiC.
    'boolq': ('passage', 'question'),
    'cb': ('hypothesis', 'premise'),
    'copa': ('choice1', 'choice2', 'premise', 'question'),
    'multirc': ('question', 'answer', 'paragraph'),
    'rte': ('hypothesis', 'premise'),
    'wic': ('sentence1', 'sentence2', 'word'),
    'axg': ('hypothesis', 'premise'),
}
WSC_TASKS = (
    'super_glue_wsc_v102_simple_train',
    'super_glue_wsc_v102_simple_eval',
    'dpr_v001_simple',
)


@pytest.fixture(scope='module', autouse=True)
def mock_super_glue():
  sg.register(VOCAB)
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
  sg.register()


# ========== registry ==========
def test_registered_names():
  bases = [f'super_glue_{c}_v102' for c in sg.SUPER_GLUE_CONFIGS] + list(WSC_TASKS)
  expected = {f'{p}{b}{s}' for b in bases for p in sg.PREFIXES for s in sg.SUFFIXES}
  assert set(sg.TASK_NAMES) == expected and len(sg.TASK_NAMES) == 72
  assert len(sg.MIXTURE_NAMES) == 18
  for name in (
      'super_glue_boolq_v102_examples',
      'taskless_super_glue_boolq_v102_examples',
      'task_index_super_glue_record_v102',
      'super_glue_wsc_v102_simple_eval_examples',
      'taskless_super_glue_wsc_and_dev_v102_simple_examples',
      'task_index_super_glue_v102_examples_proportional',
      'task_index_super_glue_with_dpr_v102_examples_proportional',
      'super_glue_v102_proportional',
      'taskless_dpr_v001_simple_examples',
  ):
    assert seqio.get_mixture_or_task(name).name == name


def test_label_classes_and_task_index():
  for config, (labels, _) in sg.SUPER_GLUE_CONFIGS.items():
    tfds_labels = SG_BUILDER_CONFIGS[config].label_classes
    if config != 'record':
      assert labels == tuple(tfds_labels)
  assert {
      k: sg.SUPER_GLUE_TASK_INDEX[k]
      for k in ('boolq', 'cb', 'copa', 'multirc', 'record', 'rte', 'wic', 'wsc')
  } == {'boolq': 0, 'cb': 1, 'copa': 2, 'multirc': 3, 'record': 4, 'rte': 5, 'wic': 6, 'wsc': 7}
  assert sg.SUPER_GLUE_TASK_INDEX['axb'] == sg.SUPER_GLUE_TASK_INDEX['axg'] == 5
  assert sg.SUPER_GLUE_TASK_INDEX['dpr'] == sg.SUPER_GLUE_TASK_INDEX['wsc.fixed'] == 7


def test_every_task_pipeline():
  for config, (labels, splits) in sg.SUPER_GLUE_CONFIGS.items():
    text = prep.get_glue_text_preprocessor(config, SG_BUILDER_CONFIGS[config].label_classes)
    for prefix in sg.PREFIXES:
      for suffix in sg.SUFFIXES:
        task = seqio.get_mixture_or_task(f'{prefix}super_glue_{config}_v102{suffix}')
        assert task.source.tfds_dataset.name == f'super_glue/{config}:1.0.2'
        assert tuple(task.source.splits) == splits
        assert describe(task.preprocessors) == expected_chain(
            text, prefix, sg.SUPER_GLUE_TASK_INDEX[config]
        )
        assert bool(task.metric_objs) == (config not in ('axb', 'axg'))
  for base, tfds_name, splits in (
      ('super_glue_wsc_v102_simple_train', 'super_glue/wsc.fixed:1.0.2', ('train',)),
      ('super_glue_wsc_v102_simple_eval', 'super_glue/wsc.fixed:1.0.2', ('validation', 'test')),
      ('dpr_v001_simple', 'definite_pronoun_resolution:1.1.0', ('train', 'test')),
  ):
    reference = seqio.get_mixture_or_task(base)
    text = reference.preprocessors[:1]
    for prefix in sg.PREFIXES:
      for suffix in sg.SUFFIXES:
        task = seqio.get_mixture_or_task(f'{prefix}{base}{suffix}')
        assert task.source.tfds_dataset.name == tfds_name
        assert tuple(task.source.splits) == splits
        assert describe(task.preprocessors) == expected_chain(text, prefix, 7)
        assert bool(task.metric_objs) == ('train' not in base)


# ========== mock data ==========
def expected_inputs(config: str, raw) -> str:
  benchmark = 'rte' if config in ('axb', 'axg') else config
  if config == 'axb':
    raw = dict(raw, premise=raw['sentence1'], hypothesis=raw['sentence2'])
  parts = [benchmark]
  for field in FIELDS.get(config, ('hypothesis', 'premise')):
    parts += [f'{field}:', raw[field]]
  return ' '.join(parts)


def check_variants(base_name: str, split: str, first_word: str, index: int):
  base = examples(base_name, split)
  taskless = examples(f'taskless_{base_name}', split)
  task_index = examples(f'task_index_{base_name}', split)
  assert len(base) == len(taskless) == len(task_index) > 0
  for b, tl, ti in zip(base, taskless, task_index):
    assert b['inputs_pretokenized'] == f'{first_word} {tl["inputs_pretokenized"]}'
    assert len(b['inputs_pretokenized'].split()) == len(tl['inputs_pretokenized'].split()) + 1
    assert tl['targets_pretokenized'] == b['targets_pretokenized']
    assert ti['inputs_pretokenized'] == tl['inputs_pretokenized']
    assert ti['inputs'][0] == VOCAB.vocab_size - 1 - index
    assert ti['inputs'][1:] == tl['inputs']
  return base


@pytest.mark.parametrize('config', ['boolq', 'cb', 'copa', 'multirc', 'rte', 'wic', 'axb', 'axg'])
def test_glue_style_formats(config):
  split = 'test' if config.startswith('ax') else 'validation'
  name = f'super_glue_{config}_v102_examples'
  base = check_variants(
      name, split, 'rte' if config.startswith('ax') else config, sg.SUPER_GLUE_TASK_INDEX[config]
  )
  labels = sg.SUPER_GLUE_CONFIGS[config][0]
  for b, r in zip(base, raw_examples(name, split)):
    assert b['inputs_pretokenized'] == expected_inputs(config, r)
    assert b['targets_pretokenized'] == labels[r['label']]
    if config == 'multirc':
      assert (b['idx/question'], b['idx/answer']) == (r['idx']['question'], r['idx']['answer'])


def test_record_format():
  name = 'super_glue_record_v102_examples'
  raw = raw_examples(name, 'validation', 1)[0]
  answers = raw['answers'] or ['<unk>']
  base = check_variants(name, 'validation', 'record', 4)
  passage = re.sub(
      r'\n@highlight\n', '. ', re.sub(r'([.?!"\'])\n@highlight\n', r'\1 ', raw['passage'])
  )
  expected = (
      f'record query: {raw["query"]} entities: {", ".join(raw["entities"])} ' f'passage: {passage}'
  )
  assert [b['inputs_pretokenized'] for b in base] == [expected] * 2
  assert [b['targets_pretokenized'] for b in base] == answers[:2]
  # One example per gold answer, each carrying all answers for the metric.
  all_examples = examples(name, 'validation', 100)
  first = [
      e
      for e in all_examples
      if e['idx/query'] == raw['idx']['query'] and e['idx/passage'] == raw['idx']['passage']
  ]
  assert [e['targets_pretokenized'] for e in first] == answers
  task = seqio.get_mixture_or_task(name)
  ex = {k: (v.encode() if isinstance(v, str) else v) for k, v in first[0].items()}
  ex['answers'] = np.array([a.encode() for a in first[0]['answers']], dtype=object)
  target = task.postprocess_fn(answers[0], example=ex, is_target=True)
  prediction = task.postprocess_fn(answers[-1], example=ex, is_target=False)
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn([target, target], [prediction, prediction]))
  assert scores['em'] == 100.0 and scores['f1'] == 100.0


def test_wsc_simple_formats():
  eval_name = 'super_glue_wsc_v102_simple_eval_examples'
  base = check_variants(eval_name, 'validation', 'wsc:', 7)
  for b, r in zip(base, raw_examples(eval_name, 'validation')):
    assert b['inputs_pretokenized'].startswith('wsc: ')
    assert b['targets_pretokenized'] == r['span1_text']
    words = r['text'].split(' ')
    if r['span2_index'] >= len(words) and r['span2_text'] not in words:
      assert b['inputs_pretokenized'] == f'wsc: {r["text"]}'
  # The train task keeps only examples whose candidate is the referent.
  train = examples('super_glue_wsc_v102_simple_train', 'train', 3)
  raw = raw_examples('super_glue_wsc_v102_simple_train', 'train', 3)
  assert [e['targets_pretokenized'] for e in train] == [
      r['span1_text'] for r in raw if r['label'] == 1
  ]
  # Eval: the target is the label; a prediction scores 1 when it names the candidate.
  task = seqio.get_mixture_or_task(eval_name)
  ex = {k: (v.encode() if isinstance(v, str) else v) for k, v in base[0].items()}
  assert task.postprocess_fn('x', example=ex, is_target=True) == ex['label']
  pred = task.postprocess_fn(base[0]['targets_pretokenized'], example=ex, is_target=False)
  assert pred[utils.PREDICTION] == 1


def test_dpr_format():
  name = 'dpr_v001_simple_examples'
  base = check_variants(name, 'test', 'wsc:', 7)
  for b, r in zip(base, raw_examples(name, 'test')):
    marked = re.sub(r' (' + r['pronoun'] + r')( |\.|,)', r' *\1*\2', r['sentence'], count=1)
    assert b['inputs_pretokenized'] == f'wsc: {marked}'
    assert b['targets_pretokenized'] == r['candidates'][r['label']]


# ========== mixtures ==========
@pytest.mark.parametrize('prefix', sg.PREFIXES)
def test_proportional_mixtures(prefix):
  mixture = seqio.get_mixture_or_task(f'{prefix}super_glue_v102_examples_proportional')
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {
      f'{prefix}super_glue_wsc_v102_simple_train_examples': 259,
      f'{prefix}super_glue_wsc_v102_simple_eval_examples': 0,
      f'{prefix}super_glue_boolq_v102_examples': 9_427,
      f'{prefix}super_glue_cb_v102_examples': 250,
      f'{prefix}super_glue_copa_v102_examples': 400,
      f'{prefix}super_glue_multirc_v102_examples': 27_243,
      f'{prefix}super_glue_record_v102_examples': 138_854,
      f'{prefix}super_glue_rte_v102_examples': 2_490,
      f'{prefix}super_glue_wic_v102_examples': 5_428,
  }
  with_dpr = seqio.get_mixture_or_task(f'{prefix}super_glue_with_dpr_v102_proportional')
  assert with_dpr.get_rate(seqio.get_mixture_or_task(f'{prefix}dpr_v001_simple')) == 1_322
  assert len(with_dpr.tasks) == 10


def test_wsc_and_dev_mixture():
  mixture = seqio.get_mixture_or_task('task_index_super_glue_wsc_and_dev_v102_simple_examples')
  by_split = {
      split: sorted(t.name for t in mixture.tasks if split in t.splits)
      for split in ('train', 'validation')
  }
  assert by_split == {
      'train': ['task_index_super_glue_wsc_v102_simple_train_examples'],
      'validation': ['task_index_super_glue_wsc_v102_simple_eval_examples'],
  }
