"""Text-to-text formats of the preprocessors on hand-written (Super)GLUE/QA examples."""

from typing import Any, Dict, List

import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_tuning.data import features
from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import utils


def run(preprocessor, examples: List[Dict[str, Any]], **kwargs) -> List[Dict[str, Any]]:
  """Applies a dataset preprocessor to examples; returns numpy outputs with text decoded."""
  ds = None
  for ex in examples:
    one = tf.data.Dataset.from_tensors(ex)
    ds = one if ds is None else ds.concatenate(one)
  out = preprocessor(ds, **kwargs)
  return [{k: utils.to_text(v) for k, v in ex.items()} for ex in out.as_numpy_iterator()]


def apply_all(preprocessors, examples):
  """Applies a list of (text) preprocessors in order."""
  ds = None
  for ex in examples:
    one = tf.data.Dataset.from_tensors(ex)
    ds = one if ds is None else ds.concatenate(one)
  for p in preprocessors:
    ds = p(ds)
  return [{k: utils.to_text(v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_glue_sorted_features_and_label_names():
  ex = {
      'sentence1': 'A man runs.',
      'sentence2': 'A person moves.',
      'label': np.int64(0),
      'idx': np.int32(7),
  }
  out = apply_all(prep.get_glue_text_preprocessor('rte', ('entailment', 'not_entailment')), [ex])
  assert out == [
      {
          'inputs': 'rte sentence1: A man runs. sentence2: A person moves.',
          'targets': 'entailment',
          'idx': 7,
      }
  ]


@pytest.mark.parametrize(
    'config,labels,example,expected_inputs,expected_target',
    [
        (
            'sst2',
            ('negative', 'positive'),
            {'sentence': 'it is great', 'label': 1},
            'sst2 sentence: it is great',
            'positive',
        ),
        (
            'cola',
            ('unacceptable', 'acceptable'),
            {'sentence': 'Him go.', 'label': 0},
            'cola sentence: Him go.',
            'unacceptable',
        ),
        (
            'qqp',
            ('not_duplicate', 'duplicate'),
            {'question1': 'q1?', 'question2': 'q2?', 'label': 1},
            'qqp question1: q1? question2: q2?',
            'duplicate',
        ),
        (
            'qnli',
            ('entailment', 'not_entailment'),
            {'sentence': 's.', 'question': 'q?', 'label': 1},
            'qnli question: q? sentence: s.',
            'not_entailment',
        ),
        (
            'mnli_mismatched',
            ('entailment', 'neutral', 'contradiction'),
            {'premise': 'p.', 'hypothesis': 'h.', 'label': 2},
            'mnli hypothesis: h. premise: p.',
            'contradiction',
        ),
        (
            'ax',
            ('entailment', 'neutral', 'contradiction'),
            {'premise': 'p.', 'hypothesis': 'h.', 'label': -1},
            'mnli hypothesis: h. premise: p.',
            '<unk>',
        ),
        (
            'wnli',
            ('not_entailment', 'entailment'),
            {'sentence1': 'a', 'sentence2': 'b', 'label': 1},
            'wnli sentence1: a sentence2: b',
            'entailment',
        ),
        (
            'boolq',
            ('False', 'True'),
            {'question': 'is it?', 'passage': 'It is.', 'label': 1},
            'boolq passage: It is. question: is it?',
            'True',
        ),
        (
            'cb',
            ('entailment', 'contradiction', 'neutral'),
            {'premise': 'p', 'hypothesis': 'h', 'label': 2},
            'cb hypothesis: h premise: p',
            'neutral',
        ),
        (
            'copa',
            ('choice1', 'choice2'),
            {
                'premise': 'It rained.',
                'choice1': 'Wet.',
                'choice2': 'Dry.',
                'question': 'effect',
                'label': 0,
            },
            'copa choice1: Wet. choice2: Dry. premise: It rained. question: effect',
            'choice1',
        ),
        (
            'wic',
            ('False', 'True'),
            {
                'word': 'bank',
                'sentence1': 's1',
                'sentence2': 's2',
                'start1': 0,
                'start2': 1,
                'end1': 2,
                'end2': 3,
                'label': 0,
            },
            'wic sentence1: s1 sentence2: s2 word: bank',
            'False',
        ),
        (
            'axb',
            ('entailment', 'not_entailment'),
            {'sentence1': 'p', 'sentence2': 'h', 'label': 0},
            'rte hypothesis: h premise: p',
            'entailment',
        ),
        (
            'axg',
            ('entailment', 'not_entailment'),
            {'premise': 'p', 'hypothesis': 'h', 'label': 1},
            'rte hypothesis: h premise: p',
            'not_entailment',
        ),
    ],
)
def test_glue_formats(config, labels, example, expected_inputs, expected_target):
  example = dict(example, idx=np.int32(3))
  example['label'] = np.int64(example['label'])
  out = apply_all(prep.get_glue_text_preprocessor(config, labels), [example])
  assert out[0]['inputs'] == expected_inputs
  assert out[0]['targets'] == expected_target
  assert out[0]['idx'] == 3


def test_multirc_removes_markup_and_keeps_indices():
  ex = {
      'paragraph': 'Sent 1: <b>Hi</b> there.<br>Sent 2: bye.',
      'question': 'Who?',
      'answer': 'Me',
      'label': np.int64(1),
      'idx': {'paragraph': np.int32(1), 'question': np.int32(2), 'answer': np.int32(3)},
  }
  out = apply_all(prep.get_glue_text_preprocessor('multirc', ('False', 'True')), [ex])
  assert out == [
      {
          'inputs': 'multirc question: Who? answer: Me paragraph: Sent 1: Hi there. '
          'Sent 2: bye.',
          'targets': 'True',
          'idx/paragraph': 1,
          'idx/question': 2,
          'idx/answer': 3,
      }
  ]


@pytest.mark.parametrize(
    'score,expected',
    [(3.84, '3.8'), (3.95, '4.0'), (0.0, '0.0'), (5.0, '5.0'), (0.27, '0.2'), (-1.0, '<unk>')],
)
def test_stsb_rounds_to_fifths(score, expected):
  ex = {'sentence1': 'a b', 'sentence2': 'c d', 'label': np.float32(score), 'idx': np.int32(0)}
  out = run(prep.stsb, [ex])
  assert out[0]['inputs'] == 'stsb sentence1: a b sentence2: c d'
  assert out[0]['targets'] == expected


def test_record_one_example_per_answer():
  ex = {
      'passage': 'The cat sat.\n@highlight\nCats are great\n@highlight\nDogs too',
      'query': 'A @placeholder sat.',
      'entities': ['cat', 'dog'],
      'answers': ['cat', 'Cat'],
      'idx': {'passage': np.int32(4), 'query': np.int32(9)},
  }
  no_answer = dict(
      ex,
      answers=tf.constant([], dtype=tf.string),
      idx={'passage': np.int32(5), 'query': np.int32(1)},
  )
  out = run(prep.record, [ex])
  expected_inputs = (
      'record query: A @placeholder sat. entities: cat, dog passage: The cat sat. '
      'Cats are great. Dogs too'
  )
  assert [o['inputs'] for o in out] == [expected_inputs] * 2
  assert [o['targets'] for o in out] == ['cat', 'Cat']
  assert all(o['answers'] == ['cat', 'Cat'] for o in out)
  assert all(o['idx/passage'] == 4 and o['idx/query'] == 9 for o in out)
  out = run(prep.record, [no_answer])
  assert len(out) == 1 and out[0]['targets'] == '<unk>' and out[0]['answers'] == []


def _wsc(text, span1, span2, span2_index, label=1, idx=0):
  return {
      'text': text,
      'span1_text': span1,
      'span1_index': np.int32(0),
      'span2_text': span2,
      'span2_index': np.int32(span2_index),
      'label': np.int64(label),
      'idx': np.int32(idx),
  }


def test_wsc_simple_marks_the_pronoun():
  examples = [
      _wsc(
          'Mark told Pete many lies about himself, which Pete included in his book. He should '
          'have been more truthful.',
          'Mark',
          'He',
          13,
          label=1,
          idx=0,
      ),
      # Index off by one (as in a few WSC examples): the closest occurrence is marked.
      _wsc(
          'Some day they might want to use it , but not now.', 'the pebble', 'it', 6, label=0, idx=1
      ),
      # Punctuation glued to the pronoun.
      _wsc('John laughed. "Good for him," he said.', 'the boy', 'him', 4, label=1, idx=2),
  ]
  out = run(prep.wsc_simple, examples)
  assert [o['inputs'] for o in out] == [
      'wsc: Mark told Pete many lies about himself, which Pete included in his book. *He* should '
      'have been more truthful.',
      'wsc: Some day they might want to use *it* , but not now.',
      'wsc: John laughed. "Good for *him* ," he said.',
  ]
  assert [o['targets'] for o in out] == ['Mark', 'the pebble', 'the boy']
  assert [o['label'] for o in out] == [1, 0, 1]
  # Training keeps only examples whose candidate is the referent.
  out = run(prep.wsc_simple, examples, correct_referent_only=True)
  assert [o['idx'] for o in out] == [0, 2]


def test_mark_word_out_of_range_leaves_text():
  out = tf.function(prep.mark_word)(tf.constant('a b c'), tf.constant('zz'), tf.constant(9))
  assert out.numpy() == b'a b c'


def test_dpr_simple():
  ex = {
      'sentence': 'The bee landed on the flower because it had pollen.',
      'pronoun': 'it',
      'candidates': ['The bee', 'the flower'],
      'label': np.int64(1),
  }
  out = run(prep.definite_pronoun_resolution_simple, [ex])
  assert out[0]['inputs'] == 'wsc: The bee landed on the flower because *it* had pollen.'
  assert out[0]['targets'] == 'the flower'


def test_squad_pads_punctuation():
  ex = {
      'id': 'x1',
      'title': 't',
      'context': 'Paris, France is big.',
      'question': "What's it?",
      'answers': {'text': ['Paris, France', 'Paris'], 'answer_start': np.array([0, 0], np.int32)},
  }
  out = run(prep.squad, [ex])[0]
  assert out['inputs'] == "question: What ' s it ? context: Paris , France is big . "
  assert out['targets'] == 'Paris , France'
  assert out['answers'] == ['Paris , France', 'Paris']
  assert out['question'] == "What ' s it ? "


def test_mrqa_like_squad():
  ex = {'qid': 'q7', 'question': 'Who?', 'context': 'Ann did.', 'answers': ['Ann', 'ann']}
  out = run(prep.mrqa, [ex])[0]
  assert out['inputs'] == 'question: Who ? context: Ann did . '
  assert out['targets'] == 'Ann'
  assert out['answers'] == ['Ann', 'ann']
  assert out['idx'] == 'q7'


@pytest.mark.parametrize(
    'text,expected',
    [
        ('sst2 sentence: it is good', 'sentence: it is good'),
        ('wsc: *he* ran', '*he* ran'),
        ('single', 'single'),
        ('two  spaces', ' spaces'),
    ],
)
def test_remove_first_text_token(text, expected):
  out = run(prep.remove_first_text_token, [{'inputs': text, 'targets': 'x'}])
  assert out[0] == {'inputs': expected, 'targets': 'x'}


def test_add_sentinel_to_beginning():
  vocab = seqio.SentencePieceVocabulary(features.seqio_test_vocabulary_path(), extra_ids=10)
  feats = features.output_features(vocab)
  ds = tf.data.Dataset.from_tensors(
      {'inputs': tf.constant([5, 6], tf.int32), 'targets': tf.constant([7], tf.int32)}
  )
  out = list(
      prep.add_sentinel_to_beginning(ds, feats, field='inputs', offset=3).as_numpy_iterator()
  )
  assert out[0]['inputs'].tolist() == [36 - 1 - 3, 5, 6]
  assert out[0]['targets'].tolist() == [7]
  assert prep.task_index_token(vocab, 0) == 35
  assert vocab.decode([prep.task_index_token(vocab, 2)]) == '<extra_id_2>'
  with pytest.raises(ValueError):
    prep.task_index_token(vocab, 36)


def test_get_glue_text_preprocessor_rejects_wsc():
  with pytest.raises(ValueError):
    prep.get_glue_text_preprocessor('wsc.fixed', ('False', 'True'))


def test_glue_benchmark_names():
  assert [prep.glue_benchmark_name(n) for n in ('mnli_matched', 'ax', 'axb', 'axg', 'sst2')] == [
      'mnli',
      'mnli',
      'rte',
      'rte',
      'sst2',
  ]
