"""The models' door for auxiliary per-example outputs: what a prompt module sows into
`hooks.PER_EXAMPLE_OUTPUTS` while the inputs are encoded (or the prompt is prefilled) comes back
from `predict_batch_with_aux` next to `scores`, one row per example (ATTEMPT writes its mixture
weights this way); decoding is unchanged by it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.architectures import hooks
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

P = 3


class SowingPrompt(nn.Module):
  """A prompt that records, per example, the sum of its input token ids."""

  length: int = P

  @nn.compact
  def __call__(self, tokens=None, embedded=None, prompt_ids=None):
    del prompt_ids
    prompt = self.param('prompt', nn.initializers.normal(1.0), (self.length, embedded.shape[-1]))
    self.sow(hooks.PER_EXAMPLE_OUTPUTS, 'token_sum', jnp.sum(tokens, axis=1).astype(jnp.float32))
    return prompt


def _factory():
  def factory():
    return prompted.CombinedPrompt(prompt=SowingPrompt(parent=None))

  factory.length = P
  return factory


TOKENS = np.array([[5, 6, 7, 1, 0], [9, 1, 0, 0, 0], [3, 4, 1, 0, 0]], np.int32)


def test_encoder_decoder_returns_sown_outputs_per_example():
  config = t5.get_config('tiny', vocab_size=32)
  module = t5.EncoderDecoder(config, prompt_factory=_factory())
  plain = t5.EncoderDecoder(config, prompt_factory=prompted.make_prompt_factory(P))
  model = models.EncoderDecoderModel(module, None, None, decode_fn=decoding.beam_search)
  reference = models.EncoderDecoderModel(plain, None, None, decode_fn=decoding.beam_search)
  batch = {
      'encoder_input_tokens': TOKENS,
      'decoder_input_tokens': np.zeros((3, 4), np.int32),
      'decoder_target_tokens': np.zeros((3, 4), np.int32),
  }
  params = model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
  )
  params = params['params']
  decodes, aux = jax.jit(model.predict_batch_with_aux)(params, batch)
  np.testing.assert_array_equal(np.asarray(aux['token_sum']), TOKENS.sum(1))
  assert set(aux) == {'scores', 'token_sum'}
  # The same prompt as a plain parameter decodes the same tokens with the same scores.
  ref_decodes, ref_aux = jax.jit(reference.predict_batch_with_aux)(params, batch)
  np.testing.assert_array_equal(np.asarray(decodes), np.asarray(ref_decodes))
  np.testing.assert_allclose(np.asarray(aux['scores']), np.asarray(ref_aux['scores']), rtol=1e-6)
  assert set(ref_aux) == {'scores'}


def test_two_modules_sowing_one_name_is_an_error():
  sown = {
      hooks.PER_EXAMPLE_OUTPUTS: {
          'a': {'x': (jnp.zeros(2),)},
          'b': {'x': (jnp.ones(2),)},
      }
  }
  with pytest.raises(ValueError, match="sowed the per-example output 'x'"):
    models.per_example_outputs(sown)
  assert models.per_example_outputs({}) == {}
