"""SPoT: the two retrieval similarities against their definitions, ranking and transfer initialization,
the library-backed command line, and a tiny-model toy: a task embedding of a counting task ranks the
counting source above an unrelated (copy-a-word) source, and starting from the top-ranked source beats
the random initialization at a fixed small step budget.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prompt_tuning import library
from prompt_tuning.methods import spot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tests', 'runtime'))


def test_similarities_equal_their_definitions():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(7, 16)), rng.normal(size=(4, 16))
  ms, mt = s.mean(axis=0), t.mean(axis=0)
  expected = ms @ mt / (np.linalg.norm(ms) * np.linalg.norm(mt))
  assert spot.mean_cosine(s, t) == pytest.approx(expected, abs=1e-9)
  pairs = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a in s for b in t]
  assert spot.token_cosine(s, t) == pytest.approx(np.mean(pairs), abs=1e-9)
  assert spot.mean_cosine(s, 3 * s) == pytest.approx(1.0)


def test_rank_and_transfer_init():
  rng = np.random.default_rng(1)
  target = rng.normal(size=(5, 8))
  sources = {
      'near': target + 0.1 * rng.normal(size=(5, 8)),
      'far': -target,
      'mid': rng.normal(size=(5, 8)),
  }
  for metric in spot.METRICS:
    ranked = spot.rank(target, sources, metric)
    assert [r.name for r in ranked][0] == 'near' and ranked[-1].name == 'far'
  ranked = spot.rank(target, sources)
  best, chosen = spot.transfer_init(ranked, sources, 'best')
  np.testing.assert_allclose(best, sources['near'], rtol=1e-6)
  avg, chosen = spot.transfer_init(ranked, sources, 'average', top_k=2)
  assert chosen == [ranked[0].name, ranked[1].name]
  np.testing.assert_allclose(avg, (sources[chosen[0]] + sources[chosen[1]]) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match='one backbone'):
    spot.rank(target, {'x': rng.normal(size=(5, 4))})


def test_command_line_ranks_the_library_and_writes_the_init(tmp_path):
  emb = {0: np.random.default_rng(0).normal(size=(64, 8)), 1: np.ones((64, 8))}
  lib_dir = str(tmp_path / 'lib')
  lib = library.Library(lib_dir)
  rng = np.random.default_rng(2)
  target = rng.normal(size=(4, 8)).astype(np.float32)
  lib.add('target_embedding', target, {'method': 'task_embedding'}, backbone=emb[0])
  lib.add('near', target + 0.05, {'task': 'near_task'}, backbone=emb[0])
  lib.add('far', -target, {'task': 'far_task'}, backbone=emb[0])
  lib.add('other_backbone', target, {'task': 'x'}, backbone=emb[1])
  lib.add('bank', np.stack([target, target]), {'task': 'x'}, backbone=emb[0])
  np.save(str(tmp_path / 'emb.npy'), emb[0])
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  common = [
      f'--library={lib_dir}',
      '--target=library:target_embedding',
      f'--backbone={tmp_path / "emb.npy"}',
  ]
  proc = subprocess.run(
      [sys.executable, '-m', 'prompt_tuning.spot', 'rank', *common, '--json'],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr
  ranking = json.loads(proc.stdout)
  for metric in spot.METRICS:  # only single prompts of this backbone, target excluded
    assert [r['name'] for r in ranking[metric]] == ['near', 'far']
  out = str(tmp_path / 'init.npy')
  proc = subprocess.run(
      [sys.executable, '-m', 'prompt_tuning.spot', 'transfer', *common, f'--output={out}'],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr
  np.testing.assert_allclose(np.load(out), target + 0.05, rtol=1e-6)


# ------------------------------------------------------------------------------- tiny toy


def _examples(kind, seed, n=64):
  import tiny_task

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(1, 4))
    words = [tiny_task.WORDS[int(i)] for i in rng.integers(0, len(tiny_task.WORDS), size=k)]
    target = tiny_task.COUNTS[k - 1] if kind == 'count' else words[0]
    out.append((' '.join(words), target))
  return out


def _batch(vocab, examples):
  enc = np.zeros((len(examples), 24), np.int32)
  dec = np.zeros((len(examples), 8), np.int32)
  for i, (x, y) in enumerate(examples):
    ids = vocab.encode(x)[:23] + [1]
    enc[i, : len(ids)] = ids
    t = vocab.encode(y)[:7] + [1]
    dec[i, : len(t)] = t
  inputs = np.zeros_like(dec)
  inputs[:, 1:] = dec[:, :-1]
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': inputs,
      'decoder_target_tokens': dec,
      'decoder_loss_weights': (dec > 0).astype(np.int32),
  }


@pytest.fixture(scope='module')
def toy():  # about a minute on 2 idle cores (two 60-step sources, a 15-step task embedding)
  import jax
  import jax.numpy as jnp
  import optax
  import tiny_task
  from prompt_tuning.architectures import t5
  from prompt_tuning.methods import ensembling

  config = t5.get_config('tiny')
  x = jnp.ones((1, 4), jnp.int32)
  frozen = jax.device_get(
      t5.EncoderDecoder(config).init(jax.random.PRNGKey(3), x, x, x, enable_dropout=False)
  )['params']
  vocab = tiny_task.get_vocabulary()
  init = np.asarray(
      jax.random.uniform(jax.random.PRNGKey(0), (5, config.emb_dim), minval=-0.5, maxval=0.5)
  )
  model, params = ensembling.prompted_model(frozen, init, vocab)
  optimizer = optax.adam(0.1)

  def with_prompt(p):
    return {**params, 'encoder': {**params['encoder'], 'prompt': {'prompt': {'prompt': p}}}}

  @jax.jit
  def loss_of(p, batch):
    return model.loss_fn(with_prompt(p), batch, None)[0] / jnp.sum(batch['decoder_loss_weights'])

  @jax.jit
  def step(p, state, batch):
    loss, grad = jax.value_and_grad(loss_of)(p, batch)
    updates, state = optimizer.update(grad, state, p)
    return optax.apply_updates(p, updates), state, loss

  def train(prompt, batch, steps):
    p = jnp.asarray(prompt)
    state = optimizer.init(p)
    for _ in range(steps):
      p, state, _ = step(p, state, batch)
    return np.asarray(p)

  batches = {
      'count': _batch(vocab, _examples('count', 1)),
      'first_word': _batch(vocab, _examples('first', 2)),
      'target': _batch(vocab, _examples('count', 5)),  # counting, other sentences
      'target_eval': _batch(vocab, _examples('count', 6)),
  }
  sources = {name: train(init, batches[name], 60) for name in ('count', 'first_word')}
  embedding = train(init, batches['target'], 15)
  return {
      'init': init,
      'sources': sources,
      'embedding': embedding,
      'train': train,
      'batches': batches,
      'loss': lambda p, b: float(loss_of(jnp.asarray(p), b)),
  }


@pytest.mark.slow
def test_toy_retrieval_ranks_the_related_source_first(toy):
  for metric in spot.METRICS:
    ranked = spot.rank(toy['embedding'], toy['sources'], metric)
    print(metric, [(r.name, round(r.score, 4)) for r in ranked])
    assert [r.name for r in ranked] == ['count', 'first_word'], (metric, ranked)


@pytest.mark.slow
def test_toy_transfer_from_the_top_source_beats_random_init(toy):
  ranked = spot.rank(toy['embedding'], toy['sources'])
  start, _ = spot.transfer_init(ranked, toy['sources'], 'best')
  budget = 8
  spot_prompt = toy['train'](start, toy['batches']['target'], budget)
  random_prompt = toy['train'](toy['init'], toy['batches']['target'], budget)
  spot_loss = toy['loss'](spot_prompt, toy['batches']['target_eval'])
  random_loss = toy['loss'](random_prompt, toy['batches']['target_eval'])
  print(f'held-out loss after {budget} steps: SPoT {spot_loss:.4f}, random init {random_loss:.4f}')
  assert spot_loss < random_loss
