"""Merging: every rule against a float64 numpy transcription of its paper's formula (and TIES also
against a torch transcription of `prateeky2806/ties-merging`'s `merge_utils`), the streaming readers
and writer against in-memory merges, and the peak memory of a merge against the checkpoints' size.
"""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from prompt_tuning import library
from prompt_tuning.checkpoints import formats
from prompt_tuning.checkpoints import t5x_format
from prompt_tuning.methods import merging

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {'a/kernel': (7, 5), 'b/scale': (11,), 'c/kernel': (3, 4, 2)}


def _tree(rng, scale=1.0, shapes=SHAPES):
  return {n: (scale * rng.normal(size=s)).astype(np.float64) for n, s in shapes.items()}


def _models(seed=0, n=3):
  rng = np.random.default_rng(seed)
  base = _tree(rng)
  models = [{k: v + _tree(rng, 0.1)[k] for k, v in base.items()} for _ in range(n)]
  return base, models


def _flat(tree):
  from prompt_tuning import params as params_lib

  return params_lib.flatten_params(tree)


def _concat(trees):
  return np.concatenate([np.asarray(trees[n], np.float64).reshape(-1) for n in SHAPES])


def _split(vec):
  out, i = {}, 0
  for n, s in SHAPES.items():
    size = int(np.prod(s))
    out[n] = vec[i : i + size].reshape(s)
    i += size
  return out


def _close(actual, expected, tol=1e-6):
  actual = _flat(actual)
  assert set(actual) == set(expected)
  for n in expected:
    np.testing.assert_allclose(actual[n], expected[n], rtol=tol, atol=tol, err_msg=n)


# ------------------------------------------------------------------------------- formula oracles


def test_task_arithmetic_and_average_equal_their_formulas():
  base, models = _models()
  lam = 0.8
  expected = {n: base[n] + lam * sum(m[n] - base[n] for m in models) for n in SHAPES}
  _close(merging.merge(merging.MergeConfig('task_arithmetic', scale=lam), models, base), expected)
  neg = {n: base[n] - 0.5 * (models[0][n] - base[n]) for n in SHAPES}
  _close(merging.merge(merging.MergeConfig('task_arithmetic', scale=-0.5), models[:1], base), neg)
  w = [0.2, 0.5, 0.3]
  avg = {n: sum(wi * m[n] for wi, m in zip(w, models)) / sum(w) for n in SHAPES}
  _close(merging.merge(merging.MergeConfig('average', weights=w), models), avg)
  uniform = {n: np.mean([m[n] for m in models], axis=0) for n in SHAPES}
  _close(merging.merge(merging.MergeConfig('average'), models), uniform)


def _ties_numpy(taus, density, lam, base_vec):
  """The four steps of TIES (methods.md §9b) on concatenated float64 task vectors [T, d]."""
  t, d = taus.shape
  keep = int(np.floor(d * density))
  j = d - keep
  trimmed = np.zeros_like(taus)
  for i in range(t):
    thr = np.sort(np.abs(taus[i]))[j - 1]
    trimmed[i] = np.where(np.abs(taus[i]) >= thr, taus[i], 0.0)
  gamma = np.sign(trimmed.sum(axis=0))
  gamma[gamma == 0] = np.sign(gamma.sum())
  agree = np.where(gamma > 0, trimmed > 0, trimmed < 0)
  selected = trimmed * agree
  tau_m = selected.sum(axis=0) / np.maximum((selected != 0).sum(axis=0), 1)
  return base_vec + lam * tau_m


def _ties_torch(taus, density, lam, base_vec):
  """`ties_merging` of prateeky2806/ties-merging (topk_values_mask, resolve_sign, disjoint_merge)."""
  import torch

  m = torch.tensor(taus, dtype=torch.float64)
  n, d = m.shape
  k = d - int(d * density)
  kth, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
  updated = m * (m.abs() >= kth)
  sign = torch.sign(updated.sum(dim=0))
  sign[sign == 0] = torch.sign(sign.sum())
  rows = torch.where(sign.unsqueeze(0) > 0, updated > 0, updated < 0)
  selected = updated * rows
  counts = (selected != 0).sum(dim=0).double()
  merged = selected.sum(dim=0) / torch.clamp(counts, min=1)
  return base_vec + lam * merged.numpy()


def _tied_models():
  """Task vectors with exact ties at the thresholds, a coordinate trimmed to 0 in every task and a
  coordinate whose trimmed values cancel (sign 0 -> the majority sign)."""
  base, models = _models(seed=3)
  # Dyadic values, so θ_t − θ₀ recomputed by the merge is exactly τ (and ties stay ties).
  bvec = np.round(_concat(base) * 64) / 64
  base = _split(bvec)
  taus = np.stack([_concat(m) - bvec for m in models])
  taus = np.round(taus * 16) / 16  # many equal magnitudes, so ties at the threshold
  taus[:, 0] = 2.0**-30  # trimmed everywhere (unless density ~1): the merge must leave θ₀
  taus[0, 1], taus[1, 1], taus[2, 1] = 3.0, -3.0, 0.0  # sum 0: elected by the majority sign
  models = [_split(bvec + t) for t in taus]
  return base, models, bvec, taus


@pytest.mark.parametrize('density', [0.2, 0.5, 0.9])
def test_ties_equals_numpy_and_the_reference_code(density):
  base, models, bvec, taus = _tied_models()
  lam = 1.3
  got = merging.merge(merging.MergeConfig('ties', density=density, scale=lam), models, base)
  got_vec = _concat(_flat(got))
  expected = _ties_numpy(taus, density, lam, bvec)
  np.testing.assert_allclose(got_vec, expected, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(_ties_torch(taus, density, lam, bvec), expected, atol=1e-12)
  if density < 0.9:
    assert got_vec[0] == bvec[0]


def test_ties_keeps_floor_dk_plus_one_on_the_reference_toy_vector():
  # methods.md: d=10, K=0.2 keeps 3 entries (the off-by-one of the reference code).
  tau = np.arange(1.0, 11.0)
  base = {'a/kernel': np.zeros(10)}
  merged = merging.merge(merging.MergeConfig('ties', density=0.2), [{'a/kernel': tau}], base)
  assert np.count_nonzero(_flat(merged)['a/kernel']) == 3


def test_radix_select_is_exact_on_ties_zeros_and_tiny_values():
  rng = np.random.default_rng(0)
  values = np.concatenate(
      [np.abs(rng.normal(size=500)), np.zeros(30), np.full(40, 0.5), [1e-300, 5e-324, 1e300]]
  )
  chunks = np.array_split(rng.permutation(values), 7)
  for k in (1, 2, 31, 50, 250, len(values)):
    sel = merging._RadixSelect(k)  # pylint: disable=protected-access
    while not sel.done:
      for c in chunks:
        sel.add(c)
      sel.finish_pass()
    assert sel.value == np.sort(values)[k - 1], k


def _dare_oracle(base, models, p, seed, rescale=True):
  out = []
  for t, m in enumerate(models):
    tree = {}
    for n in SHAPES:
      tau = m[n] - base[n]
      rng = np.random.default_rng([seed, t, zlib.crc32(n.encode())])
      drop = rng.random(tau.shape) < p
      tau = tau * (1 - drop)
      if rescale:
        tau = tau / (1 - p)
      tree[n] = base[n] + tau
    out.append(tree)
  return out


@pytest.mark.parametrize('rescale', [True, False])
def test_dare_then_task_arithmetic_ties_and_average(rescale):
  base, models = _models(seed=5)
  p, seed = 0.6, 17
  dared = _dare_oracle(base, models, p, seed, rescale)
  cfg = dict(method='dare', drop_rate=p, seed=seed, rescale=rescale)
  ta = {n: base[n] + 0.9 * sum(m[n] - base[n] for m in dared) for n in SHAPES}
  _close(
      merging.merge(
          merging.MergeConfig(**cfg, dare_merge='task_arithmetic', scale=0.9), models, base
      ),
      ta,
  )
  avg = {n: np.mean([m[n] for m in dared], axis=0) for n in SHAPES}
  _close(merging.merge(merging.MergeConfig(**cfg, dare_merge='average'), models, base), avg)
  bvec = _concat(base)
  taus = np.stack([_concat(m) - bvec for m in dared])
  ties = _split(_ties_numpy(taus, 0.3, 1.0, bvec))
  _close(
      merging.merge(merging.MergeConfig(**cfg, dare_merge='ties', density=0.3), models, base), ties
  )


def test_dare_rescaling_preserves_the_expectation():
  base = {'a/kernel': np.zeros((40, 50))}
  tau = np.random.default_rng(1).normal(size=(40, 50))
  runs = [
      _flat(
          merging.merge(
              merging.MergeConfig('dare', drop_rate=0.7, seed=s), [{'a/kernel': tau}], base
          )
      )['a/kernel']
      for s in range(200)
  ]
  kept = np.mean([r != 0 for r in runs])
  assert kept == pytest.approx(0.3, abs=0.01)
  np.testing.assert_allclose(np.mean(runs, axis=0).mean(), tau.mean(), atol=0.02)
  rel = np.abs(np.mean(runs, axis=0) - tau).mean() / np.abs(tau).mean()
  assert rel < 0.15  # 200 draws of a 0.3-Bernoulli rescaled by 1/0.3


def _fisher_oracle(models, fishers, lambdas, floor, favor, normalize):
  if normalize:
    norms = [np.sqrt(sum(np.sum(f[n] ** 2) for n in SHAPES)) for f in fishers]
    lambdas = [l / z for l, z in zip(lambdas, norms)]
  out = {}
  for n in SHAPES:
    lhs = rhs = 0
    for j, (m, f, l) in enumerate(zip(models, fishers, lambdas)):
      diag = np.maximum(f[n], floor) if (not favor or j == 0) else f[n]
      lhs = lhs + l * diag
      rhs = rhs + l * diag * m[n]
    out[n] = rhs / lhs
  return out


@pytest.mark.parametrize('favor,normalize', [(True, True), (False, False), (True, False)])
def test_fisher_merge_equals_its_formula(favor, normalize):
  _, models = _models(seed=7, n=2)
  rng = np.random.default_rng(8)
  fishers = [
      {n: rng.gamma(0.5, size=s) * (rng.random(s) > 0.3) for n, s in SHAPES.items()} for _ in models
  ]
  lam = [0.7, 0.3]
  cfg = merging.MergeConfig('fisher', weights=lam, favor_target=favor, normalize_fishers=normalize)
  got = merging.merge(cfg, models, fishers=fishers)
  _close(got, _fisher_oracle(models, fishers, lam, 1e-6, favor, normalize))
  # Equal (constant) Fishers reduce it to the weighted average.
  const = [{n: np.full(s, 2.0) for n, s in SHAPES.items()} for _ in models]
  cfg = merging.MergeConfig('fisher', weights=lam, normalize_fishers=False)
  avg = {n: 0.7 * models[0][n] + 0.3 * models[1][n] for n in SHAPES}
  _close(merging.merge(cfg, models, fishers=const), avg)


def test_per_example_fisher_of_a_softmax_classifier_is_the_analytic_one():
  import jax
  import jax.numpy as jnp

  jax.config.update('jax_enable_x64', True)
  try:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3))
    xs = rng.normal(size=(6, 3))
    ys = rng.integers(0, 4, size=6)

    def log_probs(params, x):
      return jax.nn.log_softmax(params['w'] @ x)

    got = merging.per_example_fisher(log_probs, {'w': jnp.asarray(w)}, jnp.asarray(xs))
    expected = np.zeros_like(w)
    empirical = np.zeros_like(w)
    for x, y in zip(xs, ys):
      z = w @ x
      p = np.exp(z - z.max())
      p /= p.sum()
      for c in range(4):
        grad = np.outer(np.eye(4)[c] - p, x)  # d log p_c / dW
        expected += p[c] * grad**2
        if c == y:
          empirical += grad**2
    np.testing.assert_allclose(np.asarray(got['w']), expected, rtol=1e-10)
    got_emp = merging.per_example_fisher(
        lambda params, ex: log_probs(params, ex[0])[ex[1]],
        {'w': jnp.asarray(w)},
        (jnp.asarray(xs), jnp.asarray(ys)),
        expected=False,
    )
    np.testing.assert_allclose(np.asarray(got_emp['w']), empirical, rtol=1e-10)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_greedy_soup_replays_the_reference_loop():
  rng = np.random.default_rng(4)
  target = _tree(rng)
  ingredients = [{n: target[n] + _tree(rng, s)[n] for n in SHAPES} for s in (0.5, 2.0, 0.4, 0.6)]

  def score(source):
    return -sum(float(np.sum((source.read(n) - target[n]) ** 2)) for n in SHAPES)

  result = merging.greedy_soup(ingredients, score)
  # Replay: descending scores, running mean of the kept ones, strict improvement.
  scores = [score(merging.DictSource(m)) for m in ingredients]
  order = list(np.argsort(scores, kind='stable')[::-1])
  kept, best = [order[0]], scores[order[0]]
  for i in order[1:]:
    cand = {n: np.mean([ingredients[j][n] for j in kept + [i]], axis=0) for n in SHAPES}
    s = score(merging.DictSource(cand))
    if s > best:
      kept, best = kept + [i], s
  assert result.order == order and result.accepted == kept and 1 in order
  assert result.soup_score == pytest.approx(best, rel=1e-12)
  mean = {n: np.mean([ingredients[j][n] for j in kept], axis=0) for n in SHAPES}
  _close({n: result.soup.read(n) for n in SHAPES}, mean, tol=1e-12)
  # Equal scores: the later ingredient comes first; an equal candidate score is rejected.
  same = merging.greedy_soup(ingredients[:3], lambda s: 1.0, scores=[1.0, 1.0, 1.0])
  assert same.order == [2, 1, 0] and same.accepted == [2]


def test_bad_inputs_give_clear_errors():
  base, models = _models()
  with pytest.raises(merging.MergeError, match='--base'):
    merging.Merger(merging.MergeConfig('ties'), models)
  with pytest.raises(merging.MergeError, match='one Fisher per model'):
    merging.Merger(merging.MergeConfig('fisher'), models, fishers=models[:1])
  broken = dict(models[1])
  broken.pop('b/scale')
  with pytest.raises(merging.MergeError, match='lacks 1 parameter'):
    merging.Merger(merging.MergeConfig('task_arithmetic'), [models[0], broken], base)
  wrong = dict(models[1], **{'b/scale': np.zeros(3)})
  with pytest.raises(merging.MergeError, match="'b/scale' has shape"):
    merging.merge(merging.MergeConfig('task_arithmetic'), [wrong], base)


def test_excluded_and_integer_parameters_come_from_the_base():
  base, models = _models()
  base['step'] = np.array([3, 4], np.int32)
  for m in models:
    m['step'] = np.array([9, 9], np.int32)
  cfg = merging.MergeConfig('task_arithmetic', exclude=['a/.*'])
  got = _flat(merging.merge(cfg, models, base))
  np.testing.assert_array_equal(got['step'], base['step'])
  np.testing.assert_array_equal(got['a/kernel'], base['a/kernel'])
  assert not np.allclose(got['b/scale'], base['b/scale'])


# ------------------------------------------------------------------------------- streaming


def _save_t5x(root, name, tree):
  from prompt_tuning import params as params_lib

  path = os.path.join(root, name, 'checkpoint_0')
  t5x_format.save(
      path, params_lib.unflatten_params({k: np.asarray(v, np.float32) for k, v in tree.items()}), 0
  )
  return path


def _run_merge(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run(
      [sys.executable, '-m', 'prompt_tuning.merge', *args],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


def test_streamed_t5x_merge_equals_the_in_memory_merge(tmp_path):
  base, models = _models(seed=11)
  f32 = lambda t: {k: v.astype(np.float32) for k, v in t.items()}
  paths = [_save_t5x(str(tmp_path), f'm{i}', m) for i, m in enumerate(models)]
  base_path = _save_t5x(str(tmp_path), 'base', base)
  out = str(tmp_path / 'merged')
  proc = _run_merge(
      '--method=ties',
      '--density=0.3',
      '--scale=1.1',
      f'--base={base_path}',
      f'--models={",".join(paths)}',
      f'--output={out}',
  )
  assert proc.returncode == 0, proc.stderr
  expected = merging.merge(
      merging.MergeConfig('ties', density=0.3, scale=1.1), [f32(m) for m in models], f32(base)
  )
  got = formats.load_params(out)
  _close(got, _flat(expected), tol=0)
  again = _run_merge(
      '--method=ties', f'--base={base_path}', f'--models={paths[0]}', f'--output={out}'
  )
  assert again.returncode == 1 and '--overwrite' in again.stderr


def test_huggingface_and_orbax_sources_read_what_load_params_reads(tmp_path):
  import jax
  from prompt_tuning.architectures import t5
  from prompt_tuning.checkpoints import huggingface
  from prompt_tuning.runtime import checkpoints as runtime_checkpoints

  config = t5.get_config('tiny')
  module = t5.EncoderDecoder(config)
  x = np.ones((1, 4), np.int32)
  params = jax.device_get(module.init(jax.random.PRNGKey(0), x, x, x, enable_dropout=False))
  params = params['params']
  hf_dir = str(tmp_path / 'hf')
  huggingface.save_t5(hf_dir, config, params)
  source = merging.CheckpointSource(hf_dir)
  expected = _flat(formats.load_params(hf_dir))
  assert sorted(source.names()) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(source.read(name), expected[name], err_msg=name)

  class State:  # the two things save_checkpoint reads from a train state
    step = np.asarray(5)

    def state_dict(self):
      return {'step': self.step, 'trainable': params, 'opt_state': {}}

  model_dir = str(tmp_path / 'orbax')
  runtime_checkpoints.save_checkpoint(model_dir, State())
  source = merging.CheckpointSource(model_dir)
  assert sorted(source.names()) == sorted(expected)
  name = 'decoder/layers_0/mlp/wo/kernel'
  np.testing.assert_array_equal(source.read(name), _flat(params)[name])


def test_prompts_of_one_backbone_merge_into_a_library_entry(tmp_path):
  lib_dir = str(tmp_path / 'lib')
  lib = library.Library(lib_dir)
  emb = {0: np.random.default_rng(0).normal(size=(32, 4)), 1: np.ones((32, 4))}
  rng = np.random.default_rng(1)
  prompts = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
  for i, p in enumerate(prompts):
    lib.add(f'p{i}', p, {'task': 't'}, backbone=emb[0] if i < 2 else emb[1])
  proc = _run_merge(
      '--method=average',
      '--models=library:p0,library:p1',
      '--weights=1,3',
      '--output=library:avg',
      f'--library={lib_dir}',
  )
  assert proc.returncode == 0, proc.stderr
  entry = lib.get('avg', backbone=emb[0])
  np.testing.assert_allclose(entry.array, (prompts[0] + 3 * prompts[1]) / 4, rtol=1e-6)
  assert entry.metadata['merged_from'] == ['library:p0', 'library:p1']
  bad = _run_merge(
      '--method=average',
      '--models=library:p0,library:p2',
      f'--output={tmp_path / "x.npy"}',
      f'--library={lib_dir}',
  )
  assert bad.returncode == 1 and 'one backbone' in bad.stderr
  assert str(library.backbone_fingerprint(emb[1])) in bad.stderr


@pytest.mark.slow
def test_merging_large_checkpoints_stays_within_a_few_parameters_of_memory(tmp_path):
  """Three ~100 MB float32 checkpoints (25 parameters of 4 MiB) are merged with TIES (six passes)
  and task arithmetic; the merge process's peak RSS above its RSS after imports must stay under
  24 parameters (96 MiB), a third of the inputs' 300 MB (a merge holding the three checkpoints
  would need 75 parameters, and 100 with its output)."""
  n_params, shape = 25, (1024, 1024)
  param_bytes = 4 * int(np.prod(shape))
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    tree = {f'layers_{j}/kernel': rng.standard_normal(shape, np.float32) for j in range(n_params)}
    paths.append(_save_t5x(str(tmp_path), f'ckpt{i}', tree))
    del tree
  total = 3 * n_params * param_bytes
  results = {}
  for method in ('task_arithmetic', 'ties'):
    out = str(tmp_path / f'merged_{method}')
    proc = _run_merge(
        f'--method={method}',
        f'--base={paths[0]}',
        f'--models={paths[1]},{paths[2]}',
        f'--output={out}',
        '--report_memory',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads(proc.stdout.split('MEMORY ', 1)[1].splitlines()[0])
    results[method] = memory['peak_rss'] - memory['baseline_rss']
    # The output is the merge of those checkpoints (checked on one parameter).
    name = 'layers_7/kernel'
    got = formats.load_params(out, variables=[name])['layers_7']['kernel']
    sources = [merging.CheckpointSource(p) for p in paths]
    cfg = merging.MergeConfig(method, density=0.2)
    if method == 'task_arithmetic':
      b = sources[0].read(name).astype(np.float64)
      expected = b + sum(s.read(name).astype(np.float64) - b for s in sources[1:])
      np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    del cfg
  print(f'peak RSS above baseline: {results} (params of {param_bytes} bytes, inputs {total})')
  for method, extra in results.items():
    assert extra < 24 * param_bytes, (method, extra, total)
