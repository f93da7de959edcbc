"""Prompt recycling: each recycler against a float64 transcription of its formula, and a synthetic
backbone pair whose target is an orthogonal rotation of the source (every layer norm scale 1, every
kernel rotated), on which v2v-lin must recover the rotation and the recycled prompt must give the
target the source's logits; then the command line on that pair, through the library and rank
classification.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import library
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.checkpoints import t5x_format
from prompt_tuning.methods import recycling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pair(v=300, e=16, e2=24, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(v, e))
  t = s @ rng.normal(size=(e, e2)) + 0.1 * rng.normal(size=(v, e2))
  return s, t, rng.normal(size=(7, e))


def test_v2v_lin_is_the_normal_equations_solution():
  s, t, p = _pair()
  x = np.linalg.solve(s.T @ s, s.T @ t)  # TF's lstsq fast path: (SᵀS)⁻¹ SᵀT
  np.testing.assert_allclose(recycling.fit_v2v_lin(s, t), x, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(recycling.recycle(p, s, t, 'v2v-lin'), p @ x, rtol=1e-5, atol=1e-6)


def test_lin_comb_is_the_minimum_norm_combination_and_equals_v2v_lin():
  s, t, p = _pair()
  c = s @ np.linalg.solve(s.T @ s, p.T)  # min-norm solution of Sᵀ C = Pᵀ
  np.testing.assert_allclose(s.T @ c, p.T, atol=1e-9)
  expected = c.T @ t
  got = recycling.recycle_lin_comb(p, s, t)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(got, p @ recycling.fit_v2v_lin(s, t), rtol=1e-6, atol=1e-9)


def test_v2v_nn_recipe_shapes_loss_and_schedule():
  s, t, p = _pair(v=120)
  nn = recycling.V2VNN().fit(s, t)  # the recipe: 25 epochs of batch 50
  assert nn.steps == 25 * int(np.ceil(120 / 50))
  assert len(nn.losses) == 25 and nn.losses[-1] < 0.9 * nn.losses[0]
  assert all(b < a for a, b in zip(nn.losses, nn.losses[1:]))  # lr 3e-4: slow but steady
  out = nn(p)
  assert out.shape == (7, 24)
  # The layer sizes of the recipe: E -> 4·E2 -> E2.
  shapes = jax.tree_util.tree_map(lambda x: x.shape, nn._params)  # pylint: disable=protected-access
  kernels = sorted(v['kernel'] for v in shapes['params'].values())
  assert kernels == [(16, 96), (96, 24)]
  # The training loss is optax.l2_loss(...).mean() = half the mean squared error.
  import optax

  pred, target = np.asarray(nn(s)), t.astype(np.float32)
  loss = float(optax.l2_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target)).mean())
  assert loss == pytest.approx(0.5 * np.mean((pred - target) ** 2), rel=1e-5)


def test_bad_inputs():
  s, t, p = _pair()
  with pytest.raises(recycling.RecyclingError, match='source backbone'):
    recycling.recycle(p[:, :5], s, t)
  with pytest.raises(recycling.RecyclingError, match='same V pieces'):
    recycling.fit_v2v_lin(s, t[:10])
  with pytest.raises(recycling.RecyclingError, match='Unknown recycler'):
    recycling.recycle(p, s, t, 'v2v-xyz')


def test_english_only_vocabulary_of_the_toy_sentencepiece_model(tmp_path):
  from tasks import toy

  vocab = toy.get_toy_vocabulary()
  ids = recycling.english_only_ids(vocab)
  model = vocab.tokenizer
  pieces = [model.id_to_piece(i) for i in ids]
  assert all(
      p.replace('\u2581', '').isalpha() and p.replace('\u2581', '').isascii() for p in pieces
  )
  assert {0, 1, 2}.isdisjoint(ids) and max(ids) < model.get_piece_size()  # no pad/eos/unk/sentinel
  for word in ('fox', 'river', 'yes', 'colour'):
    assert f'\u2581{word}' in pieces
  assert len(ids) > 100
  chosen = recycling.recycling_vocabulary(vocab, num_words=50, word_offset=10)
  np.testing.assert_array_equal(chosen, ids[10:60])
  with pytest.raises(recycling.RecyclingError, match='fewer than word_offset'):
    recycling.recycling_vocabulary(vocab)  # the original's 1000 + 4000 do not fit 400 pieces
  path = str(tmp_path / 'vocab.json')
  with open(path, 'w') as f:
    json.dump({str(i): f'p{i}' for i in (9, 4, 30, 7)}, f)
  np.testing.assert_array_equal(
      recycling.recycling_vocabulary(vocab_file=path, num_words=2, word_offset=1), [7, 9]
  )


# ------------------------------------------------------------------------------- rotated pair


def _tiny_params(seed):
  config = t5.get_config('tiny')
  module = t5.EncoderDecoder(config)
  x = jnp.ones((1, 4), jnp.int32)
  params = jax.device_get(module.init(jax.random.PRNGKey(seed), x, x, x, enable_dropout=False))
  flat = params_lib.flatten_params(params['params'])
  for name in flat:
    if name.endswith('/scale'):  # RMSNorm commutes with a rotation only with equal scales
      flat[name] = np.ones_like(flat[name])
  return config, {k: np.asarray(v, np.float64) for k, v in flat.items()}


def _rotate(flat, q):
  out = {}
  for name, w in flat.items():
    if name == 'token_embedder/embedding':
      out[name] = w @ q
    elif name.endswith(('out/kernel', 'wo/kernel')):
      out[name] = w @ q
    elif name.endswith('kernel'):
      out[name] = q.T @ w
    else:
      out[name] = w
  return out


@pytest.fixture(scope='module')
def rotated():
  config, source = _tiny_params(0)
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(config.emb_dim, config.emb_dim)))
  target = _rotate(source, q)
  prompt = rng.normal(size=(5, config.emb_dim))
  return config, source, target, q, prompt


def _logits(config, flat, prompt):
  module = prompted.PromptEncoderDecoder(config, prompt_length=prompt.shape[0])
  params = dict(flat, **{'encoder/prompt/prompt/prompt': prompt})
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float32), params_lib.unflatten_params(params)
  )
  rng = np.random.default_rng(2)
  enc = jnp.asarray(rng.integers(3, 128, size=(3, 9)), jnp.int32)
  dec = jnp.asarray(rng.integers(3, 128, size=(3, 6)), jnp.int32)
  return np.asarray(module.apply({'params': params}, enc, dec, dec, enable_dropout=False))


def test_v2v_lin_recovers_an_orthogonal_transform_and_the_logits(rotated):
  config, source, target, q, prompt = rotated
  s, t = source['token_embedder/embedding'], target['token_embedder/embedding']
  np.testing.assert_allclose(recycling.fit_v2v_lin(s, t), q, atol=1e-6)
  expected = _logits(config, source, prompt)
  for name in ('v2v-lin', 'lin-comb'):
    recycled = recycling.recycle(prompt, s, t, name)
    got = _logits(config, target, recycled)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=name)
  # The unrecycled prompt does not work on the target (the check above is not vacuous).
  assert np.abs(_logits(config, target, prompt) - expected).max() > 1e-2


@pytest.mark.slow
def test_command_line_recycles_a_library_prompt_and_evaluates_it(rotated, tmp_path):
  config, source, target, _, prompt = rotated
  paths = {}
  for name, flat in (('source', source), ('target', target)):
    paths[name] = str(tmp_path / name / 'checkpoint_0')
    t5x_format.save(
        paths[name],
        params_lib.unflatten_params({k: v.astype(np.float32) for k, v in flat.items()}),
        0,
    )
  lib_dir = str(tmp_path / 'lib')
  library.Library(lib_dir).add(
      'p', prompt.astype(np.float32), {'task': 'tiny_count'}, backbone=paths['source']
  )
  vocab_file = str(tmp_path / 'all.json')
  with open(vocab_file, 'w') as f:
    json.dump({str(i): '' for i in range(config.vocab_size)}, f)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO, os.path.join(REPO, 'tests', 'runtime'), env.get('PYTHONPATH', '')]
  )
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'prompt_tuning.recycle',
          '--prompt=library:p',
          f'--source={paths["source"]}',
          f'--target={paths["target"]}',
          '--recycler=v2v-lin',
          f'--vocab_file={vocab_file}',
          '--word_offset=0',
          f'--num_words={config.vocab_size}',
          '--output=library:p_on_target',
          f'--library={lib_dir}',
          '--eval_task=tiny_count',
          '--eval_module=tiny_task',
          '--class_labels=one,two,three',
          '--input_length=24',
      ],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.split('RESULTS ', 1)[1].splitlines()[0])
  assert results['recycled'] == results['source']
  assert set(results) == {'source', 'recycled', 'target_zero_shot'}
  entry = library.Library(lib_dir).get('p_on_target', backbone=paths['target'])
  assert entry.metadata['method'] == 'recycled/v2v-lin'
  np.testing.assert_allclose(
      entry.array,
      recycling.recycle(
          prompt.astype(np.float32),
          source['token_embedder/embedding'].astype(np.float32),
          target['token_embedder/embedding'].astype(np.float32),
      ),
      atol=1e-5,
  )
  # The source prompt is refused on the target backbone.
  bad = subprocess.run(
      [
          sys.executable,
          '-m',
          'prompt_tuning.recycle',
          '--prompt=library:p',
          f'--source={paths["target"]}',
          f'--target={paths["source"]}',
          f'--library={lib_dir}',
      ],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert bad.returncode == 1 and 'BackboneMismatchError' in bad.stderr
