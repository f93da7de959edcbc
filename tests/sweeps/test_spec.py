"""Sweep specs: expansion into named runs, gin literals, and every spec error before any run."""

import math
import os

import gin
import pytest

from prompt_tuning.sweeps import spec as spec_lib

SpecError = spec_lib.SpecError


def _sweep(**kw):
  base = dict(
      name='s',
      gin_files=['models/x.gin', '{init}', 'runs/prompt_finetune.gin'],
      bindings={'TRAIN_STEPS': 100, 'MIXTURE_OR_TASK_NAME': 'boolq'},
      axes={
          'size': {
              'label': ['small', 'base'],
              'plot_x': [77e6, 250e6],
              'INITIAL_CHECKPOINT_PATH': ['/ckpt/small', '/ckpt/base'],
          },
          'init': {'gin_file': ['prompts/random_uniform.gin', 'prompts/from_class_labels.gin']},
          'length': {'PROMPT_LENGTH': [1, 20]},
      },
      seeds=[0, 1],
  )
  base.update(kw)
  return spec_lib.Sweep(**base)


def test_expansion_is_the_product_of_axes_zipped_within_each(tmp_path):
  plan = spec_lib.expand(_sweep(), str(tmp_path))
  assert len(plan.runs) == 2 * 2 * 2 * 2
  assert plan.axes == ['size', 'init', 'length', 'seed']
  first, last = plan.runs[0], plan.runs[-1]
  assert first.name == 'size=small,init=random_uniform,length=1,seed=0'
  assert last.name == 'size=base,init=from_class_labels,length=20,seed=1'
  # The axis's gin file takes the place of its '{init}' entry; zipped values stay together.
  assert last.gin_files == [
      'models/x.gin',
      'prompts/from_class_labels.gin',
      'runs/prompt_finetune.gin',
  ]
  bindings = dict(last.bindings)
  assert bindings['INITIAL_CHECKPOINT_PATH'] == "'/ckpt/base'"
  assert bindings['PROMPT_LENGTH'] == '20'
  assert bindings['RANDOM_SEED'] == '1'
  assert bindings['MODEL_DIR'] == repr(os.path.join(str(tmp_path), last.name))
  assert last.run_dir == os.path.join(str(tmp_path), last.name)
  assert last.settings == {'size': 'base', 'init': 'from_class_labels', 'length': '20', 'seed': '1'}
  assert last.plot_x == {'size': 250e6, 'length': 20.0, 'seed': 1.0}
  argv = last.argv('python')
  assert argv[:3] == ['python', '-m', 'prompt_tuning.train']
  assert '--gin.PROMPT_LENGTH=20' in argv and '--gin_file=prompts/from_class_labels.gin' in argv
  # Names are unique and stable: the same spec gives the same names and fingerprints.
  again = spec_lib.expand(_sweep(), str(tmp_path))
  assert [r.name for r in again.runs] == [r.name for r in plan.runs]
  assert [r.fingerprint() for r in again.runs] == [r.fingerprint() for r in plan.runs]
  changed = spec_lib.expand(_sweep(bindings={'TRAIN_STEPS': 101}), str(tmp_path))
  assert changed.runs[0].fingerprint() != plan.runs[0].fingerprint()


def test_gin_files_without_a_placeholder_are_appended_and_placeholders_substituted(tmp_path):
  sweep = _sweep(
      gin_files=['models/x.gin'],
      bindings={'EVAL_OUTPUT_DIR_HINT': '{run_dir}/eval', 'FILES': ['{root}/a', '{size}.npy']},
      axes={'size': {'gin_file': ['sizes/small.gin']}},
      seeds=None,
  )
  run = spec_lib.expand(sweep, str(tmp_path)).runs[0]
  assert run.name == 'size=small'
  assert run.gin_files == ['models/x.gin', 'sizes/small.gin']
  b = dict(run.bindings)
  assert b['EVAL_OUTPUT_DIR_HINT'] == repr(f'{tmp_path}/size=small/eval')
  assert b['FILES'] == repr([f'{tmp_path}/a', 'small.npy'])
  assert 'RANDOM_SEED' not in b


def test_a_label_only_axis_can_fill_placeholders(tmp_path):
  sweep = _sweep(
      gin_files=['models/t5_1_1_{size}_prompt.gin'],
      bindings={'INITIAL_CHECKPOINT_PATH': 'gs://b/t5_1_1_lm100k_{size}/checkpoint_1100000'},
      axes={'size': {'label': ['small', 'xxl'], 'plot_x': [77e6, 11e9]}},
      seeds=None,
  )
  run = spec_lib.expand(sweep, str(tmp_path)).runs[1]
  assert run.gin_files == ['models/t5_1_1_xxl_prompt.gin']
  assert dict(run.bindings)['INITIAL_CHECKPOINT_PATH'] == repr(
      'gs://b/t5_1_1_lm100k_xxl/checkpoint_1100000'
  )
  assert spec_lib.run_metric('glue_{size}/accuracy', run) == 'glue_xxl/accuracy'


def test_vectorized_groups_share_every_other_axis(tmp_path):
  plan = spec_lib.expand(_sweep(vectorize=['init', 'seed']), str(tmp_path))
  groups = plan.groups()
  assert sorted(groups) == [
      'size=base,length=1',
      'size=base,length=20',
      'size=small,length=1',
      'size=small,length=20',
  ]
  assert all(len(runs) == 4 for runs in groups.values())
  assert {r.settings['init'] for r in groups['size=small,length=1']} == {
      'random_uniform',
      'from_class_labels',
  }


@pytest.mark.parametrize(
    'value',
    [3, -2.5, 1e-05, 0.3, 'boolq', "it's", True, None, [1, 'a'], (1,), (1, 2), {'inputs': 512}],
)
def test_values_are_written_as_gin_literals_that_parse_back(value):
  assert gin.config.parse_value(spec_lib.to_gin(value)) == value


def test_references_are_kept_as_gin_text():
  assert spec_lib.to_gin('@prompts.uniform()') == '@prompts.uniform()'
  assert spec_lib.to_gin(['%A', 1]) == '[%A, 1]'


@pytest.mark.parametrize(
    'kw, message',
    [
        ({'axes': {'length': {}}}, "Axis 'length' is empty"),
        ({'axes': {'length': {'PROMPT_LENGTH': []}}}, 'has no values'),
        ({'axes': {'x': {'A': [1, 2], 'B': [1]}}}, 'same length'),
        ({'axes': {'x': {'A': 5}}}, 'must be a list'),
        ({'axes': {'x': {'not a name!': [1]}}}, 'is not a gin name'),
        ({'axes': {'x': {'plot_x': [1]}}}, 'binds nothing'),
        ({'axes': {'x': {'label': ['a', 'b']}}}, 'would compute the same thing'),
        ({'axes': {'lr': {'LR': [0.1, 0.1]}}}, 'occur more than once'),
        ({'axes': {'x': {'label': ['a', 'a'], 'A': [1, 2]}}}, 'occur more than once'),
        ({'axes': {'x': {'A': [float('nan')]}}}, 'cannot be written as a gin literal'),
        ({'axes': {'x': {'label': ['o'], 'A': [object()]}}}, 'cannot be written as a gin literal'),
        ({'bindings': {'A': {1, 2}}}, 'cannot be written as a gin literal'),
        ({'axes': {'x': {'A': [[1, 2], [3]]}}}, 'give the axis a `label`'),
        ({'seeds': []}, 'seeds is empty'),
        ({'seeds': [0.5]}, 'seeds must be integers'),
        ({'axes': {'seed': {'A': [1]}}}, 'is the seed axis'),
        ({'figure_x': 'width'}, 'is not an axis'),
        ({'vectorize': ['lr']}, 'not an axis'),
        ({'metric_step': 'last'}, "'final' or 'best'"),
        ({'entry': 'prompt_tuning.serve'}, 'entry must be one of'),
        ({'name': ''}, 'has no name'),
    ],
)
def test_invalid_specs_fail_before_any_run(tmp_path, kw, message):
  with pytest.raises(SpecError, match=message):
    spec_lib.expand(_sweep(**kw), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written


def test_nan_in_a_nested_value_names_the_run_and_binding(tmp_path):
  with pytest.raises(SpecError, match=r'run size=small.*: LOSS_WEIGHTS'):
    spec_lib.expand(_sweep(bindings={'LOSS_WEIGHTS': [1.0, math.inf]}), str(tmp_path))


SPEC = """
from __gin__ import dynamic_registration
from prompt_tuning.sweeps import spec

CHECKPOINT = %gin.REQUIRED
DATA_DIR = None
spec.Sweep:
  name = 'from_file'
  gin_files = ['models/x.gin']
  bindings = {'INITIAL_CHECKPOINT_PATH': %CHECKPOINT}
  axes = {'length': {'PROMPT_LENGTH': [1, 5]}}
  tfds_data_dir = %DATA_DIR
  metric = 'boolq/accuracy'
"""


def test_spec_files_take_their_macros_from_the_command_line(tmp_path):
  path = tmp_path / 'spec.gin'
  path.write_text(SPEC)
  with pytest.raises(SpecError, match=r"needs values for its macros \['CHECKPOINT'\]"):
    spec_lib.load_sweep(str(path))
  sweep = spec_lib.load_sweep(str(path), ["CHECKPOINT = '/c/k'", "DATA_DIR = 'gs://tfds'"])
  assert sweep.name == 'from_file' and sweep.bindings == {'INITIAL_CHECKPOINT_PATH': '/c/k'}
  plan = spec_lib.expand(sweep, str(tmp_path / 'root'))
  assert plan.runs[0].flags == ['--tfds_data_dir=gs://tfds']
  assert plan.sweep['metric'] == 'boolq/accuracy'
  # The parse left no gin state behind.
  assert gin.config_str().strip() == ''


def test_a_file_without_a_sweep_or_with_bad_syntax_is_a_spec_error(tmp_path):
  empty = tmp_path / 'empty.gin'
  empty.write_text('A = 1\n')
  with pytest.raises(SpecError, match='binds no spec.Sweep'):
    spec_lib.load_sweep(str(empty))
  bad = tmp_path / 'bad.gin'
  bad.write_text(SPEC.replace("name = 'from_file'", "name = 'from_file"))
  with pytest.raises(SpecError, match='does not parse'):
    spec_lib.load_sweep(str(bad), ["CHECKPOINT = '/c'"])


def test_a_plan_survives_moving_its_root(tmp_path):
  plan = spec_lib.expand(_sweep(), str(tmp_path / 'a'))
  plan.save()
  os.rename(tmp_path / 'a', tmp_path / 'b')
  moved = spec_lib.load_plan(str(tmp_path / 'b'))
  assert moved.root == str(tmp_path / 'b')
  assert all(r.run_dir.startswith(str(tmp_path / 'b') + os.sep) for r in moved.runs)
  assert [r.name for r in moved.runs] == [r.name for r in plan.runs]
  # What the runs compute does not depend on where the root is.
  again = spec_lib.expand(_sweep(), str(tmp_path / 'b'))
  assert [r.fingerprint() for r in again.runs] == [r.fingerprint() for r in plan.runs]
  with pytest.raises(FileNotFoundError, match='not a sweep root'):
    spec_lib.load_plan(str(tmp_path / 'a'))
