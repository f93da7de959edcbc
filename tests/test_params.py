"""`prompt_tuning/params.py` (the one flatten helper, path regexes) and the runtime's trainable split."""

import numpy as np
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import train_state

TREE = {
    'token_embedder': {'embedding': np.ones((4, 2))},
    'encoder': {
        'prompt': {'prompt': {'prompt': np.zeros((3, 2))}},
        'layers_0': {'attention': {'query': {'kernel': np.ones((2, 2))}}},
    },
    'decoder': {'logits_dense': {'kernel': np.ones((2, 4))}},
}


def _split(regexes):
  return train_state.split_params(TREE, params_lib.match_any(regexes))


def test_flatten_roundtrip_and_count():
  flat = params_lib.flatten_params(TREE)
  assert list(flat) == [
      'token_embedder/embedding',
      'encoder/prompt/prompt/prompt',
      'encoder/layers_0/attention/query/kernel',
      'decoder/logits_dense/kernel',
  ]
  back = params_lib.unflatten_params(flat)
  assert params_lib.flatten_params(back).keys() == flat.keys()
  assert params_lib.count_params(TREE) == 8 + 6 + 4 + 8
  # The runtime's names are the same functions.
  assert train_state.flatten is params_lib.flatten_params


def test_flatten_stops_at_leaves_chosen_by_is_leaf():
  tree = {'a': {'b': {'axes': ('x', 'y')}, 'c': 1}}
  flat = params_lib.flatten_params(tree, is_leaf=lambda n: 'axes' in n)
  assert flat == {'a/b': {'axes': ('x', 'y')}, 'a/c': 1}


def test_split_by_the_prompt_regex():
  train, frozen = _split(['.*/prompt/.*'])
  assert params_lib.flatten_params(train).keys() == {'encoder/prompt/prompt/prompt'}
  assert 'prompt' not in frozen['encoder']  # Only leaves; no empty sub-dicts.
  assert len(params_lib.flatten_params(frozen)) == 3
  merged = train_state.merge_params(train, frozen)
  assert params_lib.flatten_params(merged).keys() == params_lib.flatten_params(TREE).keys()


def test_regex_styles():
  train, _ = _split(['encoder/prompt/.*'])  # Without the leading slash.
  assert list(params_lib.flatten_params(train)) == ['encoder/prompt/prompt/prompt']
  train, _ = _split('/decoder/.*')  # ModelParamTraversal style.
  assert list(params_lib.flatten_params(train)) == ['decoder/logits_dense/kernel']
  train, frozen = _split(('.*',))  # Model tuning.
  assert len(params_lib.flatten_params(train)) == 4 and not frozen
  train, _ = _split(['.*/prompt/.*', 'token_embedder/.*'])  # Union.
  assert len(params_lib.flatten_params(train)) == 2


def test_nothing_trainable_and_bad_regexes_are_errors():
  with pytest.raises(ValueError, match='No parameter is trainable.*encoder/'):
    _split(['.*/adapter/.*'])
  with pytest.raises(ValueError, match=r"Invalid parameter-path regex '\(unclosed'"):
    params_lib.match_any(['(unclosed'])


def test_match_any():
  fn = params_lib.match_any(['.*/prompt/.*'])
  assert fn('encoder/prompt/prompt/prompt') and fn('/encoder/prompt/prompt/prompt', None)
  assert not fn('encoder/layers_0/attention/query/kernel')
  assert fn.regexes == ('.*/prompt/.*',)
  assert params_lib.path_matches('encoder/.*', '/encoder/x')
