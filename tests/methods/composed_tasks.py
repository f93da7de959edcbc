"""Tiny offline seqio tasks for the composed-prompt end-to-end tests (3 tasks x 2 languages).

Importable as `composed_tasks` (the tests put `tests/methods` on PYTHONPATH and pass
`--gin.MIXTURE_OR_TASK_MODULE="'composed_tasks'"`). Words and vocabulary are those of
`tests/runtime/tiny_task.py` (seqio's bundled 26-piece test SentencePiece model). Language 1 spells
every word backwards (same letters, so it is encodable).

Tasks (`composed_<task>_l<lang>`; every example carries int32 scalars `task_ids` and `lang_ids`):
  count  "<1-3 words>" -> "one" | "two" | "three"   (task 0)
  first  "<1-3 words>" -> the first word             (task 1)
  last   "<1-3 words>" -> the last word              (task 2)
Mixtures / interleavings:
  composed_mixture      the six tasks at equal rates (training batches mix tasks and languages).
  composed_interleaved  one task whose examples cycle through the six: example i is example
                        i // 6 of task-language pair i % 6 (in `PAIRS` order), so every batch
                        mixes tasks and languages (serving).
"""

from typing import Dict, List, Sequence

import numpy as np
import seqio
import tensorflow as tf

import tiny_task

TASKS = ('count', 'first', 'last')
LANGS = 2
PAIRS = tuple((t, l) for l in range(LANGS) for t in range(len(TASKS)))
SPLIT_SIZES = {'train': 64, 'validation': 4}
COUNTS = ('one', 'two', 'three')


def task_name(task: int, lang: int) -> str:
  return f'composed_{TASKS[task]}_l{lang}'


def _word(w: str, lang: int) -> str:
  return w[::-1] if lang else w


def examples(task: int, lang: int, split: str) -> List[Dict]:
  rng = np.random.default_rng([{'train': 1, 'validation': 2}[split], task, lang])
  out = []
  for _ in range(SPLIT_SIZES[split]):
    n = int(rng.integers(1, 4))
    words = [_word(tiny_task.WORDS[int(i)], lang) for i in rng.integers(0, len(tiny_task.WORDS), n)]
    target = (_word(COUNTS[n - 1], lang), words[0], words[-1])[task]
    out.append({'inputs': ' '.join(words), 'targets': target, 'task_ids': task, 'lang_ids': lang})
  return out


def interleaved(split: str) -> List[Dict]:
  per_pair = [examples(t, l, split) for t, l in PAIRS]
  return [per_pair[i % len(PAIRS)][i // len(PAIRS)] for i in range(len(PAIRS) * SPLIT_SIZES[split])]


def _dataset_fn(make):
  def dataset_fn(split: str, shuffle_files: bool = False, seed=None):
    del shuffle_files, seed
    rows = make(split)
    data = {k: [r[k] for r in rows] for k in ('inputs', 'targets')}
    for k in ('task_ids', 'lang_ids'):
      data[k] = np.asarray([[r[k]] for r in rows], np.int32)
    return tf.data.Dataset.from_tensor_slices(data)

  return dataset_fn


def _id_feature(size: int) -> seqio.Feature:
  return seqio.Feature(
      vocabulary=seqio.PassThroughVocabulary(size=size),
      add_eos=False,
      required=False,
      dtype=tf.int32,
      rank=1,
  )


def _tokenize_text(dataset, output_features):
  return seqio.preprocessors.tokenize(
      dataset, {k: output_features[k] for k in ('inputs', 'targets')}
  )


def register() -> None:
  vocab = tiny_task.get_vocabulary()
  # `task_ids` / `lang_ids` are output features (a seqio Mixture keeps only those) of one int per
  # example, stored as [1] vectors (seqio's evaluator measures the length of every output feature).
  features = {
      'inputs': seqio.Feature(vocabulary=vocab, add_eos=True),
      'targets': seqio.Feature(vocabulary=vocab, add_eos=True),
      'task_ids': _id_feature(len(TASKS)),
      'lang_ids': _id_feature(LANGS),
  }
  sources = {task_name(t, l): (lambda s, t=t, l=l: examples(t, l, s)) for t, l in PAIRS}
  sources['composed_interleaved'] = interleaved
  for name, make in sources.items():
    if name in seqio.TaskRegistry.names():
      continue
    n = len(make('validation')) // SPLIT_SIZES['validation']
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(make),
            splits=('train', 'validation'),
            num_input_examples={k: v * n for k, v in SPLIT_SIZES.items()},
        ),
        preprocessors=[_tokenize_text, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[tiny_task.accuracy, tiny_task.mean_log_likelihood],
    )
  if 'composed_mixture' not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add('composed_mixture', [(task_name(t, l), 1.0) for t, l in PAIRS])


register()
