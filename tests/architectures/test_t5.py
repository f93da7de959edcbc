"""Tests of the Flax T5 backbone against flaxformer facts and transformers' PyTorch T5."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from prompt_tuning.architectures import layers
from prompt_tuning.architectures import t5
from prompt_tuning.checkpoints import huggingface

# Only the parity tests against transformers' PyTorch T5 need torch; the pure-JAX tests run without.
try:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - the [test] extra installs both
  torch = transformers = None
requires_torch = pytest.mark.skipif(
    torch is None, reason='parity with transformers needs torch and transformers (the [test] extra)'
)


# ----------------------------------------------------------------------------------------------
# A test-only prefix prompt implementing the CONTRIBUTING "Prompt modules" interface.
# ----------------------------------------------------------------------------------------------


class PrefixPrompt(nn.Module):
  """Prepends a learned `[P, H]` prompt to the embedded inputs."""

  length: int
  features: int

  def setup(self):
    self.prompt = nn_partitioning.param_with_axes(
        'prompt',
        nn.initializers.normal(1.0),
        (self.length, self.features),
        jnp.float32,
        axes=('prompt', 'prompt_embed'),
    )

  def get_prompt(self, batch_size, prompt_ids=None):
    del prompt_ids
    return jnp.broadcast_to(self.prompt[None], (batch_size,) + self.prompt.shape)

  def __call__(self, tokens, embedded, prompt_ids=None):
    prompt = self.get_prompt(tokens.shape[0], prompt_ids).astype(embedded.dtype)
    return jnp.concatenate([prompt, embedded], axis=1)

  def combine_mask(self, tokens, mask):
    return jnp.concatenate(
        [jnp.ones((tokens.shape[0], self.length), bool), mask.astype(bool)], axis=1
    )


P = 3
TINY = t5.get_config('tiny')


def prompt_factory():
  return PrefixPrompt(P, TINY.emb_dim)


# ----------------------------------------------------------------------------------------------
# Static facts
# ----------------------------------------------------------------------------------------------


def test_relpos_bucket_test_vectors():
  rel = np.array(
      [-200, -128, -127, -64, -32, -16, -8, -7, -1, 0, 1, 7, 8, 16, 32, 64, 127, 128, 200]
  )
  bidi = [15, 15, 15, 14, 12, 10, 8, 7, 1, 0, 17, 23, 24, 26, 28, 30, 31, 31, 31]
  causal = [31, 31, 31, 26, 21, 16, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, True, 32, 128), bidi)
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, False, 32, 128), causal)


def test_presets():
  base = t5.get_config('t5_1_1_base')
  assert (base.emb_dim, base.num_heads, base.mlp_dim, base.num_encoder_layers) == (
      768,
      12,
      2048,
      12,
  )
  assert base.mlp_activations == ('gelu', 'linear') and not base.logits_via_embedding
  t3b = t5.get_config('t5_1_0_3b')
  assert (t3b.emb_dim, t3b.num_heads, t3b.head_dim, t3b.mlp_dim) == (1024, 32, 128, 16384)
  assert t3b.mlp_activations == ('relu',) and t3b.logits_via_embedding
  assert t5.get_config('mt5_xl').vocab_size == 250112
  assert t5.get_config('mt5_large').mlp_dim == 2816
  cfg = t5.get_config('tiny', dropout_rate=0.1, mlp_activations=['relu'])
  assert cfg.mlp_activations == ('relu',) and hash(cfg) == hash(
      t5.get_config('tiny', dropout_rate=0.1, mlp_activations=('relu',))
  )
  with pytest.raises(ValueError, match='Unknown T5 config'):
    t5.get_config('t5_1_1_huge')
  with pytest.raises(ValueError, match='Unknown T5Config field'):
    t5.get_config('tiny', d_model=3)


def _expected_paths(enc_layers, dec_layers, mlp, logits_dense):
  paths = ['token_embedder/embedding', 'encoder/relpos_bias/rel_embedding']
  for i in range(enc_layers):
    p = f'encoder/layers_{i}/'
    paths += [p + 'pre_attention_layer_norm/scale']
    paths += [p + f'attention/{n}/kernel' for n in ('query', 'key', 'value', 'out')]
    paths += [p + 'pre_mlp_layer_norm/scale'] + [p + f'mlp/{n}/kernel' for n in mlp]
  paths += ['encoder/encoder_norm/scale', 'decoder/relpos_bias/rel_embedding']
  for i in range(dec_layers):
    p = f'decoder/layers_{i}/'
    paths += [p + 'pre_self_attention_layer_norm/scale']
    paths += [p + f'self_attention/{n}/kernel' for n in ('query', 'key', 'value', 'out')]
    paths += [p + 'pre_cross_attention_layer_norm/scale']
    paths += [p + f'encoder_decoder_attention/{n}/kernel' for n in ('query', 'key', 'value', 'out')]
    paths += [p + 'pre_mlp_layer_norm/scale'] + [p + f'mlp/{n}/kernel' for n in mlp]
  paths += ['decoder/decoder_norm/scale']
  if logits_dense:
    paths += ['decoder/logits_dense/kernel']
  return paths


@pytest.mark.parametrize('variant', ['t5_1_1', 't5_1_0'])
def test_parameter_names_shapes_and_axes(variant):
  if variant == 't5_1_1':
    cfg = t5.get_config('tiny', num_heads=2, head_dim=12, num_decoder_layers=3)
    mlp = ('wi_0', 'wi_1', 'wo')
  else:
    cfg = t5.get_config(
        'tiny',
        num_heads=2,
        head_dim=12,
        num_decoder_layers=3,
        mlp_activations=('relu',),
        logits_via_embedding=True,
    )
    mlp = ('wi', 'wo')
  variables = t5.init_variables(cfg, abstract=True)
  flat = t5.flatten_params(variables['params'])
  assert sorted(flat) == sorted(_expected_paths(2, 3, mlp, not cfg.logits_via_embedding))
  d, inner, ff, v = cfg.emb_dim, 24, cfg.mlp_dim, cfg.vocab_size
  assert flat['token_embedder/embedding'].shape == (v, d)
  assert flat['encoder/relpos_bias/rel_embedding'].shape == (2, 32)
  assert flat['encoder/layers_0/attention/query/kernel'].shape == (d, inner)
  assert flat['encoder/layers_0/attention/out/kernel'].shape == (inner, d)
  assert flat['decoder/layers_2/encoder_decoder_attention/key/kernel'].shape == (d, inner)
  assert flat[f'decoder/layers_1/mlp/{mlp[0]}/kernel'].shape == (d, ff)
  assert flat['decoder/layers_1/mlp/wo/kernel'].shape == (ff, d)
  if not cfg.logits_via_embedding:
    assert flat['decoder/logits_dense/kernel'].shape == (d, v)
  assert all(x.dtype == jnp.float32 for x in flat.values())
  # params_axes: one `<leaf>_axes` entry per parameter, with the logical names.
  axes = {
      k[: -len('_axes')]: a.names for k, a in t5.flatten_params(variables['params_axes']).items()
  }
  assert sorted(axes) == sorted(flat)
  assert axes['token_embedder/embedding'] == ('vocab', 'embed')
  assert axes['encoder/relpos_bias/rel_embedding'] == ('heads', 'relpos_buckets')
  assert axes['encoder/layers_0/attention/query/kernel'] == ('embed', 'joined_kv')
  assert axes['encoder/layers_0/attention/out/kernel'] == ('joined_kv', 'embed')
  assert axes[f'encoder/layers_0/mlp/{mlp[0]}/kernel'] == ('embed', 'mlp')
  assert axes['encoder/layers_0/mlp/wo/kernel'] == ('mlp', 'embed')
  assert axes['encoder/encoder_norm/scale'] == ('embed',)
  if not cfg.logits_via_embedding:
    assert axes['decoder/logits_dense/kernel'] == ('embed', 'vocab')
  assert all(len(a) == len(flat[k].shape) for k, a in axes.items())


def test_decoder_only_names_and_prompt_path():
  cfg = TINY
  flat = t5.flatten_params(
      t5.init_variables(cfg, decoder_only=True, abstract=True, prompt_factory=prompt_factory)[
          'params'
      ]
  )
  assert 'decoder/token_embedder/embedding' in flat
  assert 'decoder/prompt/prompt' in flat and flat['decoder/prompt/prompt'].shape == (P, 32)
  assert 'decoder/layers_0/self_attention/query/kernel' in flat
  assert not any('cross' in k or 'encoder' in k for k in flat)
  assert 'decoder/logits_dense/kernel' in flat
  enc_dec = t5.flatten_params(
      t5.init_variables(cfg, abstract=True, prompt_factory=prompt_factory)['params']
  )
  assert enc_dec['encoder/prompt/prompt'].shape == (P, 32)


def test_sharding_constraints_are_noops_without_mesh():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  assert layers.with_sharding_constraint(x, ('batch', 'length', 'embed')) is x


def test_initializers_fold_query_scale():
  attention = layers.MultiHeadDotProductAttention(num_heads=4, head_dim=64)
  x = jnp.ones((1, 1, 256))
  params = t5.flatten_params(attention.init(jax.random.PRNGKey(1), x, x)['params'])
  q = np.std(params['query/kernel'])
  k = np.std(params['key/kernel'])
  np.testing.assert_allclose(k, 256**-0.5, rtol=0.05)
  np.testing.assert_allclose(q, 256**-0.5 / 8, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Against transformers T5 (random weights, built here)
# ----------------------------------------------------------------------------------------------

HF_SIZES = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
    dropout_rate=0.0,
)


def _randomize(model, seed):
  """Random weights large enough for greedy decoding to produce varied sequences."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layer_norm.weight'):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif 'relative_attention_bias' in name:
        p.mul_(10.0)
      elif p.ndim == 2 and name != 'shared.weight':
        p.copy_(torch.randn(p.shape, generator=gen) * 2 / np.sqrt(p.shape[1]))


def _build_hf(kind):
  torch.manual_seed(0)
  if kind == 't5_1_0':
    cfg = transformers.T5Config(
        feed_forward_proj='relu', tie_word_embeddings=True, num_decoder_layers=3, **HF_SIZES
    )
  else:
    cfg = transformers.T5Config(
        feed_forward_proj='gated-gelu', tie_word_embeddings=False, **HF_SIZES
    )
  model = transformers.T5ForConditionalGeneration(cfg)
  if kind == 't5_1_1':  # transformers 5 ties lm_head to shared; untie it (T5 1.1 layout).
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))
  _randomize(model, 3)
  model.eval()
  return model


def _hf_to_ours(model, kind):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = huggingface.config_from_hf(
      model.config.to_dict(), separate_lm_head=(kind == 't5_1_1'), dropout_rate=0.0
  )
  params = huggingface.state_dict_to_params(sd, cfg)
  t5.check_params(cfg, params)
  return cfg, jax.tree_util.tree_map(jnp.asarray, params)


ENC = np.array(
    [
        [5, 9, 17, 33, 2, 41, 7, 1, 0, 0, 0, 0],
        [12, 3, 88, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [4, 60, 71, 22, 9, 9, 13, 50, 3, 8, 77, 1],
    ],
    np.int32,
)
DEC_TARGET = np.array(
    [[6, 7, 8, 9, 1, 0, 0], [19, 20, 1, 0, 0, 0, 0], [30, 31, 32, 33, 34, 35, 1]], np.int32
)
DEC_INPUT = np.concatenate([np.zeros((3, 1), np.int32), DEC_TARGET[:, :-1]], axis=1)
GEN_LEN = 7  # = decoder length, so the uncached loop reuses the compiled forward


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  model = t5.EncoderDecoder(cfg)

  @jax.jit
  def forward(params, enc, dec_in, dec_tgt):
    return model.apply({'params': params}, enc, dec_in, dec_tgt, enable_dropout=False)

  @jax.jit
  def encode(params, enc):
    return model.apply({'params': params}, enc, enable_dropout=False, method=model.encode)

  @functools.partial(jax.jit, static_argnames='max_len')
  def step(params, cache, encoded, enc, tokens, max_len):
    logits, mutated = model.apply(
        {'params': params, 'cache': cache},
        encoded,
        enc,
        tokens,
        tokens,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        method=model.decode,
        mutable=['cache'],
    )
    return logits, mutated['cache']

  def new_cache(params, encoded, enc, max_len):
    tokens = jnp.zeros((enc.shape[0], 1), jnp.int32)
    _, mutated = model.apply(
        {'params': params},
        encoded,
        enc,
        tokens,
        tokens,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        method=model.decode,
        mutable=['cache'],
    )
    return mutated['cache']

  return model, forward, encode, step, new_cache


def _argmax_no_pad(logits):
  # Token 0 is both padding and BOS in T5; a generated 0 would read as padding when the prefix is
  # recomputed, so greedy decoding here never picks it (HF: suppress_tokens=[0]).
  return np.asarray(jnp.argmax(logits.at[:, 0].set(-jnp.inf), -1))


def _greedy_cached(cfg, params, enc, length):
  _, _, encode, step, new_cache = _jitted(cfg)
  encoded = encode(params, enc)
  cache = new_cache(params, encoded, enc, length)
  token = jnp.zeros((enc.shape[0], 1), jnp.int32)
  done = np.zeros(enc.shape[0], bool)
  out = []
  for _ in range(length):
    logits, cache = step(params, cache, encoded, enc, token, length)
    nxt = _argmax_no_pad(logits[:, -1])
    nxt = np.where(done, 0, nxt)
    done |= nxt == 1
    out.append(nxt)
    token = jnp.asarray(nxt[:, None], jnp.int32)
  return np.stack(out, 1)


def _greedy_uncached(cfg, params, enc, length):
  _, forward, _, _, _ = _jitted(cfg)
  batch = enc.shape[0]
  dec_in = np.zeros((batch, length), np.int32)
  done = np.zeros(batch, bool)
  out = np.zeros((batch, length), np.int32)
  for t in range(length):
    logits = forward(params, enc, jnp.asarray(dec_in), jnp.ones((batch, length), jnp.int32))
    nxt = _argmax_no_pad(logits[:, t])
    nxt = np.where(done, 0, nxt)
    done |= nxt == 1
    out[:, t] = nxt
    if t + 1 < length:
      dec_in[:, t + 1] = nxt
  return out


@pytest.fixture(scope='module', params=['t5_1_0', 't5_1_1'])
def hf_pair(request):
  kind = request.param
  model = _build_hf(kind)
  cfg, params = _hf_to_ours(model, kind)
  return kind, model, cfg, params


@requires_torch
def test_config_matches_hf_kind(hf_pair):
  kind, _, cfg, params = hf_pair
  if kind == 't5_1_0':
    assert cfg.logits_via_embedding and cfg.mlp_activations == ('relu',)
    assert cfg.num_decoder_layers == 3
    assert 'logits_dense' not in params['decoder']
  else:
    assert not cfg.logits_via_embedding and cfg.mlp_activations == ('gelu', 'linear')


@requires_torch
def test_logits_match_transformers(hf_pair):
  _, model, cfg, params = hf_pair
  _, forward, _, _, _ = _jitted(cfg)
  ours = np.asarray(forward(params, ENC, DEC_INPUT, DEC_TARGET))
  with torch.no_grad():
    ref = model(
        input_ids=torch.tensor(ENC, dtype=torch.long),
        attention_mask=torch.tensor(ENC > 0, dtype=torch.long),
        decoder_input_ids=torch.tensor(DEC_INPUT, dtype=torch.long),
    ).logits.numpy()
  real = DEC_TARGET > 0
  assert ours.shape == ref.shape == DEC_TARGET.shape + (cfg.vocab_size,)
  assert np.abs(ours - ref)[real].max() < 1e-4


@requires_torch
def test_greedy_decode_matches_generate_and_uncached(hf_pair):
  _, model, cfg, params = hf_pair
  cached = _greedy_cached(cfg, params, jnp.asarray(ENC), GEN_LEN)
  uncached = _greedy_uncached(cfg, params, jnp.asarray(ENC), GEN_LEN)
  np.testing.assert_array_equal(cached, uncached)
  with torch.no_grad():
    gen = model.generate(
        input_ids=torch.tensor(ENC, dtype=torch.long),
        attention_mask=torch.tensor(ENC > 0, dtype=torch.long),
        max_new_tokens=GEN_LEN,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        suppress_tokens=[0],
        use_cache=False,
    ).numpy()  # HF's cache assumes num_decoder_layers ==
    # num_layers; without it generate recomputes every step (still greedy).
  assert (gen[:, 0] == 0).all()
  gen = gen[:, 1:]
  np.testing.assert_array_equal(cached[:, : gen.shape[1]], gen)
  assert (cached[:, gen.shape[1] :] == 0).all()  # generate stops once every row hit EOS.
  assert len(set(map(tuple, cached.tolist()))) > 1


@requires_torch
def test_chunked_decode_equals_step_by_step_and_full(hf_pair):
  _, _, cfg, params = hf_pair
  model, forward, encode, step, new_cache = _jitted(cfg)
  enc = jnp.asarray(ENC)
  # A decoder input without padding: compare every position.
  dec_in = np.array(
      [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12, 13, 14, 15, 16], [0, 17, 18, 19, 20, 21, 22]], np.int32
  )
  length = dec_in.shape[1]
  full = np.asarray(forward(params, enc, dec_in, np.ones_like(dec_in)))
  encoded = encode(params, enc)
  # Step by step.
  cache = new_cache(params, encoded, enc, length)
  steps = []
  for t in range(length):
    logits, cache = step(params, cache, encoded, enc, jnp.asarray(dec_in[:, t : t + 1]), length)
    steps.append(np.asarray(logits[:, 0]))
  steps = np.stack(steps, 1)
  assert int(cache['decoder']['layers_0']['self_attention']['cache_index']) == length
  # Chunks of 3, 1 and 3 tokens.
  cache = new_cache(params, encoded, enc, length)
  chunks = []
  for lo, hi in ((0, 3), (3, 4), (4, 7)):
    logits, cache = step(params, cache, encoded, enc, jnp.asarray(dec_in[:, lo:hi]), length)
    chunks.append(np.asarray(logits))
  chunks = np.concatenate(chunks, 1)
  np.testing.assert_allclose(chunks, steps, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(steps, full, atol=1e-5, rtol=1e-5)
  # Cache layout (CONTRIBUTING): batch leads; cached_bias [1, heads, max_len, max_len].
  layer_cache = cache['decoder']['layers_0']['self_attention']
  assert layer_cache['cached_key'].shape == (3, length, cfg.num_heads, cfg.head_dim)
  assert layer_cache['cache_index'].shape == () and layer_cache['cache_index'].dtype == jnp.int32
  assert cache['decoder']['relpos_bias']['cached_bias'].shape == (1, cfg.num_heads, length, length)


# ----------------------------------------------------------------------------------------------
# Packing, remat, dtype, dropout, prompts
# ----------------------------------------------------------------------------------------------


def random_params(cfg, seed, decoder_only=False, prompt=False):
  """Random parameters of the right shapes (numpy; much cheaper than running `init`)."""
  abstract = t5.init_variables(
      cfg,
      decoder_only=decoder_only,
      abstract=True,
      prompt_factory=prompt_factory if prompt else None,
  )['params']
  rng = np.random.default_rng(seed)

  def make(path, x):
    if path[-1].key == 'scale':
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    std = 1.0 if path[-1].key in ('embedding', 'rel_embedding', 'prompt') else x.shape[0] ** -0.5
    return jnp.asarray(rng.normal(0, std, x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(make, abstract)


@pytest.fixture(scope='module')
def tiny_params():
  return random_params(TINY, 0)


def test_packed_equals_separate(tiny_params):
  model = t5.EncoderDecoder(TINY)
  apply = jax.jit(functools.partial(model.apply, enable_dropout=False))
  a_enc, b_enc = [5, 6, 7, 1], [8, 9, 1]
  a_tgt, b_tgt = [10, 11, 1], [12, 1]
  enc = np.array([a_enc + b_enc + [0]], np.int32)
  enc_seg = np.array([[1] * 4 + [2] * 3 + [0]], np.int32)
  enc_pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32)
  tgt = np.array([a_tgt + b_tgt + [0]], np.int32)
  dec_in = np.array([[0, 10, 11, 0, 12, 0]], np.int32)
  dec_seg = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
  dec_pos = np.array([[0, 1, 2, 0, 1, 0]], np.int32)
  packed = np.asarray(
      apply({'params': tiny_params}, enc, dec_in, tgt, enc_seg, dec_seg, enc_pos, dec_pos)
  )

  # The two sequences unpacked, as one padded batch.
  enc = np.array([a_enc, b_enc + [0]], np.int32)
  tgt = np.array([a_tgt, b_tgt + [0]], np.int32)
  dec_in = np.array([[0, 10, 11], [0, 12, 0]], np.int32)
  single = np.asarray(apply({'params': tiny_params}, enc, dec_in, tgt))
  np.testing.assert_allclose(packed[0, :3], single[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 3:5], single[1, :2], atol=1e-5)


def test_remat_bf16_and_dropout():
  cfg = t5.get_config('tiny', num_encoder_layers=1, num_decoder_layers=1)
  params = random_params(cfg, 5)
  enc, dec_in, tgt = ENC[:2] % 128, DEC_INPUT[:2], DEC_TARGET[:2]

  def loss(params, config, rng=None):
    model = t5.EncoderDecoder(config)
    logits = model.apply(
        {'params': params},
        enc,
        dec_in,
        tgt,
        enable_dropout=rng is not None,
        rngs=None if rng is None else {'dropout': rng},
    )
    return jnp.sum(logits**2), logits

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g0, base = grad(params, cfg)
  for remat in (True, 'minimal'):
    g1, logits = grad(params, dataclasses.replace(cfg, remat=remat))
    np.testing.assert_allclose(logits, base, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)

  # What the backward pass keeps: everything > 'minimal' (weight matmul outputs) > 'full' (inputs).
  def saved_floats(remat):  # the residuals a VJP closes over, in numbers
    _, vjp = jax.vjp(lambda p: loss(p, dataclasses.replace(cfg, remat=remat))[0], params)
    return sum(x.size for x in jax.tree_util.tree_leaves(vjp))

  saved = {r: saved_floats(r) for r in (False, 'minimal', True)}
  assert saved[False] > saved['minimal'] > saved[True], saved
  with pytest.raises(ValueError, match='remat must be one of'):
    dataclasses.replace(cfg, remat='everything')
  forward = jax.jit(loss, static_argnums=1)
  _, bf16 = forward(params, dataclasses.replace(cfg, dtype='bfloat16'))
  assert bf16.dtype == jnp.float32
  assert np.abs(np.asarray(bf16) - np.asarray(base)).max() < 0.1 * np.abs(base).max()
  drop_cfg = dataclasses.replace(cfg, dropout_rate=0.3)
  _, d1 = forward(params, drop_cfg, jax.random.key(1))
  _, d2 = forward(params, drop_cfg, jax.random.key(1))
  _, d3 = forward(params, drop_cfg, jax.random.key(2))
  np.testing.assert_array_equal(d1, d2)
  assert np.abs(np.asarray(d1) - np.asarray(base)).max() > 1e-3
  assert np.abs(np.asarray(d1) - np.asarray(d3)).max() > 1e-3


def test_encoder_decoder_prompt_hook(tiny_params):
  model = t5.EncoderDecoder(TINY, prompt_factory=prompt_factory)
  params = random_params(TINY, 2, prompt=True)
  assert params['encoder']['prompt']['prompt'].shape == (P, TINY.emb_dim)
  enc = ENC[:2] % 128
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=model.encode)
  assert encoded.shape == (2, P + enc.shape[1], TINY.emb_dim)
  mask = model.apply({'params': params}, enc, method=model.encoder_input_mask)
  np.testing.assert_array_equal(mask, np.concatenate([np.ones((2, P), bool), enc > 0], 1))
  # Padding positions of the encoder output are zero, prompt positions are not.
  assert np.all(np.asarray(encoded)[~np.asarray(mask)] == 0)
  assert np.abs(np.asarray(encoded)[:, :P]).min() > 0
  logits = model.apply({'params': params}, enc, DEC_INPUT[:2], DEC_TARGET[:2], enable_dropout=False)
  assert logits.shape == DEC_TARGET[:2].shape + (TINY.vocab_size,)
  with pytest.raises(ValueError, match='pack=False'):
    model.apply(
        {'params': params},
        enc,
        DEC_INPUT[:2],
        DEC_TARGET[:2],
        np.ones_like(enc),
        np.ones_like(DEC_TARGET[:2]),
        enable_dropout=False,
    )


@pytest.fixture(scope='module')
def lm():
  model = t5.DecoderOnly(TINY)
  params = random_params(TINY, 3, decoder_only=True)

  @functools.partial(jax.jit, static_argnames=('causal',))
  def forward(params, tokens, dca=None, causal=True):
    return model.apply(
        {'params': params},
        tokens,
        None,
        decoder_causal_attention=None if causal else dca,
        enable_dropout=False,
    )

  @functools.partial(jax.jit, static_argnames=('max_len',))
  def step(params, cache, tokens, dca, max_len):
    logits, mutated = model.apply(
        {'params': params, 'cache': cache},
        tokens,
        None,
        decoder_causal_attention=dca,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        mutable=['cache'],
    )
    return logits, mutated['cache']

  def new_cache(params, batch, max_len):
    tokens = jnp.zeros((batch, 1), jnp.int32)
    _, mutated = model.apply(
        {'params': params},
        tokens,
        None,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        mutable=['cache'],
    )
    return mutated['cache']

  return model, params, forward, step, new_cache


LM_TOKENS = np.array([[0, 5, 9, 14, 3, 22, 7, 40], [0, 31, 2, 17, 18, 60, 61, 9]], np.int32)
LM_DCA = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


def test_decoder_only_cached_equals_uncached(lm):
  _, params, forward, step, new_cache = lm
  length = LM_TOKENS.shape[1]
  for causal in (True, False):
    full = np.asarray(forward(params, LM_TOKENS, LM_DCA, causal=causal))
    cache = new_cache(params, 2, length)
    # Prefix (bidirectional for the prefix LM) as one chunk, then token by token.
    dca = None if causal else jnp.asarray(LM_DCA[:, :4])
    logits, cache = step(params, cache, jnp.asarray(LM_TOKENS[:, :4]), dca, length)
    out = [np.asarray(logits)]
    for t in range(4, length):
      logits, cache = step(params, cache, jnp.asarray(LM_TOKENS[:, t : t + 1]), None, length)
      out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, 1), full, atol=1e-5, rtol=1e-5)


def test_prefix_lm_mask_effect(lm):
  _, params, forward, _, _ = lm
  changed = LM_TOKENS.copy()
  changed[:, 2] += 1  # a later prefix position
  for causal in (True, False):
    a = np.asarray(forward(params, LM_TOKENS, LM_DCA, causal=causal))
    b = np.asarray(forward(params, changed, LM_DCA, causal=causal))
    early = np.abs(a[:, :2] - b[:, :2]).max()
    if causal:
      assert early == 0.0
    else:
      assert early > 1e-4  # prefix positions see later prefix positions
  changed = LM_TOKENS.copy()
  changed[:, 6] += 1  # a target position: invisible to earlier positions in both cases
  for causal in (True, False):
    a = np.asarray(forward(params, LM_TOKENS, LM_DCA, causal=causal))
    b = np.asarray(forward(params, changed, LM_DCA, causal=causal))
    assert np.abs(a[:, :6] - b[:, :6]).max() == 0.0
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-4


def test_decoder_only_prompt_prefill(lm):
  model = t5.DecoderOnly(TINY, prompt_factory=prompt_factory)
  _, base_params, _, _, _ = lm
  params = dict(base_params)
  params['decoder'] = dict(base_params['decoder'])
  params['decoder']['prompt'] = {
      'prompt': jax.random.normal(jax.random.PRNGKey(4), (P, TINY.emb_dim))
  }
  t5.check_params(TINY, params, decoder_only=True)
  length = LM_TOKENS.shape[1]
  full = np.asarray(model.apply({'params': params}, LM_TOKENS, None, enable_dropout=False))
  assert full.shape == (2, P + length, TINY.vocab_size)
  max_len = P + length

  @functools.partial(jax.jit, static_argnames='prefill')
  def step(cache, tokens, prefill=False):
    logits, mutated = model.apply(
        {'params': params, 'cache': cache},
        tokens,
        None,
        enable_dropout=False,
        decode=True,
        prefill_prompt=prefill,
        max_decode_length=max_len,
        mutable=['cache'],
    )
    return logits, mutated['cache']

  tokens = jnp.zeros((2, 1), jnp.int32)
  _, mutated = model.apply(
      {'params': params},
      tokens,
      None,
      enable_dropout=False,
      decode=True,
      max_decode_length=max_len,
      mutable=['cache'],
  )
  logits, cache = step(mutated['cache'], tokens, prefill=True)
  assert logits.shape == (2, P, TINY.vocab_size)
  np.testing.assert_allclose(logits, full[:, :P], atol=1e-5, rtol=1e-5)
  assert int(cache['decoder']['layers_0']['self_attention']['cache_index']) == P
  out = []
  for t in range(length):
    logits, cache = step(cache, jnp.asarray(LM_TOKENS[:, t : t + 1]))
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, 1), full[:, P:], atol=1e-5, rtol=1e-5)
  # Prefix LM with a prompt keeps the P + L layout; the prompt and the prefix go into the cache
  # in one chunk (they attend to each other), then the rest token by token.
  prefix = model.apply(
      {'params': params}, LM_TOKENS, None, decoder_causal_attention=LM_DCA, enable_dropout=False
  )
  assert prefix.shape == full.shape
  _, mutated = model.apply(
      {'params': params},
      tokens,
      None,
      enable_dropout=False,
      decode=True,
      max_decode_length=max_len,
      mutable=['cache'],
  )
  logits, mutated = model.apply(
      {'params': params, 'cache': mutated['cache']},
      LM_TOKENS[:, :4],
      None,
      decoder_causal_attention=LM_DCA[:, :4],
      enable_dropout=False,
      decode=True,
      prefill_prompt=True,
      max_decode_length=max_len,
      mutable=['cache'],
  )
  cache = mutated['cache']
  assert int(cache['decoder']['layers_0']['self_attention']['cache_index']) == P + 4
  out = [np.asarray(logits)]
  for t in range(4, length):
    logits, cache = step(cache, jnp.asarray(LM_TOKENS[:, t : t + 1]))
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, 1), np.asarray(prefix), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(prefix)[:, :P] - full[:, :P]).max() > 1e-4  # the prompt saw the prefix
  with pytest.raises(ValueError, match='pack=False'):
    model.apply({'params': params}, LM_TOKENS, None, np.ones_like(LM_TOKENS), enable_dropout=False)


def test_check_params_messages(tiny_params):
  with pytest.raises(ValueError) as e:
    t5.check_params(t5.get_config('tiny', emb_dim=48), tiny_params)
  msg = str(e.value)
  assert 'token_embedder/embedding' in msg and '(128, 48)' in msg and '(128, 32)' in msg
  assert 'size' in msg
  with pytest.raises(ValueError) as e:
    t5.check_params(t5.get_config('tiny', vocab_size=256), tiny_params)
  assert 'vocab' in str(e.value).lower() and 'NUM_EMBEDDINGS' in str(e.value)
  with pytest.raises(ValueError) as e:
    t5.check_params(
        t5.get_config('tiny', mlp_activations=('relu',), logits_via_embedding=True), tiny_params
    )
  assert 'T5 1.0 vs 1.1' in str(e.value) and 'mlp/wi/kernel' in str(e.value)
