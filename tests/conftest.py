"""Shared pytest setup: CPU only, quiet TensorFlow, no network, XLA's quick compile for tests."""

import collections
import gc
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'runtime'))
from runtime_testlib import TEST_XLA_FLAGS  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# Before JAX starts in this process (the subprocess runs get the same flags from runtime_testlib).
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [TEST_XLA_FLAGS, os.environ.get('XLA_FLAGS')]))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Files with more slow tests run earlier (scripts/test.sh schedules whole files over two workers
  with `--dist loadfile --no-loadscope-reorder`): a long file started last would leave the other
  worker idle at the end, while many quick files at the end even the two out. Files with the same
  number of slow tests keep their collection order."""
  slow = collections.Counter(item.path for item in items if item.get_closest_marker('slow'))
  items.sort(key=lambda item: -slow[item.path])


def pytest_collection_finish(session):  # pylint: disable=unused-argument
  """What exists after collection (JAX, TensorFlow, PyTorch, transformers and the test modules)
  lives until the end: freezing it out of the garbage collector spares each full collection walking
  it again. On test_merging.py + test_hooks.py: 125 full collections took 14.8 of 153 s, 4.7 s
  frozen. Objects the tests create are collected as usual."""
  gc.collect()
  gc.freeze()
