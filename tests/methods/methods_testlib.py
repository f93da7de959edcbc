"""Shared rig of the methods' tests: a tiny T5 in ours and in transformers/PEFT, losses, gradients.

One random tiny transformers T5 1.1 (gated GELU, untied head, dropout 0) is converted to our
parameter tree, so PEFT and our model hold the same weights. `peft_loss_and_grads` runs PEFT's
forward/backward (mean token cross entropy over labels that are not -100); `our_loss_and_grads`
computes the same loss with our module, taking the gradient with respect to the method's
parameters only, as the runtime's train step does (the backbone enters as a constant).
"""

import functools
from typing import Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import train_state

VOCAB = 100
D_MODEL, D_KV, HEADS, D_FF = 32, 8, 4, 64


def tiny_config(**overrides):
  """The tiny T5 1.1 of the methods' numpy tests (vocabulary `VOCAB`)."""
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  return t5.get_config('tiny', vocab_size=VOCAB, **overrides)


def random_backbone(config, seed: int = 0) -> Dict[str, object]:
  """Random backbone parameters for `config`, drawn in numpy (nothing compiled)."""
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  shapes = params_lib.flatten_params(t5.init_variables(config, abstract=True)['params'])
  rng = np.random.RandomState(seed)
  out = {}
  for path, leaf in shapes.items():
    shape = tuple(leaf.shape)
    if path.endswith('/scale'):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    elif path.endswith('token_embedder/embedding'):
      value = rng.normal(size=shape)
    elif path.endswith('rel_embedding'):
      value = 0.5 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / np.sqrt(shape[0])
    out[path] = value.astype(np.float32)
  return params_lib.unflatten_params(out)


def hf_model(num_layers: int = 2, d_kv: int = D_KV, seed: int = 0):
  """A random tiny `T5ForConditionalGeneration` (T5 1.1 layout), in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.T5Config(
      vocab_size=VOCAB,
      d_model=D_MODEL,
      d_kv=d_kv,
      d_ff=D_FF,
      num_layers=num_layers,
      num_decoder_layers=num_layers,
      num_heads=HEADS,
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=False,
      dropout_rate=0.0,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      pad_token_id=0,
      eos_token_id=1,
      decoder_start_token_id=0,
  )
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config)
  model.eval()
  return model


def convert(hf, path: str):
  """Saves `hf` to `path` and reads it back as `(T5Config, params)` with our names."""
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  hf.save_pretrained(path)
  return huggingface.load_t5(path)


def batch(seed: int = 0, batch_size: int = 3, enc_len: int = 9, dec_len: int = 5):
  """A padded batch: `(encoder ids, targets)` int64 with 0 padding."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, size=(batch_size, enc_len)).astype(np.int64)
  enc[0, 6:] = 0
  enc[1, 3:] = 0
  tgt = rng.randint(2, VOCAB, size=(batch_size, dec_len)).astype(np.int64)
  tgt[1, 2:] = 0
  tgt[2, 4:] = 0
  return enc, tgt


def peft_loss_and_grads(peft_model, enc, tgt, named_params: Mapping[str, object]):
  """PEFT's loss and the gradients of `named_params` (`{name: torch parameter}`) as numpy."""
  import torch  # pylint: disable=g-import-not-at-top

  peft_model.zero_grad()
  out = peft_model(
      input_ids=torch.from_numpy(enc),
      attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
      labels=torch.from_numpy(np.where(tgt > 0, tgt, -100)),
  )
  out.loss.backward()
  grads = {}
  for name, p in named_params.items():
    grads[name] = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.detach().numpy().copy()
  return float(out.loss.detach()), grads


def peft_logits(peft_model, enc, tgt) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    out = peft_model(
        input_ids=torch.from_numpy(enc),
        attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
        labels=torch.from_numpy(np.where(tgt > 0, tgt, -100)),
    )
  return out.logits.numpy()[tgt > 0]


def decoder_inputs(tgt: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros((tgt.shape[0], 1), tgt.dtype), tgt[:, :-1]], axis=1)


def mean_ce(logits, tgt):
  weights = jnp.asarray(tgt > 0, jnp.float32)
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], -1)[..., 0]
  return jnp.sum(ce * weights) / jnp.sum(weights)


def our_loss_and_grads(
    module, params: Mapping[str, object], trainable_regex: str, enc, tgt
) -> Tuple[float, Dict[str, np.ndarray]]:
  """Our mean token CE and its gradient w.r.t. the parameters matching `trainable_regex` only."""
  full = jax.tree.map(jnp.asarray, params)
  trainable, frozen = train_state.split_params(full, params_lib.match_any([trainable_regex]))
  assert params_lib.flatten_params(trainable), f'nothing matches {trainable_regex}'
  dec_in = decoder_inputs(tgt)

  def loss_fn(t):
    logits = module.apply(
        {'params': train_state.merge_params(t, frozen)},
        enc.astype(np.int32),
        dec_in.astype(np.int32),
        tgt.astype(np.int32),
        enable_dropout=False,
    )
    return mean_ce(logits, tgt)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  return float(loss), {k: np.asarray(v) for k, v in params_lib.flatten_params(grads).items()}


def logits(module, params, enc, tgt) -> np.ndarray:
  """Logits at the real target positions `[num real targets, vocab]` (padding rows are noise)."""
  apply = jax.jit(functools.partial(module.apply, enable_dropout=False))
  return np.asarray(
      apply(
          {'params': params},
          enc.astype(np.int32),
          decoder_inputs(tgt).astype(np.int32),
          tgt.astype(np.int32),
      )
  )[tgt > 0]


def with_method_params(base: Mapping[str, object], method: Mapping[str, object]):
  """The backbone tree `base` plus flat `method` parameters."""
  flat = params_lib.flatten_params(base)
  flat.update({k: np.asarray(v, np.float32) for k, v in method.items()})
  return params_lib.unflatten_params(flat)


def method_param_shapes(module, enc, tgt, base) -> Dict[str, Tuple[int, ...]]:
  """`{path: shape}` of the parameters `module` has beyond the backbone `base` (nothing computed)."""
  dec_in = decoder_inputs(tgt)
  init = functools.partial(module.init, enable_dropout=False)
  variables = jax.eval_shape(
      init,
      jax.random.PRNGKey(0),
      enc.astype(np.int32),
      dec_in.astype(np.int32),
      tgt.astype(np.int32),
  )
  base_flat = params_lib.flatten_params(base)
  flat = params_lib.flatten_params(variables['params'])
  return {k: tuple(v.shape) for k, v in flat.items() if k not in base_flat}


def init_method_params(module, enc, tgt, base):
  """`module.init` on the batch, with the backbone replaced by `base`: returns the full tree."""
  dec_in = decoder_inputs(tgt)
  init = jax.jit(functools.partial(module.init, enable_dropout=False))
  variables = init(
      jax.random.PRNGKey(0), enc.astype(np.int32), dec_in.astype(np.int32), tgt.astype(np.int32)
  )
  flat = params_lib.flatten_params(jax.device_get(variables['params']))
  base_flat = params_lib.flatten_params(base)
  method = {k: v for k, v in flat.items() if k not in base_flat}
  return with_method_params(base, method), method


def assert_close_grads(ours: np.ndarray, theirs: np.ndarray, name: str, rtol: float = 1e-4):
  """Gradients within `rtol` relative (elementwise, with an absolute floor of rtol * max|g|)."""
  theirs = np.asarray(theirs, np.float64)
  ours = np.asarray(ours, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  scale = np.abs(theirs).max()
  assert scale > 0, f'{name}: the reference gradient is zero'
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale, err_msg=name)
