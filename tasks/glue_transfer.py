"""Zero-shot task transfer between QQP and MRPC (paraphrase detection).

A prompt trained on QQP answers `duplicate`/`not_duplicate`; MRPC's labels
are `equivalent`/`not_equivalent` (and the other way round). The evaluation
tasks below read the target dataset's validation split in its own T5 format
(`mrpc sentence1: ... sentence2: ...`) and translate the source task's label
words into the target's before T5's postprocessing and metrics (F1, accuracy),
so a prompt trained on one task is scored zero-shot on the other.

Tasks (`{prefix}` in '', 'taskless_', 'task_index_'; `{sfx}` in '',
'_examples'; `{ver}` in 'v002' (TFDS glue 1.0.0, the original names) and
'v200' (glue 2.0.0)):

* `{prefix}glue_mrpc_from_qqp_{ver}{sfx}`: MRPC validation, QQP label words.
* `{prefix}glue_qqp_from_mrpc_{ver}{sfx}`: QQP validation, MRPC label words.

Mixtures `{prefix}glue_{target}_from_{source}_zeroshot_{ver}{sfx}`: train on
`{prefix}glue_{source}_{ver}` (the source has the only `train` split),
evaluate zero-shot on the task above.

`task_index_*` tasks prepend the *source* task's index token
(`tasks.glue.GLUE_TASK_INDEX[source]`): the evaluated examples must reach the
prompt that was trained on the source task. (The original prompt-tuning code
used the target's index, whose prompt is never trained in this setting.)
"""

from typing import List, Optional

import seqio

from prompt_tuning.data import features
from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import postprocessors as pt_postprocessors
from prompt_tuning.data import preprocessors as pt_preprocessors
from prompt_tuning.data import utils
from tasks import glue

PREFIXES = glue.PREFIXES
SUFFIXES = glue.SUFFIXES
# (source, target) -> label translation applied to predictions (and targets).
TRANSLATIONS = {
    ('qqp', 'mrpc'): pt_postprocessors.qqp_to_mrpc,
    ('mrpc', 'qqp'): pt_postprocessors.mrpc_to_qqp,
}

TASK_NAMES: List[str] = []
MIXTURE_NAMES: List[str] = []


def register(vocabulary: Optional[seqio.Vocabulary] = None) -> List[str]:
  """(Re-)registers the transfer tasks and mixtures; returns their names.

  Needs the GLUE source tasks, which importing this module registers
  (`tasks.glue`).

  Args:
    vocabulary: vocabulary of the tasks; None uses `features.get_vocabulary()`.
  """
  feats = features.output_features(vocabulary)
  tasks: List[str] = []
  mixtures: List[str] = []
  for ver, data_version in glue.VERSIONS.items():
    for (source, target), translation in TRANSLATIONS.items():
      label_classes, _ = glue.GLUE_CONFIGS[target]
      glue.register_variants(
          f'glue_{target}_from_{source}_{ver}',
          tfds_name=f'glue/{target}:{data_version}',
          splits=('validation',),
          text_preprocessors=pt_preprocessors.get_glue_text_preprocessor(target, label_classes),
          postprocess_fn=pt_postprocessors.sequential(
              translation, pt_postprocessors.get_glue_postprocess_fn(target, label_classes)
          ),
          metric_fns=pt_metrics.get_glue_metric(target),
          output_features=feats,
          task_index=glue.GLUE_TASK_INDEX[source],
          display_name=f'{target}_from_{source}',
          registered=tasks,
      )
      for prefix in PREFIXES:
        for suffix in SUFFIXES:
          name = f'{prefix}glue_{target}_from_{source}_zeroshot_{ver}{suffix}'
          utils.register_mixture(
              name,
              [
                  f'{prefix}glue_{source}_{ver}',
                  f'{prefix}glue_{target}_from_{source}_{ver}{suffix}',
              ],
              default_rate=1.0,
          )
          mixtures.append(name)
  TASK_NAMES[:] = tasks
  MIXTURE_NAMES[:] = mixtures
  return tasks + mixtures


register()
