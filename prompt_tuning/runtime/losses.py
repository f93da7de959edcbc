"""Loss functions with T5X's names and semantics.

`cross_entropy_with_logits` is the stabilized cross entropy (with the auxiliary
z-loss) that T5X uses; `compute_weighted_cross_entropy` adds label smoothing,
per-token weights and an optional loss normalizing factor; and
`get_loss_normalizing_factor_and_weights` resolves T5X's "special" loss
normalizing factors (given as an enum or, from gin, as a string).
"""

import enum
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
LossNormalizingFactor = Optional[Union[float, int, str, 'SpecialLossNormalizingFactor', Array]]


def _log_softmax_parts(logits: Array) -> Tuple[Array, Array, Array, Array]:
  """Returns (exp_shifted, sum_exp, log_softmax, log_z) for the last axis."""
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shifted = logits - max_logit
  exp_shifted = jnp.exp(shifted)
  sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
  log_sum_exp = jnp.log(sum_exp)
  log_softmax = shifted - log_sum_exp
  log_z = jnp.squeeze(log_sum_exp + max_logit, axis=-1)
  return exp_shifted, sum_exp, log_softmax, log_z


@jax.custom_vjp
def cross_entropy_with_logits(logits: Array, targets: Array, z_loss: float) -> Tuple[Array, Array]:
  """Cross entropy with an auxiliary z-loss and a stable custom gradient.

  Computes `-sum(targets * log_softmax(logits), -1) + z_loss * log(Z)**2`
  where `log(Z) = logsumexp(logits, -1)`. The gradient with respect to the
  logits is `(1 + 2 * z_loss * log(Z)) * softmax(logits) - targets` (times the
  upstream cotangent of the first output); the second output (the z-loss term
  alone) is for logging and carries no gradient.

  Args:
    logits: [..., num_classes] float array.
    targets: [..., num_classes] float array (one-hot or soft targets).
    z_loss: coefficient of the auxiliary z-loss term.

  Returns:
    `(loss, z_loss_term)`, both of shape `logits.shape[:-1]`; `loss` already
    includes `z_loss_term`.
  """
  _, _, log_softmax, log_z = _log_softmax_parts(logits)
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  total_z_loss = z_loss * jax.lax.square(log_z)
  return loss + total_z_loss, total_z_loss


def _cross_entropy_with_logits_fwd(logits: Array, targets: Array, z_loss: float):
  """Forward pass of `cross_entropy_with_logits`, saving residuals."""
  exp_shifted, sum_exp, log_softmax, log_z = _log_softmax_parts(logits)
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  total_z_loss = z_loss * jax.lax.square(log_z)
  residuals = (logits, targets, z_loss, exp_shifted, sum_exp, log_softmax, log_z)
  return (loss + total_z_loss, total_z_loss), residuals


def _cross_entropy_with_logits_bwd(residuals, cotangents):
  """Backward pass: the z-loss output's cotangent is ignored (logging only)."""
  g = cotangents[0]
  logits, targets, z_loss, exp_shifted, sum_exp, log_softmax, log_z = residuals
  softmax = exp_shifted / sum_exp
  deriv = jnp.expand_dims(1.0 + 2.0 * z_loss * log_z, -1) * softmax - targets
  g_logits = jnp.expand_dims(g, -1) * deriv
  g_targets = -jnp.expand_dims(g, -1) * log_softmax
  return (
      jnp.asarray(g_logits, logits.dtype),
      jnp.asarray(g_targets, targets.dtype),
      jnp.zeros_like(jnp.asarray(z_loss, jnp.float32)),
  )


cross_entropy_with_logits.defvjp(_cross_entropy_with_logits_fwd, _cross_entropy_with_logits_bwd)


def _onehot(labels: Array, num_classes: int, on_value: float, off_value: float) -> Array:
  """One-hot float32 encoding with custom on/off values (flax common_utils)."""
  hot = labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)
  return jnp.where(hot, on_value, off_value).astype(jnp.float32)


def compute_weighted_cross_entropy(
    logits: Array,
    targets: Array,
    weights: Optional[Array] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factor: Optional[Union[float, Array]] = None,
) -> Tuple[Array, Array, Array]:
  """Weighted, label-smoothed cross entropy summed over all tokens (T5X).

  Args:
    logits: [batch, length, vocab] float array.
    targets: [batch, length] integer targets.
    weights: optional [batch, length] per-token loss weights.
    label_smoothing: the target of the correct class is `1 - label_smoothing`,
      every other class gets `label_smoothing / (vocab - 1)`; the entropy of
      that distribution is subtracted so a perfect prediction costs 0.
    z_loss: coefficient of the auxiliary z-loss.
    loss_normalizing_factor: if given, the summed losses are divided by it.
      Must already be a number (see `get_loss_normalizing_factor_and_weights`
      for the special/string forms).

  Returns:
    `(loss, z_loss, weight_sum)`: the summed (and normalized) loss including
    the z-loss term, the summed (and normalized) z-loss term alone, and the sum
    of the weights (the number of target tokens when `weights` is None).
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(
        f'Incorrect shapes. Got shape {logits.shape} logits and '
        f'{targets.shape} targets; logits must have exactly one more axis.'
    )
  if isinstance(loss_normalizing_factor, (str, SpecialLossNormalizingFactor)):
    raise ValueError(
        f'loss_normalizing_factor={loss_normalizing_factor!r} must be resolved '
        'to a number first with get_loss_normalizing_factor_and_weights().'
    )
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = (1.0 - confidence) / (vocab_size - 1)
  normalizing_constant = -(
      confidence * jnp.log(confidence)
      + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
  )
  soft_targets = _onehot(targets, vocab_size, confidence, low_confidence)
  total_loss, total_z_loss = cross_entropy_with_logits(logits, soft_targets, z_loss)
  total_loss = total_loss - normalizing_constant

  weight_sum = np.prod(targets.shape)
  if weights is not None:
    total_loss = total_loss * weights
    total_z_loss = total_z_loss * weights
    weight_sum = jnp.sum(weights)

  if loss_normalizing_factor is not None:
    total_loss = total_loss / loss_normalizing_factor
    total_z_loss = total_z_loss / loss_normalizing_factor
  return jnp.sum(total_loss), jnp.sum(total_z_loss), weight_sum


@enum.unique
class SpecialLossNormalizingFactor(enum.Enum):
  """Loss normalizing factors computed from the batch (T5X).

  Attributes:
    NUM_REAL_TARGET_TOKENS: divide by the sum of the loss weights (the number of
      non-padding target tokens when no `decoder_loss_weights` are given).
    NUM_TOTAL_TARGET_TOKENS: divide by `batch * target_length` (padding
      included).
    AVERAGE_PER_SEQUENCE: average the loss over each sequence's real tokens,
      then over the sequences (each sequence weighs the same).
  """

  NUM_REAL_TARGET_TOKENS = 1
  NUM_TOTAL_TARGET_TOKENS = 2
  AVERAGE_PER_SEQUENCE = 3


def convert_special_loss_normalizing_factor_to_enum(x: str) -> SpecialLossNormalizingFactor:
  """Converts a (case-insensitive) string to a `SpecialLossNormalizingFactor`.

  Gin cannot bind enum members directly, so configs pass e.g.
  `'NUM_REAL_TARGET_TOKENS'` and this resolves it.

  Args:
    x: the member name, e.g. `'average_per_sequence'`.

  Returns:
    The enum member.

  Raises:
    ValueError: if `x` names no member.
  """
  name = x.strip().upper()
  if name.startswith('SPECIALLOSSNORMALIZINGFACTOR.'):
    name = name[len('SPECIALLOSSNORMALIZINGFACTOR.') :]
  try:
    return SpecialLossNormalizingFactor[name]
  except KeyError:
    valid = ', '.join(m.name for m in SpecialLossNormalizingFactor)
    raise ValueError(
        f'Could not convert string "{x}" to SpecialLossNormalizingFactor; '
        f'expected one of: {valid} (or a number).'
    ) from None


def _sum_weights_per_segment(segment_ids: Array, weights: Array) -> Array:
  """For packed rows: each position gets the weight sum of its segment."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return jnp.einsum('bij,bj->bi', same.astype(weights.dtype), weights)


def get_loss_normalizing_factor_and_weights(
    loss_normalizing_factor: LossNormalizingFactor,
    batch: Mapping[str, Array],
) -> Tuple[Optional[Union[float, Array]], Optional[Array]]:
  """Resolves a loss normalizing factor and the loss weights of a batch (T5X).

  A number or None is returned unchanged together with
  `batch.get('decoder_loss_weights')`. A `SpecialLossNormalizingFactor` (or its
  name as a string) is computed from the batch; when the batch has no
  `decoder_loss_weights` the weights default to `decoder_target_tokens > 0`.

  - NUM_REAL_TARGET_TOKENS: factor = `sum(weights)`.
  - NUM_TOTAL_TARGET_TOKENS: factor = `prod(decoder_target_tokens.shape)`.
  - AVERAGE_PER_SEQUENCE: each sequence's weights are divided by that
    sequence's weight sum (per packed segment when `decoder_segment_ids` is in
    the batch; 0/0 becomes 0) and factor = sum of the new weights, i.e. the
    number of sequences that have any weight.

  Args:
    loss_normalizing_factor: None, a number, an enum member or its name.
    batch: the feature-converted batch.

  Returns:
    `(factor, loss_weights)`.
  """
  loss_weights = batch.get('decoder_loss_weights', None)
  if loss_normalizing_factor is None or not isinstance(
      loss_normalizing_factor, (str, SpecialLossNormalizingFactor)
  ):
    return loss_normalizing_factor, loss_weights

  if isinstance(loss_normalizing_factor, str):
    loss_normalizing_factor = convert_special_loss_normalizing_factor_to_enum(
        loss_normalizing_factor
    )

  if loss_weights is None:
    loss_weights = jnp.asarray(batch['decoder_target_tokens'] > 0, jnp.float32)
  else:
    loss_weights = jnp.asarray(loss_weights)

  if loss_normalizing_factor == SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    factor = jnp.sum(loss_weights)
  elif loss_normalizing_factor == SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    factor = np.prod(batch['decoder_target_tokens'].shape)
  elif loss_normalizing_factor == SpecialLossNormalizingFactor.AVERAGE_PER_SEQUENCE:
    loss_weights = loss_weights.astype(jnp.float32)
    if batch.get('decoder_segment_ids', None) is not None:  # packed
      norm_vec = _sum_weights_per_segment(jnp.asarray(batch['decoder_segment_ids']), loss_weights)
    else:
      norm_vec = jnp.sum(loss_weights, axis=-1, keepdims=True)
    loss_weights = jnp.nan_to_num(loss_weights / norm_vec, nan=0.0, posinf=0.0, neginf=0.0)
    factor = jnp.sum(loss_weights)
  else:
    raise ValueError(
        f'Unsupported value of loss_normalizing_factor: ' f'{loss_normalizing_factor!r}'
    )
  return factor, loss_weights
