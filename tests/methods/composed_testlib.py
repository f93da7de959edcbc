"""Shared helpers of the composed-prompt tests: a tiny random T5, a padded batch, the reference
model (the plain backbone fed each example's prompt through a `PromptBank`) and float64 finite
differences of numpy formulas.

The reference check of a composed prompt generator: compute each example's prompt with a float64
numpy transcription of the method's formula, feed those prompts to the reference model, and
compare (1) its logits with the composed model's and (2) the composed model's parameter gradients
with the chain rule `d loss / d params = (d prompt / d params)^T (d loss / d prompt)`, where
`d loss / d prompt` comes from the reference model and the transpose-Jacobian product of the numpy
formula is taken by central differences in float64. The backbone is shared (tested elsewhere
against transformers); what is checked is the formula and its wiring into the prompt door.
"""

import functools
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5

CFG = t5.get_config('tiny')
H = CFG.emb_dim
B, L, T = 6, 7, 4
PROMPT_LENGTH = 4  # every method's composed prompt in these tests has 4 positions


@functools.lru_cache(maxsize=None)
def backbone_params() -> Dict:
  """A random tiny T5 (fixed seed), without prompt."""
  module = t5.EncoderDecoder(CFG)
  x = jnp.ones((2, 5), jnp.int32)
  with jax.ensure_compile_time_eval():  # concrete values even when first called inside a trace
    variables = module.init(jax.random.PRNGKey(7), x, x, x, enable_dropout=False)
    return jax.tree.map(np.asarray, variables['params'])


def batch(seed: int = 0, batch_size: int = B, first_tokens: Tuple[int, ...] = ()):
  """Padded encoder inputs `[B, L]`, decoder inputs and targets `[B, T]` (int32 numpy)."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, 100, size=(batch_size, L)).astype(np.int32)
  for i in range(batch_size):
    enc[i, 3 + i % (L - 3) :] = 0  # real lengths 3..L-1
  if first_tokens:
    enc = np.concatenate([np.asarray(first_tokens, np.int32).T.reshape(batch_size, -1), enc], 1)
  tgt = rng.randint(3, 100, size=(batch_size, T)).astype(np.int32)
  tgt[1, 2:] = 0
  tgt[4, 3:] = 0
  dec = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec, tgt


def loss_from_logits(logits, tgt):
  weights = (tgt > 0).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], -1)[..., 0]
  return jnp.sum(ce * weights) / jnp.sum(weights)


def with_prompt_params(prompt_params: Mapping, stack: str = 'encoder') -> Dict:
  """The backbone's parameters with `prompt_params` as `<stack>/prompt/prompt`."""
  flat = params_lib.flatten_params(backbone_params())
  for k, v in params_lib.flatten_params(prompt_params).items():
    flat[f'{stack}/prompt/prompt/{k}'] = v
  return jax.tree.map(jnp.asarray, params_lib.unflatten_params(flat))


def init_prompt_params(factory, enc, features=None) -> Dict:
  """The generator's initial parameters (`encoder/prompt/prompt/...`) of a composed model."""
  module = t5.EncoderDecoder(CFG, prompt_factory=factory)
  dec = jnp.ones((enc.shape[0], T), jnp.int32)
  kwargs = {'features': features} if features else {}
  variables = module.init(
      jax.random.PRNGKey(0), jnp.asarray(enc), dec, dec, enable_dropout=False, **kwargs
  )
  return jax.device_get(variables['params']['encoder']['prompt']['prompt'])


def composed_loss_grads(factory, prompt_params, enc, dec, tgt, features=None, trainable=None):
  """(loss, logits, grads of the generator's parameters) of the composed model.

  `trainable` (names of `prompt_params`) restricts the differentiated parameters (the rest are
  constants), as the runtime's train step does.
  """
  module = t5.EncoderDecoder(CFG, prompt_factory=factory)
  names = list(prompt_params) if trainable is None else list(trainable)
  train = {k: jax.tree.map(jnp.asarray, v) for k, v in prompt_params.items() if k in names}
  const = {k: v for k, v in prompt_params.items() if k not in names}
  kwargs = {'features': {k: jnp.asarray(v) for k, v in features.items()}} if features else {}

  def loss_fn(p):
    params = with_prompt_params({**const, **p})
    logits = module.apply(
        {'params': params},
        jnp.asarray(enc),
        jnp.asarray(dec),
        jnp.asarray(tgt),
        enable_dropout=False,
        **kwargs,
    )
    return loss_from_logits(logits, tgt), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(train)
  return float(loss), np.asarray(logits), jax.device_get(grads)


@functools.lru_cache(maxsize=None)
def _reference_fn(num: int, length: int):
  module = t5.EncoderDecoder(
      CFG, prompt_factory=prompted.make_prompt_factory(length, num_prompts=num)
  )

  def loss_fn(bank, enc, dec, tgt):
    params = with_prompt_params({'prompt': bank})
    logits = module.apply(
        {'params': params}, enc, dec, tgt, enable_dropout=False, prompt_ids=jnp.arange(num)
    )
    return loss_from_logits(logits, tgt), logits

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def reference(prompts_f64: np.ndarray, enc, dec, tgt):
  """(loss, logits, d loss / d prompt) of the plain backbone with per-example prompts."""
  fn = _reference_fn(prompts_f64.shape[0], prompts_f64.shape[1])
  (loss, logits), grad = fn(jnp.asarray(prompts_f64, jnp.float32), enc, dec, tgt)
  return float(loss), np.asarray(logits), np.asarray(grad, np.float64)


def fd_vjp(formula: Callable[[Dict[str, np.ndarray]], np.ndarray], params, cotangent, eps=1e-6):
  """`{name: d <cotangent, formula(params)> / d params[name]}` by float64 central differences."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  out = {}
  for name, value in params.items():
    grad = np.zeros_like(value)
    flat = value.reshape(-1)
    for i in range(flat.size):
      old = flat[i]
      flat[i] = old + eps
      plus = np.sum(cotangent * formula(params))
      flat[i] = old - eps
      minus = np.sum(cotangent * formula(params))
      flat[i] = old
      grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    out[name] = grad
  return out


def assert_close(actual, expected, rtol=1e-4, what=''):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.abs(expected).max(), 1e-12)
  err = np.abs(actual - expected).max() / scale
  assert err < rtol, f'{what}: max error {err:.3g} relative to max |expected| {scale:.3g}'


def random_like(params: Mapping, seed: int, scale: float = 0.5) -> Dict[str, np.ndarray]:
  """Random float32 values of the same shapes (away from the initializers' special values)."""
  rng = np.random.RandomState(seed)
  flat = params_lib.flatten_params(params)
  return params_lib.unflatten_params(
      {k: rng.uniform(-scale, scale, np.shape(v)).astype(np.float32) for k, v in flat.items()}
  )


def check_against_reference(
    factory,
    prompt_params,
    formula,
    features,
    *,
    enc=None,
    dec=None,
    tgt=None,
    trainable=None,
    nested_formula_params: Optional[Callable] = None,
    first_tokens=0,
):
  """Logits and gradients of the composed model against the numpy formula (module docstring).

  `formula(params_f64) -> [B, P, H]` takes the generator's parameters (flattened `/` names).
  With `first_tokens`, the reference model sees the inputs without that many leading tokens.
  Returns the composed model's gradients (flattened names).
  """
  if enc is None:
    enc, dec, tgt = batch()
  loss, logits, grads = composed_loss_grads(
      factory, prompt_params, enc, dec, tgt, features, trainable
  )
  flat = {k: np.asarray(v, np.float64) for k, v in params_lib.flatten_params(prompt_params).items()}
  prompts_f64 = formula(flat)
  ref_loss, ref_logits, g_prompt = reference(prompts_f64, enc[:, first_tokens:], dec, tgt)
  assert_close(logits, ref_logits, 1e-5, 'logits')
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  flat_grads = params_lib.flatten_params(grads)
  wanted = {k: flat[k] for k in flat_grads}
  ref_grads = fd_vjp(lambda p: formula({**flat, **p}), wanted, g_prompt)
  for k in flat_grads:
    assert_close(flat_grads[k], ref_grads[k], 1e-4, f'gradient of {k}')
  return flat_grads


def alone_equals_mixed(factory, prompt_params, features, enc=None, dec=None, tgt=None):
  """Each example of a mixed batch has the logits it gets alone (with its own features)."""
  if enc is None:
    enc, dec, tgt = batch()
  module = t5.EncoderDecoder(CFG, prompt_factory=factory)
  params = with_prompt_params(prompt_params)
  fn = jax.jit(
      lambda e, d, t, f: module.apply({'params': params}, e, d, t, enable_dropout=False, features=f)
  )
  mixed = np.asarray(fn(enc, dec, tgt, {k: jnp.asarray(v) for k, v in features.items()}))
  for i in range(enc.shape[0]):
    own = {k: jnp.asarray(v[i : i + 1]) for k, v in features.items()}
    alone = np.asarray(fn(enc[i : i + 1], dec[i : i + 1], tgt[i : i + 1], own))
    np.testing.assert_allclose(
        mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5, err_msg=f'example {i}'
    )
  return mixed
