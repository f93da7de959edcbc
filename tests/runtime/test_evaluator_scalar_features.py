"""`seqio.Evaluator` on tasks whose examples carry one integer each (`prompt_ids`, rank 0).

seqio 0.0.20 measures every output feature's length as `shape[0]` while it builds an evaluator and
raised a bare `IndexError` on the toy mixed-task tasks (scalar `prompt_ids`), so `prompt_tuning.eval`
and the in-training inference evaluation could not run on them. The runtime builds its evaluators
inside `inference.measurable_scalar_features()`.
"""

import numpy as np
import seqio

from prompt_tuning.data import feature_converters
from prompt_tuning.runtime import inference
from tasks import toy


def _evaluator(task):
  return seqio.Evaluator(
      mixture_or_task_name=task,
      feature_converter=feature_converters.EncDecFeatureConverter(pack=False),
      eval_split='validation',
      sequence_length={'inputs': 32, 'targets': 8},
  )


def test_mixed_task_ids_survive_the_evaluator():
  names = toy.MIXED_TASKS[:2]
  with inference.measurable_scalar_features():
    evaluators = [_evaluator(name) for name in names]
  for task_id, (name, ev) in enumerate(zip(names, evaluators)):
    assert [t.name for t in ev.eval_tasks] == [name]
    examples = list(ev._cached_model_datasets[name].as_numpy_iterator())  # pylint: disable=protected-access
    assert examples
    ids = [ex['prompt_ids'] for _, ex in examples]
    # One scalar per example again after the converter, the task's own id.
    assert all(np.shape(i) == () for i in ids)
    assert set(int(i) for i in ids) == {toy.MIXED_TASKS.index(name)} == {task_id}
    # The evaluator's task datasets (what the metrics' examples come from) hold them as [1].
    task_examples = list(ev._cached_task_datasets[name].as_numpy_iterator())  # pylint: disable=protected-access
    assert len(task_examples) == len(examples)
    assert all(np.shape(ex['prompt_ids']) == (1,) for ex in task_examples)


def test_the_patch_is_undone():
  from seqio import evaluation  # pylint: disable=g-import-not-at-top

  before = evaluation._cache_and_measure_examples  # pylint: disable=protected-access
  with inference.measurable_scalar_features():
    assert evaluation._cache_and_measure_examples is not before  # pylint: disable=protected-access
  assert evaluation._cache_and_measure_examples is before  # pylint: disable=protected-access
