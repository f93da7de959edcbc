"""`python -m benchmarks.serve_load --quick`: the load test runs, answers are all checked, tables written."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_load_test_checks_every_answer(tmp_path):
  out = tmp_path / 'SERVING.md'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # the benchmarks compile as users do (not conftest's quick compile)
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'benchmarks.serve_load',
          '--quick',
          '--requests',
          '24',
          '--sequential_requests',
          '6',
          '--clients',
          '12',
          '--output',
          str(out),
          '--workdir',
          str(tmp_path / 'work'),
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  rows = re.findall(
      r'^\| (ours[^|]*|PEFT[^|]*) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| (\d+) \|$', text, re.M
  )
  assert [r[0].split(',')[0] for r in rows] == ['ours', 'ours', 'PEFT'], text
  for name, n, rps, p50, p99, wrong in rows:
    assert int(wrong) == 0, (name, text)
    assert float(rps) > 0 and int(p99) >= int(p50), (name, text)
  results = json.loads((tmp_path / 'SERVING.json').read_text())
  assert results['ours']['compiles_during_load'] == 0
  assert results['ours']['batched']['requests'] == 24
