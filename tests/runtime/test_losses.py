"""Losses against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.runtime import losses

SLNF = losses.SpecialLossNormalizingFactor


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  lse = m + np.log(np.exp(x - m).sum(-1, keepdims=True))
  return x - lse, lse[..., 0]


def _np_weighted_ce(logits, targets, weights=None, label_smoothing=0.0, z_loss=0.0, lnf=None):
  vocab = logits.shape[-1]
  logp, lse = _np_log_softmax(logits)
  on = 1.0 - label_smoothing
  off = label_smoothing / (vocab - 1)
  soft = np.full(logits.shape, off)
  np.put_along_axis(soft, targets[..., None], on, axis=-1)
  # Entropy of the smoothed target distribution (0 without smoothing).
  entropy = -(on * np.log(on) + (vocab - 1) * off * np.log(off + 1e-20))
  ce = -(soft * logp).sum(-1) - entropy
  zl = z_loss * lse**2
  loss = ce + zl
  if weights is None:
    weights = np.ones(targets.shape)
  loss, zl = loss * weights, zl * weights
  if lnf is not None:
    loss, zl = loss / lnf, zl / lnf
  return loss.sum(), zl.sum(), weights.sum()


@pytest.fixture(scope='module')
def data():
  rng = np.random.RandomState(0)
  logits = (3 * rng.normal(size=(3, 5, 11))).astype(np.float32)
  targets = rng.randint(0, 11, size=(3, 5)).astype(np.int32)
  weights = (rng.uniform(size=(3, 5)) > 0.3).astype(np.float32)
  return logits, targets, weights


def test_cross_entropy_with_logits_values(data):
  logits, targets, _ = data
  onehot = np.eye(11, dtype=np.float32)[targets]
  loss, zl = losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(onehot), 1e-2)
  logp, lse = _np_log_softmax(logits)
  ref_ce = -(onehot * logp).sum(-1)
  np.testing.assert_allclose(zl, 1e-2 * lse**2, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_ce + 1e-2 * lse**2, rtol=1e-5)
  assert loss.shape == (3, 5)


def test_cross_entropy_large_logits_are_stable():
  logits = jnp.asarray([[1000.0, 0.0, -1000.0]])
  loss, _ = losses.cross_entropy_with_logits(logits, jnp.asarray([[0.0, 1.0, 0.0]]), 0.0)
  np.testing.assert_allclose(loss, [1000.0], rtol=1e-6)


@pytest.mark.parametrize('z_loss', [0.0, 1e-4, 0.1])
def test_custom_vjp_matches_autodiff_of_plain_implementation(data, z_loss):
  logits, targets, weights = data
  rng = np.random.RandomState(1)
  soft = rng.dirichlet(np.ones(11), size=(3, 5)).astype(np.float32)
  w = jnp.asarray(weights * np.arange(1, 6, dtype=np.float32))

  def plain(lg, tg):
    logp = jax.nn.log_softmax(lg)
    lse = jax.scipy.special.logsumexp(lg, axis=-1)
    return jnp.sum((-(tg * logp).sum(-1) + z_loss * lse**2) * w)

  def custom(lg, tg):
    loss, _ = losses.cross_entropy_with_logits(lg, tg, z_loss)
    return jnp.sum(loss * w)

  args = (jnp.asarray(logits), jnp.asarray(soft))
  got = jax.grad(custom, argnums=(0, 1))(*args)
  want = jax.grad(plain, argnums=(0, 1))(*args)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  # Explicit formula: (1 + 2 z logZ) softmax - targets.
  _, lse = _np_log_softmax(logits)
  sm = jax.nn.softmax(args[0])
  formula = ((1 + 2 * z_loss * lse)[..., None] * sm - soft) * np.asarray(w)[..., None]
  np.testing.assert_allclose(got[0], formula, rtol=1e-5, atol=1e-6)
  # Under jit too.
  got_jit = jax.jit(jax.grad(custom))(*args)
  np.testing.assert_allclose(got_jit, got[0], rtol=1e-6, atol=1e-7)


def test_z_loss_output_has_no_gradient(data):
  logits, targets, _ = data
  onehot = jnp.asarray(np.eye(11, dtype=np.float32)[targets])
  g = jax.grad(lambda lg: jnp.sum(losses.cross_entropy_with_logits(lg, onehot, 0.5)[1]))(
      jnp.asarray(logits)
  )
  np.testing.assert_array_equal(g, np.zeros_like(logits))


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
@pytest.mark.parametrize('z_loss', [0.0, 1e-4])
@pytest.mark.parametrize('use_weights', [False, True])
@pytest.mark.parametrize('lnf', [None, 7.5])
def test_compute_weighted_cross_entropy(data, label_smoothing, z_loss, use_weights, lnf):
  logits, targets, weights = data
  w = weights if use_weights else None
  loss, zl, wsum = losses.compute_weighted_cross_entropy(
      jnp.asarray(logits),
      jnp.asarray(targets),
      None if w is None else jnp.asarray(w),
      label_smoothing=label_smoothing,
      z_loss=z_loss,
      loss_normalizing_factor=lnf,
  )
  ref = _np_weighted_ce(logits, targets, w, label_smoothing, z_loss, lnf)
  np.testing.assert_allclose(loss, ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(zl, ref[1], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(wsum, ref[2])
  if not use_weights:
    assert int(wsum) == 15


def test_label_smoothing_perfect_prediction_is_zero():
  # Logits equal to log of the smoothed target distribution -> loss 0.
  vocab, ls = 5, 0.2
  soft = np.full((1, 1, vocab), ls / (vocab - 1))
  soft[0, 0, 2] = 1 - ls
  loss, _, _ = losses.compute_weighted_cross_entropy(
      jnp.asarray(np.log(soft), jnp.float32), jnp.asarray([[2]]), label_smoothing=ls
  )
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_compute_weighted_cross_entropy_errors(data):
  logits, targets, _ = data
  with pytest.raises(ValueError, match='Incorrect shapes'):
    losses.compute_weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets[0]))
  with pytest.raises(ValueError, match='get_loss_normalizing_factor'):
    losses.compute_weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), loss_normalizing_factor='NUM_REAL_TARGET_TOKENS'
    )


def test_convert_special_loss_normalizing_factor_to_enum():
  for m in SLNF:
    assert losses.convert_special_loss_normalizing_factor_to_enum(m.name) is m
    assert losses.convert_special_loss_normalizing_factor_to_enum(m.name.lower()) is m
  assert losses.convert_special_loss_normalizing_factor_to_enum(
      'SpecialLossNormalizingFactor.AVERAGE_PER_SEQUENCE'
  ) is (SLNF.AVERAGE_PER_SEQUENCE)
  with pytest.raises(ValueError, match='NUM_REAL_TARGET_TOKENS'):
    losses.convert_special_loss_normalizing_factor_to_enum('per_token')


@pytest.fixture(scope='module')
def batch():
  targets = np.array([[5, 3, 1, 0, 0], [7, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
  weights = np.array([[1, 1, 1, 0, 0], [1, 0.5, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  return targets, weights


def test_lnf_passthrough(batch):
  targets, weights = batch
  b = {'decoder_target_tokens': targets, 'decoder_loss_weights': weights}
  f, w = losses.get_loss_normalizing_factor_and_weights(None, b)
  assert f is None and w is weights
  f, w = losses.get_loss_normalizing_factor_and_weights(233472.0, b)
  assert f == 233472.0 and w is weights
  f, w = losses.get_loss_normalizing_factor_and_weights(3.0, {'decoder_target_tokens': targets})
  assert f == 3.0 and w is None


@pytest.mark.parametrize('form', ['enum', 'str', 'lower'])
def test_lnf_num_real_and_total(batch, form):

  def conv(m):
    return {'enum': m, 'str': m.name, 'lower': m.name.lower()}[form]

  targets, weights = batch
  b = {'decoder_target_tokens': targets, 'decoder_loss_weights': weights}
  f, w = losses.get_loss_normalizing_factor_and_weights(conv(SLNF.NUM_REAL_TARGET_TOKENS), b)
  np.testing.assert_allclose(f, weights.sum())  # 4.5: the weight sum
  np.testing.assert_array_equal(w, weights)
  # Without explicit weights: non-padding targets.
  f, w = losses.get_loss_normalizing_factor_and_weights(
      conv(SLNF.NUM_REAL_TARGET_TOKENS), {'decoder_target_tokens': targets}
  )
  np.testing.assert_allclose(f, 5.0)
  np.testing.assert_array_equal(w, (targets > 0).astype(np.float32))
  f, w = losses.get_loss_normalizing_factor_and_weights(conv(SLNF.NUM_TOTAL_TARGET_TOKENS), b)
  assert f == 15
  np.testing.assert_array_equal(w, weights)


@pytest.mark.parametrize('form', ['enum', 'str'])
def test_lnf_average_per_sequence(batch, form):
  targets, weights = batch
  lnf = SLNF.AVERAGE_PER_SEQUENCE if form == 'enum' else 'AVERAGE_PER_SEQUENCE'
  b = {'decoder_target_tokens': targets, 'decoder_loss_weights': weights}
  f, w = losses.get_loss_normalizing_factor_and_weights(lnf, b)
  sums = weights.sum(-1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    ref_w = np.nan_to_num(weights / sums, nan=0.0, posinf=0.0, neginf=0.0)
  np.testing.assert_allclose(w, ref_w, rtol=1e-6)
  # Factor = sum of the new weights = number of sequences with any weight.
  np.testing.assert_allclose(f, 2.0, rtol=1e-6)
  # The resulting loss is the mean over sequences of per-sequence means.
  rng = np.random.RandomState(3)
  logits = rng.normal(size=targets.shape + (9,)).astype(np.float32)
  loss, _, _ = losses.compute_weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), w, loss_normalizing_factor=f
  )
  logp, _ = _np_log_softmax(logits)
  tok = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  per_seq = [(tok[i] * weights[i]).sum() / weights[i].sum() for i in range(2)]
  np.testing.assert_allclose(loss, np.mean(per_seq), rtol=1e-5)


def test_lnf_average_per_sequence_packed():
  # Row 0 packs two sequences (segments 1, 2) and padding; row 1 one sequence.
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
  pos = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]], np.int32)
  targets = np.where(seg > 0, 4, 0).astype(np.int32)
  weights = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]], np.float32)
  b = {
      'decoder_target_tokens': targets,
      'decoder_loss_weights': weights,
      'decoder_segment_ids': seg,
      'decoder_positions': pos,
  }
  f, w = losses.get_loss_normalizing_factor_and_weights('AVERAGE_PER_SEQUENCE', b)
  ref = np.zeros_like(weights)
  for r in range(2):
    for s in set(seg[r]) - {0}:
      m = seg[r] == s
      ref[r, m] = weights[r, m] / weights[r, m].sum()
  np.testing.assert_allclose(w, ref, rtol=1e-6)
  np.testing.assert_allclose(f, 3.0, rtol=1e-6)


def test_lnf_jittable(batch):
  targets, weights = batch

  @jax.jit
  def fn(t, w):
    return losses.get_loss_normalizing_factor_and_weights(
        'NUM_REAL_TARGET_TOKENS', {'decoder_target_tokens': t, 'decoder_loss_weights': w}
    )

  f, _ = fn(targets, weights)
  np.testing.assert_allclose(f, 4.5)
