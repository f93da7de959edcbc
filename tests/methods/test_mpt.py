"""MPT (`prompt_tuning.methods.mpt`): the float64 numpy reference of `P* * (U_t V_t)` on the tiny
T5 (forward and gradient) in a batch mixing 3 tasks; Hugging Face PEFT 0.21's
`MultitaskPromptTuningConfig` on the same random T5 (loss and gradients within 1e-4 relative);
import / export of PEFT's MPT state; source -> target initializers; the distillation term."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import composed_testlib as lib
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.methods import mpt

H = lib.H
NUM_TASKS, RANK = 4, 2
TASK_IDS = np.array([2, 0, 1, 1, 0, 2], np.int32)


def ref_mpt(p, task_ids=TASK_IDS):
  """P_b = P* * (U[t_b] @ V[t_b])."""
  task = np.einsum('bnr,brh->bnh', p['prefix_task_cols'][task_ids], p['prefix_task_rows'][task_ids])
  return p['shared_prompt'][None] * task


def _factory(**kwargs):
  return mpt.mpt_prompt_factory(4, NUM_TASKS, RANK, **kwargs)


@pytest.fixture(scope='module')
def params():
  enc, _, _ = lib.batch()
  init = lib.init_prompt_params(_factory(), enc, {'task_ids': TASK_IDS})
  assert init['shared_prompt'].shape == (4, H)
  assert init['prefix_task_cols'].shape == (NUM_TASKS, 4, RANK)
  assert init['prefix_task_rows'].shape == (NUM_TASKS, RANK, H)
  # PEFT's init: U, V ~ N(0, 0.02^2).
  assert 0.01 < init['prefix_task_cols'].std() < 0.03
  return lib.random_like(init, seed=5, scale=1.0)


def test_forward_and_gradient_match_numpy_in_a_mixed_batch(params):
  features = {'task_ids': TASK_IDS}
  grads = lib.check_against_reference(_factory(), params, ref_mpt, features)
  assert np.abs(grads['shared_prompt']).max() > 0
  for name in ('prefix_task_cols', 'prefix_task_rows'):
    assert all(np.abs(grads[name][t]).max() > 0 for t in range(3))
    assert np.all(grads[name][3] == 0), name
  lib.alone_equals_mixed(_factory(), params, features)


def test_single_task_target_needs_no_task_ids(params):
  one = {k: (v[:1] if k != 'shared_prompt' else v) for k, v in params.items()}
  factory = mpt.mpt_prompt_factory(4, 1, RANK)
  lib.check_against_reference(factory, one, lambda p: ref_mpt(p, np.zeros(lib.B, int)), None)


def test_from_source_initializers(tmp_path):
  source = np.random.RandomState(0).normal(size=(3, 4, 2)).astype(np.float32)
  path = str(tmp_path / 'cols.npy')
  np.save(path, source)
  load = lambda: np.load(path)
  np.testing.assert_allclose(mpt.from_source(load)(None, (3, 4, 2)), source)
  np.testing.assert_allclose(
      mpt.from_source(load, 'mean')(None, (1, 4, 2)), source.mean(0, keepdims=True), rtol=1e-6
  )
  np.testing.assert_allclose(mpt.from_source(load, 2)(None, (1, 4, 2)), source[2:3])
  np.testing.assert_allclose(mpt.from_source(load, 1)(None, (2, 4, 2)), source[[1, 1]])
  with pytest.raises(ValueError, match='not one of the 3 source tasks'):
    mpt.from_source(load, 5)(None, (1, 4, 2))
  with pytest.raises(ValueError, match='rank and width must match'):
    mpt.from_source(load, 'mean')(None, (1, 4, 3))


# --------------------------------------------------------------------------------- PEFT 0.21 --

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')
VOCAB, N = 100, 5


@pytest.fixture(scope='module')
def peft_pair(tmp_path_factory):
  """A random tiny transformers T5, our parameters of it, and PEFT MPT on it (1 submodule)."""
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  config = transformers.T5Config(
      vocab_size=VOCAB,
      d_model=32,
      d_kv=8,
      d_ff=64,
      num_layers=2,
      num_decoder_layers=2,
      num_heads=4,
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=False,
      dropout_rate=0.0,
      pad_token_id=0,
      eos_token_id=1,
      decoder_start_token_id=0,
  )
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(config).eval()
  path = str(tmp_path_factory.mktemp('hf_t5'))
  hf.save_pretrained(path)
  cfg, backbone = huggingface.load_t5(path)
  peft_config = peft.MultitaskPromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM,
      num_virtual_tokens=N,
      num_tasks=3,
      num_ranks=RANK,
      num_transformer_submodules=1,
  )
  model = peft.get_peft_model(hf, peft_config).eval()
  rng = np.random.RandomState(11)
  values = {
      'shared_prompt': rng.uniform(-0.5, 0.5, (N, 32)).astype(np.float32),
      'prefix_task_cols': rng.normal(0, 1.0, (3, N, RANK)).astype(np.float32),
      'prefix_task_rows': rng.normal(0, 1.0, (3, RANK, 32)).astype(np.float32),
  }
  enc = model.prompt_encoder['default']
  with torch.no_grad():
    enc.embedding.weight.copy_(torch.from_numpy(values['shared_prompt']))
    enc.prefix_task_cols.copy_(torch.from_numpy(values['prefix_task_cols']))
    enc.prefix_task_rows.copy_(torch.from_numpy(values['prefix_task_rows']))
  return cfg, backbone, model, values, path


def _peft_batch():
  rng = np.random.RandomState(3)
  enc = rng.randint(2, VOCAB, size=(5, 9)).astype(np.int64)
  enc[0, 6:] = 0
  enc[3, 4:] = 0
  tgt = rng.randint(2, VOCAB, size=(5, 4)).astype(np.int64)
  tgt[1, 2:] = 0
  return enc, tgt, np.array([0, 2, 1, 2, 0], np.int64)


def _our_loss_and_grads(cfg, backbone, values, enc, tgt, task_ids):
  module = t5.EncoderDecoder(cfg, prompt_factory=mpt.mpt_prompt_factory(N, 3, RANK))
  dec = np.concatenate([np.zeros((enc.shape[0], 1), np.int64), tgt[:, :-1]], axis=1)

  def loss_fn(p):
    flat = params_lib.flatten_params(backbone)
    flat.update({f'encoder/prompt/prompt/{k}': v for k, v in p.items()})
    full = jax.tree.map(jnp.asarray, params_lib.unflatten_params(flat))
    logits = module.apply(
        {'params': full},
        jnp.asarray(enc, jnp.int32),
        jnp.asarray(dec, jnp.int32),
        jnp.asarray(tgt, jnp.int32),
        enable_dropout=False,
        features={'task_ids': jnp.asarray(task_ids, jnp.int32)},
    )
    return lib.loss_from_logits(logits, jnp.asarray(tgt, jnp.int32))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(jax.tree.map(jnp.asarray, values))
  return float(loss), jax.device_get(grads)


def test_loss_and_gradients_match_peft(peft_pair):
  cfg, backbone, model, values, _ = peft_pair
  enc, tgt, task_ids = _peft_batch()
  model.zero_grad()
  out = model(
      input_ids=torch.from_numpy(enc),
      attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
      labels=torch.from_numpy(np.where(tgt > 0, tgt, -100)),
      task_ids=torch.from_numpy(task_ids),
  )
  out.loss.backward()
  pe = model.prompt_encoder['default']
  peft_grads = {
      'shared_prompt': pe.embedding.weight.grad.numpy(),
      'prefix_task_cols': pe.prefix_task_cols.grad.numpy(),
      'prefix_task_rows': pe.prefix_task_rows.grad.numpy(),
  }
  loss, grads = _our_loss_and_grads(cfg, backbone, values, enc, tgt, task_ids)
  np.testing.assert_allclose(loss, float(out.loss.detach()), rtol=1e-5)
  for name, expected in peft_grads.items():
    assert np.abs(expected).max() > 0, name
    lib.assert_close(grads[name], expected, 1e-4, f'gradient of {name}')


def test_export_loads_in_peft_and_peft_state_imports(peft_pair, tmp_path):
  cfg, backbone, model, values, hf_path = peft_pair
  # PEFT's own save -> our import: the same arrays.
  saved = str(tmp_path / 'peft_saved')
  model.save_pretrained(saved)
  imported = mpt.load_peft(saved)
  for name, value in values.items():
    np.testing.assert_array_equal(imported[name], value)
  # Our export -> PEFT's loader: the same loss as the model we exported from.
  exported = mpt.export_peft(str(tmp_path / 'ours'), {k: v * 1.5 for k, v in values.items()})
  config = json.load(open(os.path.join(exported, 'adapter_config.json')))
  assert config['peft_type'] == 'MULTITASK_PROMPT_TUNING' and config['num_tasks'] == 3
  base = transformers.T5ForConditionalGeneration.from_pretrained(hf_path).eval()
  loaded = peft.PeftModel.from_pretrained(base, exported).eval()
  enc, tgt, task_ids = _peft_batch()
  with torch.no_grad():
    out = loaded(
        input_ids=torch.from_numpy(enc),
        attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
        labels=torch.from_numpy(np.where(tgt > 0, tgt, -100)),
        task_ids=torch.from_numpy(task_ids),
    )
  ours, _ = _our_loss_and_grads(
      cfg, backbone, {k: v * 1.5 for k, v in values.items()}, enc, tgt, task_ids
  )
  np.testing.assert_allclose(ours, float(out.loss), rtol=1e-5)


def test_two_submodule_state_imports_the_encoder_half(tmp_path):
  rng = np.random.RandomState(0)
  state = {
      'prompt_embeddings': rng.normal(size=(2 * N, 32)).astype(np.float32),
      'prefix_task_cols': rng.normal(size=(3, 2 * N, RANK)).astype(np.float32),
      'prefix_task_rows': rng.normal(size=(3, RANK, 32)).astype(np.float32),
  }
  out = mpt.import_peft_state(state, num_virtual_tokens=N)
  np.testing.assert_array_equal(out['shared_prompt'], state['prompt_embeddings'][:N])
  np.testing.assert_array_equal(out['prefix_task_cols'], state['prefix_task_cols'][:, :N])
  np.testing.assert_array_equal(out['prefix_task_rows'], state['prefix_task_rows'])
  with pytest.raises(ValueError, match='missing'):
    mpt.import_peft_state({'prompt_embeddings': state['prompt_embeddings']})


# ------------------------------------------------------------------------------ distillation --


def test_distillation_term_matches_numpy(params):
  """KL(teacher || student) summed over target tokens + MSE of the encoder outputs."""
  enc, dec, tgt = lib.batch()
  teachers = np.random.RandomState(9).uniform(-1, 1, (3, 4, H)).astype(np.float32)
  factory = _factory()
  module = t5.EncoderDecoder(lib.CFG, prompt_factory=factory)
  full = lib.with_prompt_params(params)
  batch = {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec,
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
      'task_ids': TASK_IDS,
  }
  feats = {'features': {'task_ids': jnp.asarray(TASK_IDS)}}
  logits = module.apply({'params': full}, enc, dec, tgt, enable_dropout=False, **feats)
  term = mpt.PromptDistillation(module, teachers, weight=0.5, hidden_weight=2.0, temperature=2.0)
  value, metrics = jax.jit(lambda p, b, l: term(p, b, {'logits': l}))(full, batch, logits)

  teacher_module = t5.EncoderDecoder(
      lib.CFG, prompt_factory=prompted.make_prompt_factory(4, num_prompts=3)
  )
  t_full = lib.with_prompt_params({'prompt': teachers})
  t_logits = teacher_module.apply(
      {'params': t_full}, enc, dec, tgt, enable_dropout=False, prompt_ids=TASK_IDS
  )

  def log_softmax(x):
    x = np.asarray(x, np.float64) / 2.0
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lt, ls = log_softmax(t_logits), log_softmax(logits)
  kl = (np.exp(lt) * (lt - ls)).sum(-1) * 4.0
  kl = (kl * (tgt > 0)).sum()
  s_enc = np.asarray(
      module.apply({'params': full}, enc, enable_dropout=False, method=module.encode, **feats),
      np.float64,
  )
  t_enc = np.asarray(
      teacher_module.apply(
          {'params': t_full},
          enc,
          enable_dropout=False,
          method=teacher_module.encode,
          prompt_ids=TASK_IDS,
      ),
      np.float64,
  )
  real = (enc > 0)[..., None]
  mse = (((s_enc[:, 4:] - t_enc[:, 4:]) * real) ** 2).sum() / (real.sum() * H)
  np.testing.assert_allclose(float(value), 0.5 * (kl + 2.0 * mse), rtol=1e-5)
  assert kl > 0 and mse > 0
  # No gradient reaches the teacher; the student's parameters get one.
  grads = jax.grad(
      lambda p: term(
          lib.with_prompt_params(p),
          batch,
          {
              'logits': module.apply(
                  {'params': lib.with_prompt_params(p)},
                  enc,
                  dec,
                  tgt,
                  enable_dropout=False,
                  **feats,
              )
          },
      )[0]
  )(jax.tree.map(jnp.asarray, params))
  assert np.abs(grads['shared_prompt']).max() > 0
