"""The repository has one formatter configuration (pyproject.toml, [tool.pyink]) and follows it."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyink_check_passes():
  """`pyink --check .` (Google style: 2-space indent, 100 columns) leaves every file unchanged."""
  pytest.importorskip('pyink', reason='pyink is part of the [test] extra')
  proc = subprocess.run(
      [sys.executable, '-m', 'pyink', '--check', '.'],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  would = [l for l in proc.stderr.splitlines() if l.startswith('would reformat')]
  assert proc.returncode == 0, (
      'Files not formatted as pyproject.toml says; run `pyink .` from the repository root:\n'
      + '\n'.join(would[:40])
      + ('' if would else proc.stderr[-2000:])
  )


def test_one_formatter_configuration():
  """No second formatter configuration competes with pyproject.toml's."""
  others = ['.style.yapf', 'setup.cfg', '.flake8', 'ruff.toml', '.ruff.toml', 'tox.ini']
  found = [f for f in others if os.path.exists(os.path.join(REPO, f))]
  assert not found, f'Competing formatter configuration(s): {found}'
  with open(os.path.join(REPO, 'pyproject.toml')) as f:
    text = f.read()
  assert '[tool.pyink]' in text and 'pyink-indentation = 2' in text and 'line-length = 100' in text
