"""Adafactor with T5X's semantics (`t5x.adafactor.Adafactor`).

The update for one parameter `x` with gradient `g` at step `t`:

1. `decay = 1 - (t - step_offset + 1) ** -decay_rate`, `mix = 1 - decay`.
2. `g2 = g**2 + epsilon1`.
3. Factored (see below): `v_row = decay*v_row + mix*mean(g2, col dims)`,
   `v_col = decay*v_col + mix*mean(g2, row dims)`,
   `y = g * (v_row / mean(v_row, row dims))**-0.5 * v_col**-0.5`.
   Otherwise: `v = decay*v + mix*g2`, `y = g * v**-0.5`.
4. Update clipping: `y /= max(1, rms(y) / clipping_threshold)`.
5. `scale = lr`, times `clip(rms(x), epsilon2, max_parameter_scale)` when
   `multiply_by_parameter_scale`.
6. `u = scale * y`; with momentum `m = beta1*m + (1-beta1)*u; u = m`.
7. `x' = (1 - weight_decay_rate) * x - u` (or `x - u` without weight decay);
   with `weight_decay_rate_lr_exponent` the rate is
   `(weight_decay_rate or 1) * lr ** exponent`.

RMS values (steps 4-5) are taken over all dimensions except those marked
`FactorDim.BATCH`. Optional global-norm clipping of the gradients happens
before everything else, and `skip_nan_updates` keeps the old values where the
new ones are NaN.

Factoring: a parameter of rank <= 2 without BATCH dims uses the heuristic (the
two largest dims are factored when the second largest is at least
`min_dim_size_to_factor`; the largest is the "column"), even when a rule is
given. Higher-rank or batched parameters need an explicit rule, from
`factor_map` or from `logical_factor_rules` applied to the logical axis names
passed to `set_param_axes`.
"""

import enum
import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from flax import struct
from flax.core import frozen_dict
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning.runtime import optimizers

Dtype = Any
PyTree = Any

OptimizerDef = optimizers.OptimizerDef
OptimizerState = optimizers.OptimizerState
LogicalAxes = optimizers.LogicalAxes


class FactorDim(enum.Enum):
  """How Adafactor treats one dimension of a parameter."""

  # Don't factorize this dimension.
  NONE = None
  # A batch-like dimension (stacked/scanned layers): never averaged over.
  BATCH = 1
  ROW = 2
  COLUMN = 3


class HeuristicRule(enum.Enum):
  """Sentinel for the legacy heuristic factorization rule."""

  token = 1


HEURISTIC_RULE = HeuristicRule.token
FactorRule = Union[HeuristicRule, Tuple[FactorDim, ...]]


def standard_logical_factor_rules() -> frozen_dict.FrozenDict:
  """T5X's logical-axis factor rules plus the prompt-tuning names.

  T5X: `vocab`, `mlp`, `heads`, `kv`, `joined_kv`, `q_wi_fused`, `o_wo_fused`,
  `multiquery_heads`, `kv_fused`, `mlp_activations` -> COLUMN; `embed` -> ROW;
  `relpos_buckets`, `layer_norm_scale` -> NONE; `layers`, `stack` -> BATCH.
  Prompt tuning adds `prompt`, `prompt_embed`, `prompt+embed`, `tasks` -> NONE
  and `batch` -> BATCH (see `prompt_logical_factor_rules`).

  Returns:
    A FrozenDict from logical axis name to `FactorDim`.
  """
  rules = {
      'vocab': FactorDim.COLUMN,
      'embed': FactorDim.ROW,
      'mlp': FactorDim.COLUMN,
      'heads': FactorDim.COLUMN,
      'kv': FactorDim.COLUMN,
      'joined_kv': FactorDim.COLUMN,
      'relpos_buckets': FactorDim.NONE,
      'layers': FactorDim.BATCH,
      'stack': FactorDim.BATCH,
      'q_wi_fused': FactorDim.COLUMN,
      'o_wo_fused': FactorDim.COLUMN,
      'multiquery_heads': FactorDim.COLUMN,
      'kv_fused': FactorDim.COLUMN,
      'layer_norm_scale': FactorDim.NONE,
      'mlp_activations': FactorDim.COLUMN,
  }
  return prompt_logical_factor_rules(rules)


def prompt_logical_factor_rules(
    rules: Optional[Mapping[str, Any]] = None,
) -> frozen_dict.FrozenDict:
  """Adds prompt-tuning's names to `rules` (prompt tuning's `pt_optim` rules).

  Args:
    rules: base rules; defaults to `standard_logical_factor_rules()`.

  Returns:
    A FrozenDict with `prompt`, `prompt_embed`, `prompt+embed`, `tasks` -> NONE
    and `batch` -> BATCH added.
  """
  if rules is None:
    return standard_logical_factor_rules()
  out = dict(frozen_dict.unfreeze(rules) if isinstance(rules, frozen_dict.FrozenDict) else rules)
  out['prompt'] = FactorDim.NONE
  out['prompt_embed'] = FactorDim.NONE
  out['prompt+embed'] = FactorDim.NONE
  out['tasks'] = FactorDim.NONE
  out['batch'] = FactorDim.BATCH
  return frozen_dict.freeze(out)


def factor_name_to_factordim(name: Any) -> FactorDim:
  """Maps 'row', 'col'/'column', 'batch', 'none'/'unfactorized' to FactorDim."""
  if name is None:
    return FactorDim.NONE
  if isinstance(name, FactorDim):
    return name
  key = str(name).lower()
  table = {
      'row': FactorDim.ROW,
      'col': FactorDim.COLUMN,
      'column': FactorDim.COLUMN,
      'batch': FactorDim.BATCH,
      'none': FactorDim.NONE,
      'unfactorized': FactorDim.NONE,
  }
  if key not in table:
    raise ValueError(
        f'Unknown Adafactor factor dimension {name!r}; expected ' f'one of {sorted(table)}.'
    )
  return table[key]


class HParamMap:
  """Maps parameter paths (`a/b/c`) to values by the first matching regex."""

  def __init__(self, rules: Sequence[Tuple[str, Any]]):
    self._rules = [(re.compile(r), p) for r, p in rules]

  def __getitem__(self, key: str) -> Any:
    for r, p in self._rules:
      if r.search(key):
        return p
    raise KeyError(f'No factor rule found for parameter: {key}')

  def __contains__(self, key: str) -> bool:
    return any(r.search(key) for r, _ in self._rules)

  def __call__(self, params: PyTree) -> Dict[str, Any]:
    """Returns a tree like `params` with the mapped value at every leaf."""
    flat = optimizers.flatten_paths(params)
    return optimizers.unflatten_paths({k: self[k] for k in flat})


@struct.dataclass
class AdafactorHyperParams:
  """Adafactor hyper parameters (structural fields are static)."""

  learning_rate: Optional[float]
  factored: bool = struct.field(pytree_node=False)
  multiply_by_parameter_scale: Union[bool, HParamMap] = struct.field(pytree_node=False)
  beta1: Optional[float]
  decay_rate: float
  step_offset: int
  clipping_threshold: Optional[float]
  weight_decay_rate: Optional[float]
  min_dim_size_to_factor: int = struct.field(pytree_node=False)
  epsilon1: float
  epsilon2: float
  factor_map: Any = struct.field(pytree_node=False, default=None)
  logical_factor_rules: Any = struct.field(pytree_node=False, default=None)
  weight_decay_rate_lr_exponent: Optional[float] = struct.field(pytree_node=False, default=None)
  global_norm_clip_threshold: Optional[float] = struct.field(pytree_node=False, default=None)
  max_parameter_scale: Optional[float] = None
  skip_nan_updates: Optional[bool] = struct.field(pytree_node=False, default=False)


_AdafactorHyperParams = AdafactorHyperParams


@struct.dataclass
class AdafactorParamState:
  """Per-parameter state; unused slots are `zeros((1,))`."""

  v_row: Any  # factored second moment (rows)
  v_col: Any  # factored second moment (columns)
  v: Any  # unfactored second moment
  m: Any  # momentum (only with beta1)


_AdafactorParamState = AdafactorParamState

_SLOTS = ('v_row', 'v_col', 'v', 'm')


class Adafactor(OptimizerDef):
  """Adafactor (https://arxiv.org/abs/1804.04235) as implemented by T5X."""

  def __init__(
      self,
      learning_rate: Optional[float] = None,
      factored: bool = True,
      multiply_by_parameter_scale: Union[bool, HParamMap] = True,
      beta1: Optional[float] = None,
      decay_rate: float = 0.8,
      step_offset: int = 0,
      clipping_threshold: Optional[float] = 1.0,
      weight_decay_rate: Optional[float] = None,
      min_dim_size_to_factor: int = 128,
      epsilon1: float = 1e-30,
      epsilon2: float = 1e-3,
      dtype_momentum: Dtype = jnp.float32,
      factor_map: Optional[Union[HParamMap, Mapping[str, Any]]] = None,
      logical_factor_rules: Optional[Mapping[str, Any]] = None,
      weight_decay_rate_lr_exponent: Optional[float] = None,
      global_norm_clip_threshold: Optional[float] = None,
      max_parameter_scale: Optional[float] = None,
      skip_nan_updates: Optional[bool] = False,
  ):
    """Creates the optimizer definition.

    Args:
      learning_rate: step size; usually supplied every step by the trainer's
        learning-rate schedule through `update_hyper_params`.
      factored: whether to factor second moments of large matrices.
      multiply_by_parameter_scale: scale the step by the parameter RMS
        (bool, or an `HParamMap` from path regex to bool).
      beta1: momentum coefficient, or None for no momentum.
      decay_rate: exponent of the second-moment decay schedule.
      step_offset: step at which the decay schedule restarts (fine-tuning).
      clipping_threshold: update-RMS clipping threshold, None for no clipping.
      weight_decay_rate: decoupled weight decay `x <- (1 - rate) * x - u`.
      min_dim_size_to_factor: factor only if the second largest dim is at
        least this large (heuristic rule).
      epsilon1: added to squared gradients.
      epsilon2: lower bound of the parameter scale.
      dtype_momentum: dtype of the momentum buffer.
      factor_map: explicit factor rules, an `HParamMap` or a dict from
        parameter path to a tuple of `FactorDim`.
      logical_factor_rules: mapping from logical axis name to `FactorDim` (or
        its name); turned into `factor_map` by `set_param_axes`.
      weight_decay_rate_lr_exponent: weight decay rate becomes
        `(weight_decay_rate or 1) * lr ** exponent`.
      global_norm_clip_threshold: clip gradients to this global norm first.
      max_parameter_scale: upper bound of the parameter scale.
      skip_nan_updates: keep old parameters/states where updates are NaN.
    """
    if not factored and factor_map is not None:
      raise ValueError('Adafactor factored is False but factorization rules ' 'have been provided.')
    if not isinstance(multiply_by_parameter_scale, (bool, HParamMap)):
      raise TypeError(
          '`multiply_by_parameter_scale` must be either bool or `HParamMap` '
          f'type. Got {type(multiply_by_parameter_scale)}'
      )
    if not isinstance(factor_map, (type(None), HParamMap, Mapping)):
      raise TypeError(
          '`factor_map` must be None, a mapping or an `HParamMap`. ' f'Got {type(factor_map)}'
      )
    if isinstance(factor_map, Mapping):
      factor_map = frozen_dict.freeze(
          {k: tuple(factor_name_to_factordim(d) for d in v) for k, v in factor_map.items()}
      )
    if logical_factor_rules is not None:
      logical_factor_rules = frozen_dict.freeze(dict(logical_factor_rules))
    hyper_params = AdafactorHyperParams(
        learning_rate=learning_rate,
        factored=factored,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        beta1=beta1,
        decay_rate=decay_rate,
        step_offset=step_offset,
        clipping_threshold=clipping_threshold,
        weight_decay_rate=weight_decay_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        epsilon1=epsilon1,
        epsilon2=epsilon2,
        factor_map=factor_map,
        logical_factor_rules=logical_factor_rules,
        weight_decay_rate_lr_exponent=weight_decay_rate_lr_exponent,
        global_norm_clip_threshold=global_norm_clip_threshold,
        max_parameter_scale=max_parameter_scale,
        skip_nan_updates=skip_nan_updates,
    )
    self.dtype_momentum = jax.dtypes.canonicalize_dtype(dtype_momentum)
    # Parameter shapes seen by init_param_state (to derive v_row/v_col axes).
    self._init_shapes: Dict[str, Tuple[int, ...]] = {}
    super().__init__(hyper_params)

  def __eq__(self, other: Any) -> bool:
    return (
        isinstance(other, Adafactor)
        and self.hyper_params == other.hyper_params
        and self.dtype_momentum == other.dtype_momentum
    )

  def __hash__(self) -> int:
    return id(self)

  # -- factoring --------------------------------------------------------------

  @staticmethod
  def _decay_rate_pow(i: Any, exponent: float = 0.8) -> Any:
    """Second-moment decay `1 - (i + 1) ** -exponent`."""
    t = jnp.asarray(i, jnp.float32) + 1.0
    return 1.0 - t ** (-exponent)

  @staticmethod
  def _parse_rule(
      rule: Optional[FactorRule],
      shape: Sequence[int],
      path: str,
      fallback_to_heuristics: bool = True,
  ) -> Tuple[Tuple[int, ...], Any]:
    """Returns `(averaging_dims, factored_dims)` for a rule.

    `factored_dims` is None (unfactored), `HEURISTIC_RULE`, or
    `(row_dims, col_dims)`.

    Args:
      rule: None (no factoring), `HEURISTIC_RULE` or a tuple of `FactorDim`.
      shape: the parameter shape.
      path: the parameter path (for messages).
      fallback_to_heuristics: use the heuristic for rank <= 2 unbatched
        parameters even when a rule is given (T5X's behaviour).
    """
    ndim = len(shape)
    all_dims = tuple(range(ndim))
    if rule is None:
      return all_dims, None
    if rule is HEURISTIC_RULE:
      if ndim > 2:
        raise ValueError(
            f'A parameter with rank strictly higher than 2 must have an '
            f'explicit factorization rule: {path}, {tuple(shape)}. Pass '
            'Adafactor(logical_factor_rules=...) or factor_map=...'
        )
      return all_dims, HEURISTIC_RULE
    rule = tuple(factor_name_to_factordim(d) for d in rule)
    if len(rule) != ndim:
      raise ValueError(
          f'Factorization rule {rule} has incorrect rank '
          f'for param of rank {ndim}: {path}, {tuple(shape)}'
      )
    row_dims = tuple(i for i, d in enumerate(rule) if d == FactorDim.ROW)
    col_dims = tuple(i for i, d in enumerate(rule) if d == FactorDim.COLUMN)
    batch_dims = tuple(i for i, d in enumerate(rule) if d == FactorDim.BATCH)
    averaging_dims = tuple(i for i in all_dims if i not in batch_dims)
    factored_dims = (row_dims, col_dims)
    if factored_dims == ((), ()):
      factored_dims = None
    if fallback_to_heuristics and ndim <= 2 and not batch_dims:
      logging.debug(
          'Adafactor: parameter %s has rank %d <= 2; the factorization '
          'heuristic is used and the rule %s is ignored.',
          path,
          ndim,
          rule,
      )
      return all_dims, HEURISTIC_RULE
    return averaging_dims, factored_dims

  def _factored_dims(self, shape: Sequence[int]) -> Optional[Tuple[Tuple[int], Tuple[int]]]:
    """Heuristic: `((second_largest,), (largest,))` or None."""
    if not self.hyper_params.factored or len(shape) < 2:
      return None
    sorted_dims = np.argsort(shape)
    if shape[sorted_dims[-2]] < self.hyper_params.min_dim_size_to_factor:
      return None
    return (int(sorted_dims[-2]),), (int(sorted_dims[-1]),)

  def _factor_rule(self, path: str) -> Optional[FactorRule]:
    hp = self.hyper_params
    if not hp.factored:
      return None
    factor_map = hp.factor_map
    if factor_map is None:
      return HEURISTIC_RULE
    if isinstance(factor_map, HParamMap):
      return factor_map[path]
    if path in factor_map:
      return factor_map[path]
    return HEURISTIC_RULE

  def factoring(self, shape: Sequence[int], path: str = '') -> Tuple[Tuple[int, ...], Any]:
    """Returns `(averaging_dims, factored_dims)` for a parameter.

    `factored_dims` is None (full second moment `v`) or
    `(row_dims, col_dims)`: `v_row` drops `col_dims`, `v_col` drops `row_dims`.

    Args:
      shape: the parameter shape.
      path: the flattened parameter path (`encoder/prompt/prompt/prompt`).
    """
    averaging_dims, factored_dims = self._parse_rule(self._factor_rule(path), shape, path)
    if factored_dims is HEURISTIC_RULE:
      factored_dims = self._factored_dims(shape)
    return averaging_dims, factored_dims

  # -- state ------------------------------------------------------------------

  def init_param_state(self, param: Any, path: str) -> AdafactorParamState:
    """Zero state for one parameter."""
    shape = tuple(int(s) for s in param.shape)
    self._init_shapes[path] = shape
    state = {k: jnp.zeros((1,), jnp.float32) for k in _SLOTS}
    _, factored_dims = self.factoring(shape, path)
    if factored_dims is not None:
      row_dims, col_dims = factored_dims
      state['v_row'] = jnp.zeros(tuple(np.delete(shape, col_dims)), dtype=jnp.float32)
      state['v_col'] = jnp.zeros(tuple(np.delete(shape, row_dims)), dtype=jnp.float32)
    else:
      state['v'] = jnp.zeros(shape, dtype=jnp.float32)
    if self.hyper_params.beta1 is not None:
      state['m'] = jnp.zeros(shape, dtype=self.dtype_momentum)
    return AdafactorParamState(**state)

  def init_state(self, params: PyTree) -> OptimizerState:
    """State for every (non-None) leaf of `params` (a full tree or subtree)."""
    flat = optimizers.flatten_paths(params)
    param_states = optimizers.unflatten_paths(
        {p: (None if x is None else self.init_param_state(x, p)) for p, x in flat.items()}
    )
    return OptimizerState(jnp.asarray(0, dtype=jnp.int32), param_states)

  # -- update -----------------------------------------------------------------

  def apply_param_gradient(
      self,
      step: Any,
      hyper_params: AdafactorHyperParams,
      param: Any,
      state: AdafactorParamState,
      grad: Any,
      path: str,
  ) -> Tuple[Any, AdafactorParamState]:
    """One Adafactor update of a single parameter."""
    if hyper_params.learning_rate is None:
      raise ValueError(
          'Adafactor has no learning rate: set Adafactor.learning_rate or pass '
          'one per step (the trainer passes learning_rate_fn(step)).'
      )
    learning_rate = hyper_params.learning_rate
    beta1 = hyper_params.beta1
    multiply_by_parameter_scale = hyper_params.multiply_by_parameter_scale
    max_parameter_scale = hyper_params.max_parameter_scale
    clipping_threshold = hyper_params.clipping_threshold
    weight_decay_rate = hyper_params.weight_decay_rate
    if hyper_params.weight_decay_rate_lr_exponent:
      # T5X: `(weight_decay_rate or 1.0) * lr ** exponent`.
      base_rate = weight_decay_rate
      if base_rate is None or (isinstance(base_rate, (int, float)) and not base_rate):
        base_rate = 1.0
      weight_decay_rate = base_rate * learning_rate**hyper_params.weight_decay_rate_lr_exponent

    averaging_dims, factored_dims = self.factoring(param.shape, path)
    param_f32 = jnp.asarray(param, jnp.float32)
    grad = jnp.asarray(grad, jnp.float32)

    updates = {k: jnp.zeros((1,), jnp.float32) for k in _SLOTS}
    decay = self._decay_rate_pow(step - hyper_params.step_offset, exponent=hyper_params.decay_rate)
    mixing_rate = 1.0 - decay

    update_scale = learning_rate
    if isinstance(multiply_by_parameter_scale, HParamMap):
      multiply_by_parameter_scale = multiply_by_parameter_scale[path]
    if multiply_by_parameter_scale:
      param_scale = jnp.sqrt(jnp.mean(param_f32 * param_f32, axis=averaging_dims, keepdims=True))
      param_scale = jnp.maximum(param_scale, hyper_params.epsilon2)
      if max_parameter_scale is not None:
        param_scale = jnp.minimum(param_scale, max_parameter_scale)
      update_scale = update_scale * param_scale

    grad_sqr = grad * grad + hyper_params.epsilon1
    if factored_dims is not None:
      row_dims, col_dims = factored_dims
      new_v_row = decay * state.v_row + mixing_rate * jnp.mean(grad_sqr, axis=col_dims)
      new_v_col = decay * state.v_col + mixing_rate * jnp.mean(grad_sqr, axis=row_dims)
      updates['v_row'] = new_v_row
      updates['v_col'] = new_v_col
      # Row dims renumbered after the column dims were reduced away.
      reduced_row_dims = tuple(d - sum(1 for c in col_dims if c < d) for d in row_dims)
      row_col_mean = jnp.mean(new_v_row, axis=reduced_row_dims, keepdims=True)
      row_factor = (new_v_row / row_col_mean) ** -0.5
      col_factor = new_v_col**-0.5
      y = (
          grad
          * jnp.expand_dims(row_factor, axis=col_dims)
          * jnp.expand_dims(col_factor, axis=row_dims)
      )
    else:
      new_v = decay * state.v + mixing_rate * grad_sqr
      updates['v'] = new_v
      y = grad * new_v**-0.5

    if clipping_threshold is not None:
      clipping_denom = jnp.maximum(
          1.0, jnp.sqrt(jnp.mean(y * y, axis=averaging_dims, keepdims=True)) / clipping_threshold
      )
      y = y / clipping_denom

    subtrahend = update_scale * y
    if beta1 is not None:
      new_m = beta1 * state.m + (1.0 - beta1) * subtrahend
      subtrahend = new_m
      updates['m'] = new_m.astype(self.dtype_momentum)

    if weight_decay_rate is not None:
      new_param = (1.0 - weight_decay_rate) * param_f32 - subtrahend
    else:
      new_param = param_f32 - subtrahend

    if hyper_params.skip_nan_updates:
      for k in _SLOTS:
        old = getattr(state, k)
        updates[k] = jnp.where(jnp.isnan(updates[k]), old, updates[k])
      new_param = jnp.where(jnp.isnan(new_param), param_f32, new_param)
    return new_param.astype(param.dtype), AdafactorParamState(**updates)

  def apply_gradient(
      self, hyper_params: AdafactorHyperParams, params: PyTree, state: OptimizerState, grads: PyTree
  ) -> Tuple[PyTree, OptimizerState]:
    """Updates every leaf of `params` that has a state.

    `params`/`grads` may be a subtree of the tree `state.param_states` was
    made for; the returned state keeps the structure of `state.param_states`.
    Leaves whose state is None are returned unchanged.

    Args:
      hyper_params: from `update_hyper_params(learning_rate=...)`.
      params: parameters (full tree or trainable subtree).
      state: the `OptimizerState`.
      grads: gradients shaped like `params`.

    Returns:
      `(new_params, new_state)`.
    """
    step = state.step
    flat_params = optimizers.flatten_paths(params)
    flat_grads = optimizers.flatten_paths(grads)
    trained = []
    flat_states = {}
    missing_states = []
    absent = object()
    for p in flat_params:
      st = optimizers.get_path(state.param_states, p, absent)
      if st is absent:
        missing_states.append(p)
        continue
      if st is None:
        continue
      if p not in flat_grads or flat_grads[p] is None:
        raise ValueError(f'No gradient for trained parameter {p!r}.')
      trained.append(p)
      flat_states[p] = st
    if missing_states:
      raise ValueError(
          f'No Adafactor state for parameters {missing_states}; the state was '
          'initialized for a different parameter tree.'
      )

    grads_used = {p: flat_grads[p] for p in trained}
    if hyper_params.global_norm_clip_threshold and trained:
      threshold = hyper_params.global_norm_clip_threshold
      squared = [jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in grads_used.values()]
      global_norm = jnp.sqrt(jnp.sum(jnp.stack(squared)))
      scale = threshold * jnp.minimum(1.0 / threshold, 1.0 / global_norm)
      grads_used = {p: g * scale for p, g in grads_used.items()}

    new_flat_params = dict(flat_params)
    new_param_states = optimizers._copy_dicts(state.param_states)  # pylint: disable=protected-access
    for p in trained:
      new_param, new_st = self.apply_param_gradient(
          step, hyper_params, flat_params[p], flat_states[p], grads_used[p], p
      )
      new_flat_params[p] = new_param
      optimizers._set_path(new_param_states, p, new_st)  # pylint: disable=protected-access
    return (optimizers.unflatten_paths(new_flat_params), OptimizerState(step + 1, new_param_states))

  # -- logical axes -----------------------------------------------------------

  def set_param_axes(self, param_logical_axes: PyTree) -> None:
    """Builds `factor_map` from logical axis names and `logical_factor_rules`.

    Does nothing when `logical_factor_rules` is None. Axes that are None
    (unnamed) count as `FactorDim.NONE`. A parameter with ROW but no COLUMN (or
    the reverse) is left unfactored (BATCH marks are kept); ROW and COLUMN
    together with a NONE raise.

    Args:
      param_logical_axes: tree of per-parameter logical axes (tuples,
        `PartitionSpec`s or flax `AxisMetadata`).
    """
    rules = self.hyper_params.logical_factor_rules
    if rules is None:
      return
    none, row, col = FactorDim.NONE, FactorDim.ROW, FactorDim.COLUMN

    def apply_rules(path: str, axes: Tuple[Any, ...]) -> Tuple[FactorDim, ...]:
      dims = []
      for name in axes:
        if name is None:
          dims.append(none)
          continue
        if name not in rules:
          raise ValueError(
              f'Adafactor logical_factor_rules has no rule for the logical '
              f'axis {name!r} of parameter {path!r} (axes {axes}). Add it to '
              'Adafactor.logical_factor_rules.'
          )
        dims.append(factor_name_to_factordim(rules[name]))
      dims = tuple(dims)
      if row in dims and col in dims and none in dims:
        raise ValueError(f'Incomplete adafactor spec {dims} for {path!r}!')
      if row not in dims or col not in dims:
        dims = tuple(none if d in (row, col) else d for d in dims)
      return dims

    flat = optimizers.flatten_paths(param_logical_axes)
    factor_map = {}
    for path, axes in flat.items():
      axes = optimizers.as_logical_axes(axes)
      if axes is None:
        continue
      factor_map[path] = apply_rules(path, tuple(axes))
    self.hyper_params = self.hyper_params.replace(factor_map=frozen_dict.freeze(factor_map))

  def derive_logical_axes(
      self, state: OptimizerState, param_logical_axes: PyTree
  ) -> OptimizerState:
    """Logical axes of the Adafactor state.

    `v` and `m` (when in use) get the parameter's axes; `v_row`/`v_col` get
    the parameter's axes without the reduced dimensions when the factoring can
    be recovered from the parameter's rule and the state shapes, and are
    replicated otherwise (T5X replicates them always); unused `(1,)` slots and
    other arrays are replicated; `step` gets `()`.

    Args:
      state: the `OptimizerState` (arrays or `jax.ShapeDtypeStruct`s).
      param_logical_axes: tree of per-parameter logical axes.

    Returns:
      An `OptimizerState` whose leaves are `LogicalAxes` (None where the state
      is None).
    """
    flat_axes = optimizers.flatten_paths(param_logical_axes)
    new_param_states = optimizers._copy_dicts(state.param_states)  # pylint: disable=protected-access
    for path, axes in flat_axes.items():
      st = optimizers.get_path(state.param_states, path, None)
      if st is None:
        continue
      axes = optimizers.as_logical_axes(axes)
      optimizers._set_path(
          new_param_states,
          path,  # pylint: disable=protected-access
          self._param_state_axes(path, axes, st),
      )
    return OptimizerState(step=LogicalAxes(()), param_states=new_param_states)

  def _param_state_axes(
      self, path: str, axes: Optional[LogicalAxes], st: AdafactorParamState
  ) -> AdafactorParamState:
    """Axes for one parameter's state."""

    def shape_of(x: Any) -> Tuple[int, ...]:
      return tuple(getattr(x, 'shape', ()))

    def rep(x: Any) -> LogicalAxes:
      return optimizers._replicated(len(shape_of(x)))  # pylint: disable=protected-access

    out = {k: rep(getattr(st, k)) for k in _SLOTS}
    if axes is None:
      return AdafactorParamState(**out)
    ndim = len(axes)
    factored = shape_of(st.v_row) != (1,) or shape_of(st.v_col) != (1,)
    if not factored and len(shape_of(st.v)) == ndim:
      out['v'] = axes
    if self.hyper_params.beta1 is not None and len(shape_of(st.m)) == ndim:
      out['m'] = axes
    if factored:
      dims = self._recover_factored_dims(path, st, ndim)
      if dims is not None:
        row_dims, col_dims = dims
        out['v_row'] = LogicalAxes(a for i, a in enumerate(axes) if i not in col_dims)
        out['v_col'] = LogicalAxes(a for i, a in enumerate(axes) if i not in row_dims)
    return AdafactorParamState(**out)

  def _recover_factored_dims(
      self, path: str, st: AdafactorParamState, ndim: int
  ) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """Factored dims consistent with the state shapes, or None if unknown.

    Uses the parameter shape seen by `init_param_state` when available;
    otherwise only explicit (rank > 2 or batched) rules and square matrices
    can be recovered from the state shapes alone.
    """
    v_row = tuple(st.v_row.shape)
    v_col = tuple(st.v_col.shape)

    def state_shapes(shape, dims):
      row_dims, col_dims = dims
      return (
          tuple(int(s) for s in np.delete(shape, col_dims)),
          tuple(int(s) for s in np.delete(shape, row_dims)),
      )

    shape = self._init_shapes.get(path)
    if shape is not None and len(shape) == ndim:
      _, dims = self.factoring(shape, path)
      if dims is not None and state_shapes(shape, dims) == (v_row, v_col):
        return dims

    candidates = []
    rule = self._factor_rule(path)
    if isinstance(rule, tuple) and len(rule) == ndim:
      rule = tuple(factor_name_to_factordim(d) for d in rule)
      candidates.append(
          (
              tuple(i for i, d in enumerate(rule) if d == FactorDim.ROW),
              tuple(i for i, d in enumerate(rule) if d == FactorDim.COLUMN),
          )
      )
    if ndim == 2:
      candidates.extend([((0,), (1,)), ((1,), (0,))])
    consistent = []
    for row_dims, col_dims in candidates:
      if len(v_row) != ndim - len(col_dims) or len(v_col) != ndim - len(row_dims):
        continue
      # Rebuild the parameter shape and check the factoring it would get.
      rebuilt = [None] * ndim
      for i, size in zip([i for i in range(ndim) if i not in col_dims], v_row):
        rebuilt[i] = size
      ok = True
      for i, size in zip([i for i in range(ndim) if i not in row_dims], v_col):
        if rebuilt[i] is not None and rebuilt[i] != size:
          ok = False
        rebuilt[i] = size
      if not ok or any(s is None for s in rebuilt):
        continue
      _, got = self.factoring(tuple(rebuilt), path)
      if got == (row_dims, col_dims) and (row_dims, col_dims) not in consistent:
        consistent.append((row_dims, col_dims))
    if len(consistent) == 1:
      return consistent[0]
    return None


__all__ = [
    'FactorDim',
    'HeuristicRule',
    'HEURISTIC_RULE',
    'HParamMap',
    'standard_logical_factor_rules',
    'prompt_logical_factor_rules',
    'factor_name_to_factordim',
    'AdafactorHyperParams',
    'AdafactorParamState',
    'Adafactor',
]
