"""Vocabulary resolution (gin, setter, environment, default) and output features."""

import gin
import pytest
import seqio

from prompt_tuning.data import features


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
  monkeypatch.delenv(features.VOCAB_ENV_VAR, raising=False)
  monkeypatch.delenv(features.EXTRA_IDS_ENV_VAR, raising=False)
  features.set_default_vocabulary(None)
  yield
  features.set_default_vocabulary(None)
  gin.clear_config()


def test_default_is_t5_vocab_and_lazy():
  vocab = features.get_vocabulary()
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert vocab.sentencepiece_model_file == features.DEFAULT_VOCAB_PATH
  assert vocab.extra_ids == 0
  # Building features does not load the (remote) model.
  feats = features.output_features()
  assert set(feats) == {'inputs', 'targets'}
  assert feats['inputs'].add_eos and feats['targets'].add_eos
  assert feats['targets'].vocabulary is vocab


def test_environment_variable(monkeypatch):
  path = features.seqio_test_vocabulary_path()
  monkeypatch.setenv(features.VOCAB_ENV_VAR, path)
  monkeypatch.setenv(features.EXTRA_IDS_ENV_VAR, '10')
  vocab = features.get_vocabulary()
  assert vocab.sentencepiece_model_file == path
  assert vocab.vocab_size == 36
  assert features.get_vocabulary() is vocab  # cached


def test_setter_wins_over_environment(monkeypatch):
  monkeypatch.setenv(features.VOCAB_ENV_VAR, '/nonexistent/spm.model')
  features.set_default_vocabulary(features.seqio_test_vocabulary_path(), extra_ids=0)
  vocab = features.get_vocabulary()
  assert vocab.sentencepiece_model_file == features.seqio_test_vocabulary_path()
  assert vocab.vocab_size == 26


def test_gin_binding():
  path = features.seqio_test_vocabulary_path()
  gin.parse_config(
      [
          f"features.get_vocabulary.sentencepiece_model_file = '{path}'",
          'features.get_vocabulary.extra_ids = 4',
      ]
  )
  vocab = features.get_vocabulary()
  assert vocab.sentencepiece_model_file == path
  assert vocab.vocab_size == 30


def test_explicit_arguments():
  vocab = features.get_vocabulary(features.seqio_test_vocabulary_path(), extra_ids=2)
  assert vocab.vocab_size == 28
  assert features.output_features(vocab, add_eos=False)['inputs'].add_eos is False
