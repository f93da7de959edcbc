"""A tiny offline seqio task for the runtime's end-to-end tests.

Importable as `tiny_task` (tests put `tests/runtime` on PYTHONPATH and pass
`--gin.MIXTURE_OR_TASK_MODULE="'tiny_task'"`). It uses seqio's bundled test
SentencePiece model (26 pieces, so it fits the tiny configs' 128 embeddings);
that model lacks some letters, so every word below is spelled with letters it
has (e a s o i l c m p w h d n r t v).

Tasks:
  tiny_count        "<1-3 words>" -> "one" | "two" | "three"  (metrics: accuracy of the decodes and
                    the mean log-likelihood of the targets).
  tiny_count_long   same inputs, but the target repeats the count word four times
                    (used to check that a too-short `targets` length is caught).
  tiny_count_mixed  tiny_count whose example i carries `prompt_ids = i % 2` (a two-prompt bank).
  tiny_count_tasks  tiny_count whose example i carries `task_ids = i % 2` (a per-example feature
                    other than `prompt_ids`).
"""

import os
from typing import Dict, List, Sequence

import numpy as np
import seqio
import tensorflow as tf

VOCAB_PATH = os.path.join(
    os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
)
WORDS = ('cat', 'rat', 'mat', 'hat', 'tea', 'ten', 'sea', 'melon', 'lemon', 'salad', 'wind', 'rain')
COUNTS = ('one', 'two', 'three')
SPLIT_SIZES = {'train': 64, 'validation': 8}
TASK_FEATURE_LENGTHS = {'inputs': 24, 'targets': 8}


def get_vocabulary() -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(VOCAB_PATH)


def examples(split: str, repeat: int = 1) -> List[Dict[str, str]]:
  rng = np.random.default_rng({'train': 1, 'validation': 2}[split])
  out = []
  for _ in range(SPLIT_SIZES[split]):
    n = int(rng.integers(1, 4))
    words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n)]
    out.append({'inputs': ' '.join(words), 'targets': ' '.join([COUNTS[n - 1]] * repeat)})
  return out


def _dataset_fn(repeat: int, num_prompts: int = 0, id_feature: str = 'prompt_ids'):
  def dataset_fn(split: str, shuffle_files: bool = False, seed=None):
    del shuffle_files, seed
    rows = examples(split, repeat)
    data = {'inputs': [r['inputs'] for r in rows], 'targets': [r['targets'] for r in rows]}
    if num_prompts:
      data[id_feature] = np.arange(len(rows), dtype=np.int32) % num_prompts
    return tf.data.Dataset.from_tensor_slices(data)

  return dataset_fn


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  targets, predictions = list(targets), list(predictions)
  return {'accuracy': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def mean_log_likelihood(targets: Sequence[str], scores: Sequence[float]) -> Dict[str, float]:
  """A score metric (seqio passes the model's per-example target log-likelihoods)."""
  del targets
  return {'log_likelihood': float(np.mean(scores))}


def register() -> None:
  vocab = get_vocabulary()
  features = {
      'inputs': seqio.Feature(vocabulary=vocab, add_eos=True),
      'targets': seqio.Feature(vocabulary=vocab, add_eos=True),
  }
  for name, repeat, num_prompts, id_feature in (
      ('tiny_count', 1, 0, None),
      ('tiny_count_long', 4, 0, None),
      ('tiny_count_mixed', 1, 2, 'prompt_ids'),
      ('tiny_count_tasks', 1, 2, 'task_ids'),
  ):
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(repeat, num_prompts, id_feature),
            splits=('train', 'validation'),
            num_input_examples=SPLIT_SIZES,
        ),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[accuracy, mean_log_likelihood],
    )


register()
