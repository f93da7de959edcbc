"""SQuAD and MRQA tasks, and SQuAD -> MRQA zero-shot domain-transfer mixtures.

All use T5's SQuAD format, `question: <q> context: <c>` -> answer, with
punctuation padded by spaces, and SQuAD's EM/F1 (max over the gold answers).

Tasks (`{sfx}` in '', '_examples'):

* `squad_v010_allanswers{sfx}`: TFDS `squad/v1.1:3.0.0` (T5's task name).
* `mrqa_{name}_v100{sfx}` over TFDS `mrqa/{name}:1.0.0`:
  - in-domain (train and validation splits): `MRQA_IN_DOMAIN`;
  - out-of-domain (TFDS has only a `test` split, served as `validation`):
    `MRQA_OUT_OF_DOMAIN`.

Mixtures: `squad_to_{name}{sfx}` for every out-of-domain MRQA set, and
`squad_to_mrqa{sfx}` with all of them: train on SQuAD (the only task with a
`train` split), evaluate on SQuAD and on the out-of-domain sets (the prompt
tuning paper's domain-shift setup).

Registration is idempotent and reads neither the vocabulary nor TFDS; see
`tasks.glue` for choosing the vocabulary.
"""

from typing import List, Optional

import seqio

from prompt_tuning.data import features
from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import postprocessors as pt_postprocessors
from prompt_tuning.data import preprocessors as pt_preprocessors
from prompt_tuning.data import utils
from tasks import glue

SUFFIXES = glue.SUFFIXES
SQUAD_TFDS_NAME = 'squad/v1.1:3.0.0'
MRQA_VERSION = '1.0.0'
MRQA_IN_DOMAIN = ('news_qa', 'trivia_qa', 'search_qa', 'hotpot_qa', 'natural_questions')
MRQA_OUT_OF_DOMAIN = ('bio_asq', 'drop', 'duo_rc', 'race', 'relation_extraction', 'textbook_qa')
QA_EXAMPLE_FIELDS = (
    utils.INPUT_TEXT,
    utils.TARGET_TEXT,
    utils.CONTEXT_TEXT,
    utils.QUESTION_TEXT,
    utils.ANSWERS_TEXT,
)

TASK_NAMES: List[str] = []
MIXTURE_NAMES: List[str] = []


def register(vocabulary: Optional[seqio.Vocabulary] = None) -> List[str]:
  """(Re-)registers the QA tasks and mixtures; returns their names.

  Args:
    vocabulary: vocabulary of the tasks; None uses `features.get_vocabulary()`.
  """
  feats = features.output_features(vocabulary)
  tasks: List[str] = []
  mixtures: List[str] = []
  common = dict(
      postprocess_fn=pt_postprocessors.qa,
      metric_fns=[pt_metrics.squad],
      output_features=feats,
      task_index=None,
      prefixes=('',),
      example_fields=QA_EXAMPLE_FIELDS,
      format_fn=pt_metrics.format_qa,
      registered=tasks,
  )
  glue.register_variants(
      'squad_v010_allanswers',
      tfds_name=SQUAD_TFDS_NAME,
      splits=('train', 'validation'),
      text_preprocessors=[pt_preprocessors.squad],
      display_name='squad',
      **common,
  )
  for name in MRQA_IN_DOMAIN + MRQA_OUT_OF_DOMAIN:
    splits = ('train', 'validation') if name in MRQA_IN_DOMAIN else {'validation': 'test'}
    glue.register_variants(
        f'mrqa_{name}_v100',
        tfds_name=f'mrqa/{name}:{MRQA_VERSION}',
        splits=splits,
        text_preprocessors=[pt_preprocessors.mrqa],
        display_name=name,
        **common,
    )
  for suffix in SUFFIXES:
    squad = f'squad_v010_allanswers{suffix}'
    for name in MRQA_OUT_OF_DOMAIN:
      mixture = f'squad_to_{name}{suffix}'
      utils.register_mixture(mixture, [squad, f'mrqa_{name}_v100{suffix}'], default_rate=1.0)
      mixtures.append(mixture)
    mixture = f'squad_to_mrqa{suffix}'
    utils.register_mixture(
        mixture,
        [squad] + [f'mrqa_{name}_v100{suffix}' for name in MRQA_OUT_OF_DOMAIN],
        default_rate=1.0,
    )
    mixtures.append(mixture)
  TASK_NAMES[:] = tasks
  MIXTURE_NAMES[:] = mixtures
  return tasks + mixtures


register()
