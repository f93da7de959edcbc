"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` into a temp dir."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('peft')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(text, header_start):
  """Rows (lists of cells) of the markdown table whose header starts with `header_start`."""
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if line.startswith(header_start):
      rows = []
      for row in lines[i + 2 :]:
        if not row.startswith('|'):
          break
        rows.append([c.strip() for c in row.strip('|').split('|')])
      return rows
  raise AssertionError(f'no table starting with {header_start!r} in:\n{text}')


def _number(cell):
  m = re.match(r'^([0-9][0-9,]*\.?[0-9]*)', cell.strip())
  assert m, f'not a number: {cell!r}'
  return float(m.group(1).replace(',', ''))


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
  out = tmp_path / 'RESULTS.md'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'benchmarks.run',
          '--quick',
          '--output',
          str(out),
          '--workdir',
          str(tmp_path / 'work'),
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=1200,  # quick mode runs every section; a loaded 2-core machine needs minutes
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert 'quick mode' in text
  assert 'GPU section' in text

  train = _table(text, '| prompt | ours ex/s')
  assert [r[0] for r in train] == ['4', '8']
  for r in train:
    ours, peft, speedup = _number(r[1]), _number(r[2]), _number(r[3])
    assert ours > 0 and peft > 0 and speedup > 0
    rss_ours, rss_peft = (_number(x) for x in r[5].split('/'))
    assert rss_ours > 0 and rss_peft > 0
    loss_ours, loss_peft = (_number(x) for x in r[7].split('/'))
    assert loss_ours == pytest.approx(loss_peft, rel=1e-3)  # same model, same prompt, same loss

  util = _table(text, '| prompt | GFLOP/step')
  assert [r[0] for r in util] == ['4', '8']
  for r in util:
    assert _number(r[1]) >= 0  # tiny model: rounds to 0.0 GFLOP
    assert all(_number(r[i]) > 0 for i in (2, 3, 4, 6, 7, 8))

  serve = _table(text, '| prompt | ours mixed ex/s')
  assert [r[0] for r in serve] == ['4']
  r = serve[0]
  assert all(_number(r[i]) > 0 for i in (1, 2, 3, 5, 6, 8))
  assert float(r[9]) < 1e-3  # mixed-task scores equal PEFT's per-task scores

  generate = _table(text, '| prompt | ours mixed ex/s | PEFT per-task ex/s | ours / PEFT')
  assert [r[0] for r in generate] == ['4']
  r = generate[0]
  assert all(_number(r[i]) > 0 for i in (1, 2, 3))
  assert r[4] == '100.0%'  # mixed-task greedy labels equal PEFT's per-task `generate`

  decode = _table(text, '| prompt | ours tokens/s')
  assert [r[0] for r in decode] == ['4']
  r = decode[0]
  assert all(_number(r[i]) > 0 for i in (1, 2, 3))
  assert r[5] == '100.0%'  # identical greedy tokens

  # Realistic input lengths (issue 18): ours fixed / bucketed vs PEFT pad-to-longest /
  # group_by_length, on the three distributions, with their padding fractions.
  realistic = _table(text, '| task | mean input tokens')
  assert [r[0] for r in realistic] == ['SST-2', 'RTE', 'BoolQ']
  for r in realistic:
    assert all(_number(r[i]) > 0 for i in (1, 2, 3, 4, 5, 6, 7, 9, 11)), r
  padding = _table(text, '| task | padding ours fixed')
  for r in padding:
    fixed, bucketed, _, longest, grouped = (_number(r[i]) for i in range(1, 6))
    assert fixed > bucketed and fixed > longest > grouped, r  # bucketing removes padding
    shapes, cache = (int(x) for x in r[7].split('/'))
    assert shapes == cache  # one compilation of the train step per bucket shape

  # bfloat16 on the CPU: the dots microbenchmark and the five training variants.
  dots = _table(text, '| run | dtype')
  assert any('bfloat16 -> float32' in r[1] for r in dots)
  assert any(r[0].startswith('PEFT') for r in dots)
  bf16 = _table(text, '| variant | ex/s')
  assert [r[0] for r in bf16] == [
      'ours float32',
      'ours bfloat16',
      'ours bfloat16 f32acc',
      'peft float32',
      'peft bfloat16',
  ]
  for r in bf16:
    assert _number(r[1]) > 0
  losses = [_number(r[5]) for r in bf16]
  assert max(losses) - min(losses) < 0.05 * max(losses)  # same model and data in every variant
  assert 'amx' in text or 'CPU matmul extensions' in text

  raw = json.loads((tmp_path / 'RESULTS.json').read_text())
  assert raw['meta']['quick'] is True
  assert 'Failures' not in text, text


def test_unknown_sections_are_refused(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--quick', '--sections', 'nonsense'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0 and 'unknown --sections' in proc.stderr
