"""SuperGLUE tasks and mixtures (T5's formats) with the prompt-tuning variants.

Tasks (TFDS `super_glue/{name}:1.0.2`; `{prefix}` in '', 'taskless_',
'task_index_'; `{sfx}` in '', '_examples'; see `tasks.glue` for what the
prefixes and suffixes do):

* `{prefix}super_glue_{name}_v102{sfx}` for boolq, cb, copa, multirc, record,
  rte, wic and the test-only diagnostics axb, axg (cast as RTE), e.g.
  `boolq passage: ... question: ...` -> `False`/`True`.
* WSC in T5's "simple" referent-generation form (`wsc: ... *he* ...` -> `Tom`):
  `{prefix}super_glue_wsc_v102_simple_train{sfx}` (train split, correct
  referents only, no metrics) and `{prefix}super_glue_wsc_v102_simple_eval{sfx}`
  (validation/test; accuracy of "predicted the candidate" vs the label).
* DPR (`definite_pronoun_resolution:1.1.0`), extra WSC-like training data:
  `{prefix}dpr_v001_simple{sfx}`.

Task indices (`task_index_*`): sorted SuperGLUE names, boolq 0, cb 1, copa 2,
multirc 3, record 4, rte 5, wic 6, wsc 7; AX-b/AX-g use RTE's, DPR uses WSC's.

Mixtures:

* `{prefix}super_glue_wsc_and_dev_v102_simple{sfx}`: train on the WSC train
  task, evaluate on the WSC eval task.
* `{prefix}super_glue_v102{sfx}_proportional` and
  `{prefix}super_glue_with_dpr_v102{sfx}_proportional`: all SuperGLUE training
  tasks (without / with DPR) at T5's examples-proportional rates
  (`SUPER_GLUE_NUM_TRAIN_EXAMPLES`, capped at `tasks.glue.MIXING_RATE_MAXIMUM`,
  which none reaches); the WSC eval task rides along with rate 0 so the
  mixture also evaluates WSC.

Registration is idempotent and reads neither the vocabulary nor TFDS; see
`tasks.glue` for choosing the vocabulary.
"""

import functools
from typing import Dict, List, Optional, Tuple

import seqio

from prompt_tuning.data import features
from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import postprocessors as pt_postprocessors
from prompt_tuning.data import preprocessors as pt_preprocessors
from prompt_tuning.data import utils
from tasks import glue

PREFIXES = glue.PREFIXES
SUFFIXES = glue.SUFFIXES
TRAIN_VALIDATION_TEST = glue.TRAIN_VALIDATION_TEST
SUPER_GLUE_VERSION = '1.0.2'
DPR_TFDS_NAME = 'definite_pronoun_resolution:1.1.0'

SUPER_GLUE_CONFIGS: Dict[str, Tuple[Optional[Tuple[str, ...]], Tuple[str, ...]]] = {
    'boolq': (('False', 'True'), TRAIN_VALIDATION_TEST),
    'cb': (('entailment', 'contradiction', 'neutral'), TRAIN_VALIDATION_TEST),
    'copa': (('choice1', 'choice2'), TRAIN_VALIDATION_TEST),
    'multirc': (('False', 'True'), TRAIN_VALIDATION_TEST),
    'record': (None, TRAIN_VALIDATION_TEST),
    'rte': (('entailment', 'not_entailment'), TRAIN_VALIDATION_TEST),
    'wic': (('False', 'True'), TRAIN_VALIDATION_TEST),
    'axb': (('entailment', 'not_entailment'), ('test',)),
    'axg': (('entailment', 'not_entailment'), ('test',)),
}
SUPER_GLUE_TASK_INDEX = utils.task_mapping(
    list(SUPER_GLUE_CONFIGS) + ['wsc', 'wsc.fixed'],
    {'wsc.fixed': 'wsc', 'axb': 'rte', 'axg': 'rte'},
)
SUPER_GLUE_TASK_INDEX['dpr'] = SUPER_GLUE_TASK_INDEX['wsc']

# T5's SuperGLUE mixing weights (training examples per task; the WSC eval task has 0).
SUPER_GLUE_NUM_TRAIN_EXAMPLES = {
    'wsc_simple_train': 259,
    'wsc_simple_eval': 0,
    'boolq': 9_427,
    'cb': 250,
    'copa': 400,
    'multirc': 27_243,
    'record': 138_854,
    'rte': 2_490,
    'wic': 5_428,
}
DPR_NUM_TRAIN_EXAMPLES = 1_322

QA_EXAMPLE_FIELDS = (utils.INPUT_TEXT, utils.TARGET_TEXT, utils.ANSWERS_TEXT)

TASK_NAMES: List[str] = []
MIXTURE_NAMES: List[str] = []


def _task_for(key: str, prefix: str, suffix: str) -> str:
  """Name of a mixture member given its key in `SUPER_GLUE_NUM_TRAIN_EXAMPLES`."""
  if key.startswith('wsc_simple_'):
    return f'{prefix}super_glue_wsc_v102_simple_{key[len("wsc_simple_"):]}{suffix}'
  if key == 'dpr':
    return f'{prefix}dpr_v001_simple{suffix}'
  return f'{prefix}super_glue_{key}_v102{suffix}'


def register(vocabulary: Optional[seqio.Vocabulary] = None) -> List[str]:
  """(Re-)registers every SuperGLUE/WSC/DPR task and mixture; returns their names.

  Args:
    vocabulary: vocabulary of the tasks; None uses `features.get_vocabulary()`.
  """
  feats = features.output_features(vocabulary)
  tasks: List[str] = []
  mixtures: List[str] = []
  for config, (label_classes, splits) in SUPER_GLUE_CONFIGS.items():
    glue.register_variants(
        f'super_glue_{config}_v102',
        tfds_name=f'super_glue/{config}:{SUPER_GLUE_VERSION}',
        splits=splits,
        text_preprocessors=pt_preprocessors.get_glue_text_preprocessor(config, label_classes),
        postprocess_fn=pt_postprocessors.get_glue_postprocess_fn(config, label_classes),
        metric_fns=pt_metrics.get_super_glue_metric(config),
        output_features=feats,
        task_index=SUPER_GLUE_TASK_INDEX[config],
        display_name=config,
        example_fields=QA_EXAMPLE_FIELDS
        if config == 'record'
        else (utils.INPUT_TEXT, utils.TARGET_TEXT),
        registered=tasks,
    )

  wsc_source = f'super_glue/wsc.fixed:{SUPER_GLUE_VERSION}'
  glue.register_variants(
      'super_glue_wsc_v102_simple_train',
      tfds_name=wsc_source,
      splits=('train',),
      text_preprocessors=[
          functools.partial(pt_preprocessors.wsc_simple, correct_referent_only=True)
      ],
      postprocess_fn=None,
      metric_fns=[],
      output_features=feats,
      task_index=SUPER_GLUE_TASK_INDEX['wsc'],
      display_name='wsc',
      registered=tasks,
  )
  glue.register_variants(
      'super_glue_wsc_v102_simple_eval',
      tfds_name=wsc_source,
      splits=('validation', 'test'),
      text_preprocessors=[
          functools.partial(pt_preprocessors.wsc_simple, correct_referent_only=False)
      ],
      postprocess_fn=pt_postprocessors.wsc_simple,
      metric_fns=[pt_metrics.accuracy],
      output_features=feats,
      task_index=SUPER_GLUE_TASK_INDEX['wsc'],
      display_name='wsc',
      registered=tasks,
  )
  glue.register_variants(
      'dpr_v001_simple',
      tfds_name=DPR_TFDS_NAME,
      splits=('train', 'test'),
      text_preprocessors=[pt_preprocessors.definite_pronoun_resolution_simple],
      postprocess_fn=None,
      metric_fns=[pt_metrics.accuracy],
      output_features=feats,
      task_index=SUPER_GLUE_TASK_INDEX['dpr'],
      display_name='dpr',
      registered=tasks,
  )

  rates = glue.proportional_rates(SUPER_GLUE_NUM_TRAIN_EXAMPLES)
  rates_with_dpr = glue.proportional_rates(
      {'dpr': DPR_NUM_TRAIN_EXAMPLES, **SUPER_GLUE_NUM_TRAIN_EXAMPLES}
  )
  for prefix in PREFIXES:
    for suffix in SUFFIXES:
      name = f'{prefix}super_glue_wsc_and_dev_v102_simple{suffix}'
      utils.register_mixture(
          name,
          [
              _task_for('wsc_simple_train', prefix, suffix),
              _task_for('wsc_simple_eval', prefix, suffix),
          ],
          default_rate=1.0,
      )
      mixtures.append(name)
      for mixture_base, mixture_rates in (
          ('super_glue', rates),
          ('super_glue_with_dpr', rates_with_dpr),
      ):
        name = f'{prefix}{mixture_base}_v102{suffix}_proportional'
        utils.register_mixture(
            name, [(_task_for(k, prefix, suffix), r) for k, r in mixture_rates.items()]
        )
        mixtures.append(name)
  TASK_NAMES[:] = tasks
  MIXTURE_NAMES[:] = mixtures
  return tasks + mixtures


register()
