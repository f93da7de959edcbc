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
  tiny_count_p<k>   tiny_count whose every example carries `prompt_ids = k` (k = 0..3).

Mixtures: `tiny_bank_mix` (tiny_count_p0, tiny_count_p1: served by a bank of 2 prompts) and
`tiny_bank_mix4` (tiny_count_p0 ... p3: ids 2 and 3 are out of range for a bank of 2).
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


def _dataset_fn(
    repeat: int, num_prompts: int = 0, id_feature: str = 'prompt_ids', constant_id=None
):
  def dataset_fn(split: str, shuffle_files: bool = False, seed=None):
    del shuffle_files, seed
    rows = examples(split, repeat)
    data = {'inputs': [r['inputs'] for r in rows], 'targets': [r['targets'] for r in rows]}
    if num_prompts:
      data[id_feature] = np.arange(len(rows), dtype=np.int32) % num_prompts
    if constant_id is not None:
      data[id_feature] = np.full(len(rows), constant_id, np.int32)
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
  for name, repeat, num_prompts, id_feature, constant_id in (
      ('tiny_count', 1, 0, None, None),
      ('tiny_count_long', 4, 0, None, None),
      ('tiny_count_mixed', 1, 2, 'prompt_ids', None),
      ('tiny_count_tasks', 1, 2, 'task_ids', None),
      *((f'tiny_count_p{k}', 1, 0, 'prompt_ids', k) for k in range(4)),
  ):
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(repeat, num_prompts, id_feature, constant_id),
            splits=('train', 'validation'),
            num_input_examples=SPLIT_SIZES,
        ),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[accuracy, mean_log_likelihood],
    )
  for name, tasks in (
      ('tiny_bank_mix', ['tiny_count_p0', 'tiny_count_p1']),
      ('tiny_bank_mix4', [f'tiny_count_p{k}' for k in range(4)]),
  ):
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, tasks, default_rate=1.0)


register()
