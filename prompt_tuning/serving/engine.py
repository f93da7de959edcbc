"""The serving engine: a frozen encoder-decoder, a bank of prompts, and functions compiled once.

The model's module is a `PromptEncoderDecoder` with a `PromptBank` of `capacity` prompts
(`encoder/prompt/prompt/prompt`, `[capacity, P, H]`); every row of a batch picks its prompt with
`prompt_ids`. The bank is an argument of the compiled functions, so adding, replacing or removing a
prompt writes one row of a device array and never recompiles.

Shapes come from a small set of buckets: batch sizes `batch_buckets`, encoder lengths
`input_buckets`, target lengths `target_buckets` (scoring) and one decoding length
`max_decode_length`. `compile_all()` builds every function ahead of time
(`jax.jit(...).lower(...).compile()`); a call with a shape outside the buckets is an error, not a
silent recompilation. `compile_count` counts the compilations done.

Kinds of work (one compiled function per kind and bucket):

* `sample`: `temperature_sample` with a per-row temperature (0 is greedy), top-k and top-p off;
  the rows of one batch may mix greedy and sampled requests and any prompts.
* `beam`: `beam_search` with each of `beam_sizes` (brevity penalty `alpha`).
* `score`: the log-likelihood of given targets (`score_batch`), for rank classification.
"""

import dataclasses
import functools
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models
from prompt_tuning.runtime import xla_options

BANK_PATH = 'encoder/prompt/prompt/prompt'


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  """Buckets and limits of a server (gin: `engine.ServingConfig.*`).

  Attributes:
    batch_buckets: padded batch sizes (rows); the largest is the largest batch.
    input_buckets: padded encoder input lengths (tokens, EOS included); the largest is the longest
      input accepted (longer inputs are refused unless the request asks to truncate).
    target_buckets: padded target lengths for scoring.
    max_decode_length: decoded tokens per generation (the decoder length of `generate`).
    beam_sizes: beam sizes compiled for `beam` decoding.
    alpha: the brevity penalty of beam search.
    max_wait_ms: how long the batcher waits for more requests before running a batch.
    max_queue: rows admitted and not yet answered; more are refused with 503.
    request_timeout_s: a request not answered in this time gets 504.
    poll_interval_s: how often the prompt library is checked for changes.
  """

  batch_buckets: Tuple[int, ...] = (1, 4, 16)
  input_buckets: Tuple[int, ...] = (32, 128)
  target_buckets: Tuple[int, ...] = (8, 32)
  max_decode_length: int = 32
  beam_sizes: Tuple[int, ...] = (4,)
  alpha: float = 0.6
  max_wait_ms: float = 5.0
  max_queue: int = 256
  request_timeout_s: float = 60.0
  poll_interval_s: float = 2.0

  def __post_init__(self):
    for name in ('batch_buckets', 'input_buckets', 'target_buckets', 'beam_sizes'):
      value = tuple(sorted(int(v) for v in getattr(self, name)))
      if not value or value[0] <= 0:
        raise ValueError(f'ServingConfig.{name} must be positive integers, got {value}.')
      object.__setattr__(self, name, value)
    if self.max_decode_length <= 0:
      raise ValueError(f'max_decode_length must be positive, got {self.max_decode_length}.')

  @property
  def max_batch_size(self) -> int:
    return self.batch_buckets[-1]


def bucket(value: int, buckets: Sequence[int]) -> Optional[int]:
  """The smallest bucket >= value, or None when none is large enough."""
  for b in buckets:
    if value <= b:
      return b
  return None


_COMPILES = {'count': 0}
_LISTENER_LOCK = threading.Lock()
_LISTENER = {'installed': False}


def _install_compile_listener() -> None:
  """Counts XLA backend compilations of the whole process (a flat count means no recompiles)."""
  with _LISTENER_LOCK:
    if _LISTENER['installed']:
      return

    def on_duration(event: str, duration: float, **kwargs) -> None:
      del duration, kwargs
      if event == '/jax/core/compile/backend_compile_duration':
        _COMPILES['count'] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _LISTENER['installed'] = True


def process_compile_count() -> int:
  """XLA compilations in this process since the first engine was built."""
  return _COMPILES['count']


class ServingEngine:
  """Runs padded mixed-task batches on a frozen model with a bank of prompts.

  Args:
    model: a `models.EncoderDecoderModel` whose module is a `PromptEncoderDecoder` with
      `num_prompts` (the bank capacity) set.
    params: the model's parameters (frozen backbone; the bank entry is replaced by `set_row`).
    config: buckets and limits.
    eos_id: end-of-sequence id of the output vocabulary.
  """

  def __init__(self, model, params: Mapping[str, Any], config: ServingConfig, *, eos_id: int = 1):
    if not isinstance(model, models.EncoderDecoderModel):
      raise ValueError('The server serves encoder-decoder models (models.EncoderDecoderModel).')
    module = model.module
    capacity = getattr(module, 'num_prompts', None)
    if not capacity:
      raise ValueError(
          'The served model needs a prompt bank: bind prompted.PromptEncoderDecoder.num_prompts '
          '(the bank capacity, runs/serve.gin does) so that every row picks its prompt.'
      )
    _install_compile_listener()
    self.model = model
    self.config = config
    self.eos_id = eos_id
    flat = params_lib.flatten_params(params)
    if BANK_PATH not in flat:
      raise ValueError(f'The model parameters have no prompt bank at {BANK_PATH}.')
    bank = np.asarray(flat.pop(BANK_PATH))
    self.capacity, self.prompt_length, self.embed_dim = bank.shape
    self._frozen = jax.device_put(params_lib.unflatten_params(flat))
    self._bank = jnp.zeros(bank.shape, jnp.float32)
    self._bank_lock = threading.Lock()
    self._compiled: Dict[Tuple, Any] = {}
    self.compile_count = 0
    self._sample_model = models.EncoderDecoderModel(
        module,
        model.input_vocabulary,
        model.output_vocabulary,
        decode_fn=decoding.temperature_sample,
    )
    self._beam_model = models.EncoderDecoderModel(
        module, model.input_vocabulary, model.output_vocabulary, decode_fn=decoding.beam_search
    )

  # ------------------------------------------------------------------------------ the bank --

  def set_row(self, row: int, value: Optional[np.ndarray]) -> None:
    """Writes one prompt `[P, H]` into bank row `row` (None zeroes it)."""
    if not 0 <= row < self.capacity:
      raise ValueError(f'Bank row {row} is outside [0, {self.capacity}).')
    if value is None:
      value = np.zeros((self.prompt_length, self.embed_dim), np.float32)
    value = np.asarray(value, np.float32)
    if value.shape != (self.prompt_length, self.embed_dim):
      raise ValueError(
          f'A prompt of shape {value.shape} does not fit the bank: the server serves prompts of '
          f'shape {(self.prompt_length, self.embed_dim)} (PROMPT_LENGTH, embed dim).'
      )
    with self._bank_lock:
      self._bank = self._bank.at[row].set(jnp.asarray(value))

  def bank_row(self, row: int) -> np.ndarray:
    return np.asarray(self._bank[row])

  def _params(self):
    with self._bank_lock:
      bank = self._bank
    flat = {BANK_PATH: bank}
    return _with(self._frozen, flat)

  # ------------------------------------------------------------------------------ compiling --

  def _abstract_params(self):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self._params()
    )

  def _sample_fn(self, params, batch, temperatures, rng):
    return self._sample_model.predict_batch_with_aux(
        params,
        batch,
        rng=rng,
        decoder_params={'temperature': temperatures, 'topk': 0, 'topp': 0.0},
    )

  def _beam_fn(self, params, batch, beam_size):
    return self._beam_model.predict_batch_with_aux(
        params, batch, num_decodes=beam_size, decoder_params={'alpha': self.config.alpha}
    )

  def _score_fn(self, params, batch):
    return self.model.score_batch(params, batch)

  def _key_shapes(self, kind: str, b: int, n: int, extra: int = 0):
    i32 = jnp.int32
    s = jax.ShapeDtypeStruct
    if kind == 'score':
      batch = {
          'encoder_input_tokens': s((b, n), i32),
          'decoder_input_tokens': s((b, extra), i32),
          'decoder_target_tokens': s((b, extra), i32),
          'decoder_loss_weights': s((b, extra), jnp.float32),
          'prompt_ids': s((b,), i32),
      }
      return (batch,)
    batch = {
        'encoder_input_tokens': s((b, n), i32),
        'decoder_input_tokens': s((b, self.config.max_decode_length), i32),
        'prompt_ids': s((b,), i32),
    }
    if kind == 'sample':
      return (batch, s((b,), jnp.float32), s((2,), jnp.uint32))
    return (batch,)

  def _compile(self, key: Tuple) -> Any:
    kind, b, n, extra = key
    if kind == 'sample':
      fn = self._sample_fn
    elif kind == 'beam':
      fn = functools.partial(self._beam_fn, beam_size=extra)
    elif kind == 'score':
      fn = self._score_fn
    else:
      raise ValueError(f'Unknown kind {kind!r}.')
    args = self._key_shapes(kind, b, n, extra if kind == 'score' else 0)
    compiled = (
        jax.jit(fn)
        .lower(self._abstract_params(), *args)
        .compile(compiler_options=xla_options.inference_compiler_options(self.model))
    )
    self.compile_count += 1
    return compiled

  def keys(self) -> List[Tuple]:
    """Every (kind, batch, length, extra) the server compiles."""
    cfg = self.config
    out = []
    for b in cfg.batch_buckets:
      for n in cfg.input_buckets:
        out.append(('sample', b, n, 0))
        for k in cfg.beam_sizes:
          out.append(('beam', b, n, k))
        for t in cfg.target_buckets:
          out.append(('score', b, n, t))
    return out

  def compile_all(self, kinds: Sequence[str] = ('sample', 'beam', 'score')) -> int:
    """Compiles every bucket of `kinds` now; returns how many functions were compiled."""
    for key in self.keys():
      if key[0] in kinds and key not in self._compiled:
        self._compiled[key] = self._compile(key)
    return len(self._compiled)

  def _get(self, key: Tuple) -> Any:
    fn = self._compiled.get(key)
    if fn is None:
      # Not compiled at start-up (a kind left out of `compile_all`): compile once, counted.
      fn = self._compiled[key] = self._compile(key)
    return fn

  # ------------------------------------------------------------------------------- running --

  def _pad_inputs(self, token_rows: Sequence[Sequence[int]], rows: int) -> np.ndarray:
    n = bucket(max(len(t) for t in token_rows), self.config.input_buckets)
    if n is None:
      raise ValueError(
          f'An input of {max(len(t) for t in token_rows)} tokens is longer than the largest input '
          f'bucket ({self.config.input_buckets[-1]}).'
      )
    out = np.zeros((rows, n), np.int32)
    for i, t in enumerate(token_rows):
      out[i, : len(t)] = t
    return out

  def _rows(self, n: int) -> int:
    b = bucket(n, self.config.batch_buckets)
    if b is None:
      raise ValueError(f'{n} rows exceed the largest batch bucket {self.config.max_batch_size}.')
    return b

  def generate(
      self,
      token_rows: Sequence[Sequence[int]],
      prompt_rows: Sequence[int],
      *,
      temperatures: Optional[Sequence[float]] = None,
      beam_size: Optional[int] = None,
      seed: int = 0,
  ) -> Tuple[np.ndarray, np.ndarray]:
    """Decodes one padded batch. Returns `(tokens [n, max_decode_length], scores [n])`."""
    n = len(token_rows)
    b = self._rows(n)
    enc = self._pad_inputs(token_rows, b)
    ids = np.zeros((b,), np.int32)
    ids[:n] = prompt_rows
    batch = {
        'encoder_input_tokens': enc,
        'decoder_input_tokens': np.zeros((b, self.config.max_decode_length), np.int32),
        'prompt_ids': ids,
    }
    params = self._params()
    if beam_size:
      if beam_size not in self.config.beam_sizes:
        raise ValueError(
            f'beam_size {beam_size} is not served; this server compiled {self.config.beam_sizes}.'
        )
      tokens, aux = self._get(('beam', b, enc.shape[1], beam_size))(params, batch)
    else:
      temps = np.zeros((b,), np.float32)
      if temperatures is not None:
        temps[:n] = temperatures
      rng = jax.random.PRNGKey(seed)
      tokens, aux = self._get(('sample', b, enc.shape[1], 0))(params, batch, temps, rng)
    return np.asarray(tokens)[:n], np.asarray(aux['scores'])[:n]

  def score(
      self,
      token_rows: Sequence[Sequence[int]],
      target_rows: Sequence[Sequence[int]],
      prompt_rows: Sequence[int],
  ) -> np.ndarray:
    """Log-likelihood of each row's target given its input and prompt. Returns `[n]`."""
    n = len(token_rows)
    b = self._rows(n)
    enc = self._pad_inputs(token_rows, b)
    t = bucket(max(len(x) for x in target_rows), self.config.target_buckets)
    if t is None:
      raise ValueError(
          f'A target of {max(len(x) for x in target_rows)} tokens is longer than the largest '
          f'target bucket ({self.config.target_buckets[-1]}).'
      )
    targets = np.zeros((b, t), np.int32)
    for i, x in enumerate(target_rows):
      targets[i, : len(x)] = x
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
    ids = np.zeros((b,), np.int32)
    ids[:n] = prompt_rows
    batch = {
        'encoder_input_tokens': enc,
        'decoder_input_tokens': dec_in,
        'decoder_target_tokens': targets,
        'decoder_loss_weights': (targets > 0).astype(np.float32),
        'prompt_ids': ids,
    }
    out = self._get(('score', b, enc.shape[1], t))(self._params(), batch)
    return np.asarray(out)[:n]


def _with(tree: Mapping[str, Any], flat_updates: Mapping[str, Any]) -> Dict[str, Any]:
  """A copy of nested `tree` with the `/`-paths of `flat_updates` set (shares the other leaves)."""
  out = dict(tree)
  for path, value in flat_updates.items():
    keys = path.split('/')
    node = out
    for k in keys[:-1]:
      node[k] = dict(node.get(k, {}))
      node = node[k]
    node[keys[-1]] = value
  return out
