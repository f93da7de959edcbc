"""collect: the metric of every run from its own evaluation files, means and deviations by hand."""

import csv
import json
import math
import os

import pytest

from prompt_tuning.sweeps import collect
from prompt_tuning.sweeps import spec as spec_lib

# Final accuracies per (lr, seed); None: the run has no evaluation yet.
FINAL = {
    ('0.1', '0'): 70.0,
    ('0.1', '1'): 72.5,
    ('0.1', '2'): 68.0,
    ('0.3', '0'): 81.0,
    ('0.3', '1'): 79.0,
    ('0.3', '2'): None,
}


def _write_metrics(run_dir, task, lines):
  os.makedirs(os.path.join(run_dir, 'inference_eval'), exist_ok=True)
  with open(os.path.join(run_dir, 'inference_eval', f'{task}-metrics.jsonl'), 'w') as f:
    f.write(''.join(lines))


@pytest.fixture()
def plan(tmp_path):
  sweep = spec_lib.Sweep(
      name='lr_sweep',
      gin_files=['m.gin'],
      axes={
          'lr': {'LR': [0.1, 0.3]},
          'length': {'PROMPT_LENGTH': [20]},
      },
      seeds=[0, 1, 2],
      metric='boolq/accuracy',
  )
  p = spec_lib.expand(sweep, str(tmp_path / 'root'))
  for run in p.runs:
    final = FINAL[(run.settings['lr'], run.settings['seed'])]
    if final is None:
      continue
    lines = [
        json.dumps({'step': 100, 'accuracy': final + 9.0, 'f1': 1.0}) + '\n',
        json.dumps({'step': 200, 'accuracy': final - 50.0, 'f1': 2.0}) + '\n',
        # A resumed run evaluates its last step again: the later line counts.
        json.dumps({'step': 200, 'accuracy': final, 'f1': 3.0}) + '\n',
        '{"step": 300, "accur',  # cut short by a kill
    ]
    _write_metrics(run.run_dir, 'boolq', lines)
    _write_metrics(run.run_dir, 'rte', [json.dumps({'step': 200, 'accuracy': 50.0}) + '\n'])
  p.save()
  return p


def _mean_std(values):
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return mean, std


def test_rows_hold_each_runs_final_metric(plan):
  rows = {r['run']: r for r in collect.run_rows([plan])}
  r = rows['lr=0.1,length=20,seed=1']
  assert (r['step'], r['value']) == (200, 72.5)
  assert r['boolq/f1'] == 3.0 and r['rte/accuracy'] == 50.0
  assert (r['lr'], r['length'], r['seed']) == ('0.1', '20', '1')
  assert rows['lr=0.3,length=20,seed=2']['value'] is None


def test_best_step_and_metric_names(plan):
  run = plan.run('lr=0.1,length=20,seed=0')
  metrics = collect.read_metrics(run.run_dir)
  assert collect.metric_value(metrics, 'boolq/accuracy', 'best', 'max') == (100, 79.0)
  assert collect.metric_value(metrics, 'boolq/accuracy', 'best', 'min') == (200, 70.0)
  assert collect.metric_value(metrics, 'f1') == (200, 3.0)  # one task has it
  with pytest.raises(ValueError, match='several tasks'):
    collect.metric_value(metrics, 'accuracy')
  assert collect.metric_value(metrics, 'boolq/missing') is None
  rows = collect.run_rows([plan], metric_step='best')
  assert {r['run']: r['value'] for r in rows}['lr=0.3,length=20,seed=1'] == 88.0


def test_means_and_standard_deviations_equal_a_hand_computation(plan):
  summary = collect.summarize(collect.run_rows([plan]), plan.axes)
  by_lr = {s['lr']: s for s in summary}
  assert set(by_lr) == {'0.1', '0.3'}
  for lr in ('0.1', '0.3'):
    values = [v for (l, _), v in sorted(FINAL.items()) if l == lr and v is not None]
    mean, std = _mean_std(values)
    assert by_lr[lr]['mean'] == pytest.approx(mean, abs=1e-12)
    assert by_lr[lr]['std'] == pytest.approx(std, abs=1e-12)
    assert by_lr[lr]['n'] == len(values) and by_lr[lr]['runs'] == 3
  # 0.1: (70 + 72.5 + 68) / 3 = 70.1667, sample std 2.2546.
  assert by_lr['0.1']['mean'] == pytest.approx(70.16667, abs=1e-4)
  assert by_lr['0.1']['std'] == pytest.approx(2.25462, abs=1e-4)


def test_written_outputs(plan, tmp_path):
  paths = collect.write([plan], str(tmp_path / 'out'))
  with open(paths['csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  row = [r for r in rows if r['run'] == 'lr=0.3,length=20,seed=0'][0]
  assert float(row['value']) == 81.0 and row['lr'] == '0.3' and row['seed'] == '0'
  assert row['boolq/accuracy'] == '81.0'
  data = json.load(open(paths['json']))
  assert data['metric'] == 'boolq/accuracy' and len(data['runs']) == 6
  table = open(paths['md']).read()
  assert '| 0.1 | 20 | 70.17 ± 2.25 | 3/3 |' in table
  assert '| 0.3 | 20 | 80.00 ± 1.41 | 2/3 |' in table
  # The paper's layout: lines as rows, the x axis as columns.
  assert '| length | lr=0.1 | lr=0.3 |' in table
  assert '| 20 | 70.17 ± 2.25 | 80.00 ± 1.41 |' in table
  with open(paths['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_several_sweeps_share_one_table(plan, tmp_path):
  other = spec_lib.expand(
      spec_lib.Sweep(
          name='model_tuning', axes={'lr': {'LR': [0.1]}}, seeds=[0], metric='boolq/accuracy'
      ),
      str(tmp_path / 'mt'),
  )
  _write_metrics(other.runs[0].run_dir, 'boolq', [json.dumps({'step': 5, 'accuracy': 90.0}) + '\n'])
  paths = collect.write([plan, other], str(tmp_path / 'both'), x_axis='lr')
  table = open(paths['md']).read()
  assert '| model_tuning | 0.1 | - | 90.00 | 1/1 |' in table
  assert '| lr_sweep | 0.1 | 20 | 70.17 ± 2.25 | 3/3 |' in table
  where = collect.write([plan], str(tmp_path / 'where'), where={'lr': ['0.3']})
  assert '0.1' not in open(where['md']).read().split('\n', 2)[2]
