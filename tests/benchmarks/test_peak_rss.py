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


def test_the_table_compares_training_peaks_and_shows_the_process_peaks_beside_them():
  from benchmarks import bench_methods  # pylint: disable=g-import-not-at-top

  def worker(training, process):
    out = {'examples_per_s': 2.0, 'params': {'trainable': 5}, 'peak_rss_mb': process}
    return out if training is None else dict(out, training_peak_rss_mb=training)

  results = {  # keys sorted, as methods.json keeps them
      'ia3': {'ours': worker(1000.0, 1600.0), 'peft': worker(None, 1300.0)},  # older PEFT result
      'per_layer': {'ours': worker(900.0, 1500.0)},
      'prompt': {'ours': worker(1000.0, 1600.0), 'peft': worker(1250.0, 1300.0)},
  }
  rows = [
      [c.strip() for c in r.strip('|').split('|')]
      for r in bench_methods.table(results).splitlines()[2:]
  ]
  assert [r[0] for r in rows] == ['prompt', 'ia3', 'per_layer']  # bench_methods.METHODS' order
  prompt, ia3, per_layer = rows
  assert prompt[5:] == ['1000', '1250', '0.80', '1600 / 1300']
  assert ia3[5:] == ['1600', '1300', '1.23', '1600 / 1300']  # like with like: process peaks
  assert per_layer[5:] == ['900', '—', '—', '1500 / —']
