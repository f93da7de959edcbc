"""Validation of every run's gin configuration before a sweep starts (parsed, never called)."""

import json
import os
import subprocess
import sys

import pytest

import sweep_testlib as st

rt = st.rt


def _sweep_args(bindings=None, axes=None, gin_files=None, entry='prompt_tuning.train'):
  base = {
      'INITIAL_CHECKPOINT_PATH': '/nowhere/checkpoint_0',
      'MIXTURE_OR_TASK_NAME': 'tiny_count',
      'TASK_FEATURE_LENGTHS': {'inputs': 24, 'targets': 8},
      'TRAIN_STEPS': 3,
  }
  base.update(bindings or {})
  return dict(
      name='c',
      gin_files=gin_files or ['test/tiny_prompt.gin', 'runs/prompt_finetune.gin'],
      bindings=base,
      axes=axes or {'length': {'PROMPT_LENGTH': [3, 5]}},
      seeds=[0],
      entry=entry,
  )


_CHECK = """
import json, sys
from prompt_tuning.sweeps import check, spec
args = json.loads(sys.argv[1])
runs = spec.expand(spec.Sweep(**args['sweep']), args['root']).runs
print('CHECK ' + json.dumps({'names': [r.name for r in runs], 'problems': check.check_runs(runs)}))
"""


def _check(tmp_path, **kwargs):
  """`(run names, check.check_runs(runs))`, computed in a fresh process: parsing registers gin
  configurables (a stand-in `__main__.train`, ...) that outlive gin.clear_config() and would leak
  into the other test modules of this pytest worker."""
  args = json.dumps({'sweep': _sweep_args(**kwargs), 'root': str(tmp_path)})
  proc = subprocess.run(
      [sys.executable, '-c', _CHECK, args],
      cwd=st.REPO,
      env=dict(os.environ, PYTHONPATH=st.REPO + os.pathsep + os.environ.get('PYTHONPATH', '')),
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('CHECK ')][-1][6:])
  return out['names'], out['problems']


def test_valid_runs_have_no_problem(tmp_path):
  assert _check(tmp_path)[1] == []


@pytest.mark.parametrize(
    'change, needle',
    [
        ({'bindings': {'utils.SaveCheckpointConfig.periodd': 3}}, 'periodd'),
        ({'bindings': {'utils.NoSuchConfig.period': 3}}, 'NoSuchConfig'),
        ({'bindings': {'PROMPT_LENGHT': 4}}, 'the macro PROMPT_LENGHT is bound but no gin file'),
        ({'axes': {'x': {'PROMPT_LENGHT': [4, 5]}}}, 'the macro PROMPT_LENGHT is bound but no gin'),
        ({'axes': {'init': {'PROMPT_INIT': ['@prompts.unifrom()']}}}, "'@prompts.unifrom()'"),
        ({'axes': {'init': {'PROMPT_INIT': ['@prompts.uniform(']}}}, 'Could not parse'),
        ({'gin_files': ['test/tiny_promt.gin']}, 'tiny_promt.gin'),
    ],
)
def test_each_invalid_run_configuration_is_named(tmp_path, change, needle):
  names, problems = _check(tmp_path, **change)
  assert len(problems) == 1, problems
  assert problems[0].startswith(f'run {names[0]}')
  assert needle in problems[0]
  assert 'Searched config paths' not in problems[0]
  assert not os.listdir(tmp_path)


def test_a_macro_used_by_some_runs_only_is_fine(tmp_path):
  _, problems = _check(
      tmp_path,
      bindings={'CLASS_LABELS': ['one', 'two'], 'EMBEDDING_FILE': '/e.npy'},
      gin_files=['test/tiny_prompt.gin', '{init}', 'runs/prompt_finetune.gin'],
      axes={
          'init': {
              'gin_file': ['prompts/random_uniform.gin', 'prompts/from_class_labels_numpy.gin']
          }
      },
  )
  assert problems == []


def test_the_seed_must_be_used_by_the_entry_point(tmp_path):
  # runs/prompt_eval.gin has no RANDOM_SEED: a seed axis on an evaluation sweep is a mistake.
  _, problems = _check(
      tmp_path,
      bindings={'CHECKPOINT_PATH': '/c', 'PROMPT_FILE': '/p.npy'},
      gin_files=['test/tiny_prompt.gin', 'runs/prompt_eval.gin'],
      entry='prompt_tuning.eval',
  )
  assert any('the macro RANDOM_SEED is bound but no gin file' in p for p in problems), problems
  assert any('the macro TRAIN_STEPS is bound' in p for p in problems), problems
