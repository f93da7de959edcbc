"""Vocabularies and output features shared by the task modules in `tasks/`.

Every GLUE/SuperGLUE/transfer/QA task takes its vocabulary from one place,
`get_vocabulary()`, so that a run (or a test) can point all of them at another
SentencePiece model. When it is called without arguments the vocabulary is
resolved in this order (the first one that is set wins):

1. a gin binding, e.g.
   `prompt_tuning.data.features.get_vocabulary.sentencepiece_model_file = '/path/spm.model'`
   (gin bindings only count when `get_vocabulary` runs after gin was parsed,
   i.e. when the task module is imported through `MIXTURE_OR_TASK_MODULE`);
2. `set_default_vocabulary(path, extra_ids)`, called from Python;
3. the environment variables `PROMPT_TUNING_VOCAB` (a SentencePiece `.model`
   path, local or `gs://`) and `PROMPT_TUNING_VOCAB_EXTRA_IDS` (an integer);
4. `DEFAULT_VOCAB_PATH` (T5's `cc_all.32000.100extra`, 32100 pieces that
   already include the 100 sentinels) with `extra_ids=0`, as in T5X's gin files.

Task modules read the vocabulary when they register their tasks (at import);
to change it afterwards call their `register(vocabulary=...)` function, which
re-registers every task with the new vocabulary. Constructing a
`seqio.SentencePieceVocabulary` never reads the model file: seqio loads it the
first time a piece is encoded or the vocabulary size is asked for, so importing
the task modules needs neither the network nor the file.
"""

import os
import threading
from typing import Dict, Mapping, Optional, Tuple

import gin
import seqio

DEFAULT_VOCAB_PATH = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
DEFAULT_EXTRA_IDS = 0
VOCAB_ENV_VAR = 'PROMPT_TUNING_VOCAB'
EXTRA_IDS_ENV_VAR = 'PROMPT_TUNING_VOCAB_EXTRA_IDS'

_LOCK = threading.Lock()
_OVERRIDE: Optional[Tuple[str, int]] = None
_CACHE: Dict[Tuple[str, int], seqio.SentencePieceVocabulary] = {}


def set_default_vocabulary(sentencepiece_model_file: Optional[str], extra_ids: int = 0) -> None:
  """Sets the vocabulary `get_vocabulary()` returns when given no arguments.

  It only affects tasks registered afterwards: call it before importing the
  task modules, or call their `register()` again.

  Args:
    sentencepiece_model_file: path of a SentencePiece `.model` file; None
      removes the override (back to the environment variable or the default).
    extra_ids: number of sentinel ids seqio appends to the model's pieces.
  """
  global _OVERRIDE
  with _LOCK:
    _OVERRIDE = (
        None
        if sentencepiece_model_file is None
        else (str(sentencepiece_model_file), int(extra_ids))
    )


def _resolve(sentencepiece_model_file: Optional[str], extra_ids: Optional[int]) -> Tuple[str, int]:
  """Resolves path and extra ids following the order in the module docstring."""
  if sentencepiece_model_file is None:
    if _OVERRIDE is not None:
      sentencepiece_model_file, default_extra = _OVERRIDE
    elif os.environ.get(VOCAB_ENV_VAR):
      sentencepiece_model_file = os.environ[VOCAB_ENV_VAR]
      default_extra = int(os.environ.get(EXTRA_IDS_ENV_VAR, '0') or 0)
    else:
      sentencepiece_model_file, default_extra = DEFAULT_VOCAB_PATH, DEFAULT_EXTRA_IDS
    if extra_ids is None:
      extra_ids = default_extra
  if extra_ids is None:
    extra_ids = DEFAULT_EXTRA_IDS
  return str(sentencepiece_model_file), int(extra_ids)


@gin.configurable
def get_vocabulary(
    sentencepiece_model_file: Optional[str] = None, extra_ids: Optional[int] = None
) -> seqio.SentencePieceVocabulary:
  """Returns the (cached) SentencePiece vocabulary used by the task modules.

  Args:
    sentencepiece_model_file: a SentencePiece model path; None resolves it as
      described in the module docstring.
    extra_ids: sentinel ids appended by seqio; None means 0 (or the value that
      came with the resolved path).

  Returns:
    A `seqio.SentencePieceVocabulary`; the same object for the same arguments.
    Building it does not read the model file.
  """
  key = _resolve(sentencepiece_model_file, extra_ids)
  with _LOCK:
    if key not in _CACHE:
      _CACHE[key] = seqio.SentencePieceVocabulary(key[0], extra_ids=key[1])
    return _CACHE[key]


def output_features(
    vocabulary: Optional[seqio.Vocabulary] = None, add_eos: bool = True
) -> Mapping[str, seqio.Feature]:
  """T5's text-to-text output features: `inputs` and `targets` over one vocab.

  Args:
    vocabulary: the vocabulary of both features; None uses `get_vocabulary()`.
    add_eos: whether seqio appends EOS to both features.

  Returns:
    {'inputs': Feature, 'targets': Feature}.
  """
  vocabulary = get_vocabulary() if vocabulary is None else vocabulary
  return {
      'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=add_eos, required=False),
      'targets': seqio.Feature(vocabulary=vocabulary, add_eos=add_eos),
  }


def seqio_test_vocabulary_path() -> str:
  """Path of the 26-piece SentencePiece model bundled with seqio (for tests)."""
  return os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
  )
