"""Model parallelism on 8 simulated CPU devices, and data parallelism over two `jax.distributed` processes.

Both must reproduce the single-device run of the same config (tiny model tuning, every parameter
trained by plain Adafactor, dropout on): same per-step losses within 1e-5 relative.
"""

import json
import os

import pytest

import runtime_testlib as rt

pytestmark = pytest.mark.slow

STEPS = 5
SCRIPT = os.path.join(rt.HERE, 'sharded_run.py')


def _finish(proc, timeout=500):
  done = rt.finish_logged(proc, timeout)
  return done.returncode, done.stdout


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """All at once: 1 device; 8 devices with num_partitions=2; two processes of 1 device each."""
  root = str(tmp_path_factory.mktemp('partitioning'))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  procs = {
      'single': rt.popen_logged(
          [rt.PYTHON, SCRIPT, f'{root}/single.json', f'{root}/single', '1'],
          env,
          f'{root}/single.log',
      ),
      'sharded': rt.popen_logged(
          [rt.PYTHON, SCRIPT, f'{root}/sharded.json', f'{root}/sharded', '2'],
          dict(env, XLA_FLAGS=env['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=8'),
          f'{root}/sharded.log',
      ),
  }
  port = rt.free_port()
  args = rt.entry_args(
      'prompt_tuning.train', rt.MODEL_TUNING_GIN, rt.model_tuning_bindings(f'{root}/multi')
  )
  for i in range(2):
    flags = [
        '--multiprocess_gpu',
        f'--coordinator_address=127.0.0.1:{port}',
        '--process_count=2',
        f'--process_index={i}',
    ]
    procs[f'process_{i}'] = rt.popen_logged(args + flags, env, f'{root}/process_{i}.log')
  results = {k: _finish(p) for k, p in procs.items()}
  out = {'results': results, 'multi_dir': f'{root}/multi'}
  for k in ('single', 'sharded'):
    if results[k][0] == 0:
      with open(f'{root}/{k}.json') as f:
        out[k] = json.load(f)
  return out


def _ok(runs, name):
  rc, log = runs['results'][name]
  assert rc == 0, f'{name} run failed ({rc}):\n{log[-5000:]}'
  return runs.get(name)


def test_parameters_are_sharded_over_the_model_axis(runs):
  single, sharded = _ok(runs, 'single'), _ok(runs, 'sharded')
  assert single['devices'] == 1 and sharded['devices'] == 8
  assert sharded['step'] == STEPS and sharded['frozen'] == {}, 'model tuning trains every parameter'
  specs = sharded['trainable']
  expected = {
      'token_embedder/embedding': ['model', None],  # (vocab, embed)
      'decoder/logits_dense/kernel': [None, 'model'],  # (embed, vocab)
      'encoder/layers_0/mlp/wi_0/kernel': [None, 'model'],  # (embed, mlp)
      'encoder/layers_0/mlp/wo/kernel': ['model', None],  # (mlp, embed)
      'decoder/layers_0/mlp/wi_1/kernel': [None, 'model'],
      'encoder/layers_0/attention/query/kernel': [None, 'model'],  # (embed, joined_kv)
      'encoder/layers_0/attention/out/kernel': ['model', None],  # (joined_kv, embed)
      'decoder/layers_0/encoder_decoder_attention/key/kernel': [None, 'model'],
      'encoder/relpos_bias/rel_embedding': ['model', None],  # (heads, relpos_buckets)
  }
  for path, spec in expected.items():
    assert path in specs, f'{path} not in {sorted(specs)}'
    assert specs[path] == spec, f'{path}: {specs[path]} != {spec}'
  # Embedding-dim-only parameters (layer norms) stay replicated.
  norms = [p for p in specs if p.endswith('/scale')]
  assert norms and all(all(a is None for a in specs[p]) for p in norms)
  assert sum('model' in str(s) for s in specs.values()) >= 15
  # The optimizer state of a sharded parameter is sharded the same way.
  opt = {p: s for p, s in sharded['opt_state'].items() if 'encoder/layers_0/mlp/wi_0/kernel' in p}
  assert any(s == [None, 'model'] for s in opt.values()), opt
  # One device: the same rules (over a 1 x 1 mesh, so nothing is actually split).
  assert single['trainable'] == specs


def test_model_parallel_losses_match_one_device(runs):
  single, sharded = _ok(runs, 'single'), _ok(runs, 'sharded')
  steps = range(1, STEPS + 1)
  rt.assert_losses_close(
      {int(k): v for k, v in sharded['losses'].items()},
      {int(k): v for k, v in single['losses'].items()},
      steps,
      rtol=1e-5,
      atol=0,
  )


def test_two_processes_match_one_process(runs):
  single = _ok(runs, 'single')
  for i in range(2):
    _ok(runs, f'process_{i}')
  rc, log = runs['results']['process_0']
  assert 'jax.distributed.initialize' in log
  losses = rt.losses(runs['multi_dir'])
  rt.assert_losses_close(
      losses,
      {int(k): v for k, v in single['losses'].items()},
      range(1, STEPS + 1),
      rtol=1e-5,
      atol=0,
  )
