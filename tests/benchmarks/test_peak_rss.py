"""The methods table's training peak: `common.reset_peak_rss` starts the peak anew (`VmHWM`)."""

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
