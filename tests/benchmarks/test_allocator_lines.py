"""The benchmark reports say which allocator each framework's workers ran with."""

from benchmarks import bench_methods
from benchmarks import run


def test_main_report_names_a_preloaded_allocator_over_glibcs_settings():
  worker = lambda f, tunables, preload: {'framework': f, 'glibc_tunables': tunables, **preload}
  results = {
      'section': {
          'ours': worker('ours', '', {'ld_preload': 'libtcmalloc_minimal.so.4'}),
          'peft': worker('peft', '', {'ld_preload': ''}),
      }
  }
  assert run._allocators(results) == {  # pylint: disable=protected-access
      'ours': '`LD_PRELOAD=libtcmalloc_minimal.so.4`',
      'peft': "glibc's defaults",
  }
  # Results written before `ld_preload` was recorded.
  older = {'s': {'a': worker('ours', 'glibc.malloc.hugetlb=1', {}), 'b': worker('peft', '', {})}}
  assert run._allocators(older) == {  # pylint: disable=protected-access
      'ours': '`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`',
      'peft': "glibc's defaults",
  }


def test_methods_report_line(monkeypatch):
  for k in ('LD_PRELOAD', 'GLIBC_TUNABLES'):
    monkeypatch.delenv(k, raising=False)
  assert bench_methods.allocator() == "glibc's defaults"
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert bench_methods.allocator() == '`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`'
  monkeypatch.setenv('LD_PRELOAD', 'libtcmalloc_minimal.so.4')
  assert bench_methods.allocator() == '`LD_PRELOAD=libtcmalloc_minimal.so.4`'
  results = {
      'prompt': {
          'ours': {'allocator': '`LD_PRELOAD=libtcmalloc_minimal.so.4`'},
          'peft': {'allocator': "glibc's defaults"},
      },
      'per_layer': {'ours': {'allocator': '`LD_PRELOAD=libtcmalloc_minimal.so.4`'}},
  }
  assert bench_methods.allocator_line(results) == (
      "Allocator: ours' workers ran with `LD_PRELOAD=libtcmalloc_minimal.so.4` "
      "(`PROMPT_TUNING_MALLOC`), PEFT's with glibc's defaults.\n\n"
  )
  assert bench_methods.allocator_line({'prompt': {'ours': {'examples_per_s': 1.0}}}) == ''
