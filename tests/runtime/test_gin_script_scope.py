"""`import __main__ as train_script` read twice in one process with different `__main__` functions.

The sweep check reads a run's configuration with a stand-in `train`; a later reading (a test, a
notebook cell, the vectorized sweep job) binds the real one. Gin registers the `train_script.train`
selector dynamically for the first function it meets, and without `forget_stale_registrations`
the second reading fails with "A different configurable matching 'train_script.train' already exists"
(the CI failure of test_gin_compat after the sweeps tests ran in the same worker).
"""

import sys
import types

import gin
import pytest

from prompt_tuning.runtime import gin_utils

GIN = """
from __gin__ import dynamic_registration
import __main__ as train_script
train_script.train.steps = %STEPS
STEPS = 7
"""


@pytest.fixture
def fake_main(tmp_path, monkeypatch):
  (tmp_path / 'run.gin').write_text(GIN)
  monkeypatch.setitem(sys.modules, '__main__', types.ModuleType('__main__'))
  yield tmp_path
  gin.clear_config()
  gin_utils.forget_stale_registrations()


def _read(path, bindings=()):
  gin.clear_config()
  gin_utils.parse_gin_flags([str(path)], ['run.gin'], list(bindings), finalize_config=False)


def test_second_main_function_gets_the_bindings(fake_main):
  def first(steps=0):
    return ('first', steps)

  def second(steps=0):
    return ('second', steps)

  sys.modules['__main__'].train = first
  _read(fake_main)
  assert gin.get_configurable(first)() == ('first', 7)

  sys.modules['__main__'].train = second
  _read(fake_main, ['STEPS = 9'])
  assert gin.get_configurable(second)() == ('second', 9)
  # The first function is no longer the configurable behind the selector.
  assert gin_utils.forget_stale_registrations() == []


def test_same_function_keeps_its_registration(fake_main):
  def train(steps=0):
    return steps

  sys.modules['__main__'].train = train
  _read(fake_main)
  assert gin_utils.forget_stale_registrations() == []
  _read(fake_main, ['STEPS = 3'])
  assert gin.get_configurable(train)() == 3


def test_a_stale_registration_is_reported_when_main_changes(fake_main):
  def train(steps=0):
    return steps

  sys.modules['__main__'].train = train
  _read(fake_main)
  sys.modules['__main__'].train = lambda steps=0: steps
  assert gin_utils.forget_stale_registrations() == ['train_script.train']


def test_an_alias_of_an_earlier_reading_does_not_hide_a_new_one(tmp_path, monkeypatch):
  """T5X's tiny.gin (no dynamic registration) names `network.T5Config`, registered by base.gin's
  `import ... as network`; a class registered earlier in the process under another alias used to
  stay under that alias only."""
  (tmp_path / 'aliased_net.py').write_text(
      'class Config:\n  def __init__(self, width=1):\n    self.width = width\n'
      'def build(config=None):\n  return config.width\n'
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / 'first.gin').write_text(
      'from __gin__ import dynamic_registration\nimport aliased_net as net\n'
      'net.build.config = @net.Config()\n'
  )
  (tmp_path / 'base.gin').write_text(
      'from __gin__ import dynamic_registration\nimport aliased_net as network\n'
      'network.build.config = @network.Config()\n'
  )
  (tmp_path / 'plain.gin').write_text("include 'base.gin'\nnetwork.Config.width = 5\n")
  import aliased_net  # pylint: disable=g-import-not-at-top

  try:
    gin.clear_config()
    gin_utils.parse_gin_flags([str(tmp_path)], ['first.gin'], [], finalize_config=False)
    assert gin.get_configurable(aliased_net.build)() == 1
    gin.clear_config()
    gin_utils.parse_gin_flags([str(tmp_path)], ['plain.gin'], [], finalize_config=False)
    assert gin.get_configurable(aliased_net.build)() == 5
  finally:
    gin.clear_config()
    gin_utils.forget_stale_registrations()
