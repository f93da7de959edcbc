"""Postprocessors: label ids, floats, QA answers, `_examples` dicts, zero-shot label translation."""

import functools

import numpy as np
import pytest

from prompt_tuning.data import postprocessors as post
from prompt_tuning.data import utils


@pytest.mark.parametrize(
    'text,expected',
    [('positive', 1), ('negative', 0), (b'positive', 1), ('Positive', -1), ('', -1), ('<unk>', -1)],
)
def test_string_label_to_class_id(text, expected):
  assert post.string_label_to_class_id(text, label_classes=('negative', 'positive')) == expected


@pytest.mark.parametrize(
    'text,expected', [('3.8', 3.8), ('4', 4.0), ('<unk>', -1.0), ('abc', -1.0), (b'0.2', 0.2)]
)
def test_string_to_float(text, expected):
  assert post.string_to_float(text, example={}, is_target=False) == pytest.approx(expected)


def test_multirc_groups_targets_by_question():
  example = {'idx/question': np.int32(5), 'idx/answer': np.int32(1)}
  assert post.multirc('True', example=example, is_target=True) == {'value': 1, 'group': 5}
  assert post.multirc('False', example=example, is_target=False) == {'value': 0}
  assert post.multirc('maybe', example=example, is_target=False) == {'value': -1}


def test_record_targets_are_all_answers():
  example = {
      'answers': np.array([b'Obama', b'Barack Obama'], dtype=object),
      'idx/passage': np.int32(3),
      'idx/query': np.int32(4),
  }
  assert post.record('Obama', example=example, is_target=True) == {
      'value': ['Obama', 'Barack Obama'],
      'group': (3, 4),
  }
  assert post.record('Obama', example=example, is_target=False) == {'value': 'Obama'}


def test_qa_targets_are_all_answers():
  example = {'answers': np.array([b'Paris', b'Paris , France'], dtype=object)}
  assert post.qa('Paris', example=example, is_target=True) == ['Paris', 'Paris , France']
  assert post.qa('Lyon', example=example, is_target=False) == 'Lyon'


@pytest.mark.parametrize(
    'prediction,referent,expected',
    [
        ('Tom', 'Tom', 1),
        ('the dog', 'dog', 1),  # determiners are ignored
        ('fuzzy bunny', 'bunny', 1),  # subset either way
        ("Bob's hat", 'Bob', 0),  # possessive mismatch
        ('Mary', 'Tom', 0),
        ('', 'Tom', -1),
    ],
)
def test_wsc_simple(prediction, referent, expected):
  example = {'targets_pretokenized': referent.encode(), 'label': np.int64(1)}
  assert post.wsc_simple(prediction, example=example, is_target=False) == expected
  assert post.wsc_simple(referent, example=example, is_target=True) == 1


def test_postprocess_with_examples():
  fn = post.with_examples(post.get_glue_postprocess_fn('sst2', ('negative', 'positive')))
  example = {
      'inputs_pretokenized': b'sst2 sentence: nice',
      'targets_pretokenized': b'positive',
      'idx': np.int32(1),
  }
  # Targets stay plain values ...
  assert fn('positive', example=example, is_target=True) == 1
  # ... predictions become dicts that keep the example's texts.
  assert fn('negative', example=example, is_target=False) == {
      utils.PREDICTION: 0,
      utils.PREDICTION_TEXT: 'negative',
      utils.INPUT_TEXT: 'sst2 sentence: nice',
      utils.TARGET_TEXT: 'positive',
  }


def test_postprocess_with_examples_chained_dict_input():
  fn = functools.partial(
      post.postprocess_with_examples,
      post.string_to_float,
      decoded_model_output_field='raw',
      example_fields=('extra',),
  )
  out = fn({'raw': '2.4', 'extra': 'kept'}, example={}, is_target=False)
  assert out == {utils.PREDICTION: 2.4, utils.PREDICTION_TEXT: '2.4', 'extra': 'kept'}


def test_sequential():
  add = lambda x, **kw: x + 1
  double = lambda x, **kw: x * 2
  assert post.sequential(add, double)(3, example={}, is_target=False) == 8


@pytest.mark.parametrize(
    'qqp_word,mrpc_word', [('duplicate', 'equivalent'), ('not_duplicate', 'not_equivalent')]
)
def test_zero_shot_label_translation(qqp_word, mrpc_word):
  assert post.qqp_to_mrpc(qqp_word) == mrpc_word
  assert post.mrpc_to_qqp(mrpc_word) == qqp_word
  # The evaluated task's own labels and unknown text pass unchanged.
  assert post.qqp_to_mrpc(mrpc_word) == mrpc_word
  assert post.qqp_to_mrpc('duplicated stuff') == 'duplicated stuff'


def test_translation_then_class_id():
  fn = post.sequential(post.qqp_to_mrpc, post.get_glue_postprocess_fn('mrpc', post.MRPC_LABELS))
  assert [
      fn(w, example={}, is_target=False)
      for w in ('duplicate', 'not_duplicate', 'equivalent', 'junk')
  ] == [1, 0, 1, -1]


def test_remove_extra_id_0():
  assert post.remove_extra_id_0('<extra_id_0> positive') == 'positive'
  assert post.remove_extra_id_0('positive') == 'positive'


def test_get_glue_postprocess_fn():
  assert post.get_glue_postprocess_fn('stsb') is post.string_to_float
  assert post.get_glue_postprocess_fn('multirc') is post.multirc
  assert post.get_glue_postprocess_fn('record') is post.record
  with pytest.raises(ValueError):
    post.get_glue_postprocess_fn('sst2')
