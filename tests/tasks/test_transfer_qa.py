"""Zero-shot QQP<->MRPC transfer and SQuAD/MRQA tasks under `tfds.testing.mock_data`."""

import re

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from prompt_tuning.data import features
from prompt_tuning.data import utils
from task_testlib import examples, raw_examples
import tasks.glue as glue
import tasks.glue_transfer as transfer
import tasks.qa as qa

VOCAB = seqio.SentencePieceVocabulary(features.seqio_test_vocabulary_path(), extra_ids=10)


@pytest.fixture(scope='module', autouse=True)
def mock_tasks():
  # Transfer mixtures hold the GLUE source tasks: register GLUE first.
  for module in (glue, transfer, qa):
    module.register(VOCAB)
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
  for module in (glue, transfer, qa):
    module.register()


def as_example(ex):
  """Materialized example back to seqio's numpy form (strings as bytes)."""
  out = {}
  for k, v in ex.items():
    if isinstance(v, str):
      out[k] = v.encode()
    elif isinstance(v, list) and all(isinstance(a, str) for a in v):
      out[k] = np.array([a.encode() for a in v], dtype=object)
    else:
      out[k] = v
  return out


def run_metrics(task, exs, prediction_texts):
  targets = [
      task.postprocess_fn(e['targets_pretokenized'].decode(), example=e, is_target=True)
      for e in exs
  ]
  predictions = [
      task.postprocess_fn(p, example=e, is_target=False) for p, e in zip(prediction_texts, exs)
  ]
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn(targets, predictions))
  return scores


# ========== zero-shot transfer ==========
PAIRS = (('qqp', 'mrpc'), ('mrpc', 'qqp'))
LABELS = {'qqp': ('not_duplicate', 'duplicate'), 'mrpc': ('not_equivalent', 'equivalent')}


def test_transfer_names():
  expected = {
      f'{p}glue_{t}_from_{s}_{v}{x}'
      for s, t in PAIRS
      for v in glue.VERSIONS
      for p in glue.PREFIXES
      for x in glue.SUFFIXES
  }
  assert set(transfer.TASK_NAMES) == expected and len(transfer.TASK_NAMES) == 24
  assert len(transfer.MIXTURE_NAMES) == 24
  assert seqio.get_mixture_or_task('glue_mrpc_from_qqp_v002_examples').name


@pytest.mark.parametrize('source,target', PAIRS)
def test_transfer_tasks_read_target_validation(source, target):
  for ver, data_version in glue.VERSIONS.items():
    for prefix in glue.PREFIXES:
      for suffix in glue.SUFFIXES:
        task = seqio.get_mixture_or_task(f'{prefix}glue_{target}_from_{source}_{ver}{suffix}')
        assert task.source.tfds_dataset.name == f'glue/{target}:{data_version}'
        assert tuple(task.source.splits) == ('validation',)
  name = f'glue_{target}_from_{source}_v002_examples'
  base = examples(name, 'validation')
  taskless = examples(f'taskless_{name}', 'validation')
  task_index = examples(f'task_index_{name}', 'validation')
  # The target dataset in its own T5 format, exactly as the plain target task.
  reference = examples(f'glue_{target}_v002', 'validation')
  assert [e['inputs_pretokenized'] for e in base] == [e['inputs_pretokenized'] for e in reference]
  assert all(e['inputs_pretokenized'].startswith(f'{target} ') for e in base)
  assert all(e['targets_pretokenized'] in LABELS[target] for e in base)
  for b, tl, ti in zip(base, taskless, task_index):
    assert b['inputs_pretokenized'] == f'{target} {tl["inputs_pretokenized"]}'
    # task_index uses the *source* task's index: the prompt trained on the source.
    assert ti['inputs'][0] == VOCAB.vocab_size - 1 - glue.GLUE_TASK_INDEX[source]
    assert ti['inputs'][1:] == tl['inputs']


@pytest.mark.parametrize('source,target', PAIRS)
def test_transfer_translates_labels(source, target):
  for suffix in glue.SUFFIXES:
    task = seqio.get_mixture_or_task(f'glue_{target}_from_{source}_v002{suffix}')
    exs = [
        as_example(e) for e in examples(f'glue_{target}_from_{source}_v002_examples', 'validation')
    ]
    # Source label words (what the transferred prompt outputs) map to target class ids ...
    for class_id, word in enumerate(LABELS[source]):
      out = task.postprocess_fn(word, example=exs[0], is_target=False)
      value = out[utils.PREDICTION] if suffix else out
      assert value == class_id
      if suffix:
        assert out[utils.PREDICTION_TEXT] == word  # the raw output is kept
      # ... also on the target side (as the original test does).
      assert task.postprocess_fn(word, example=exs[0], is_target=True) == class_id
    assert task.postprocess_fn(LABELS[target][1], example=exs[0], is_target=True) == 1
    unknown = task.postprocess_fn('maybe', example=exs[0], is_target=False)
    assert (unknown[utils.PREDICTION] if suffix else unknown) == -1
    # Scoring zero-shot predictions given in the source vocabulary.
    gold = [LABELS[source][LABELS[target].index(e['targets_pretokenized'].decode())] for e in exs]
    assert run_metrics(task, exs, gold)['accuracy'] == 100.0
    flipped = [LABELS[source][1 - LABELS[source].index(g)] for g in gold]
    assert run_metrics(task, exs, flipped)['accuracy'] == 0.0


@pytest.mark.parametrize('source,target', PAIRS)
@pytest.mark.parametrize('prefix', glue.PREFIXES)
def test_zero_shot_mixtures(source, target, prefix):
  for ver in glue.VERSIONS:
    mixture = seqio.get_mixture_or_task(
        f'{prefix}glue_{target}_from_{source}_zeroshot_{ver}_examples'
    )
    train = [t.name for t in mixture.tasks if 'train' in t.splits]
    evaluation = [t.name for t in mixture.tasks if 'validation' in t.splits]
    assert train == [f'{prefix}glue_{source}_{ver}']
    assert f'{prefix}glue_{target}_from_{source}_{ver}_examples' in evaluation


# ========== QA ==========
def pad(text: str) -> str:
  text = re.sub(r'([!-/:-@\[-`{-~])', r' \1 ', text)
  return re.sub(r'\s+', ' ', text)


def test_qa_names_and_sources():
  bases = ['squad_v010_allanswers'] + [
      f'mrqa_{n}_v100' for n in qa.MRQA_IN_DOMAIN + qa.MRQA_OUT_OF_DOMAIN
  ]
  assert set(qa.TASK_NAMES) == {f'{b}{s}' for b in bases for s in glue.SUFFIXES}
  assert len(qa.TASK_NAMES) == 24 and len(qa.MIXTURE_NAMES) == 14
  squad = seqio.get_mixture_or_task('squad_v010_allanswers_examples')
  assert squad.source.tfds_dataset.name == 'squad/v1.1:3.0.0'
  for name in qa.MRQA_IN_DOMAIN + qa.MRQA_OUT_OF_DOMAIN:
    for suffix in glue.SUFFIXES:
      task = seqio.get_mixture_or_task(f'mrqa_{name}_v100{suffix}')
      assert task.source.tfds_dataset.name == f'mrqa/{name}:1.0.0'
      if name in qa.MRQA_OUT_OF_DOMAIN:
        # Out-of-domain sets only have TFDS `test`, served as `validation`.
        assert tuple(task.source.splits) == ('validation',)
        split_map = task.source.tfds_dataset._split_map  # pylint: disable=protected-access
        assert split_map == {'validation': 'test'}
      else:
        assert tuple(task.source.splits) == ('train', 'validation')
      assert task.preprocessors[0].__qualname__ == 'mrqa'


@pytest.mark.parametrize(
    'name,split',
    [
        ('squad_v010_allanswers_examples', 'validation'),
        ('mrqa_news_qa_v100_examples', 'validation'),
        ('mrqa_bio_asq_v100_examples', 'validation'),
    ],
)
def test_qa_format_and_metrics(name, split):
  exs = examples(name, split)
  raws = raw_examples(name, split)
  for ex, raw in zip(exs, raws):
    answers = raw['answers']['text'] if name.startswith('squad') else raw['answers']
    assert ex['inputs_pretokenized'] == re.sub(
        r'\s+', ' ', f'question: {pad(raw["question"])} context: {pad(raw["context"])}'
    )
    assert ex['targets_pretokenized'] == pad(answers[0])
    assert ex['answers'] == [pad(a) for a in answers]
  task = seqio.get_mixture_or_task(name)
  numpy_exs = [as_example(e) for e in exs]
  last_answers = [e['answers'][-1] for e in exs]
  scores = run_metrics(task, numpy_exs, last_answers)  # any gold answer is right
  assert scores['em'] == 100.0 and scores['f1'] == 100.0
  assert run_metrics(task, numpy_exs, ['zzz qqq'] * len(exs))['em'] == 0.0
  prediction = task.postprocess_fn('abc', example=numpy_exs[0], is_target=False)
  assert prediction[utils.QUESTION_TEXT] == exs[0]['question']
  assert prediction[utils.ANSWERS_TEXT] == exs[0]['answers']
  texts = run_metrics(task, numpy_exs, ['zzz'] * len(exs))
  assert any(isinstance(v, seqio.metrics.Text) for v in texts.values())


def test_squad_to_mrqa_mixtures():
  for suffix in glue.SUFFIXES:
    for name in qa.MRQA_OUT_OF_DOMAIN:
      mixture = seqio.get_mixture_or_task(f'squad_to_{name}{suffix}')
      assert {t.name for t in mixture.tasks} == {
          f'squad_v010_allanswers{suffix}',
          f'mrqa_{name}_v100{suffix}',
      }
    mixture = seqio.get_mixture_or_task(f'squad_to_mrqa{suffix}')
    assert [t.name for t in mixture.tasks if 'train' in t.splits] == [
        f'squad_v010_allanswers{suffix}'
    ]
    assert len([t for t in mixture.tasks if 'validation' in t.splits]) == 7
