"""PromptEncoderDecoder equals Hugging Face PEFT prompt tuning (loss and prompt gradient).

A random tiny transformers T5 (gated-GELU, untied head) is converted to our format; PEFT's
`PromptTuningConfig(num_transformer_submodules=1)` prepends its virtual tokens to the encoder
inputs (and ones to the attention mask), exactly like `prompts.prefix_prompt`. With the same prompt
values, the same padded batch and no dropout, PEFT's loss (mean token cross-entropy over labels
that are not -100) must equal ours (sum CE / number of target tokens), and so must the gradient
with respect to the prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

P = 5
VOCAB = 100


def _hf_model():
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
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      pad_token_id=0,
      eos_token_id=1,
      decoder_start_token_id=0,
  )
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  model.eval()
  return model


def _batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, VOCAB, size=(3, 9)).astype(np.int64)
  enc[0, 6:] = 0
  enc[1, 3:] = 0
  tgt = rng.randint(2, VOCAB, size=(3, 5)).astype(np.int64)
  tgt[1, 2:] = 0
  tgt[2, 4:] = 0
  return enc, tgt


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  hf = _hf_model()
  path = str(tmp_path_factory.mktemp('hf_t5'))
  hf.save_pretrained(path)
  config, params = huggingface.load_t5(path)
  prompt = np.random.RandomState(1).uniform(-0.5, 0.5, size=(P, config.emb_dim))
  prompt = prompt.astype(np.float32)
  peft_config = peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P, num_transformer_submodules=1
  )
  peft_model = peft.get_peft_model(hf, peft_config)
  peft_model.eval()
  embedding = peft_model.prompt_encoder['default'].embedding
  assert tuple(embedding.weight.shape) == (P, config.emb_dim)
  with torch.no_grad():
    embedding.weight.copy_(torch.from_numpy(prompt))
  return config, params, prompt, peft_model


def test_loss_and_prompt_gradient_match_peft(models):
  config, params, prompt, peft_model = models
  enc, tgt = _batch()

  # PEFT / PyTorch.
  labels = torch.from_numpy(np.where(tgt > 0, tgt, -100))
  peft_model.zero_grad()
  out = peft_model(
      input_ids=torch.from_numpy(enc),
      attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
      labels=labels,
  )
  out.loss.backward()
  peft_loss = float(out.loss.detach())
  peft_grad = peft_model.prompt_encoder['default'].embedding.weight.grad.detach().numpy()

  # Ours.
  model = prompted.PromptEncoderDecoder(config, prompt_length=P)
  flat = params_lib.flatten_params(params)
  flat['encoder/prompt/prompt/prompt'] = prompt
  full = jax.tree.map(jnp.asarray, params_lib.unflatten_params(flat))
  train, frozen = train_state.split_params(full, params_lib.match_any(['.*/prompt/.*']))
  dec_in = np.concatenate([np.zeros((3, 1), np.int64), tgt[:, :-1]], axis=1)
  weights = (tgt > 0).astype(np.float32)

  def loss_fn(p):
    logits = model.apply(
        {'params': p},
        enc.astype(np.int32),
        dec_in.astype(np.int32),
        tgt.astype(np.int32),
        enable_dropout=False,
    )
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tgt)[..., None], -1)[..., 0]
    return jnp.sum(ce * weights) / jnp.sum(weights)

  # As the runtime's step: gradients w.r.t. the trainable subtree only, the rest constant.
  loss, grads = jax.jit(jax.value_and_grad(lambda t: loss_fn(train_state.merge_params(t, frozen))))(
      train
  )
  grad = np.asarray(grads['encoder']['prompt']['prompt']['prompt'])

  np.testing.assert_allclose(float(loss), peft_loss, rtol=1e-5)
  assert np.abs(peft_grad).max() > 0
  np.testing.assert_allclose(grad, peft_grad, rtol=1e-4, atol=1e-4 * np.abs(peft_grad).max())
