"""The shipped sweep specs (configs/sweeps/): they load, expand to the paper's grids, and every
run's gin configuration is valid (parsed, never run: their checkpoints are on GCS)."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import sweep_testlib as st
from prompt_tuning.sweeps import spec as spec_lib

SPECS = os.path.join(st.REPO, 'configs', 'sweeps')
# Macros a spec requires (%gin.REQUIRED) and test values for them.
REQUIRED = {
    # The downstream task with a sentinel before its targets (a task the user registers).
    'SENTINEL_TASK': "'taskless_super_glue_boolq_v102_sentinel'",
    'LM_ADAPTATION_CHECKPOINTS': "'/ckpt/t5_1_1_lm{lm_steps}_{size}/checkpoint_1100000'",
    'BACKBONES': "'/cache/backbones/size={size}/checkpoint_1500'",
}
# Runs per spec: the paper's grids (Lester et al. 2021, Fig. 1, 3a-d, Tables 2-3), the toy's.
RUNS = {
    'power_of_scale/model_size.gin': 5 * 2 * 3,
    'power_of_scale/prompt_length.gin': 5 * 5 * 3,
    'power_of_scale/initialization.gin': 5 * 3 * 3,
    'power_of_scale/pretraining_objective.gin': 5 * 3 * 3,
    'power_of_scale/lm_adaptation_steps.gin': 5 * 6 * 3,
    'power_of_scale/domain_shift.gin': 2 * 2 * 3,
    'power_of_scale/ensembling_prompts.gin': 4 * 5,
    'power_of_scale/ensembling_eval.gin': 4,
    'toy/backbones.gin': 3,
    'toy/prompt_tuning.gin': 3 * 3 * 3 * 2,
    'toy/model_tuning.gin': 3 * 2,
}
LOAD = """
import json, sys
from prompt_tuning.sweeps import spec
out = {}
for name in sys.argv[2:]:
  sweep = spec.load_sweep(f'{sys.argv[1]}/{name}', [f'{k} = {v}' for k, v in REQUIRED.items()])
  out[name] = spec.expand(sweep, '/sweeps/' + name).to_json()
print('PLANS ' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def plans():
  """Every spec loaded in a fresh process (so each file must import what it uses)."""
  code = f'REQUIRED = {REQUIRED!r}\n' + LOAD
  proc = subprocess.run(
      [sys.executable, '-c', code, SPECS] + sorted(RUNS),
      cwd=st.REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('PLANS ')][-1]
  return {k: spec_lib.Plan.from_json(v) for k, v in json.loads(line[len('PLANS ') :]).items()}


def test_every_spec_is_listed():
  found = {
      os.path.relpath(p, SPECS)
      for p in glob.glob(os.path.join(SPECS, '*', '*.gin'))
      if not p.endswith('common.gin')
  }
  assert found == set(RUNS)


@pytest.mark.parametrize('name', sorted(RUNS))
def test_grids(plans, name):
  plan = plans[name]
  assert len(plan.runs) == RUNS[name]
  for run in plan.runs:  # every placeholder was filled in
    for key, value in run.bindings:
      assert not re.search(r'\{[A-Za-z_]\w*\}', value), (run.name, key, value)
    assert not any(re.search(r'\{[A-Za-z_]\w*\}', g) for g in run.gin_files), run.gin_files


def test_paper_settings(plans):
  run = plans['power_of_scale/prompt_length.gin'].run('size=xxl,length=100,seed=2')
  b = dict(run.bindings)
  assert b['INITIAL_CHECKPOINT_PATH'] == repr(
      'gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_xxl/checkpoint_1100000'
  )
  assert b['BATCH_SIZE'] == '32' and b['TRAIN_STEPS_RELATIVE'] == '30000'
  assert run.gin_files[0] == 'models/t5_1_1_xxl_prompt.gin'
  assert plans['power_of_scale/prompt_length.gin'].sweep['metric_step'] == 'best'
  shift = plans['power_of_scale/domain_shift.gin']
  run = shift.run('size=xxl,transfer=mrpc_from_qqp,method=model_tuning,seed=0')
  assert run.gin_files == [
      'models/t5_1_1_model_tuning.gin',
      'runs/model_finetune.gin',
      'sizes/xxl.gin',
  ]
  assert (
      spec_lib.run_metric(shift.sweep['metric'], run) == 'taskless_glue_mrpc_from_qqp_v002/accuracy'
  )
  ens = plans['power_of_scale/ensembling_eval.gin'].runs[0]
  files = eval(dict(ens.bindings)['ENSEMBLE'])  # pylint: disable=eval-used
  assert files[4] == (
      '/sweeps/power_of_scale/ensembling_eval.gin/../task=boolq,size=xxl,seed=4/'
      'numpy_checkpoints/checkpoint_1130000/encoder.prompt.prompt.prompt.npy'
  )
  groups = plans['toy/prompt_tuning.gin'].groups()
  assert len(groups) == 9 and all(len(g) == 6 for g in groups.values())


def _sample(plan):
  """The first and last runs, and one run per value of every axis."""
  runs = plan.runs
  sample = {r.name: r for r in (runs[0], runs[-1])}
  for r in runs:
    for axis, label in r.settings.items():
      if not any(s.settings.get(axis) == label for s in sample.values()):
        sample[r.name] = r
  return list(sample)


_CHECK = """
import json, sys
from prompt_tuning.sweeps import check, spec
args = json.loads(sys.argv[1])
out = {}
required = [f'{k} = {v}' for k, v in args['required'].items()]
for name, run_names in args['jobs'].items():
  try:  # a spec that fails here fails its own test only
    sweep = spec.load_sweep(f"{args['specs']}/{name}", required)
    runs = [r for r in spec.expand(sweep, '/sweeps/' + name).runs if r.name in run_names]
    assert len(runs) == len(run_names), [r.name for r in runs]
    out[name] = check.check_runs(runs)
  except Exception as e:  # pylint: disable=broad-except
    out[name] = [f'{type(e).__name__}: {e}']
print('CHECK ' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def checked(plans):
  """`check.check_runs` of a sample of every spec's runs (the ensembling evaluation: its first run),
  spec by spec, in one fresh process, as `prompt_tuning.sweep` checks a sweep's runs before it
  starts them: parsing registers gin configurables (a stand-in `__main__.train`, ...) that outlive
  gin.clear_config() and would leak into the other test modules of this pytest worker."""
  jobs = {name: _sample(plans[name]) for name in sorted(RUNS) if 'ensembling_eval' not in name}
  jobs['power_of_scale/ensembling_eval.gin'] = [
      plans['power_of_scale/ensembling_eval.gin'].runs[0].name
  ]
  args = {'specs': SPECS, 'required': REQUIRED, 'jobs': jobs}
  proc = subprocess.run(
      [sys.executable, '-c', _CHECK, json.dumps(args)],
      cwd=st.REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith('CHECK ')][-1][6:])


@pytest.mark.parametrize('name', sorted(n for n in RUNS if 'ensembling_eval' not in n))
def test_run_configurations_are_valid(checked, name):
  assert checked[name] == []


def test_the_ensembling_spec_waits_for_its_gin_interface(checked):
  problems = checked['power_of_scale/ensembling_eval.gin']
  if os.path.exists(os.path.join(st.REPO, 'configs', 'methods', 'ensembling.gin')):
    assert problems == []
  else:
    assert len(problems) == 1 and 'methods/ensembling.gin' in problems[0]
