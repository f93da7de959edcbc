"""The methods table's peaks: `common.reset_peak_rss` starts the peak anew (`VmHWM`), and the
workers keep the process's peak from before the reset."""

import numpy as np
import pytest

from benchmarks import common
from prompt_tuning.runtime import launch


def test_the_peak_starts_anew_at_the_reset_and_counts_what_comes_after():
  if not common.reset_peak_rss():
    pytest.skip('this kernel offers no /proc/self/clear_refs')
  base = common.peak_rss_since_reset_mb()
  x = np.ones(300 * 2**20, np.uint8)  # every page written
  high = common.peak_rss_since_reset_mb()
  assert high >= base + 290, (base, high)
  del x
  launch.release_free_memory()
  assert common.peak_rss_mb() >= high - 1  # the whole life's peak keeps the array
  assert common.reset_peak_rss()
  # From the current RSS again: the freed array is not in the new peak.
  assert common.peak_rss_since_reset_mb() <= high - 250


def test_the_methods_workers_keep_the_setting_up_peak_beside_the_training_peak():
  from benchmarks import bench_methods  # pylint: disable=g-import-not-at-top

  x = np.ones(300 * 2**20, np.uint8)  # setting up: a peak, then freed
  setup_high = common.peak_rss_mb()
  del x
  res = {'rss_mb': {}}
  bench_methods._start_training_peak(res)  # pylint: disable=protected-access
  if not res['training_peak_reset']:
    pytest.skip('this kernel offers no /proc/self/clear_refs')
  y = np.ones(100 * 2**20, np.uint8)  # training
  bench_methods._end_training_peak(res)  # pylint: disable=protected-access
  del y
  assert res['peak_rss_mb'] >= setup_high - 1
  assert res['rss_mb']['training_start'] + 95 <= res['training_peak_rss_mb']
  assert res['training_peak_rss_mb'] <= setup_high - 150
