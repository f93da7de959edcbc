"""Dependencies flow one way: the runtime uses the core, never the reverse.

`prompts.py`, `architectures/` and `checkpoints/` are used by the runtime (`runtime/` imports
`checkpoints/` to read parameters, `architectures/` to build models); none of them may import
`prompt_tuning.runtime`, at module level or inside a function. Checked on the source, so an import
hidden in a rarely taken branch is found too.
"""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'prompt_tuning')
CORE_FILES = sorted(
    [os.path.join(PACKAGE, 'prompts.py')]
    + glob.glob(os.path.join(PACKAGE, 'architectures', '*.py'))
    + glob.glob(os.path.join(PACKAGE, 'checkpoints', '*.py'))
)
# What `grep -rn "prompt_tuning.runtime\|from prompt_tuning import runtime"` looks for.
_TEXT = re.compile(r'prompt_tuning.runtime|from prompt_tuning import runtime')


def _runtime_imports(source: str) -> list:
  """(line, statement) of every import of prompt_tuning.runtime in `source`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    if any(n == 'prompt_tuning.runtime' or n.startswith('prompt_tuning.runtime.') for n in names):
      found.append((node.lineno, ast.unparse(node)))
  return found


def test_core_files_exist():
  names = {os.path.relpath(p, PACKAGE) for p in CORE_FILES}
  assert {'prompts.py', 'architectures/t5.py', 'checkpoints/formats.py'} <= names


@pytest.mark.parametrize('path', CORE_FILES, ids=lambda p: os.path.relpath(p, PACKAGE))
def test_core_does_not_import_the_runtime(path):
  with open(path) as f:
    source = f.read()
  imports = _runtime_imports(source)
  assert not imports, f'{path} imports the runtime: {imports}'
  lines = [(i + 1, line) for i, line in enumerate(source.splitlines()) if _TEXT.search(line)]
  assert not lines, f'{path} names prompt_tuning.runtime (imported by name?): {lines}'


def test_the_checker_finds_imports():
  source = (
      'def f():\n'
      '  from prompt_tuning.runtime import checkpoints\n'
      'import prompt_tuning.runtime.models as m\n'
      'from prompt_tuning import runtime\n'
  )
  assert sorted(line for line, _ in _runtime_imports(source)) == [2, 3, 4]
  assert len([l for l in source.splitlines() if _TEXT.search(l)]) == 3
