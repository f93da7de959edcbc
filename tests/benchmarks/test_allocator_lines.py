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


def test_ours_gin_bindings_reach_the_worker_and_the_report(monkeypatch):
  import gin  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import bench_ours  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top

  split = "training_forward_compiler_options.cpu_float32_dots = 'eigen'"
  env = {common.OURS_GIN_ENV: f'\n  {split}  \n\n'}
  assert bench_ours.gin_bindings(env) == [split]
  assert bench_ours.gin_bindings({}) == []
  monkeypatch.setenv(common.OURS_GIN_ENV, split)
  monkeypatch.setattr(xla_options, 'split_step_pays_here', lambda: False)  # as on AMD
  assert xla_options.training_forward_compiler_options(dtype=jnp.float32) is None
  try:
    bench_ours.apply_gin_bindings(bench_ours.gin_bindings())
    # The split training step's forward compiles with Eigen dots (on the CPU backend).
    assert (
        xla_options.training_forward_compiler_options(dtype=jnp.float32) == xla_options.EIGEN_DOTS
    )
  finally:
    gin.clear_config()
  worker = lambda f, bindings: {'framework': f, 'gin_bindings': bindings}
  results = {'train': {'ours': worker('ours', [split]), 'peft': worker('peft', [split])}}
  assert run._gin_lines(results) == [  # pylint: disable=protected-access
      f"- Gin bindings of ours' workers (`--ours-gin`): `{split}`."
  ]
  no_bindings = {'train': {'ours': worker('ours', [])}}
  assert run._gin_lines(no_bindings) == []  # pylint: disable=protected-access


def test_the_report_says_how_the_training_step_was_compiled():
  from benchmarks import run  # pylint: disable=g-import-not-at-top

  worker = lambda f, n: {'framework': f, 'executables_per_step': n}
  one = {'train': {'20': {'ours': worker('ours', 1), 'peft': worker('peft', 3)}}}
  (line,) = run._train_step_lines(one)  # pylint: disable=protected-access
  assert line == "- Ours' training step: one executable."
  split = {'train': {'20': {'ours': worker('ours', 2)}, '100': {'ours': worker('ours', 2)}}}
  (line,) = run._train_step_lines(split)  # pylint: disable=protected-access
  assert 'split in two executables (`trainer.SplitTrainStep`' in line
  assert 'one executable' not in line
  assert run._train_step_lines({'train': {}}) == []  # pylint: disable=protected-access
