"""Tests for prompt_tuning.runtime.decoding against plain-python references.

The toy model is a "bigram + running state" language model whose logits depend
on the current token, a running sum of all tokens fed so far (kept in the
cache as a token history), the position (the cache index), a per-example
"encoder" vector (a batch-carrying cache leaf) and a shared `cached_bias`.
Wrong beam expansion or cache gathering therefore changes the results, and the
shared leaves are checked to keep their shapes.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.runtime import decoding

EOS = 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class ToyLM:
  """Tiny autoregressive model with a batch-carrying cache.

  logits(next | fed tokens x_0..x_t) = bigram[x_t] + running[sum(x) % mod]
    + position[t] + encoded[b] + bias.
  """

  def __init__(
      self,
      vocab: int,
      batch: int,
      max_len: int,
      seed: int = 0,
      eos_shift: float = 0.0,
      scale: float = 1.5,
      mod: int = 3,
      offset: int = 0,
  ):
    rng = np.random.RandomState(seed)
    self.vocab, self.batch, self.mod, self.offset = vocab, batch, mod, offset
    self.hist_len = 2 * max_len + 4
    self.bigram = (rng.randn(vocab, vocab) * scale).astype(np.float32)
    self.running = (rng.randn(mod, vocab) * scale).astype(np.float32)
    self.position = (rng.randn(self.hist_len, vocab) * 0.5).astype(np.float32)
    self.encoded = (rng.randn(batch, vocab) * scale).astype(np.float32)
    self.bias = (rng.randn(vocab) * 0.5).astype(np.float32)
    self.bias[EOS] += eos_shift

  def _stack(self, x: np.ndarray) -> jnp.ndarray:
    """Adds a leading 'scanned layers' axis when offset == 1."""
    x = jnp.asarray(x)
    return jnp.stack([x, x]) if self.offset else x

  def init_cache(self, inputs=None, initial_index=None):
    """Fresh cache, or one prefilled with `inputs[b, :initial_index[b]]`."""
    hist = np.zeros((self.batch, self.hist_len), np.int32)
    if initial_index is None:
      index = jnp.array(0, jnp.int32)
    else:
      for b, n in enumerate(np.asarray(initial_index)):
        hist[b, :n] = np.asarray(inputs)[b, :n]
      index = jnp.asarray(initial_index, jnp.int32)
    return {
        'decoder': {
            'layers_0': {
                'self_attention': {
                    'cached_key': self._stack(hist),
                    'cache_index': index,
                },
                'relpos_bias': {'cached_bias': jnp.asarray(self.bias[None, :])},
            },
            'encoded': self._stack(self.encoded),
        }
    }

  def tokens_to_logits(self, state: decoding.DecodingState):
    cache = state.cache['decoder']
    attn = cache['layers_0']['self_attention']
    bias = cache['layers_0']['relpos_bias']['cached_bias']
    # Shared leaves must never be expanded or gathered.
    assert bias.shape == (1, self.vocab), bias.shape
    index = attn['cache_index']
    hist, enc = attn['cached_key'], cache['encoded']
    if self.offset:
      assert hist.shape[0] == 2 and enc.shape[0] == 2
      hist, enc = hist[0], enc[0]
    rows = hist.shape[0]
    assert state.cur_token.shape == (rows, 1), state.cur_token.shape
    assert enc.shape == (rows, self.vocab), enc.shape
    tok = state.cur_token[:, 0]
    if index.ndim == 0:
      hist = jax.lax.dynamic_update_slice(hist, tok[:, None], (0, index))
      pos = jnp.asarray(self.position)[index][None, :]
    else:
      assert index.shape == (rows,), index.shape
      hist = hist.at[jnp.arange(rows), index].set(tok)
      pos = jnp.asarray(self.position)[index]
    running = jnp.sum(hist, axis=1) % self.mod
    logits = (
        jnp.asarray(self.bigram)[tok] + jnp.asarray(self.running)[running] + pos + enc + bias[0]
    )
    new_cache = {
        'decoder': {
            'layers_0': {
                'self_attention': {
                    'cached_key': self._stack(hist),
                    'cache_index': index + 1,
                },
                'relpos_bias': {'cached_bias': bias},
            },
            'encoded': self._stack(enc),
        }
    }
    return logits, new_cache

  # ---- numpy reference -------------------------------------------------------

  def next_log_probs(self, b: int, fed) -> np.ndarray:
    """log p(next | fed) for example b; `fed` starts with BOS 0."""
    t = len(fed) - 1
    logits = (
        self.bigram[fed[-1]].astype(np.float64)
        + self.running[sum(fed) % self.mod]
        + self.position[t]
        + self.encoded[b]
        + self.bias
    )
    return _log_softmax(logits)

  def greedy(self, b: int, length: int, prefix=()):
    """Plain python greedy decoding; returns (tokens [length], log-lik)."""
    fed, out, loglik = [0] + list(prefix), list(prefix), 0.0
    while len(out) < length:
      lp = self.next_log_probs(b, fed)
      tok = int(np.argmax(lp))
      out.append(tok)
      loglik += lp[tok]
      if tok == EOS:
        break
      fed.append(tok)
    return out + [0] * (length - len(out)), loglik

  def sequence_log_lik(self, b: int, tokens, num_forced: int = 0) -> float:
    """Log-likelihood of `tokens` (up to and incl. EOS), skipping the forced.

    Token 0 is an ordinary token for the toy model (it may be generated).
    """
    fed, total = [0], 0.0
    for j, tok in enumerate(tokens):
      if j >= num_forced:
        total += self.next_log_probs(b, fed)[tok]
      if tok == EOS and j >= num_forced:
        break
      fed.append(int(tok))
    return total


def _bp(alpha: float, length: int) -> float:
  return ((5.0 + length) / 6.0) ** alpha


def brute_force_finished(model: ToyLM, b: int, length: int, alpha: float, prefix=()):
  """All EOS-terminated sequences of at most `length` tokens, best first."""
  results = []

  def rec(fed, gen, loglik):
    if len(prefix) + len(gen) >= length:
      return
    lp = model.next_log_probs(b, fed)
    for tok in range(model.vocab):
      if tok == EOS:
        n = len(prefix) + len(gen) + 1
        seq = list(prefix) + gen + [tok]
        results.append((seq + [0] * (length - n), (loglik + lp[tok]) / _bp(alpha, n)))
      else:
        rec(fed + [tok], gen + [tok], loglik + lp[tok])

  rec([0] + list(prefix), [], 0.0)
  results.sort(key=lambda r: -r[1])
  return results


def _zeros_inputs(batch, length):
  return jnp.zeros((batch, length), jnp.int32)


# ------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------


def test_beam_helpers_shapes_and_order():
  x = jnp.arange(6).reshape(2, 3)
  expanded = decoding.flat_batch_beam_expand(x, 2)
  np.testing.assert_array_equal(expanded, [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
  with_beam = decoding.add_beam_dim(x, 2)
  assert with_beam.shape == (2, 2, 3)
  np.testing.assert_array_equal(decoding.flatten_beam_dim(with_beam), expanded)
  np.testing.assert_array_equal(decoding.unflatten_beam_dim(expanded, 2, 2), with_beam)
  # Offset 1 (scanned layers): batch on axis 1.
  y = jnp.arange(12).reshape(2, 3, 2)
  ye = decoding.flat_batch_beam_expand(y, 4, offset=1)
  assert ye.shape == (2, 12, 2)
  np.testing.assert_array_equal(ye[:, 4:8], jnp.repeat(y[:, 1:2], 4, axis=1))


def test_cache_map_skips_shared_leaves():
  cache = {
      'a': {'cached_key': jnp.ones((2, 3)), 'cache_index': jnp.array(0)},
      'b': {'cached_bias': jnp.ones((1, 4, 3, 3))},
      'pos': {'position_embedder_index': jnp.array(5)},
  }
  out = decoding.cache_map(lambda x: decoding.flat_batch_beam_expand(x, 3), cache)
  assert out['a']['cached_key'].shape == (6, 3)
  assert out['a']['cache_index'].shape == ()
  assert out['b']['cached_bias'].shape == (1, 4, 3, 3)
  assert out['pos']['position_embedder_index'].shape == ()
  vec = {'a': {'cache_index': jnp.array([1, 2])}}
  out = decoding.cache_map(
      lambda x: decoding.flat_batch_beam_expand(x, 2), vec, apply_to_index=True
  )
  np.testing.assert_array_equal(out['a']['cache_index'], [1, 1, 2, 2])
  frozen = decoding.cache_map(lambda x: x * 2, flax.core.freeze(cache))
  assert isinstance(frozen, flax.core.FrozenDict)
  assert frozen['a']['cached_key'][0, 0] == 2


def test_gather_beams_one_hot_equals_direct():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 3, 4).astype(np.float32))
  ints = jnp.asarray(rng.randint(0, 100, (2, 3, 5)), jnp.int32)
  idx = jnp.array([[2, 0, 0, 1], [1, 1, 2, 0]])
  a = decoding.gather_beams([x, ints], idx, 2, 3, 4, one_hot=True)
  b = decoding.gather_beams([x, ints], idx, 2, 3, 4, one_hot=False)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(b[0][1, 2], x[1, 2])
  assert a[1].dtype == jnp.int32


def test_topk_and_topp_masks():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
  logits = jnp.asarray(np.log(probs))
  kept = lambda m: set(np.nonzero(np.asarray(m)[0] > -1e6)[0].tolist())
  assert kept(decoding.topp_mask(logits, 0.3)) == {0}
  assert kept(decoding.topp_mask(logits, 0.75)) == {0, 1}
  assert kept(decoding.topp_mask(logits, 0.85)) == {0, 1, 2}
  assert kept(decoding.topp_mask(logits, 0.999)) == {0, 1, 2, 3}
  assert kept(decoding.topp_mask(logits, 0.0)) == {0, 1, 2, 3}
  assert kept(decoding.topk_mask(logits, 2)) == {0, 1}
  assert kept(decoding.topk_mask(logits, 0)) == {0, 1, 2, 3}
  # Traced k gives the same mask.
  traced = jax.jit(decoding.topk_mask)(logits, jnp.array(3))
  assert kept(traced) == {0, 1, 2}


# ------------------------------------------------------------------------------
# Temperature sampling.
# ------------------------------------------------------------------------------

B, L, V = 3, 8, 8


@pytest.fixture(scope='module')
def model():
  return ToyLM(V, B, L, seed=3)


def test_greedy_equals_python_argmax_loop(model):
  seqs, logp = decoding.temperature_sample(
      _zeros_inputs(B, L), model.init_cache(), model.tokens_to_logits, EOS, rescale_log_probs=False
  )
  assert seqs.shape == (B, 1, L) and logp.shape == (B, 1)
  saw_early_eos = False
  for b in range(B):
    ref, loglik = model.greedy(b, L)
    np.testing.assert_array_equal(np.asarray(seqs[b, 0]), ref)
    np.testing.assert_allclose(float(logp[b, 0]), loglik, rtol=1e-4, atol=1e-4)
    if EOS in ref[:-1]:
      saw_early_eos = True
      # Everything after EOS is padding.
      first = ref.index(EOS)
      assert not np.any(np.asarray(seqs[b, 0, first + 1 :]))
  assert saw_early_eos, 'toy model should stop early for some example'
  # With rescaling, greedy log-probs are 0.
  _, logp = decoding.temperature_sample(
      _zeros_inputs(B, L), model.init_cache(), model.tokens_to_logits, EOS
  )
  np.testing.assert_array_equal(np.asarray(logp), 0.0)


def test_tiny_temperature_equals_greedy(model):
  ref = np.stack([model.greedy(b, L)[0] for b in range(B)])
  # Scalar temperature below MIN_TEMPERATURE: greedy whatever topk says.
  seqs, _ = decoding.temperature_sample(
      _zeros_inputs(B, L),
      model.init_cache(),
      model.tokens_to_logits,
      EOS,
      decode_rng=jax.random.PRNGKey(7),
      num_decodes=2,
      temperature=1e-5,
      topk=5,
  )
  for j in range(2):
    np.testing.assert_array_equal(np.asarray(seqs[:, j]), ref)
  # Per-example temperatures: exactly 0, tiny-but-sampled (0.01), 1e-5.
  seqs, _ = decoding.temperature_sample(
      _zeros_inputs(B, L),
      model.init_cache(),
      model.tokens_to_logits,
      EOS,
      decode_rng=jax.random.PRNGKey(8),
      num_decodes=2,
      temperature=jnp.array([0.0, 0.01, 1e-5]),
      topk=0,
  )
  for j in range(2):
    np.testing.assert_array_equal(np.asarray(seqs[:, j]), ref)


def _check_samples(model, seqs, logp, allowed_fn, renorm=True):
  """Checks every sampled token is allowed and log-probs match the reference.

  Returns counts of first tokens per example.
  """
  first_counts = np.zeros((B, V), np.int64)
  seqs, logp = np.asarray(seqs), np.asarray(logp)
  for b in range(B):
    for j in range(seqs.shape[1]):
      fed, total = [0], 0.0
      for t in range(L):
        tok = int(seqs[b, j, t])
        lp = model.next_log_probs(b, fed)
        allowed = allowed_fn(lp)
        assert tok in allowed, (b, j, t, tok, allowed)
        if t == 0:
          first_counts[b, tok] += 1
        sub = np.array(sorted(allowed))
        total += lp[tok] - np.log(np.exp(lp[sub]).sum()) if renorm else lp[tok]
        if tok == EOS:
          assert not np.any(seqs[b, j, t + 1 :])
          break
        fed.append(tok)
      np.testing.assert_allclose(logp[b, j], total, rtol=1e-3, atol=1e-3)
  # Sorted ascending by log-prob.
  assert np.all(np.diff(logp, axis=1) >= 0)
  return first_counts


def _sample_many(model, seeds, **kwargs):
  fn = jax.jit(
      lambda rng: decoding.temperature_sample(
          _zeros_inputs(B, L),
          model.init_cache(),
          model.tokens_to_logits,
          EOS,
          decode_rng=rng,
          num_decodes=32,
          **kwargs,
      )
  )
  outs = [fn(jax.random.PRNGKey(s)) for s in seeds]
  return (
      jnp.concatenate([o[0] for o in outs], axis=1),
      jnp.concatenate([o[1] for o in outs], axis=1),
  )


def test_topk_sampling_stays_in_topk(model):
  k = 3
  seqs, logp = _sample_many(model, (0, 1, 2), topk=k, temperature=1.0)
  # Log-probs are sorted per seed chunk; check each chunk separately.
  allowed = lambda lp: set(np.argsort(-lp)[:k].tolist())
  counts = np.zeros((B, V), np.int64)
  for c in range(3):
    sl = slice(32 * c, 32 * (c + 1))
    counts += _check_samples(model, seqs[:, sl], logp[:, sl], allowed)
  # Statistically: the first-token frequencies follow the renormalized top-k.
  for b in range(B):
    lp = model.next_log_probs(b, [0])
    top = np.argsort(-lp)[:k]
    p = np.exp(lp[top]) / np.exp(lp[top]).sum()
    freq = counts[b, top] / counts[b].sum()
    assert np.all(np.abs(freq - p) < 0.15), (freq, p)
    assert counts[b].sum() == counts[b, top].sum()


def test_topp_sampling_stays_in_nucleus(model):
  p = 0.7

  def nucleus(lp):
    order = np.argsort(-lp)
    probs = np.exp(lp[order])
    before = np.cumsum(probs) - probs
    return set(order[before < p].tolist())

  seqs, logp = _sample_many(model, (3, 4), topk=0, topp=p)
  sizes = []
  for c in range(2):
    sl = slice(32 * c, 32 * (c + 1))
    _check_samples(model, seqs[:, sl], logp[:, sl], nucleus)
  for b in range(B):
    sizes.append(len(nucleus(model.next_log_probs(b, [0]))))
  assert max(sizes) > 1, 'nucleus should not be trivially greedy'
  assert min(sizes) < V


def test_topp_with_topk_raises(model):
  with pytest.raises(ValueError, match='topk'):
    decoding.temperature_sample(
        _zeros_inputs(B, L), model.init_cache(), model.tokens_to_logits, EOS, topk=4, topp=0.9
    )


def test_forced_prefix_is_kept_and_not_scored(model):
  inputs = np.zeros((B, L), np.int32)
  prefixes = [[3, 2], [4], [5, EOS, 6]]  # An EOS inside a prompt: no stop.
  for b, pre in enumerate(prefixes):
    inputs[b, 1 : 1 + len(pre)] = pre
  seqs, logp = decoding.temperature_sample(
      jnp.asarray(inputs),
      model.init_cache(),
      model.tokens_to_logits,
      EOS,
      decode_rng=jax.random.PRNGKey(1),
      num_decodes=4,
      topk=0,
      rescale_log_probs=False,
  )
  seqs, logp = np.asarray(seqs), np.asarray(logp)
  for b, pre in enumerate(prefixes):
    for j in range(4):
      np.testing.assert_array_equal(seqs[b, j, : len(pre)], pre)
      # Something was generated after the prompt.
      assert seqs[b, j, len(pre)] != 0 or len(pre) == L
      ll = model.sequence_log_lik(b, list(seqs[b, j]), num_forced=len(pre))
      np.testing.assert_allclose(logp[b, j], ll, rtol=1e-4, atol=1e-4)
  # Greedy with a prefix equals the python loop with the same prefix.
  seqs, _ = decoding.temperature_sample(
      jnp.asarray(inputs), model.init_cache(), model.tokens_to_logits, EOS
  )
  for b, pre in enumerate(prefixes):
    np.testing.assert_array_equal(np.asarray(seqs[b, 0]), model.greedy(b, L, prefix=pre)[0])


def test_max_decode_steps(model):
  inputs = np.zeros((B, L), np.int32)
  inputs[:, 1] = 3
  seqs, _ = decoding.temperature_sample(
      jnp.asarray(inputs), model.init_cache(), model.tokens_to_logits, EOS, max_decode_steps=2
  )
  for b in range(B):
    ref = model.greedy(b, L, prefix=[3])[0]
    np.testing.assert_array_equal(np.asarray(seqs[b, 0, :3]), ref[:3])
    assert not np.any(np.asarray(seqs[b, 0, 3:]))
  with pytest.raises(ValueError, match='max_decode_steps'):
    decoding.temperature_sample(
        jnp.asarray(inputs), model.init_cache(), model.tokens_to_logits, EOS, max_decode_steps=L + 1
    )


def test_logit_callback_bans_token(model):
  banned = 4

  def ban(logits, state):
    del state
    return logits.at[:, banned].set(-1e9)

  seqs, _ = decoding.temperature_sample(
      _zeros_inputs(B, L),
      model.init_cache(),
      model.tokens_to_logits,
      EOS,
      num_decodes=16,
      topk=0,
      logit_callback_fn=ban,
  )
  assert not np.any(np.asarray(seqs) == banned)


def test_prefilled_cache_initial_index_matches_forced_prefix(model):
  inputs = np.zeros((B, L), np.int32)
  prefixes = [[3, 2, 5], [4], [6, 2]]
  for b, pre in enumerate(prefixes):
    inputs[b, 1 : 1 + len(pre)] = pre
  initial_index = np.array([len(p) for p in prefixes], np.int32)
  forced, _ = decoding.temperature_sample(
      jnp.asarray(inputs), model.init_cache(), model.tokens_to_logits, EOS, num_decodes=2
  )
  prefilled, _ = decoding.temperature_sample(
      jnp.asarray(inputs),
      model.init_cache(inputs, initial_index),
      model.tokens_to_logits,
      EOS,
      num_decodes=2,
      initial_index=jnp.asarray(initial_index),
  )
  np.testing.assert_array_equal(np.asarray(prefilled), np.asarray(forced))


def test_cache_offset_scanned_layers_and_frozen_cache(model):
  # Same model with a leading 'layers' axis on every batch-carrying leaf, and
  # given as a FrozenDict.
  scanned = ToyLM(V, B, L, seed=3, offset=1)
  scanned_cache = lambda: flax.core.freeze(scanned.init_cache())
  kwargs = dict(decode_rng=jax.random.PRNGKey(5), num_decodes=3, topk=0)
  a = decoding.temperature_sample(
      _zeros_inputs(B, L), model.init_cache(), model.tokens_to_logits, EOS, **kwargs
  )
  b = decoding.temperature_sample(
      _zeros_inputs(B, L), scanned_cache(), scanned.tokens_to_logits, EOS, cache_offset=1, **kwargs
  )
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-6)
  beam_a = decoding.beam_search(
      _zeros_inputs(B, L), model.init_cache(), model.tokens_to_logits, EOS, num_decodes=3
  )
  beam_b = decoding.beam_search(
      _zeros_inputs(B, L),
      scanned_cache(),
      scanned.tokens_to_logits,
      EOS,
      num_decodes=3,
      cache_offset=1,
  )
  np.testing.assert_array_equal(np.asarray(beam_a[0]), np.asarray(beam_b[0]))
  np.testing.assert_allclose(np.asarray(beam_a[1]), np.asarray(beam_b[1]), rtol=1e-6)


# ------------------------------------------------------------------------------
# Beam search.
# ------------------------------------------------------------------------------

BV, BL = 4, 4  # Brute force: 40 EOS-terminated sequences per example.
# Exact search needs 2 * beams >= V * (V - 1) ** (L - 1) candidates per step.
EXACT_BEAMS = 54


@pytest.fixture(scope='module')
def small_model():
  return ToyLM(BV, 2, BL, seed=11, scale=1.0)


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_search_matches_brute_force(small_model, alpha):
  m = small_model
  search = jax.jit(
      lambda inputs, cache: decoding.beam_search(
          inputs, cache, m.tokens_to_logits, EOS, num_decodes=EXACT_BEAMS, alpha=alpha
      )
  )
  seqs, scores = search(_zeros_inputs(2, BL), m.init_cache())
  assert seqs.shape == (2, EXACT_BEAMS, BL)
  assert scores.shape == (2, EXACT_BEAMS)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert np.all(np.diff(scores, axis=1) >= 0), 'sorted ascending'
  top = 10
  for b in range(2):
    ref = brute_force_finished(m, b, BL, alpha)
    assert len(ref) == 40
    got_seqs = seqs[b, ::-1][:top]
    got_scores = scores[b, ::-1][:top]
    np.testing.assert_array_equal(got_seqs, np.array([r[0] for r in ref[:top]]))
    np.testing.assert_allclose(got_scores, [r[1] for r in ref[:top]], rtol=1e-4, atol=1e-4)
    # All real finished sequences end with exactly one EOS and pad after it.
    for j in range(EXACT_BEAMS):
      if scores[b, j] < -1e5:
        continue
      row = list(seqs[b, j])
      assert row.count(EOS) == 1
      assert not any(row[row.index(EOS) + 1 :])


def test_beam_search_with_forced_prefix_matches_brute_force(small_model):
  m = small_model
  prefix = [2]
  inputs = np.zeros((2, BL), np.int32)
  inputs[:, 1] = prefix[0]
  seqs, scores = decoding.beam_search(
      jnp.asarray(inputs),
      m.init_cache(),
      m.tokens_to_logits,
      EOS,
      num_decodes=EXACT_BEAMS,
      alpha=0.6,
  )
  for b in range(2):
    ref = brute_force_finished(m, b, BL, 0.6, prefix=prefix)
    assert len(ref) == 13
    np.testing.assert_array_equal(np.asarray(seqs[b, ::-1][:5]), np.array([r[0] for r in ref[:5]]))
    np.testing.assert_allclose(
        np.asarray(scores[b, ::-1][:5]), [r[1] for r in ref[:5]], rtol=1e-4, atol=1e-4
    )


def test_beam_search_prefilled_matches_forced(small_model):
  m = small_model
  inputs = np.zeros((2, BL), np.int32)
  inputs[0, 1] = 2
  inputs[1, 1] = 3
  forced = decoding.beam_search(
      jnp.asarray(inputs), m.init_cache(), m.tokens_to_logits, EOS, num_decodes=6
  )
  initial_index = jnp.array([1, 1], jnp.int32)
  prefilled = decoding.beam_search(
      jnp.asarray(inputs),
      m.init_cache(inputs, initial_index),
      m.tokens_to_logits,
      EOS,
      num_decodes=6,
      initial_index=initial_index,
  )
  np.testing.assert_allclose(np.asarray(prefilled[1]), np.asarray(forced[1]), rtol=1e-5, atol=1e-5)
  # Compare the real results (never-filled finished slots hold junk).
  real = np.asarray(forced[1]) > -1e5
  assert real.sum() >= 8
  np.testing.assert_array_equal(np.asarray(prefilled[0])[real], np.asarray(forced[0])[real])


def test_beam_one_equals_greedy():
  # EOS suppressed: greedy never stops, beam search returns its live beam.
  m = ToyLM(V, B, L, seed=5, eos_shift=-40.0)
  seqs, scores = decoding.beam_search(
      _zeros_inputs(B, L), m.init_cache(), m.tokens_to_logits, EOS, num_decodes=1
  )
  assert seqs.shape == (B, 1, L)
  greedy, _ = decoding.temperature_sample(
      _zeros_inputs(B, L), m.init_cache(), m.tokens_to_logits, EOS
  )
  np.testing.assert_array_equal(np.asarray(seqs), np.asarray(greedy))
  for b in range(B):
    ref, loglik = m.greedy(b, L)
    np.testing.assert_array_equal(np.asarray(seqs[b, 0]), ref)
    np.testing.assert_allclose(float(scores[b, 0]), loglik, rtol=1e-4)


def test_beam_search_eos_and_early_stop():
  # A model that strongly prefers EOS right away: every beam finishes and the
  # loop stops long before the maximum length; outputs are padded after EOS.
  m = ToyLM(V, B, L, seed=3, eos_shift=8.0)
  calls = []

  def counting(state):
    jax.debug.callback(lambda: calls.append(1))
    return m.tokens_to_logits(state)

  seqs, scores = decoding.beam_search(
      _zeros_inputs(B, L), m.init_cache(), counting, EOS, num_decodes=2
  )
  jax.effects_barrier()
  seqs = np.asarray(seqs)
  for b in range(B):
    best = list(seqs[b, -1])
    assert best[0] == EOS and not any(best[1:])
    for j in range(2):
      row = list(seqs[b, j])
      assert row.count(EOS) == 1 and not any(row[row.index(EOS) + 1 :])
  assert np.all(np.asarray(scores) > -1e5)
  assert 0 < len(calls) < L, len(calls)
