"""DePT (`methods/dept.py`) against a float64 numpy transcription, and its own learning rate.

The oracle adds `s A[:L] B` (`s = alpha / sqrt(r)`) to the embedded encoder inputs and then
prepends the prompt; loss within 2e-5 and gradients of the prompt, A and B by central differences
within 2e-3. At initialization (B = 0) the model is plain prompt tuning. `LearningRateMultiplier`
gives A and B another learning rate inside a `MultiOptimizer` with the same schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods_testlib as lib
import numpy_t5
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import dept
from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import optimizers

P, R, ALPHA, MAX_LEN = 2, 3, 8.0, 12
CFG = lib.tiny_config()


def test_loss_and_gradients_equal_numpy():
  base = lib.random_backbone(CFG, seed=6)
  enc, tgt = lib.batch()
  module = prompted.PromptEncoderDecoder(
      CFG, prompt_factory=dept.prompt_factory(P, max_length=MAX_LEN, rank=R, alpha=ALPHA)
  )
  shapes = lib.method_param_shapes(module, enc, tgt, base)
  assert shapes == {
      'encoder/prompt/prompt/prompt': (P, CFG.emb_dim),
      'encoder/prompt/lora_embedding_a': (MAX_LEN, R),
      'encoder/prompt/lora_embedding_b': (R, CFG.emb_dim),
  }
  full, init = lib.init_method_params(module, enc, tgt, base)
  bound = 1 / np.sqrt(R)
  a0 = init['encoder/prompt/lora_embedding_a']
  assert np.abs(a0).max() <= bound and np.abs(a0).max() > 0.5 * bound
  assert not init['encoder/prompt/lora_embedding_b'].any()
  plain = prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  np.testing.assert_allclose(  # B = 0: plain prompt tuning
      lib.logits(module, full, enc, tgt),
      lib.logits(
          plain,
          lib.with_method_params(
              base, {'encoder/prompt/prompt/prompt': init['encoder/prompt/prompt/prompt']}
          ),
          enc,
          tgt,
      ),
      atol=1e-6,
  )
  rng = np.random.RandomState(7)
  ours = {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}
  loss, grads = lib.our_loss_and_grads(
      module, lib.with_method_params(base, ours), '.*/prompt/.*', enc, tgt
  )
  ref = numpy_t5.NumpyT5(base, CFG.num_heads)

  def np_loss(v):
    a, b = v['encoder/prompt/lora_embedding_a'], v['encoder/prompt/lora_embedding_b']
    update = ALPHA / np.sqrt(R) * (a[: enc.shape[1]] @ b)
    return ref.loss(enc, tgt, prompt=v['encoder/prompt/prompt/prompt'], embed_update=update)

  np.testing.assert_allclose(loss, np_loss(ours), rtol=2e-5)
  for path in ours:
    for index in [(0, 1), (1, 2)]:
      fd = numpy_t5.finite_difference(
          lambda x, p=path: np_loss(dict(ours, **{p: x})), ours[path], index
      )
      np.testing.assert_allclose(
          grads[path][index], fd, rtol=2e-3, atol=2e-5, err_msg=f'{path}{index}'
      )
  # Rows of A past the input length get no gradient.
  assert not grads['encoder/prompt/lora_embedding_a'][enc.shape[1] :].any()


def test_inputs_longer_than_max_length_are_a_clear_error():
  base = lib.random_backbone(CFG, seed=6)
  enc, tgt = lib.batch()
  module = prompted.PromptEncoderDecoder(
      CFG, prompt_factory=dept.prompt_factory(P, max_length=enc.shape[1] - 1, rank=R)
  )
  with pytest.raises(ValueError, match='longer than max_length'):
    lib.method_param_shapes(module, enc, tgt, base)


def test_the_update_has_its_own_learning_rate():
  params = {'prompt': jnp.ones((2, 4)), 'lora_embedding_a': jnp.ones((3, 2))}
  grads = {'prompt': jnp.full((2, 4), 0.5), 'lora_embedding_a': jnp.full((3, 2), 0.5)}
  factory = lambda: adafactor.Adafactor(
      decay_rate=0.8, multiply_by_parameter_scale=False, factored=False
  )
  traversal = lambda r: optimizers.ModelParamTraversal(optimizers.match_any([r]))
  multi = optimizers.MultiOptimizer(
      (
          (traversal('.*prompt.*'), factory()),
          (traversal('.*lora_embedding.*'), dept.LearningRateMultiplier(factory(), 0.01)),
      )
  )
  state = multi.init_state(params)
  hp = multi.update_hyper_params(learning_rate=0.3)
  new, _ = multi.apply_gradient(hp, params, state, grads)
  single = factory()
  for name, lr in (('prompt', 0.3), ('lora_embedding_a', 0.003)):
    sub = {name: params[name]}
    expected, _ = single.apply_gradient(
        single.update_hyper_params(learning_rate=lr),
        sub,
        single.init_state(sub),
        {name: grads[name]},
    )
    np.testing.assert_allclose(np.asarray(new[name]), np.asarray(expected[name]), rtol=1e-6)
  # The schedule's rate for the prompt, 1/100 of it for the update (Adafactor's normalized step).
  np.testing.assert_allclose(
      np.asarray(new['prompt']) - 1,
      100 * (np.asarray(new['lora_embedding_a']) - 1).mean(),
      rtol=1e-4,
  )
