"""Which runs a vectorized job accepts (read from their gin configurations; nothing is trained).

The trajectories of a vectorized job against separate runs are compared end to end in
test_sweep_e2e.py (`test_vectorized_sweep_equals_the_separate_runs`).
"""

import pytest

import sweep_testlib as st
from prompt_tuning.sweeps import spec as spec_lib
from prompt_tuning.sweeps import vectorized

rt = st.rt


def _members(tmp_path, bindings=None, axes=None, seeds=(0, 1)):
  base = {
      'INITIAL_CHECKPOINT_PATH': '/nowhere/checkpoint_0',
      'MIXTURE_OR_TASK_NAME': 'tiny_count',
      'MIXTURE_OR_TASK_MODULE': 'tiny_task',
      'TASK_FEATURE_LENGTHS': {'inputs': 24, 'targets': 8},
      'TRAIN_STEPS': 3,
      'train/utils.DatasetConfig.seed': 7,
  }
  base.update(bindings or {})
  sweep = spec_lib.Sweep(
      name='v',
      gin_files=['test/tiny_prompt.gin', 'runs/prompt_finetune.gin'],
      bindings=base,
      axes=axes or {'lr': {'utils.create_learning_rate_scheduler.base_learning_rate': [0.1, 0.3]}},
      seeds=list(seeds),
  )
  plan = spec_lib.expand(sweep, str(tmp_path))
  specs = [
      {'name': r.name, 'run_dir': r.run_dir, 'gin_files': r.gin_files, 'bindings': r.bindings}
      for r in plan.runs
  ]
  return [vectorized.capture_member(s, ['.']) for s in specs]


def test_init_seed_and_learning_rate_may_differ(tmp_path):
  members = _members(
      tmp_path,
      axes={
          'lr': {'utils.create_learning_rate_scheduler.base_learning_rate': [0.1, 0.3]},
          'scale': {'prompts.uniform.scale': [0.5, 0.1]},
      },
  )
  assert len(members) == 8
  vectorized.check_compatible(members)
  assert {m.kwargs['random_seed'] for m in members} == {0, 1}
  # Each member keeps its own schedule: 0.1 and 0.3 (constant) at any step.
  assert sorted({float(m.learning_rate_fn(5)) for m in members}) == pytest.approx([0.1, 0.3])
  assert 'PROMPT_LENGTH = 5' in members[0].config_text


@pytest.mark.parametrize(
    'change, needle',
    [
        ({'axes': {'length': {'PROMPT_LENGTH': [3, 5]}}}, 'prompt_length'),
        ({'axes': {'steps': {'TRAIN_STEPS': [3, 4]}}}, 'total_steps'),
        (
            {'axes': {'task': {'MIXTURE_OR_TASK_NAME': ['tiny_count', 'tiny_count_long']}}},
            'mixture_or_task_name',
        ),
        ({'bindings': {'train/utils.DatasetConfig.seed': None}}, 'the training data order'),
        ({'axes': {'z': {'Z_LOSS': [1e-4, 0.0]}}}, 'z_loss'),
    ],
)
def test_anything_else_is_named(tmp_path, change, needle):
  members = _members(tmp_path, **change)
  with pytest.raises(vectorized.IncompatibleRunsError, match=needle):
    vectorized.check_compatible(members)


def test_seeds_need_the_frozen_model_from_a_checkpoint(tmp_path):
  members = _members(tmp_path, bindings={'INITIAL_CHECKPOINT_PATH': None})
  with pytest.raises(vectorized.IncompatibleRunsError, match='INITIAL_CHECKPOINT_PATH'):
    vectorized.check_compatible(members)
