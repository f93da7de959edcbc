"""GLUE tasks and mixtures in T5's text-to-text format, with the prompt-tuning variants.

Task names (for every TFDS GLUE config `{name}` in `GLUE_CONFIGS` and version
`{ver}` in `VERSIONS`: `v002` = `glue/{name}:1.0.0` as in T5, `v200` =
`glue/{name}:2.0.0`):

* `glue_{name}_{ver}`: T5's task (`sst2 sentence: ...` -> `positive`).
* `glue_{name}_{ver}_examples`: same data; predictions are postprocessed into
  dicts that keep the input text, and the metrics add TensorBoard text samples
  (`{name} samples`, `{name} negative samples`). The unlabelled AX has no
  metrics in either form, so seqio's evaluator skips it.
* `taskless_glue_{name}_{ver}[_examples]`: the benchmark name (first word) is
  removed from the inputs (`sentence: ...`), so the prompt carries the task.
* `task_index_glue_{name}_{ver}[_examples]`: the taskless inputs with one
  leading token `<extra_id_{i}>` (`vocab_size - 1 - i`), `i =
  GLUE_TASK_INDEX[name]` (sorted names; MNLI-m/mm and AX share MNLI's index),
  for multi-task prompts.

Mixtures (`{prefix}` in '', 'taskless_', 'task_index_'; `{sfx}` in '', '_examples'):

* `{prefix}glue_mnli_and_dev_{ver}{sfx}`: MNLI training data; evaluation on the
  matched and mismatched dev sets (the `glue_mnli_{matched,mismatched}` tasks,
  whose `validation` split they are).
* `{prefix}glue_{ver}{sfx}_proportional`: T5's GLUE mixture (examples-
  proportional rates from `GLUE_NUM_TRAIN_EXAMPLES`; WNLI left out as in T5).

Importing the module registers everything (idempotently: existing tasks of the
same names are replaced). The vocabulary comes from
`prompt_tuning.data.features.get_vocabulary()`; set `PROMPT_TUNING_VOCAB`
(and `PROMPT_TUNING_VOCAB_EXTRA_IDS`) or call
`features.set_default_vocabulary(...)` before the import, or call
`register(vocabulary)` afterwards (then also `tasks.glue_transfer.register`,
whose mixtures hold GLUE tasks). Nothing here reads the vocabulary or TFDS
until a dataset is requested.
"""

import functools
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import seqio

from prompt_tuning.data import features
from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import postprocessors as pt_postprocessors
from prompt_tuning.data import preprocessors as pt_preprocessors
from prompt_tuning.data import utils

PREFIXES = ('', 'taskless_', 'task_index_')
SUFFIXES = ('', '_examples')
VERSIONS = {'v002': '1.0.0', 'v200': '2.0.0'}
TRAIN_VALIDATION_TEST = ('train', 'validation', 'test')
# The examples-proportional cap K of T5's mixing rates; every (Super)GLUE task is below it.
MIXING_RATE_MAXIMUM = 2**19

# config: (label classes, splits). Label classes are TFDS's, which T5 uses as targets.
GLUE_CONFIGS: Dict[str, Tuple[Optional[Tuple[str, ...]], Tuple[str, ...]]] = {
    'cola': (('unacceptable', 'acceptable'), TRAIN_VALIDATION_TEST),
    'sst2': (('negative', 'positive'), TRAIN_VALIDATION_TEST),
    'mrpc': (('not_equivalent', 'equivalent'), TRAIN_VALIDATION_TEST),
    'qqp': (('not_duplicate', 'duplicate'), TRAIN_VALIDATION_TEST),
    'stsb': (None, TRAIN_VALIDATION_TEST),
    'mnli': (
        ('entailment', 'neutral', 'contradiction'),
        ('train', 'validation_matched', 'validation_mismatched', 'test_matched', 'test_mismatched'),
    ),
    'mnli_mismatched': (('entailment', 'neutral', 'contradiction'), ('validation', 'test')),
    'mnli_matched': (('entailment', 'neutral', 'contradiction'), ('validation', 'test')),
    'qnli': (('entailment', 'not_entailment'), TRAIN_VALIDATION_TEST),
    'rte': (('entailment', 'not_entailment'), TRAIN_VALIDATION_TEST),
    'wnli': (('not_entailment', 'entailment'), TRAIN_VALIDATION_TEST),
    'ax': (('entailment', 'neutral', 'contradiction'), ('test',)),
}
GLUE_TASK_INDEX = utils.task_mapping(
    GLUE_CONFIGS, {'ax': 'mnli', 'mnli_mismatched': 'mnli', 'mnli_matched': 'mnli'}
)
# T5's GLUE mixing weights (training-set sizes; 0 for evaluation-only configs).
GLUE_NUM_TRAIN_EXAMPLES = {
    'cola': 8_551,
    'sst2': 67_349,
    'mrpc': 3_668,
    'qqp': 363_849,
    'stsb': 5_749,
    'mnli': 392_702,
    'qnli': 104_743,
    'rte': 2_490,
    'mnli_mismatched': 0,
    'mnli_matched': 0,
    'ax': 0,
}

TASK_NAMES: List[str] = []
MIXTURE_NAMES: List[str] = []


def task_name(prefix: str, base: str, suffix: str = '') -> str:
  """`{prefix}{base}{suffix}`, e.g. ('taskless_', 'glue_sst2_v200', '_examples')."""
  return f'{prefix}{base}{suffix}'


def register_variants(
    base: str,
    *,
    tfds_name: str,
    splits,
    text_preprocessors: Sequence[Callable],
    postprocess_fn: Optional[Callable],
    metric_fns: Sequence[Callable],
    output_features: Mapping[str, seqio.Feature],
    task_index: Optional[int],
    display_name: str,
    prefixes: Sequence[str] = PREFIXES,
    suffixes: Sequence[str] = SUFFIXES,
    example_fields: Sequence[str] = (utils.INPUT_TEXT, utils.TARGET_TEXT),
    format_fn: Callable = pt_metrics.format_classification,
    registered: Optional[List[str]] = None,
) -> List[str]:
  """Registers `{prefix}{base}{suffix}` for every prefix and suffix.

  Args:
    base: the plain task name, e.g. 'glue_sst2_v200'.
    tfds_name: TFDS `name/config:version`.
    splits: split names, or {seqio split: TFDS split}.
    text_preprocessors: dataset preprocessors producing `inputs`/`targets` text.
    postprocess_fn: the plain task's postprocessor (None: identity).
    metric_fns: the plain task's metrics.
    output_features: features with the vocabulary.
    task_index: index for the `task_index_` variant.
    display_name: name shown in the `_examples` TensorBoard text metrics.
    prefixes: which of '', 'taskless_', 'task_index_' to register.
    suffixes: which of '', '_examples' to register.
    example_fields: example keys kept by `_examples` postprocessing.
    format_fn: renders one `_examples` prediction for TensorBoard.
    registered: list the new names are appended to.

  Returns:
    The registered names.
  """
  names = []
  for prefix in prefixes:
    for suffix in suffixes:
      preprocessors = list(text_preprocessors)
      if prefix:
        preprocessors.append(pt_preprocessors.remove_first_text_token)
      preprocessors.append(seqio.preprocessors.tokenize)
      if prefix == 'task_index_':
        if task_index is None:
          raise ValueError(f'{base} has no task index.')
        preprocessors.append(
            functools.partial(
                pt_preprocessors.add_sentinel_to_beginning, field='inputs', offset=task_index
            )
        )
      preprocessors += [seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim]
      if suffix:
        postprocess = pt_postprocessors.with_examples(
            postprocess_fn or utils.identity, example_fields
        )
        metrics = [pt_metrics.with_examples(fn) for fn in metric_fns]
        if metrics:
          metrics.append(
              functools.partial(
                  pt_metrics.text_examples, task_name=display_name, format_fn=format_fn
              )
          )
      else:
        postprocess = postprocess_fn
        metrics = list(metric_fns)
      name = task_name(prefix, base, suffix)
      utils.register_task(
          name,
          source=seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits),
          preprocessors=preprocessors,
          postprocess_fn=postprocess,
          metric_fns=metrics,
          output_features=output_features,
      )
      names.append(name)
  if registered is not None:
    registered.extend(names)
  return names


def proportional_rates(num_examples: Mapping[str, float]) -> Dict[str, float]:
  """T5's examples-proportional rates, capped at `MIXING_RATE_MAXIMUM`."""
  return {
      k: utils.rate_num_examples(v, maximum=MIXING_RATE_MAXIMUM) for k, v in num_examples.items()
  }


def register(vocabulary: Optional[seqio.Vocabulary] = None) -> List[str]:
  """(Re-)registers every GLUE task and mixture; returns their names.

  Args:
    vocabulary: vocabulary of the tasks; None uses `features.get_vocabulary()`.
  """
  feats = features.output_features(vocabulary)
  tasks: List[str] = []
  mixtures: List[str] = []
  for ver, data_version in VERSIONS.items():
    for config, (label_classes, splits) in GLUE_CONFIGS.items():
      register_variants(
          f'glue_{config}_{ver}',
          tfds_name=f'glue/{config}:{data_version}',
          splits=splits,
          text_preprocessors=pt_preprocessors.get_glue_text_preprocessor(config, label_classes),
          postprocess_fn=pt_postprocessors.get_glue_postprocess_fn(config, label_classes),
          metric_fns=pt_metrics.get_glue_metric(config),
          output_features=feats,
          task_index=GLUE_TASK_INDEX[config],
          display_name=config,
          registered=tasks,
      )
    for prefix in PREFIXES:
      for suffix in SUFFIXES:
        name = task_name(prefix, f'glue_mnli_and_dev_{ver}', suffix)
        utils.register_mixture(
            name,
            [
                task_name(prefix, f'glue_{c}_{ver}', suffix)
                for c in ('mnli', 'mnli_mismatched', 'mnli_matched')
            ],
            default_rate=1.0,
        )
        mixtures.append(name)
        name = f'{prefix}glue_{ver}{suffix}_proportional'
        utils.register_mixture(
            name,
            [
                (task_name(prefix, f'glue_{c}_{ver}', suffix), rate)
                for c, rate in proportional_rates(GLUE_NUM_TRAIN_EXAMPLES).items()
            ],
        )
        mixtures.append(name)
  TASK_NAMES[:] = tasks
  MIXTURE_NAMES[:] = mixtures
  return tasks + mixtures


register()
