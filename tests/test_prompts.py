"""Tests for prompt_tuning.prompts: the Prompt module, initializers, combines."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import prompts

V, H = 40, 6


@pytest.fixture(scope='module')
def vocab():
  from seqio import test_utils  # pylint: disable=g-import-not-at-top

  return test_utils.sentencepiece_vocab()


@pytest.fixture(scope='module')
def table():
  """Row i starts with the value i so sampled rows can be identified."""
  rng = np.random.RandomState(0)
  t = rng.normal(size=(V, H)).astype(np.float32)
  t[:, 0] = np.arange(V)
  return t


def _row_ids(x):
  return np.asarray(x)[:, 0].round().astype(int)


# ----------------------------------------------------------------- uniform --


def test_uniform_is_centred():
  x = np.asarray(prompts.uniform(0.5)(jax.random.PRNGKey(0), (100, 100)))
  assert x.shape == (100, 100) and x.dtype == np.float32
  assert x.min() >= -0.5 and x.max() < 0.5
  assert x.min() < -0.49 and x.max() > 0.49
  assert abs(x.mean()) < 0.01
  assert abs(x.std() - 1 / np.sqrt(12)) < 0.01  # width 1 -> std 1/sqrt(12).


def test_uniform_scale():
  x = np.asarray(prompts.uniform(2.0)(jax.random.PRNGKey(1), (50, 40)))
  assert x.min() >= -2.0 and x.max() < 2.0 and x.min() < -1.9


def test_uniform_t5x_is_nonnegative():
  x = np.asarray(prompts.uniform_t5x(0.5)(jax.random.PRNGKey(0), (100, 100)))
  assert x.min() >= 0.0 and x.max() < 0.5
  assert abs(x.mean() - 0.25) < 0.01


# ------------------------------------------------- from_sample_of_embeddings --


def test_sample_without_replacement_from_population(table):
  init = prompts.from_sample_of_embeddings(table, population_size=20)
  for seed in range(5):
    rng = jax.random.PRNGKey(seed)
    x = init(rng, (10, H))
    ids = _row_ids(x)
    assert len(set(ids)) == 10, ids  # Without replacement.
    assert ids.max() < 20  # Only from the population.
    np.testing.assert_array_equal(np.asarray(x), table[ids])
    expected = np.asarray(jax.random.choice(rng, 20, (10,), replace=False))
    np.testing.assert_array_equal(ids, expected)


def test_sample_whole_population_is_permutation(table):
  x = prompts.from_sample_of_embeddings(table, 12)(jax.random.PRNGKey(3), (12, H))
  assert sorted(_row_ids(x)) == list(range(12))


def test_sample_with_replacement_when_prompt_longer(table):
  x = prompts.from_sample_of_embeddings(table, 5)(jax.random.PRNGKey(0), (30, H))
  ids = _row_ids(x)
  assert ids.max() < 5 and len(ids) == 30
  assert len(set(ids)) <= 5


def test_sample_default_population_and_none(table):
  # Default population (5000) is larger than the table: whole table.
  ids = _row_ids(prompts.from_sample_of_embeddings(table)(jax.random.PRNGKey(0), (V, H)))
  assert sorted(ids) == list(range(V))
  ids = _row_ids(prompts.from_sample_of_embeddings(table, None)(jax.random.PRNGKey(0), (V, H)))
  assert sorted(ids) == list(range(V))


def test_sample_under_jit_matches_eager(table):
  init = prompts.from_sample_of_embeddings(table, 20)
  rng = jax.random.PRNGKey(7)
  eager = init(rng, (8, H))
  jitted = jax.jit(lambda r: init(r, (8, H)))(rng)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_sample_lazy_loader(table):
  calls = []

  def loader():
    calls.append(1)
    return table

  init = prompts.from_sample_of_embeddings(loader, 10)
  assert not calls  # Nothing read until init.
  init(jax.random.PRNGKey(0), (4, H))
  assert calls


def test_sample_errors(table):
  with pytest.raises(ValueError, match='features'):
    prompts.from_sample_of_embeddings(table)(jax.random.PRNGKey(0), (4, H + 1))
  with pytest.raises(ValueError, match='positive'):
    prompts.from_sample_of_embeddings(table, 0)


# ------------------------------------------------------- from_embedded_list --


def test_class_labels_are_mean_of_pieces(vocab, table):
  texts = ['positive', 'negative', 'b']
  fallback = prompts.from_sample_of_embeddings(table, 10)
  init = prompts.from_embedded_list(table, vocab, texts, fallback)
  rng = jax.random.PRNGKey(0)
  x = np.asarray(init(rng, (8, H)))
  for i, text in enumerate(texts):
    ids = vocab.encode(text)
    assert ids and 1 not in ids  # No EOS.
    np.testing.assert_allclose(x[i], table[ids].mean(axis=0), rtol=1e-6)
  assert len(vocab.encode('positive')) > 1  # Exercises sub-token averaging.
  # The remaining positions come from the fallback with the remaining shape.
  np.testing.assert_array_equal(x[3:], np.asarray(fallback(rng, (5, H))))


def test_class_labels_default_fallback_is_sampled_vocab(vocab, table):
  x = np.asarray(
      prompts.from_embedded_list(table, vocab, ['positive'])(jax.random.PRNGKey(0), (6, H))
  )
  ids = _row_ids(x[1:])
  np.testing.assert_array_equal(x[1:], table[ids])
  assert len(set(ids)) == 5


def test_class_labels_fill_every_position(vocab, table):
  x = prompts.from_embedded_list(table, vocab, ['a', 'b'], prompts.uniform())(
      jax.random.PRNGKey(0), (2, H)
  )
  assert x.shape == (2, H)


def test_class_labels_too_many(vocab, table):
  init = prompts.from_embedded_list(table, vocab, ['a', 'b', 'c'], prompts.uniform())
  with pytest.raises(ValueError, match='3 texts.*only 2 positions'):
    init(jax.random.PRNGKey(0), (2, H))


def test_class_labels_truncated_to_the_prompt(vocab, table):
  texts = ['positive', 'negative', 'b']
  init = prompts.from_embedded_list(table, vocab, texts, prompts.uniform(), truncate=True)
  x = np.asarray(init(jax.random.PRNGKey(0), (2, H)))
  for i, text in enumerate(texts[:2]):
    np.testing.assert_allclose(x[i], table[vocab.encode(text)].mean(axis=0), rtol=1e-6)
  # With room for every label, truncation changes nothing.
  long = prompts.from_embedded_list(table, vocab, texts, prompts.uniform(), truncate=True)
  plain = prompts.from_embedded_list(table, vocab, texts, prompts.uniform())
  rng = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(np.asarray(long(rng, (5, H))), np.asarray(plain(rng, (5, H))))


def test_class_labels_empty_text(vocab, table):
  init = prompts.from_embedded_list(table, vocab, [''], prompts.uniform())
  with pytest.raises(ValueError, match='no tokens'):
    init(jax.random.PRNGKey(0), (2, H))


# ----------------------------------------------------- from_embedded_string --


def test_embedded_string(vocab, table):
  ids = vocab.encode('ab c')
  fallback = prompts.zeros()
  x = np.asarray(
      prompts.from_embedded_string(table, vocab, 'ab c', fallback)(
          jax.random.PRNGKey(0), (len(ids) + 2, H)
      )
  )
  np.testing.assert_array_equal(x[: len(ids)], table[ids])
  np.testing.assert_array_equal(x[len(ids) :], 0)


def test_embedded_string_truncated(vocab, table):
  ids = vocab.encode('a b c d')
  x = np.asarray(
      prompts.from_embedded_string(table, vocab, 'a b c d')(jax.random.PRNGKey(0), (3, H))
  )
  np.testing.assert_array_equal(x, table[ids[:3]])


# ------------------------------------------------------ from_array / np_load --


def test_from_array(table):
  value = table[:5]
  x = prompts.from_array(value)(jax.random.PRNGKey(0), (5, H))
  np.testing.assert_array_equal(np.asarray(x), value)
  x = prompts.from_array(array=lambda: value)(None, (5, H))
  np.testing.assert_array_equal(np.asarray(x), value)
  with pytest.raises(ValueError, match='exactly one'):
    prompts.from_array()


def test_from_array_shape_error(table):
  with pytest.raises(ValueError, match=r'\(5, 6\).*\(7, 6\)'):
    prompts.from_array(table[:5])(jax.random.PRNGKey(0), (7, H))


def test_np_load_roundtrip_and_errors(tmp_path, table):
  path = tmp_path / 'prompt.npy'
  np.save(path, table[:4])
  np.testing.assert_array_equal(prompts.np_load(str(path)), table[:4])
  loaded = prompts.np_load(str(path), restore_dtype=np.float16)
  assert loaded.dtype == np.float16
  # Files without a .npy suffix (the original repo's numpy checkpoints).
  with open(tmp_path / 'encoder.prompt.prompt.prompt', 'wb') as f:
    np.save(f, table[:4])
  np.testing.assert_array_equal(
      prompts.np_load(str(tmp_path / 'encoder.prompt.prompt.prompt')), table[:4]
  )
  with pytest.raises(FileNotFoundError, match='missing.npy'):
    prompts.np_load(str(tmp_path / 'missing.npy'))
  # Shape mismatch through the Prompt module names both shapes.
  module = prompts.Prompt(
      length=5, embed_dim=H, prompt_init=prompts.from_array(prompts.np_load(str(path)))
  )
  with pytest.raises(ValueError, match=r'\(4, 6\).*\(5, 6\)'):
    module.init(jax.random.PRNGKey(0))


# ------------------------------------------------------------------ t5x_load --


@pytest.fixture
def fake_formats(monkeypatch, table):
  calls = []

  def load_params(path, variables=None):
    calls.append((path, tuple(variables)))
    return {'token_embedder': {'embedding': table}, 'encoder': {'layers_0': {'x': np.zeros(2)}}}

  module = types.ModuleType('prompt_tuning.checkpoints.formats')
  module.load_params = load_params
  monkeypatch.setitem(sys.modules, 'prompt_tuning.checkpoints.formats', module)
  import prompt_tuning.checkpoints as ckpts  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(ckpts, 'formats', module, raising=False)
  prompts.clear_cache()
  yield calls
  prompts.clear_cache()


def test_t5x_load_is_lazy_and_cached(fake_formats, table, vocab):
  loader_a = prompts.t5x_load('/ckpt/checkpoint_3')
  loader_b = prompts.t5x_load('/ckpt/checkpoint_3', 'target/token_embedder/embedding')
  assert not fake_formats  # Nothing read yet.
  init = prompts.from_embedded_list(
      loader_a, vocab, ['positive'], prompts.from_sample_of_embeddings(loader_b, 10)
  )
  x = np.asarray(init(jax.random.PRNGKey(0), (3, H)))
  np.testing.assert_allclose(x[0], table[vocab.encode('positive')].mean(0), rtol=1e-6)
  assert fake_formats == [('/ckpt/checkpoint_3', ('token_embedder/embedding',))]
  np.testing.assert_array_equal(np.asarray(loader_b), table)
  assert len(fake_formats) == 1


def test_t5x_load_missing_variable(fake_formats):
  with pytest.raises(KeyError, match='decoder/nothing'):
    prompts.t5x_load('/ckpt', 'decoder/nothing')()


def test_t5x_load_real_t5x_checkpoint(tmp_path, table):
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / 'checkpoint_3')
  t5x_format.save(
      path,
      {
          'token_embedder': {'embedding': table},
          'encoder': {'encoder_norm': {'scale': np.ones(H, np.float32)}},
      },
      3,
  )
  prompts.clear_cache()
  loader = prompts.t5x_load(path)
  np.testing.assert_array_equal(loader(), table)
  init = prompts.from_sample_of_embeddings(prompts.t5x_load(path), 10)
  ids = _row_ids(init(jax.random.PRNGKey(0), (4, H)))
  assert len(set(ids)) == 4 and ids.max() < 10
  prompts.clear_cache()


def test_t5x_load_huggingface_directory(tmp_path):
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  config = t5.get_config('tiny')
  params = t5.init_variables(config)['params']
  huggingface.save_t5(str(tmp_path), config, params)
  prompts.clear_cache()
  np.testing.assert_allclose(
      prompts.t5x_load(str(tmp_path))(), np.asarray(params['token_embedder']['embedding'])
  )
  prompts.clear_cache()


def _save_orbax_checkpoint(model_dir, step, trainable):
  """A checkpoint as the runtime writes it during training."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  state = train_state.TrainState(
      step=jnp.asarray(step, jnp.int32),
      trainable=trainable,
      frozen={},
      opt_state={'v': jnp.zeros((2,), jnp.float32)},
  )
  return checkpoints.save_checkpoint(model_dir, state)


def test_t5x_load_our_orbax_checkpoint(tmp_path, table):
  """The prompt of a training run, by its checkpoint_<step> and by MODEL_DIR (latest)."""
  from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path / 'model')
  old_prompt = np.full((3, H), -1.0, np.float32)
  new_prompt = table[:3]
  _save_orbax_checkpoint(model_dir, 10, {'encoder': {'prompt': {'prompt': {'prompt': old_prompt}}}})
  path = _save_orbax_checkpoint(
      model_dir, 20, {'encoder': {'prompt': {'prompt': {'prompt': new_prompt}}}}
  )
  assert path == str(tmp_path / 'model' / 'checkpoint_20')
  prompts.clear_cache()
  by_path = prompts.t5x_load(path, 'encoder/prompt/prompt/prompt')()
  np.testing.assert_array_equal(by_path, new_prompt)
  assert by_path.dtype == np.float32
  prompts.clear_cache()
  np.testing.assert_array_equal(
      prompts.t5x_load(model_dir, 'encoder/prompt/prompt/prompt')(), new_prompt
  )
  prompts.clear_cache()
  older = prompts.t5x_load(
      str(tmp_path / 'model' / 'checkpoint_10'), 'encoder/prompt/prompt/prompt'
  )
  np.testing.assert_array_equal(older(), old_prompt)
  # As a prompt initializer (the released-prompt workflow, `from_array(t5x_load(...))`).
  module = prompts.Prompt(
      length=3,
      embed_dim=H,
      prompt_init=prompts.from_array(
          prompts.t5x_load(model_dir, 'encoder/prompt/prompt/prompt', np.float32)
      ),
  )
  param = module.init(jax.random.PRNGKey(0))['params']['prompt']
  np.testing.assert_array_equal(np.asarray(param), new_prompt)
  # One format detection per read.
  resolved = []
  real_resolve = formats.resolve
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(formats, 'resolve', lambda p: resolved.append(p) or real_resolve(p))
    prompts.clear_cache()
    prompts.t5x_load(model_dir, 'encoder/prompt/prompt/prompt')()
  assert resolved == [model_dir]
  # A variable the checkpoint does not hold: a KeyError naming it and what is there.
  prompts.clear_cache()
  with pytest.raises(KeyError, match=r"'token_embedder/embedding'.*encoder/prompt/prompt/prompt"):
    prompts.t5x_load(model_dir)()
  prompts.clear_cache()


# ----------------------------------------------------------- Prompt module --


def test_prompt_module_param_and_axes():
  module = prompts.Prompt(length=5, dtype=jnp.bfloat16)
  embedded = jnp.zeros((2, 3, H))
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((2, 3), jnp.int32), embedded)
  param = variables['params']['prompt']
  assert param.shape == (5, H) and param.dtype == jnp.float32
  assert variables['params_axes']['prompt_axes'].names == ('prompt', 'prompt_embed')
  out = module.apply(variables, None, embedded)
  assert out.dtype == jnp.bfloat16 and out.shape == (5, H)
  # Default init is the paper's U[-0.5, 0.5).
  assert float(param.min()) < 0 and float(param.max()) < 0.5
  # Once created, embed_dim is read from the parameter.
  np.testing.assert_array_equal(
      np.asarray(module.apply(variables), np.float32),
      np.asarray(param.astype(jnp.bfloat16), np.float32),
  )


def test_prompt_module_needs_embed_dim():
  with pytest.raises(ValueError, match='embed_dim'):
    prompts.Prompt(length=5).init(jax.random.PRNGKey(0))


def test_prompt_module_with_flax_initializer():
  module = prompts.Prompt(length=3, embed_dim=4, prompt_init=jax.nn.initializers.normal(1.0))
  assert module.init(jax.random.PRNGKey(0))['params']['prompt'].shape == (3, 4)


def test_inference_only_prompt(table):
  module = prompts.InferenceOnlyPrompt(4, H, prompts.from_array(table[:4]))
  variables = module.init(jax.random.PRNGKey(0))
  assert not variables.get('params')
  np.testing.assert_array_equal(np.asarray(module.apply(variables)), table[:4])


def test_expand_to_batch():
  x = jnp.arange(6.0).reshape(2, 3)
  y = prompts.expand_to_batch(x, 4)
  assert y.shape == (4, 2, 3)
  np.testing.assert_array_equal(np.asarray(y[3]), np.asarray(x))


# ------------------------------------------------------- combine functions --

TOKENS = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 11], [0, 0, 0, 0], [4, 3, 2, 0]])
P = 2


def _inputs():
  """Embedded = token id, prompt = 100 + 10 * row + position."""
  b = TOKENS.shape[0]
  prompt = 100 + 10 * np.arange(b)[:, None] + np.arange(P)[None, :]
  prompt = jnp.asarray(prompt, jnp.float32)[..., None].repeat(2, axis=-1)
  embedded = jnp.asarray(TOKENS, jnp.float32)[..., None].repeat(2, axis=-1)
  return prompt, embedded, jnp.asarray(TOKENS)


def _run(fn):
  out = np.asarray(fn(*_inputs()))
  assert out.shape == (TOKENS.shape[0], P + TOKENS.shape[1], 2)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  return out[..., 0].astype(int).tolist()


def test_prefix_prompt():
  assert _run(prompts.prefix_prompt) == [
      [100, 101, 5, 6, 1, 0],
      [110, 111, 7, 1, 0, 0],
      [120, 121, 8, 9, 10, 11],
      [130, 131, 0, 0, 0, 0],
      [140, 141, 4, 3, 2, 0],
  ]


def test_prefix_prompt_after_bos():
  assert _run(prompts.prefix_prompt_after_bos) == [
      [5, 100, 101, 6, 1, 0],
      [7, 110, 111, 1, 0, 0],
      [8, 120, 121, 9, 10, 11],
      [0, 130, 131, 0, 0, 0],
      [4, 140, 141, 3, 2, 0],
  ]


def test_suffix_prompt():
  assert _run(prompts.suffix_prompt) == [
      [5, 6, 1, 100, 101, 0],
      [7, 1, 110, 111, 0, 0],
      [8, 9, 10, 11, 120, 121],
      [130, 131, 0, 0, 0, 0],
      [4, 3, 2, 140, 141, 0],
  ]


def test_suffix_prompt_before_eos():
  fn = lambda *a: prompts.suffix_prompt(*a, before_eos=True)
  assert _run(fn) == [
      [5, 6, 100, 101, 1, 0],
      [7, 110, 111, 1, 0, 0],
      [8, 9, 10, 11, 120, 121],  # Does not end in EOS: after the last token.
      [130, 131, 0, 0, 0, 0],
      [4, 3, 2, 140, 141, 0],
  ]


def test_suffix_prompt_under_jit():
  out = jax.jit(prompts.suffix_prompt, static_argnames='before_eos')(*_inputs(), before_eos=True)
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(prompts.suffix_prompt(*_inputs(), True))
  )


MASK = TOKENS > 0
T, F = True, False


@pytest.mark.parametrize(
    'combine,mask_fn,expected',
    [
        (
            prompts.prefix_prompt,
            prompts.prefix_prompt_mask,
            [
                [T, T, T, T, T, F],
                [T, T, T, T, F, F],
                [T, T, T, T, T, T],
                [T, T, F, F, F, F],
                [T, T, T, T, T, F],
            ],
        ),
        (
            prompts.prefix_prompt_after_bos,
            prompts.prefix_prompt_after_bos_mask,
            [
                [T, T, T, T, T, F],
                [T, T, T, T, F, F],
                [T, T, T, T, T, T],
                [F, T, T, F, F, F],
                [T, T, T, T, T, F],
            ],
        ),
        (
            prompts.suffix_prompt,
            prompts.suffix_prompt_mask,
            [
                [T, T, T, T, T, F],
                [T, T, T, T, F, F],
                [T, T, T, T, T, T],
                [T, T, F, F, F, F],
                [T, T, T, T, T, F],
            ],
        ),
    ],
)
def test_mask_counterparts(combine, mask_fn, expected):
  explicit = np.asarray(mask_fn(TOKENS, MASK, P))
  generic = np.asarray(prompts.combine_mask(combine, TOKENS, MASK, P))
  np.testing.assert_array_equal(explicit, expected)
  np.testing.assert_array_equal(generic, expected)
  assert explicit.dtype == bool and generic.dtype == bool


def test_mask_carries_arbitrary_mask():
  """Prompt positions True; the rest is the given mask, moved like tokens."""
  mask = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], bool)
  for before_eos in (False, True):
    explicit = prompts.suffix_prompt_mask(TOKENS, mask, P, before_eos)
    generic = prompts.combine_mask(
        lambda p, e, t, b=before_eos: prompts.suffix_prompt(p, e, t, b), TOKENS, mask, P
    )
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(generic))
  np.testing.assert_array_equal(
      np.asarray(prompts.suffix_prompt_mask(TOKENS, mask, P, True)),
      [
          [T, F, T, T, T, F],
          [F, T, T, T, F, F],
          [T, T, F, T, T, T],
          [T, T, F, F, F, F],
          [F, F, T, T, T, F],
      ],
  )
