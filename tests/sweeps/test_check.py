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


# The cases' sweep arguments by id: all are checked in one fresh process (the `checked` fixture).
CASES = {
    'valid': {},
    'unknown parameter': {'bindings': {'utils.SaveCheckpointConfig.periodd': 3}},
    'unknown configurable': {'bindings': {'utils.NoSuchConfig.period': 3}},
    'misspelled macro': {'bindings': {'PROMPT_LENGHT': 4}},
    'misspelled macro on an axis': {'axes': {'x': {'PROMPT_LENGHT': [4, 5]}}},
    'misspelled reference': {'axes': {'init': {'PROMPT_INIT': ['@prompts.unifrom()']}}},
    'syntax error': {'axes': {'init': {'PROMPT_INIT': ['@prompts.uniform(']}}},
    'missing gin file': {'gin_files': ['test/tiny_promt.gin']},
    'macro of some runs only': {
        'bindings': {'CLASS_LABELS': ['one', 'two'], 'EMBEDDING_FILE': '/e.npy'},
        'gin_files': ['test/tiny_prompt.gin', '{init}', 'runs/prompt_finetune.gin'],
        'axes': {
            'init': {
                'gin_file': ['prompts/random_uniform.gin', 'prompts/from_class_labels_numpy.gin']
            }
        },
    },
    # runs/prompt_eval.gin has no RANDOM_SEED: a seed axis on an evaluation sweep is a mistake.
    'seed of an evaluation': {
        'bindings': {'CHECKPOINT_PATH': '/c', 'PROMPT_FILE': '/p.npy'},
        'gin_files': ['test/tiny_prompt.gin', 'runs/prompt_eval.gin'],
        'entry': 'prompt_tuning.eval',
    },
}

_CHECK = """
import json, sys
from prompt_tuning.sweeps import check, spec
out = {}
for case, args in json.loads(sys.argv[1]).items():
  runs = spec.expand(spec.Sweep(**args['sweep']), args['root']).runs
  out[case] = {'names': [r.name for r in runs], 'problems': check.check_runs(runs)}
print('CHECK ' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def checked(tmp_path_factory):
  """Each case's `{'names': run names, 'problems': check.check_runs(runs), 'root': its sweep root}`,
  all computed in one fresh process, as `prompt_tuning.sweep` checks a sweep's runs before it
  starts them: parsing registers gin configurables (a stand-in `__main__.train`, ...) that outlive
  gin.clear_config() and would leak into the other test modules of this pytest worker."""
  base = tmp_path_factory.mktemp('check')
  args = {}
  for i, (case, kwargs) in enumerate(CASES.items()):
    root = base / f'case{i}'
    root.mkdir()
    args[case] = {'sweep': _sweep_args(**kwargs), 'root': str(root)}
  proc = subprocess.run(
      [sys.executable, '-c', _CHECK, json.dumps(args)],
      cwd=st.REPO,
      env=dict(os.environ, PYTHONPATH=st.REPO + os.pathsep + os.environ.get('PYTHONPATH', '')),
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('CHECK ')][-1][6:])
  for case in out:
    out[case]['root'] = args[case]['root']
  return out


def test_valid_runs_have_no_problem(checked):
  assert checked['valid']['problems'] == []


@pytest.mark.parametrize(
    'case, needle',
    [
        ('unknown parameter', 'periodd'),
        ('unknown configurable', 'NoSuchConfig'),
        ('misspelled macro', 'the macro PROMPT_LENGHT is bound but no gin file'),
        ('misspelled macro on an axis', 'the macro PROMPT_LENGHT is bound but no gin'),
        ('misspelled reference', "'@prompts.unifrom()'"),
        ('syntax error', 'Could not parse'),
        ('missing gin file', 'tiny_promt.gin'),
    ],
)
def test_each_invalid_run_configuration_is_named(checked, case, needle):
  names, problems = checked[case]['names'], checked[case]['problems']
  assert len(problems) == 1, problems
  assert problems[0].startswith(f'run {names[0]}')
  assert needle in problems[0]
  assert 'Searched config paths' not in problems[0]
  assert not os.listdir(checked[case]['root'])


def test_a_macro_used_by_some_runs_only_is_fine(checked):
  assert checked['macro of some runs only']['problems'] == []


def test_the_seed_must_be_used_by_the_entry_point(checked):
  problems = checked['seed of an evaluation']['problems']
  assert any('the macro RANDOM_SEED is bound but no gin file' in p for p in problems), problems
  assert any('the macro TRAIN_STEPS is bound' in p for p in problems), problems
