"""Tests of the two-language toy suite of the cross-lingual demo (`tasks/toy_crosslingual.py`)."""

import re

import numpy as np
import pytest
import seqio

from tasks import toy
from tasks import toy_crosslingual as xl

SCENE_RE = re.compile(
    r'(?P<number>\w+) (?P<size>\w+) (?P<colour>\w+) (?P<animal>\w+) (?P<verb>\w+) '
    r'(?P<prep>\w+) the (?P<place>\w+)$'
)


@pytest.fixture(scope='module')
def back():
  """Language B word -> language A word."""
  return {b: a for a, b in xl.lexicon().items()}


def _to_a(text: str, back) -> str:
  """Translates `text` of language B word by word back into A (punctuation kept)."""
  out = []
  for token in text.split(' '):
    word = token.rstrip(':?')
    out.append(back[word] + token[len(word) :])
  return ' '.join(out)


def test_lexicon_is_a_bijection_onto_two_piece_words_unused_by_a():
  table = xl.lexicon()
  assert set(table) == set(toy.world_words())
  assert len(set(table.values())) == len(table)  # one B word per A word, none shared
  vocab = toy.get_toy_vocabulary()
  a_pieces = {p for w in table for p in vocab.tokenizer.EncodeAsPieces(w)}
  for b_word in table.values():
    assert re.fullmatch('[A-M][A-Z]', b_word), b_word
    pieces = vocab.tokenizer.EncodeAsPieces(b_word)
    assert len(pieces) == 2, (b_word, pieces)
    assert not set(pieces) & a_pieces, (b_word, pieces)
    assert vocab.decode(vocab.encode(b_word)) == b_word


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_indoor_labels_are_consistent_in_both_languages(split, back):
  """Every B example, read back into A, is a scene whose label is A's rule (indoor place)."""
  for lang in xl.LANGS:
    examples = xl.generate_examples('indoor', lang, split)[:2000]
    labels = []
    for ex in examples:
      inputs, target = ex['inputs'], ex['targets']
      if lang == 'b':
        inputs, target = _to_a(inputs, back), back[target]
      m = SCENE_RE.match(inputs)
      assert m, inputs
      assert target == ('yes' if m['place'] in toy.INDOOR_PLACES else 'no'), ex
      assert (ex['lang_ids'], ex['task_ids']) == (xl.LANGS.index(lang), xl.TASK_IDS['indoor'])
      labels.append(target)
    assert 0.35 < np.mean([t == 'yes' for t in labels]) < 0.65


def test_code_switched_corpus_mixes_both_languages_and_means_the_same(back):
  rng = np.random.default_rng(0)
  texts = [s.text() for s in toy.sample_scenes('xl_test', 'validation', 200)]
  n_b = n_words = 0
  for text in texts:
    mixed = xl.code_switch(text, rng)
    words = mixed.split(' ')
    restored = ' '.join(back.get(w, w) for w in words)
    assert restored == text
    n_b += sum(w in back for w in words)
    n_words += len(words)
  assert 0.4 < n_b / n_words < 0.6  # CODE_SWITCH_RATE = 0.5


def test_features_fit_and_the_b_with_a_prompt_task_only_changes_lang_ids():
  lengths = xl.TASK_FEATURE_LENGTHS
  for name in (
      'toy_xl_indoor_b',
      'toy_xl_question_b',
      'toy_xl_describe_b',
      'toy_xl_corpus_b',
      'toy_xl_corpus_mixed',
  ):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        None, split='validation', shuffle=False, use_cached=False
    )
    for ex in ds.as_numpy_iterator():
      for k in ('inputs', 'targets'):
        assert len(ex[k]) <= lengths[k], (name, k, ex)
        assert ex[k][-1] == 1, (name, k, ex)  # EOS kept: nothing was trimmed
  b, b_with_a = (
      list(
          seqio.get_mixture_or_task(n)
          .get_dataset(None, split='validation', shuffle=False, use_cached=False)
          .as_numpy_iterator()
      )
      for n in ('toy_xl_indoor_b', xl.A_PROMPT_TASK)
  )
  assert len(b) == len(b_with_a) == xl.VALIDATION_SIZE
  for x, y in zip(b, b_with_a):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['targets'], y['targets'])
    assert (x['lang_ids'][0], y['lang_ids'][0]) == (1, 0)
