"""T5X-style models: loss, evaluation, prediction (decoding) and scoring around a Flax module.

`EncoderDecoderModel` and `DecoderOnlyModel` keep T5X's constructor arguments and method signatures
(`loss_fn`, `eval_fn`, `predict_batch`, `predict_batch_with_aux`, `score_batch`,
`get_initial_variables`), so T5X gin files that bind them work unchanged.

Two doors for methods:

* Per-example conditioning features: batches may carry integer features, one per example
  (`prompt_ids` for prompt banks, `task_ids`, `lang_ids`, ... : `conditioning_features`); those
  present are handed to the module as `features={...}`, which gives them to the prompt module and
  the hooks (`architectures/hooks.py`), in training, scoring and decoding.
* Extra loss terms: `loss_terms` are callables `(params, batch, outputs) -> (scalar, metrics)`
  (`outputs = {'logits': ...}`); each scalar is added to the cross entropy and reported as the
  metric `loss_terms/<name>`, its metrics as `<name>/<key>`.
* Per-example auxiliary outputs: what the module sows into `hooks.PER_EXAMPLE_OUTPUTS` while the
  inputs are encoded (or the prompt prefilled) is returned by `predict_batch_with_aux` next to
  `scores` (one `[B, ...]` array per name), and written by `prompt_tuning.infer`.

`loss_fn` returns metrics that carry their own reduction (`runtime/metrics.py`).
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.architectures import hooks as hooks_lib
from prompt_tuning.architectures import layers
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import losses
from prompt_tuning.runtime import metrics as metrics_lib

Array = Union[jnp.ndarray, np.ndarray]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class DecoderParams:
  return_all_decodes: bool = False
  num_decodes: int = 1


# Per-example integer features handed to the module (and from it to prompt modules and hooks)
# when a batch has them. The feature converters pass the same names through from seqio tasks.
CONDITIONING_FEATURES = hooks_lib.CONDITIONING_FEATURES
PER_EXAMPLE_OUTPUTS = hooks_lib.PER_EXAMPLE_OUTPUTS


class ConditioningFeatureError(ValueError):
  """A per-example id (e.g. `prompt_ids`) is outside the range the model has (its bank size)."""


def out_of_range_message(
    name: str, value: int, size: int, task: Optional[str] = None, values: Sequence[int] = ()
) -> str:
  """The message of a `ConditioningFeatureError`."""
  where = f' of task {task!r}' if task else ''
  others = [v for v in values if v != value]
  also = f' (also {", ".join(map(str, others[:5]))})' if others else ''
  what = 'the prompt bank has' if name == 'prompt_ids' else 'the model has'
  unit = 'prompts' if name == 'prompt_ids' else f'{name} values'
  fix = (
      'Give the task prompt_ids below the bank size, or serve a bank with more prompts '
      '(NUM_PROMPTS / PromptEncoderDecoder.num_prompts and a PROMPT_FILE of that many).'
      if name == 'prompt_ids'
      else f'Give the task {name} below {size}, or configure the model for more.'
  )
  return f'{name} {value}{where} is out of range{also}: {what} {size} {unit} (ids 0..{size - 1}). {fix}'


def _term_name(fn: Callable) -> str:
  name = getattr(fn, 'name', None) or getattr(fn, '__name__', None)
  if not name or name == '<lambda>':
    name = type(fn).__name__
  return str(name)


class _LazyClass:
  """A class attribute holding `<module>.<name>`, imported on first access.

  The default feature converters live in `prompt_tuning.data.feature_converters` (seqio's, keeping a
  per-example `prompt_ids`). Importing seqio pulls in TensorFlow (~800 MiB of resident memory); a
  model built only to train or serve from host arrays never needs it, so the import waits until a
  feature converter is used. Subclasses and instances may still assign `FEATURE_CONVERTER_CLS` as
  in T5X.
  """

  def __init__(self, module: str, name: str):
    self._module, self._name = module, name

  def __get__(self, obj, objtype=None):
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(self._module), self._name)


_CONVERTERS = 'prompt_tuning.data.feature_converters'


class BaseTransformerModel:
  """Shared loss and metrics of T5X's `BaseTransformerModel`."""

  FEATURE_CONVERTER_CLS = None

  def __init__(
      self,
      module,
      input_vocabulary,
      output_vocabulary,
      optimizer_def=None,
      decode_fn=None,
      label_smoothing: float = 0.0,
      z_loss: float = 0.0,
      loss_normalizing_factor: Optional[Union[float, int, str]] = None,
      feature_converter_cls=None,
      loss_terms: Sequence[Callable] = (),
      conditioning_features: Sequence[str] = CONDITIONING_FEATURES,
  ):
    self.module = module
    self._input_vocabulary = input_vocabulary
    self._output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self._decode_fn = decode_fn
    self._label_smoothing = label_smoothing
    self._z_loss = z_loss
    self._loss_normalizing_factor = loss_normalizing_factor
    if feature_converter_cls is not None:
      self.FEATURE_CONVERTER_CLS = feature_converter_cls  # pylint: disable=invalid-name
    self.loss_terms = tuple(loss_terms or ())
    names = [_term_name(fn) for fn in self.loss_terms]
    if len(set(names)) != len(names):
      raise ValueError(f'Loss terms need distinct names (a `name` attribute), got {names}.')
    self.conditioning_features = tuple(conditioning_features or ())

  def features_of(self, batch: Mapping[str, Array]) -> Dict[str, Array]:
    """The batch's per-example conditioning features (those of `conditioning_features` present)."""
    return {k: batch[k] for k in self.conditioning_features if k in batch}

  def conditioning_feature_sizes(self) -> Dict[str, int]:
    """How many ids each conditioning feature may take (`prompt_ids`: the bank's `num_prompts`).

    A module declares more with an attribute `conditioning_feature_sizes` (a `{feature: size}`
    mapping); a bank's `num_prompts` sizes `prompt_ids`.
    """
    sizes = dict(getattr(self.module, 'conditioning_feature_sizes', None) or {})
    num_prompts = getattr(self.module, 'num_prompts', None)
    if num_prompts:
      sizes.setdefault('prompt_ids', int(num_prompts))
    return {k: int(v) for k, v in sizes.items() if k in self.conditioning_features}

  def check_conditioning_features(
      self, batch: Mapping[str, Any], task_of: Optional[Callable[[int], Optional[str]]] = None
  ) -> None:
    """Checks a host batch's conditioning ids against `conditioning_feature_sizes` (numpy, cheap).

    An out-of-range id would otherwise select nothing (a `PromptBank` fills NaN, so the example
    decodes to nothing and scores NaN, without an error).

    Args:
      batch: host arrays, one id per example for each conditioning feature present.
      task_of: optional `row -> task name`, to name the task of a bad example.

    Raises:
      ConditioningFeatureError: naming the feature, the id, the size and the task when known.
    """
    for name, size in self.conditioning_feature_sizes().items():
      if name not in batch:
        continue
      ids = np.asarray(batch[name]).reshape(-1)
      bad = np.flatnonzero((ids < 0) | (ids >= size))
      if bad.size:
        row = int(bad[0])
        task = task_of(row) if task_of is not None else None
        raise ConditioningFeatureError(
            out_of_range_message(name, int(ids[row]), size, task, sorted(set(ids[bad].tolist())))
        )

  def _feature_kwargs(self, batch: Mapping[str, Array]) -> dict:
    features = self.features_of(batch)
    return {'features': features} if features else {}

  def _init_feature_kwargs(self, input_shapes: Mapping[str, Tuple[int, ...]]) -> dict:
    """Zero-valued conditioning features of the shapes in `input_shapes`, for `module.init`."""
    features = {
        k: jnp.zeros(input_shapes[k], jnp.int32)
        for k in self.conditioning_features
        if k in input_shapes
    }
    return {'features': features} if features else {}

  @property
  def input_vocabulary(self):
    return self._input_vocabulary

  @property
  def output_vocabulary(self):
    return self._output_vocabulary

  @property
  def decode_fn(self):
    return self._decode_fn

  @property
  def loss_normalizing_factor(self):
    return self._loss_normalizing_factor

  def _compute_logits(self, params, batch, dropout_rng=None):
    raise NotImplementedError

  def loss_fn(
      self, params: PyTree, batch: Mapping[str, Array], dropout_rng: Optional[jax.Array]
  ) -> Tuple[jnp.ndarray, Dict[str, metrics_lib.Metric]]:
    """T5X's loss: summed token cross entropy with z-loss, optionally normalized, plus the
    `loss_terms`; and metrics (`runtime/metrics.py` types, each with its own reduction)."""
    logits = self._compute_logits(params, batch, dropout_rng)
    loss_normalizing_factor, weights = losses.get_loss_normalizing_factor_and_weights(
        self._loss_normalizing_factor, batch
    )
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
        logits,
        targets=batch['decoder_target_tokens'],
        weights=weights,
        label_smoothing=self._label_smoothing,
        z_loss=self._z_loss,
        loss_normalizing_factor=loss_normalizing_factor,
    )
    metrics = self._compute_metrics(logits, batch['decoder_target_tokens'], weights, loss, z_loss)
    outputs = {'logits': logits}
    for fn in self.loss_terms:
      name = _term_name(fn)
      value, term_metrics = fn(params, batch, outputs)
      value = jnp.asarray(value, jnp.float32)
      if value.shape != ():
        raise ValueError(f'Loss term {name!r} must return a scalar, got shape {value.shape}.')
      loss = loss + value
      metrics[f'loss_terms/{name}'] = metrics_lib.AveragePerStep.from_value(value)
      for k, v in (term_metrics or {}).items():
        metrics[f'{name}/{k}'] = metrics_lib.as_metric(v)
    metrics['loss'] = metrics_lib.AveragePerStep.from_value(loss)
    return loss, metrics

  def _compute_metrics(self, logits, targets, weights, loss, z_loss) -> Dict[str, Any]:
    """T5X's base metrics, each with its own reduction (`runtime/metrics.py`)."""
    if weights is None:
      weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
    weight_sum = jnp.sum(weights)
    all_tokens = jnp.asarray(np.prod(targets.shape), jnp.float32)
    per_step = metrics_lib.AveragePerStep.from_value
    ratio = metrics_lib.Average.from_ratio
    return {
        'loss': per_step(loss),
        'z_loss': per_step(z_loss),
        'cross_ent_loss': per_step(loss - z_loss),
        'accuracy': ratio(jnp.sum(correct), weight_sum),
        'loss_per_nonpadding_target_token': ratio(loss, weight_sum),
        'loss_per_all_target_tokens': ratio(loss, all_tokens),
        'nonpadding_fraction': ratio(weight_sum, all_tokens),
        'num_examples': metrics_lib.Sum.from_value(targets.shape[0]),
        'num_tokens': metrics_lib.Sum.from_value(weight_sum),
    }

  def eval_fn(self, params: PyTree, batch: Mapping[str, Array]):
    return self.loss_fn(params, batch, dropout_rng=None)

  def predict_batch(
      self, params: PyTree, batch: Mapping[str, Array], rng: Optional[jax.Array] = None
  ):
    return self.predict_batch_with_aux(params, batch, rng=rng)[0]

  def score_batch(
      self, params: PyTree, batch: Mapping[str, Array], return_intermediates: bool = False
  ):
    """Per-sequence log-likelihood of the targets: sum over tokens of -CE, weighted, no z-loss."""
    if return_intermediates:
      raise NotImplementedError('return_intermediates=True is not supported.')
    logits = self._compute_logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = targets > 0
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    token_loss, _ = losses.cross_entropy_with_logits(logits.astype(jnp.float32), onehot, 0.0)
    return -jnp.sum(token_loss * weights.astype(jnp.float32), axis=-1)


class EncoderDecoderModel(BaseTransformerModel):
  """An encoder-decoder (T5) model with T5X's API."""

  FEATURE_CONVERTER_CLS = _LazyClass(_CONVERTERS, 'EncDecFeatureConverter')

  def __init__(
      self,
      module,
      input_vocabulary,
      output_vocabulary,
      optimizer_def=None,
      decode_fn: Callable = decoding.beam_search,
      feature_converter_cls=None,
      label_smoothing: float = 0.0,
      z_loss: float = 0.0,
      loss_normalizing_factor: Optional[Union[float, int, str]] = None,
      default_decoder_params: Optional[DecoderParams] = None,
      loss_terms: Sequence[Callable] = (),
      conditioning_features: Sequence[str] = CONDITIONING_FEATURES,
  ):
    super().__init__(
        module,
        input_vocabulary,
        output_vocabulary,
        optimizer_def,
        decode_fn,
        label_smoothing,
        z_loss,
        loss_normalizing_factor,
        feature_converter_cls,
        loss_terms=loss_terms,
        conditioning_features=conditioning_features,
    )
    self._default_decoder_params = default_decoder_params or DecoderParams()

  def get_initial_variables(
      self,
      rng: jax.Array,
      input_shapes: Mapping[str, Tuple[int, ...]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> Mapping[str, PyTree]:
    input_types = input_types or {}
    enc_shape = input_shapes['encoder_input_tokens']
    dec_shape = input_shapes['decoder_input_tokens']
    kwargs = self._init_feature_kwargs(input_shapes)
    variables = self.module.init(
        {'params': rng, 'dropout': rng},
        jnp.ones(enc_shape, input_types.get('encoder_input_tokens', jnp.int32)),
        jnp.ones(dec_shape, input_types.get('decoder_input_tokens', jnp.int32)),
        jnp.ones(dec_shape, input_types.get('decoder_target_tokens', jnp.int32)),
        enable_dropout=False,
        **kwargs,
    )
    return {k: v for k, v in variables.items() if k in ('params', 'params_axes')}

  def _compute_logits(self, params, batch, dropout_rng=None):
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params},
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
        enable_dropout=dropout_rng is not None,
        rngs=rngs,
        **self._feature_kwargs(batch),
    )

  def _init_cache(self, params, encoder_input_tokens, decoder_input_tokens, prompt_kwargs):
    """A zero decoding cache of length `decoder_input_tokens.shape[1]`."""
    _, variables = self.module.apply(
        {'params': params},
        jnp.ones_like(encoder_input_tokens),
        jnp.ones_like(decoder_input_tokens),
        jnp.ones_like(decoder_input_tokens),
        enable_dropout=False,
        decode=True,
        max_decode_length=decoder_input_tokens.shape[1],
        mutable=['cache'],
        **prompt_kwargs,
    )
    return variables['cache']

  def _init_decoding(
      self, params, encoded, encoder_input_tokens, decoder_input_tokens, prompt_kwargs
  ) -> Tuple[PyTree, PyTree]:
    """A zero decoding cache, and the encoder's keys and values of every cross-attention.

    One call of the decoder in decode mode on the real `encoded`: the self-attention caches are
    created empty (length `decoder_input_tokens.shape[1]`), and each cross-attention projects the
    encoder output once into the `encoded_kv` collection, which the decode steps then read
    (`layers.MultiHeadDotProductAttention`, `encoded_kv_cache`). The rest of this call's output is
    unused, and XLA removes it.
    """
    dummy = jnp.ones_like(decoder_input_tokens)
    _, variables = self.module.apply(
        {'params': params},
        encoded,
        encoder_input_tokens,
        dummy,
        dummy,
        enable_dropout=False,
        decode=True,
        max_decode_length=decoder_input_tokens.shape[1],
        mutable=['cache', layers.ENCODED_KV],
        method=self.module.decode,
        **prompt_kwargs,
    )
    return variables['cache'], variables.get(layers.ENCODED_KV, {})

  def predict_batch_with_aux(
      self,
      params: PyTree,
      batch: Mapping[str, Array],
      rng: Optional[jax.Array] = None,
      decoder_params: Optional[MutableMapping[str, Any]] = None,
      return_all_decodes: Optional[bool] = None,
      num_decodes: Optional[int] = None,
      prompt_with_targets: bool = False,
  ) -> Tuple[jnp.ndarray, Mapping[str, jnp.ndarray]]:
    """Decodes the batch with `decode_fn` (beam search by default) over the KV cache.

    Returns the best decode per example `[B, T]` (or all `[B, num_decodes, T]` when
    `return_all_decodes`) and `{'scores': ...}`.
    """
    if return_all_decodes is None:
      return_all_decodes = self._default_decoder_params.return_all_decodes
    if num_decodes is None:
      num_decodes = self._default_decoder_params.num_decodes
    prompt_kwargs = self._feature_kwargs(batch)
    encoder_input_tokens = batch['encoder_input_tokens']
    decoder_input_tokens = batch['decoder_input_tokens']
    encoded, sown = self.module.apply(
        {'params': params},
        encoder_input_tokens,
        enable_dropout=False,
        method=self.module.encode,
        mutable=[PER_EXAMPLE_OUTPUTS],
        **prompt_kwargs,
    )
    per_example = per_example_outputs(sown)
    cache, encoded_kv = self._init_decoding(
        params, encoded, encoder_input_tokens, decoder_input_tokens, prompt_kwargs
    )
    # The encoder's keys and values are computed once per decode (above) and are loop constants,
    # like `encoded`; they are never part of the loop state, so beam gathers never copy them.
    encoded_kv = jax.tree_util.tree_map(
        lambda x: decoding.flat_batch_beam_expand(x, num_decodes), encoded_kv
    )
    encoded = decoding.flat_batch_beam_expand(encoded, num_decodes)
    expanded_tokens = decoding.flat_batch_beam_expand(encoder_input_tokens, num_decodes)
    expanded_kwargs = _expand_features(prompt_kwargs, num_decodes)
    max_decode_length = decoder_input_tokens.shape[1]
    constants = {layers.ENCODED_KV: encoded_kv} if encoded_kv else {}

    def tokens_ids_to_logits(state: decoding.DecodingState):
      flat_ids = state.cur_token
      if flat_ids.ndim == 1:
        flat_ids = flat_ids[:, None]
      logits, new_vars = self.module.apply(
          {'params': params, 'cache': state.cache, **constants},
          encoded,
          expanded_tokens,
          flat_ids,
          flat_ids,
          enable_dropout=False,
          decode=True,
          max_decode_length=max_decode_length,
          mutable=['cache'],
          method=self.module.decode,
          **expanded_kwargs,
      )
      return logits[:, -1, :].astype(jnp.float32), new_vars['cache']

    if prompt_with_targets:
      decoder_prompt_inputs = decoder_input_tokens
    else:
      decoder_prompt_inputs = jnp.zeros_like(decoder_input_tokens)
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      decoder_params['decode_rng'] = rng
    eos_id = self.output_vocabulary.eos_id if self.output_vocabulary is not None else 1
    decodes, scores = self._decode_fn(
        inputs=decoder_prompt_inputs,
        cache=cache,
        tokens_to_logits=tokens_ids_to_logits,
        eos_id=eos_id if eos_id is not None else 1,
        num_decodes=num_decodes,
        cache_offset=0,
        **decoder_params,
    )
    if return_all_decodes:
      return decodes, {'scores': scores, **per_example}
    return decodes[:, -1, :], {'scores': scores[:, -1], **per_example}


class DecoderOnlyModel(BaseTransformerModel):
  """A decoder-only (causal or prefix) LM with T5X's API.

  For a `PromptDecoderOnly` module the prompt is written into the cache before decoding. With
  `inputs_bidirectional_attention=True` (prefix LM, seqio's PrefixLM features) the prompt and the
  inputs are written in one chunk, bidirectional as in training, so cached decoding gives the
  tokens of full forward passes.
  """

  FEATURE_CONVERTER_CLS = _LazyClass(_CONVERTERS, 'DecoderFeatureConverter')

  def __init__(
      self,
      module,
      vocabulary,
      optimizer_def=None,
      decode_fn: Callable = decoding.temperature_sample,
      inputs_bidirectional_attention: bool = False,
      feature_converter_cls=None,
      label_smoothing: float = 0.0,
      z_loss: float = 0.0,
      loss_normalizing_factor: Optional[Union[float, int, str]] = None,
      loss_terms: Sequence[Callable] = (),
      conditioning_features: Sequence[str] = CONDITIONING_FEATURES,
  ):
    super().__init__(
        module,
        vocabulary,
        vocabulary,
        optimizer_def,
        decode_fn,
        label_smoothing,
        z_loss,
        loss_normalizing_factor,
        feature_converter_cls,
        loss_terms=loss_terms,
        conditioning_features=conditioning_features,
    )
    self._inputs_bidirectional_attention = inputs_bidirectional_attention

  @property
  def prompt_length(self) -> int:
    return int(getattr(self.module, 'prompt_length', 0) or 0)

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    shape = input_shapes['decoder_input_tokens']
    kwargs = self._init_feature_kwargs(input_shapes)
    if self._inputs_bidirectional_attention:
      kwargs['decoder_causal_attention'] = jnp.ones(shape, jnp.int32)
    variables = self.module.init(
        {'params': rng, 'dropout': rng},
        jnp.ones(shape, jnp.int32),
        jnp.ones(shape, jnp.int32),
        enable_dropout=False,
        **kwargs,
    )
    return {k: v for k, v in variables.items() if k in ('params', 'params_axes')}

  def _causal_kwargs(self, batch):
    if self._inputs_bidirectional_attention:
      if 'decoder_causal_attention' not in batch:
        raise ValueError(
            'inputs_bidirectional_attention=True needs the `decoder_causal_attention` '
            'feature; use seqio.PrefixLMFeatureConverter (DecoderFeatureConverter with inputs).'
        )
      return {'decoder_causal_attention': batch['decoder_causal_attention']}
    return {}

  def _compute_logits(self, params, batch, dropout_rng=None):
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params},
        batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
        enable_dropout=dropout_rng is not None,
        rngs=rngs,
        **self._causal_kwargs(batch),
        **self._feature_kwargs(batch),
    )

  def predict_batch_with_aux(
      self,
      params,
      batch,
      rng=None,
      *,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      decoder_params=None,
  ):
    """Continues each example's inputs (the `decoder_causal_attention` prefix) by sampling."""
    tokens = batch['decoder_input_tokens']
    if 'decoder_causal_attention' in batch:
      inputs = tokens * batch['decoder_causal_attention']
    else:
      inputs = tokens * 0
    # Drop the BOS: `inputs` are the decoder inputs shifted right, so position i holds token i-1.
    prompt_kwargs = self._feature_kwargs(batch)
    p = self.prompt_length
    length = tokens.shape[1]
    max_len = length + p
    _, variables = self.module.apply(
        {'params': params},
        jnp.ones_like(tokens),
        jnp.ones_like(tokens),
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        mutable=['cache'],
        **prompt_kwargs,
    )
    cache = variables['cache']
    prefix_len = None
    per_example = {}
    if self._inputs_bidirectional_attention:
      # Prefix LM (T5X's `_compute_kv_cache`): the prompt and the whole input prefix go into the
      # cache in one chunk, bidirectional as in training. The decode loop then restarts after the
      # prompt; while a row is still inside its prefix, its forced tokens are fed but their
      # (causal-only) keys and values do not replace the prefilled ones.
      causal_attention = self._causal_kwargs(batch)['decoder_causal_attention']
      _, variables = self.module.apply(
          {'params': params, 'cache': cache},
          inputs,
          inputs,
          decoder_causal_attention=causal_attention,
          enable_dropout=False,
          decode=True,
          max_decode_length=max_len,
          mutable=['cache', PER_EXAMPLE_OUTPUTS],
          **(dict(prefill_prompt=True) if p else {}),
          **prompt_kwargs,
      )
      per_example = per_example_outputs(variables)
      cache = _set_cache_index(variables['cache'], p)
      # Shifted-right layout: BOS, then the inputs; the last input token sits at `prefix_len`.
      prefix_len = jnp.sum(causal_attention > 0, axis=1).astype(jnp.int32) - 1
    elif p:
      _, variables = self.module.apply(
          {'params': params, 'cache': cache},
          tokens,
          tokens,
          enable_dropout=False,
          decode=True,
          max_decode_length=max_len,
          prefill_prompt=True,
          mutable=['cache', PER_EXAMPLE_OUTPUTS],
          **prompt_kwargs,
      )
      per_example = per_example_outputs(variables)
      cache = variables['cache']
    expanded_kwargs = _expand_features(prompt_kwargs, num_decodes)

    def tokens_to_logits(state: decoding.DecodingState):
      ids = state.cur_token if state.cur_token.ndim == 2 else state.cur_token[:, None]
      logits, new_vars = self.module.apply(
          {'params': params, 'cache': state.cache},
          ids,
          ids,
          enable_dropout=False,
          decode=True,
          max_decode_length=max_len,
          mutable=['cache'],
          **expanded_kwargs,
      )
      new_cache = new_vars['cache']
      if prefix_len is not None:
        rows = ids.shape[0]
        in_prefix = state.cur_index <= jnp.repeat(prefix_len, rows // prefix_len.shape[0])
        new_cache = _keep_cached_rows(new_cache, state.cache, in_prefix)
      return logits[:, -1, :].astype(jnp.float32), new_cache

    # T5X's convention: `inputs` stay shifted right ([0, p1..pn, 0...]); output i is forced to inputs[i+1].
    decode_inputs = inputs
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      decoder_params['decode_rng'] = rng
    eos_id = self.output_vocabulary.eos_id if self.output_vocabulary is not None else 1
    decodes, scores = self._decode_fn(
        inputs=decode_inputs,
        cache=cache,
        tokens_to_logits=tokens_to_logits,
        eos_id=eos_id if eos_id is not None else 1,
        num_decodes=num_decodes,
        **decoder_params,
    )
    # Remove the forced prefix from the outputs (left-align the generated continuation).
    prefix_len = jnp.sum(decode_inputs != 0, axis=-1)
    decodes = _remove_prefix(decodes, prefix_len)
    if return_all_decodes:
      return decodes, {'scores': scores, **per_example}
    return decodes[:, -1, :], {'scores': scores[:, -1], **per_example}


def per_example_outputs(variables: Mapping[str, Any]) -> Dict[str, jnp.ndarray]:
  """`{name: [B, ...]}` of what the module sowed into `hooks.PER_EXAMPLE_OUTPUTS`.

  Names of nested modules are dropped: the sown name is the key (a name sown by two modules is
  an error). `sow` appends to a tuple; the last value is taken.
  """
  out: Dict[str, jnp.ndarray] = {}

  def visit(tree):
    for key, value in tree.items():
      if isinstance(value, tuple):
        if key in out or key == 'scores':
          raise ValueError(
              f'Two modules sowed the per-example output {key!r} (or it shadows `scores`); give '
              'them distinct names.'
          )
        out[key] = value[-1]
      elif isinstance(value, Mapping):
        visit(value)

  visit(variables.get(PER_EXAMPLE_OUTPUTS, {}))
  return out


def _expand_features(kwargs: Mapping[str, Any], num_decodes: int) -> dict:
  """`{'features': ...}` with every feature repeated per beam (the decode loop's batch)."""
  if 'features' not in kwargs:
    return {}
  return {
      'features': {
          k: decoding.flat_batch_beam_expand(v, num_decodes) for k, v in kwargs['features'].items()
      }
  }


def _set_cache_index(cache: PyTree, index: int) -> PyTree:
  """The cache with every layer's `cache_index` set to `index`."""

  def visit(tree):
    return {
        k: (
            jnp.full_like(v, index)
            if k == 'cache_index'
            else visit(v)
            if isinstance(v, Mapping)
            else v
        )
        for k, v in tree.items()
    }

  return visit(cache)


def _keep_cached_rows(new: PyTree, old: PyTree, keep: jnp.ndarray) -> PyTree:
  """Undoes the last one-token cache write for the rows where `keep` [rows] is set.

  The write went to position `old cache_index` of every layer's `cached_key`/`cached_value`
  `[rows, length, heads, head_dim]`; only that position is touched.
  """

  def visit(n, o):
    if 'cached_key' not in n:
      return {k: visit(n[k], o[k]) if isinstance(n[k], Mapping) else n[k] for k in n}
    out = dict(n)
    idx = o['cache_index']
    for k in ('cached_key', 'cached_value'):
      start = (0, idx) + (0,) * (n[k].ndim - 2)
      size = (n[k].shape[0], 1) + n[k].shape[2:]
      fresh = jax.lax.dynamic_slice(n[k], start, size)
      before = jax.lax.dynamic_slice(o[k], start, size)
      mask = keep.reshape((-1,) + (1,) * (n[k].ndim - 1))
      out[k] = jax.lax.dynamic_update_slice(n[k], jnp.where(mask, before, fresh), start)
    return out

  return visit(new, old)


def _remove_prefix(sequences: jnp.ndarray, prefix_len: jnp.ndarray) -> jnp.ndarray:
  """Shifts each row of `sequences` [B, N, L] left by its prefix length, zero-filling the tail."""
  length = sequences.shape[-1]
  idx = jnp.arange(length)[None, None, :] + prefix_len[:, None, None]
  gathered = jnp.take_along_axis(sequences, jnp.minimum(idx, length - 1), axis=-1)
  return jnp.where(idx < length, gathered, 0)
