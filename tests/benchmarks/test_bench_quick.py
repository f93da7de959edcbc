"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` into a temp dir.

The report must hold every table with the rows the quick shapes ask for, every cell measured (no
`n/a`, no failure), numbers that are positive and finite (parsed with their sign, so a negative
throughput or ratio fails), ratios whose paired range contains them, and table values that agree
with the raw measurements in RESULTS.json.
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('peft')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_NUMBER = re.compile(r'^[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?')
_NUM = r'[-+]?[\d.,]+'
_RATIO = re.compile(
    rf'^(?P<value>{_NUM})x? \(pairs (?P<lo>{_NUM})-(?P<hi>{_NUM}); best/best (?P<best>{_NUM})\)$'
)


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
      assert rows, f'table {header_start!r} has no rows'
      return rows
  raise AssertionError(f'no table starting with {header_start!r} in:\n{text}')


def _number(cell):
  """The signed number a cell starts with ('1,114', '-0.5', '6.3e-08', '71%', '3.51x ...')."""
  m = _NUMBER.match(cell.strip())
  assert m, f'not a number: {cell!r}'
  return float(m.group(0).replace(',', ''))


def _positive(cell):
  x = _number(cell)
  assert math.isfinite(x) and x > 0, f'expected a positive finite number, got {cell!r}'
  return x


def _ratio(cell):
  """`1.15x (pairs 1.06-1.17; best/best 1.15)` -> (1.15, 1.06, 1.17, 1.15), all checked positive."""
  m = _RATIO.match(cell.strip())
  assert m, f'not a ratio cell: {cell!r}'
  value, lo, hi, best = (_positive(m.group(k)) for k in ('value', 'lo', 'hi', 'best'))
  # The ratio is the median of the pair ratios, so it lies within their range, up to its rounding:
  # 2 decimals, or 3 significant digits from 100x up (`142x` beside pairs of 142.16).
  slack = lambda x: max(0.01, 0.005 * x)
  assert lo - slack(lo) <= value <= hi + slack(hi), cell
  return value, lo, hi, best


def _close(cell, value, rel=0.01):
  """A formatted table cell equals a raw measurement up to the rounding of its format."""
  text = _NUMBER.match(cell.strip()).group(0)
  decimals = len(text.split('.')[1]) if '.' in text and 'e' not in text.lower() else 0
  shown = float(text.replace(',', ''))
  assert shown == pytest.approx(value, rel=rel, abs=0.51 * 10**-decimals), (cell, value)


def _pair_ratio(a, b):
  """Recomputed from the raw repetitions: the median of the ratios of adjacent measurements."""
  pairs = [x / y for x, y in zip(a, b) if x and y]
  assert pairs, (a, b)
  return statistics.median(pairs)


def test_number_parsing_keeps_the_sign():
  assert _number('-3.5') == -3.5 and _number('+2') == 2 and _number('1,114') == 1114
  assert _number('6.3e-08') == pytest.approx(6.3e-8) and _number('71%') == 71
  with pytest.raises(AssertionError, match='expected a positive'):
    _positive('-1.2')
  with pytest.raises(AssertionError, match='expected a positive'):
    _positive('0.0')
  with pytest.raises(AssertionError, match='not a number'):
    _number('n/a')
  assert _ratio('1.15x (pairs 1.06-1.17; best/best 1.15)') == (1.15, 1.06, 1.17, 1.15)
  with pytest.raises(AssertionError):
    _ratio('1.50x (pairs 1.06-1.17; best/best 1.15)')  # Outside its own range.
  with pytest.raises(AssertionError):
    _ratio('-1.15x (pairs -1.2--1.1; best/best 1.15)')


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
  out = tmp_path / 'reports' / 'RESULTS.md'  # a folder the run must create
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # the benchmarks compile as users do (not conftest's quick compile)
  env['PROMPT_TUNING_MALLOC'] = 'hugepages'  # opt in: ours' workers restart with it, PEFT's do not
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
  assert 'Failures' not in text, text
  # Asked to, ours' workers restart as the entry points do (launch.tune_malloc); PEFT's run as
  # PyTorch's users run them.
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  ours = (
      '`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`'
      if launch.malloc_tunables('hugepages', {})
      else ("glibc's defaults")
  )
  assert f"- Allocator: ours' workers ran with {ours} (" in text, text[:3000]
  assert "PEFT's with glibc's defaults." in text
  raw = json.loads(out.with_suffix('.json').read_text())
  assert raw['meta']['quick'] is True
  # Quick mode: one main (CPU, tiny) section, plus the realistic-length and bfloat16 sections.
  (section,) = [
      v for k, v in raw['results'].items() if not k.endswith((', realistic lengths', ', bfloat16'))
  ]

  train = _table(text, '| prompt | ours ex/s')
  assert [r[0] for r in train] == ['4', '8']
  for r in train:
    assert not [c for c in r if 'n/a' in c], r  # Every cell measured.
    measured = section['train'][r[0]]
    ours, peft = measured['ours'], measured['peft']
    _positive(r[1])
    _positive(r[2])
    _close(r[1], statistics.median(ours['examples_per_s']))
    _close(r[2], statistics.median(peft['examples_per_s']))
    _ratio(r[3])
    speedup = _pair_ratio(ours['examples_per_s'], peft['examples_per_s'])
    _close(r[3], speedup)
    assert r[4] == ('met' if speedup >= 1.2 else '**missed**')
    rss_ours, rss_peft = (_positive(x) for x in r[5].split('/'))
    _close(f'{rss_ours:.0f}', ours['peak_rss_mb'])
    assert r[6] == ('met' if ours['peak_rss_mb'] <= peft['peak_rss_mb'] else '**missed**')
    loss_ours, loss_peft = (_positive(x) for x in r[7].split('/'))
    assert loss_ours == pytest.approx(loss_peft, rel=1e-3)  # same model, same prompt, same loss
    _close(r[7].split('/')[0].strip(), ours['first_loss'], rel=1e-4)
    assert not ours['tensorflow_imported']  # The train step does not need TensorFlow.

  util = _table(text, '| prompt | GFLOP/step')
  assert [r[0] for r in util] == ['4', '8']
  for r in util:
    assert not [c for c in r if 'n/a' in c], r
    flops = _positive(r[1])  # Small for the tiny model, but never zero or negative.
    _close(r[1], section['train'][r[0]]['ours']['flops_per_step'] / 1e9, rel=0.05)
    assert flops < 10  # In GFLOP: the quick shapes' tiny model (a unit slip shows up here).
    assert all(_positive(r[i]) for i in (2, 3, 4, 6, 7, 8))
    assert r[5] in ('met', '**missed**')

  serve = _table(text, '| prompt | ours mixed ex/s')
  assert [r[0] for r in serve] == ['4']
  r = serve[0]
  assert not [c for c in r if 'n/a' in c], r
  assert all(_positive(r[i]) for i in (1, 2, 5, 8))
  ours, peft = section['serve']['4']['ours'], section['serve']['4']['peft']
  _close(r[1], statistics.median(ours['mixed_examples_per_s']))
  _ratio(r[3])
  _ratio(r[6])
  mixed_vs_peft = _pair_ratio(ours['mixed_examples_per_s'], peft['per_task_examples_per_s'])
  _close(r[6], mixed_vs_peft)
  assert r[7] == ('met' if mixed_vs_peft >= 4 else '**missed**')
  assert r[4] in ('met', '**missed**')
  score_diff = _number(r[9])
  assert math.isfinite(score_diff) and 0 <= score_diff < 1e-3  # mixed-task = PEFT per-task scores

  generate = _table(text, '| prompt | ours mixed ex/s | PEFT per-task ex/s | ours / PEFT')
  assert [r[0] for r in generate] == ['4']
  r = generate[0]
  assert all(_positive(r[i]) for i in (1, 2))
  _ratio(r[3])
  assert r[4] == '100.0%'  # mixed-task greedy labels equal PEFT's per-task `generate`

  decode = _table(text, '| prompt | ours tokens/s')
  assert [r[0] for r in decode] == ['4']
  r = decode[0]
  assert all(_positive(r[i]) for i in (1, 2))
  ours, peft = section['decode']['4']['ours'], section['decode']['4']['peft']
  _close(r[1], statistics.median(ours['tokens_per_s']))
  _ratio(r[3])
  speedup = _pair_ratio(ours['tokens_per_s'], peft['tokens_per_s'])
  _close(r[3], speedup)
  assert r[4] == ('met' if speedup >= 1.0 else '**missed**')
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
      'ours bfloat16 plain dots',
      'ours bfloat16',
      'peft float32',
      'peft bfloat16',
  ]
  for r in bf16:
    assert _number(r[1]) > 0
  losses = [_number(r[5]) for r in bf16]
  assert max(losses) - min(losses) < 0.05 * max(losses)  # same model and data in every variant
  assert 'amx' in text or 'CPU matmul extensions' in text

  raw = json.loads(out.with_suffix('.json').read_text())
  assert raw['meta']['quick'] is True
  assert 'Failures' not in text, text


def test_unknown_sections_are_refused(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # the benchmarks compile as users do (not conftest's quick compile)
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--quick', '--sections', 'nonsense'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0 and 'unknown --sections' in proc.stderr
