"""Task index mapping, mixing rates, text decoding and idempotent registration."""

import numpy as np
import pytest
import seqio

from prompt_tuning.data import features
from prompt_tuning.data import utils


def test_task_mapping_sorted_with_aliases():
  mapping = utils.task_mapping(
      ['rte', 'boolq', 'wsc', 'wsc.fixed', 'axb'], {'wsc.fixed': 'wsc', 'axb': 'rte'}
  )
  assert mapping == {'boolq': 0, 'rte': 1, 'wsc': 2, 'wsc.fixed': 2, 'axb': 1}
  with pytest.raises(ValueError, match='not one of'):
    utils.task_mapping(['a'], {'b': 'c'})


def test_remove_prefix_suffix():
  assert utils.remove_prefix('taskless_glue', 'taskless_') == 'glue'
  assert utils.remove_prefix('glue', 'taskless_') == 'glue'
  assert utils.remove_suffix('glue_examples', '_examples') == 'glue'
  assert utils.remove_suffix('glue', '') == 'glue'


def test_rate_num_examples():
  assert utils.rate_num_examples(1000) == 1000
  assert utils.rate_num_examples(1000, maximum=10) == 10
  assert utils.rate_num_examples(100, temperature=2.0) == pytest.approx(10.0)
  assert utils.rate_num_examples(100, scale=0.5) == 50


def test_to_text():
  assert utils.to_text(b'abc') == 'abc'
  assert utils.to_text(np.array([b'a', b'b'], dtype=object)) == ['a', 'b']
  assert utils.to_text(np.int32(3)) == 3 and isinstance(utils.to_text(np.int32(3)), int)
  assert utils.to_text(np.array(b'x')) == 'x'
  assert utils.to_text({'a': 1, 'b': {'c': b'd'}}) == {'a': 1, 'b': {'c': 'd'}}


def test_register_task_is_idempotent():
  vocab = seqio.SentencePieceVocabulary(features.seqio_test_vocabulary_path())
  source = seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=['train'])
  kwargs = dict(source=source, output_features=features.output_features(vocab))
  first = utils.register_task('pt_utils_test_task', **kwargs)
  second = utils.register_task('pt_utils_test_task', **kwargs)
  assert seqio.get_mixture_or_task('pt_utils_test_task') is second is not first
  utils.register_mixture('pt_utils_test_mix', ['pt_utils_test_task'], default_rate=1.0)
  utils.register_mixture('pt_utils_test_mix', ['pt_utils_test_task'], default_rate=1.0)
  assert [t.name for t in seqio.get_mixture_or_task('pt_utils_test_mix').tasks] == [
      'pt_utils_test_task'
  ]
  seqio.MixtureRegistry.remove('pt_utils_test_mix')
  seqio.TaskRegistry.remove('pt_utils_test_task')
