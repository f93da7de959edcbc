"""Adafactor against an independent numpy transcription of T5X's update rule."""

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import optimizers

FactorDim = adafactor.FactorDim


# ---------------------------------------------------------------------------
# Reference implementation (numpy, float64), written from the rule:
#   decay = 1 - (t - offset + 1)^-decay_rate, g2 = g^2 + eps1
#   factored: R = EMA(mean_col(g2)), C = EMA(mean_row(g2)),
#             y = g / sqrt((R / mean_row(R)) * C)
#   else:     V = EMA(g2), y = g / sqrt(V)
#   y /= max(1, rms(y) / clip);  scale = lr [* max(rms(x), eps2)]
#   u = scale * y; momentum m = b1 m + (1 - b1) u; u = m
#   x' = (1 - wd) x - u
# Statistics are kept with keepdims=True here (a different layout than the
# implementation) and squeezed only for comparison.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RefConfig:
  decay_rate: float = 0.8
  step_offset: int = 0
  clipping_threshold: Optional[float] = 1.0
  multiply_by_parameter_scale: bool = True
  weight_decay_rate: Optional[float] = None
  weight_decay_rate_lr_exponent: Optional[float] = None
  beta1: Optional[float] = None
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  max_parameter_scale: Optional[float] = None
  global_norm_clip_threshold: Optional[float] = None


class RefAdafactor:
  """Numpy Adafactor for one list of parameters with given factoring."""

  def __init__(
      self,
      cfg: RefConfig,
      rules: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]],
  ):
    # rules[i] = (row_dims, col_dims, batch_dims); row/col empty = unfactored.
    self.cfg = cfg
    self.rules = rules
    self.clip_was_active = False

  def init(self, params):
    states = []
    for x, (rows, cols, _) in zip(params, self.rules):
      st = {}
      if rows:
        st['R'] = np.zeros([1 if i in cols else s for i, s in enumerate(x.shape)])
        st['C'] = np.zeros([1 if i in rows else s for i, s in enumerate(x.shape)])
      else:
        st['V'] = np.zeros(x.shape)
      st['M'] = np.zeros(x.shape)
      states.append(st)
    return states

  def step(self, t, lr, params, grads, states):
    cfg = self.cfg
    grads = [np.asarray(g, np.float64) for g in grads]
    if cfg.global_norm_clip_threshold:
      norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
      factor = min(1.0, cfg.global_norm_clip_threshold / norm)
      grads = [g * factor for g in grads]
    wd = cfg.weight_decay_rate
    if cfg.weight_decay_rate_lr_exponent:
      wd = (wd if wd is not None else 1.0) * lr**cfg.weight_decay_rate_lr_exponent
    # The schedule itself is evaluated in float32, as T5X does (at step 1.1M
    # the decay is 1 - 1.4e-5, which float32 only resolves to ~0.4%).
    decay = float(
        np.float32(1.0) - np.float32(t - cfg.step_offset + 1.0) ** np.float32(-cfg.decay_rate)
    )
    out_p, out_s = [], []
    for x, g, st, (rows, cols, batch) in zip(params, grads, states, self.rules):
      x = np.asarray(x, np.float64)
      avg = tuple(i for i in range(x.ndim) if i not in batch)
      st = dict(st)
      g2 = g * g + cfg.epsilon1
      if rows:
        st['R'] = decay * st['R'] + (1 - decay) * g2.mean(axis=cols, keepdims=True)
        st['C'] = decay * st['C'] + (1 - decay) * g2.mean(axis=rows, keepdims=True)
        r_norm = st['R'] / st['R'].mean(axis=rows, keepdims=True)
        y = g / np.sqrt(r_norm * st['C'])
      else:
        st['V'] = decay * st['V'] + (1 - decay) * g2
        y = g / np.sqrt(st['V'])
      if cfg.clipping_threshold is not None:
        rms = np.sqrt(np.mean(y * y, axis=avg, keepdims=True))
        if np.any(rms > cfg.clipping_threshold):
          self.clip_was_active = True
        y = y / np.maximum(1.0, rms / cfg.clipping_threshold)
      scale = lr
      if cfg.multiply_by_parameter_scale:
        ps = np.sqrt(np.mean(x * x, axis=avg, keepdims=True))
        ps = np.maximum(ps, cfg.epsilon2)
        if cfg.max_parameter_scale is not None:
          ps = np.minimum(ps, cfg.max_parameter_scale)
        scale = scale * ps
      u = scale * y
      if cfg.beta1 is not None:
        st['M'] = cfg.beta1 * st['M'] + (1 - cfg.beta1) * u
        u = st['M']
      new_x = ((1.0 - wd) * x if wd is not None else x) - u
      out_p.append(new_x)
      out_s.append(st)
    return out_p, out_s


def _adafactor_kwargs(cfg: RefConfig) -> dict:
  return dict(
      decay_rate=cfg.decay_rate,
      step_offset=cfg.step_offset,
      clipping_threshold=cfg.clipping_threshold,
      multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
      weight_decay_rate=cfg.weight_decay_rate,
      weight_decay_rate_lr_exponent=cfg.weight_decay_rate_lr_exponent,
      beta1=cfg.beta1,
      epsilon1=cfg.epsilon1,
      epsilon2=cfg.epsilon2,
      max_parameter_scale=cfg.max_parameter_scale,
      global_norm_clip_threshold=cfg.global_norm_clip_threshold,
  )


def _run_and_compare(
    cfg: RefConfig,
    shapes,
    rules,
    *,
    num_steps=5,
    start_step=0,
    grad_scale=1.0,
    jit=True,
    extra_kwargs=None,
    logical_axes=None,
    seed=0,
):
  rng = np.random.RandomState(seed)
  names = [f'p{i}' for i in range(len(shapes))]
  params_np = [rng.uniform(-1, 1, s).astype(np.float32) for s in shapes]
  params = {'layer': {n: jnp.asarray(p) for n, p in zip(names, params_np)}}
  opt = adafactor.Adafactor(**_adafactor_kwargs(cfg), **(extra_kwargs or {}))
  if logical_axes is not None:
    opt.set_param_axes({'layer': dict(zip(names, logical_axes))})
  state = opt.init_state(params)
  state = state.replace(step=jnp.asarray(start_step, jnp.int32))
  ref = RefAdafactor(cfg, rules)
  ref_params = [p.astype(np.float64) for p in params_np]
  ref_states = ref.init(ref_params)
  apply = jax.jit(opt.apply_gradient) if jit else opt.apply_gradient
  for i in range(num_steps):
    lr = 0.3 / (1 + i)
    grads_np = [(grad_scale * rng.normal(size=s)).astype(np.float32) for s in shapes]
    # Sprinkle a few exact zeros / tiny gradients.
    grads_np[0].reshape(-1)[:3] = [0.0, 1e-20, -1e-12]
    grads = {'layer': {n: jnp.asarray(g) for n, g in zip(names, grads_np)}}
    hp = opt.update_hyper_params(learning_rate=lr)
    params, state = apply(hp, params, state, grads)
    ref_params, ref_states = ref.step(
        start_step + i, lr, ref_params, [g.astype(np.float64) for g in grads_np], ref_states
    )
  assert int(state.step) == start_step + num_steps
  for n, rp, rs, (rows, cols, _) in zip(names, ref_params, ref_states, rules):
    np.testing.assert_allclose(np.asarray(params['layer'][n]), rp, rtol=0, atol=1e-6)
    st = state.param_states['layer'][n]
    if rows:
      np.testing.assert_allclose(np.asarray(st.v_row), rs['R'].squeeze(cols), rtol=2e-5, atol=0)
      np.testing.assert_allclose(np.asarray(st.v_col), rs['C'].squeeze(rows), rtol=2e-5, atol=0)
      assert st.v.shape == (1,)
    else:
      np.testing.assert_allclose(np.asarray(st.v), rs['V'], rtol=2e-5, atol=0)
      assert st.v_row.shape == (1,) and st.v_col.shape == (1,)
    if cfg.beta1 is not None:
      np.testing.assert_allclose(np.asarray(st.m), rs['M'], rtol=0, atol=1e-6)
    else:
      assert st.m.shape == (1,)
  return ref


# (256, 192): second largest dim 192 (axis 1) is the row, 256 (axis 0) the col.
FACT_256x192 = ((1,), (0,), ())
UNFACT = ((), (), ())


def test_factored_param_scale_default_clipping():
  ref = _run_and_compare(RefConfig(), [(256, 192)], [FACT_256x192])
  assert ref.clip_was_active


def test_factored_tall_matrix():
  # (192, 256): row = axis 0, col = axis 1.
  _run_and_compare(RefConfig(), [(192, 256)], [((0,), (1,), ())], num_steps=3)


def test_unfactored_prompt_paper_recipe_with_step_offset():
  # The prompt-tuning recipe: no parameter scale, weight decay 1e-5, and a
  # step restored from a pretrained checkpoint with a fine-tuning offset.
  cfg = RefConfig(multiply_by_parameter_scale=False, weight_decay_rate=1e-5, step_offset=1_100_000)
  _run_and_compare(cfg, [(20, 32)], [UNFACT], start_step=1_100_000)


def test_unfactored_large_step_without_offset():
  cfg = RefConfig(multiply_by_parameter_scale=False, weight_decay_rate=1e-5)
  _run_and_compare(cfg, [(20, 32)], [UNFACT], start_step=1_100_000, num_steps=3)


def test_clipping_threshold_small_and_none():
  ref = _run_and_compare(RefConfig(clipping_threshold=0.5), [(20, 32)], [UNFACT])
  assert ref.clip_was_active
  _run_and_compare(RefConfig(clipping_threshold=None), [(256, 192)], [FACT_256x192], num_steps=3)


def test_momentum_weight_decay_lr_exponent_and_max_scale():
  cfg = RefConfig(
      beta1=0.9, weight_decay_rate=1e-3, weight_decay_rate_lr_exponent=1.0, max_parameter_scale=0.3
  )
  _run_and_compare(cfg, [(256, 192), (20, 32), (192,)], [FACT_256x192, UNFACT, UNFACT])


def test_global_norm_clipping():
  cfg = RefConfig(global_norm_clip_threshold=1.0)
  _run_and_compare(cfg, [(256, 192), (20, 32)], [FACT_256x192, UNFACT], num_steps=3, grad_scale=3.0)


def test_min_dim_size_and_factored_false():
  _run_and_compare(
      RefConfig(),
      [(20, 32)],
      [((0,), (1,), ())],
      extra_kwargs=dict(min_dim_size_to_factor=16),
      num_steps=3,
  )
  _run_and_compare(
      RefConfig(), [(256, 192)], [UNFACT], extra_kwargs=dict(factored=False), num_steps=3
  )


def test_rank3_logical_rules_with_batch_dim():
  # ('layers', 'embed', 'mlp') -> (BATCH, ROW, COLUMN): statistics and RMS
  # are per layer.
  _run_and_compare(
      RefConfig(beta1=0.5),
      [(3, 16, 24), (16, 4, 8)],
      [((1,), (2,), (0,)), ((0,), (1, 2), ())],
      extra_kwargs=dict(logical_factor_rules=adafactor.standard_logical_factor_rules()),
      logical_axes=[('layers', 'embed', 'mlp'), ('embed', 'heads', 'kv')],
      num_steps=4,
  )


def test_skip_nan_updates():
  opt = adafactor.Adafactor(learning_rate=0.1, skip_nan_updates=True)
  params = {'w': jnp.ones((4, 5)), 'b': jnp.ones((5,))}
  state = opt.init_state(params)
  grads = {'w': jnp.full((4, 5), jnp.nan), 'b': jnp.ones((5,))}
  new_params, new_state = opt.apply_gradient(opt.hyper_params, params, state, grads)
  np.testing.assert_array_equal(new_params['w'], params['w'])
  np.testing.assert_array_equal(new_state.param_states['w'].v, state.param_states['w'].v)
  assert not np.allclose(new_params['b'], params['b'])


def test_missing_learning_rate_raises():
  opt = adafactor.Adafactor()
  params = {'w': jnp.ones((2, 3))}
  with pytest.raises(ValueError, match='learning rate'):
    opt.apply_gradient(opt.hyper_params, params, opt.init_state(params), params)


# ---------------------------------------------------------------------------
# Factoring decisions and logical rules.
# ---------------------------------------------------------------------------


def _state_shapes(opt, shape, path='a/b'):
  st = opt.init_param_state(jnp.zeros(shape), path)
  return st.v_row.shape, st.v_col.shape, st.v.shape, st.m.shape


@pytest.mark.parametrize(
    'shape,expected',
    [
        ((256, 192), ((192,), (256,), (1,))),
        ((192, 256), ((192,), (256,), (1,))),
        ((200, 768), ((200,), (768,), (1,))),
        ((128, 128), ((128,), (128,), (1,))),
        ((20, 32), ((1,), (1,), (20, 32))),
        ((100, 768), ((1,), (1,), (100, 768))),
        ((127, 4096), ((1,), (1,), (127, 4096))),
        ((4096,), ((1,), (1,), (4096,))),
        ((), ((1,), (1,), ())),
    ],
)
def test_heuristic_factoring(shape, expected):
  opt = adafactor.Adafactor()
  v_row, v_col, v, m = _state_shapes(opt, shape)
  assert (v_row, v_col, v) == expected
  assert m == (1,)


def test_momentum_slot_and_dtype():
  opt = adafactor.Adafactor(beta1=0.9, dtype_momentum=jnp.bfloat16)
  st = opt.init_param_state(jnp.zeros((20, 32)), 'p')
  assert st.m.shape == (20, 32) and st.m.dtype == jnp.bfloat16


def test_logical_rules_rank2_fall_back_to_heuristic():
  opt = adafactor.Adafactor(logical_factor_rules=adafactor.standard_logical_factor_rules())
  axes = {
      'encoder': {'prompt': {'prompt': {'prompt': ('prompt', 'prompt_embed')}}},
      'wi': {'kernel': ('embed', 'mlp')},
      'big_prompt': ('prompt', 'prompt_embed'),
  }
  opt.set_param_axes(axes)
  fm = opt.hyper_params.factor_map
  assert fm['encoder/prompt/prompt/prompt'] == (FactorDim.NONE, FactorDim.NONE)
  assert fm['wi/kernel'] == (FactorDim.ROW, FactorDim.COLUMN)
  # Rank <= 2: the heuristic decides, whatever the rule says.
  assert _state_shapes(opt, (100, 768), 'encoder/prompt/prompt/prompt')[2] == (100, 768)
  assert _state_shapes(opt, (200, 768), 'big_prompt')[:2] == ((200,), (768,))
  assert _state_shapes(opt, (64, 96), 'wi/kernel')[2] == (64, 96)


def test_logical_rules_rank3_and_errors():
  rules = adafactor.standard_logical_factor_rules()
  opt = adafactor.Adafactor(logical_factor_rules=rules)
  opt.set_param_axes(
      {
          'q': ('embed', 'heads', 'kv'),
          'scan': ('layers', 'embed', 'mlp'),
          'rel': ('layers', 'heads', 'relpos_buckets'),
      }
  )
  assert _state_shapes(opt, (16, 4, 8), 'q')[:2] == ((16,), (4, 8))
  assert _state_shapes(opt, (3, 16, 24), 'scan')[:2] == ((3, 16), (3, 24))
  # COLUMN without ROW -> unfactored (BATCH kept).
  assert opt.hyper_params.factor_map['rel'] == (FactorDim.BATCH, FactorDim.NONE, FactorDim.NONE)
  assert _state_shapes(opt, (3, 4, 32), 'rel')[2] == (3, 4, 32)
  # Rank 3 without a rule.
  with pytest.raises(ValueError, match='explicit factorization rule'):
    adafactor.Adafactor().init_param_state(jnp.zeros((2, 3, 4)), 'x')
  # ROW, COLUMN and NONE together.
  with pytest.raises(ValueError, match='Incomplete'):
    opt.set_param_axes({'bad': ('embed', 'mlp', 'relpos_buckets')})
  with pytest.raises(ValueError, match='no rule for the logical axis'):
    opt.set_param_axes({'bad': ('embed', 'not_an_axis')})


def test_prompt_rules_and_standard_rules():
  rules = adafactor.standard_logical_factor_rules()
  for name, dim in [
      ('vocab', 'COLUMN'),
      ('embed', 'ROW'),
      ('mlp', 'COLUMN'),
      ('heads', 'COLUMN'),
      ('kv', 'COLUMN'),
      ('joined_kv', 'COLUMN'),
      ('relpos_buckets', 'NONE'),
      ('layers', 'BATCH'),
      ('stack', 'BATCH'),
      ('mlp_activations', 'COLUMN'),
      ('prompt', 'NONE'),
      ('prompt_embed', 'NONE'),
      ('tasks', 'NONE'),
      ('batch', 'BATCH'),
  ]:
    assert rules[name] == FactorDim[dim], name
  custom = adafactor.prompt_logical_factor_rules({'foo': 'row'})
  assert custom['foo'] == 'row' and custom['prompt'] == FactorDim.NONE


def test_factor_map_hparam_map():
  fm = adafactor.HParamMap(
      [
          ('.*q$', (FactorDim.ROW, FactorDim.COLUMN, FactorDim.COLUMN)),
          ('.*', (FactorDim.NONE, FactorDim.NONE)),
      ]
  )
  opt = adafactor.Adafactor(factor_map=fm)
  assert _state_shapes(opt, (16, 4, 8), 'enc/q')[:2] == ((16,), (4, 8))
  with pytest.raises(ValueError, match='factored is False'):
    adafactor.Adafactor(factored=False, factor_map=fm)


def test_derive_logical_axes():
  opt = adafactor.Adafactor(beta1=0.9)
  params = {'k': jnp.zeros((256, 192)), 'p': jnp.zeros((20, 32)), 'e': jnp.zeros((192, 256))}
  axes = {'k': ('embed', 'mlp'), 'p': ('prompt', 'prompt_embed'), 'e': ('embed', 'vocab')}
  state = opt.init_state(params)
  out = opt.derive_logical_axes(state, axes)
  assert out.step == ()
  k = out.param_states['k']
  # (256, 192): rows = axis 1 (mlp), cols = axis 0 (embed).
  assert (k.v_row, k.v_col, k.v, k.m) == (('mlp',), ('embed',), (None,), ('embed', 'mlp'))
  e = out.param_states['e']
  assert (e.v_row, e.v_col) == (('embed',), ('vocab',))
  p = out.param_states['p']
  assert (p.v_row, p.v_col, p.v, p.m) == (
      (None,),
      (None,),
      ('prompt', 'prompt_embed'),
      ('prompt', 'prompt_embed'),
  )
  # Leaves are LogicalAxes, which JAX treats as leaves.
  leaves = jax.tree_util.tree_leaves(out)
  assert all(isinstance(x, optimizers.LogicalAxes) for x in leaves)
  assert len(leaves) == 1 + 3 * 4
  # Abstract states (eval_shape) work too, and a fresh optimizer that never
  # saw the shapes replicates the ambiguous rank-2 factors (as T5X does).
  abstract = jax.eval_shape(opt.init_state, params)
  assert opt.derive_logical_axes(abstract, axes) == out
  fresh = adafactor.Adafactor(beta1=0.9).derive_logical_axes(abstract, axes)
  assert fresh.param_states['k'].v_row == (None,)
  assert fresh.param_states['k'].m == ('embed', 'mlp')


def test_subtree_and_none_states():
  opt = adafactor.Adafactor(learning_rate=0.1)
  full = {'a': {'x': jnp.ones((3, 4))}, 'b': jnp.ones((5,))}
  state = opt.init_state(full)
  grads = jax.tree_util.tree_map(jnp.ones_like, full)
  new_full, st_full = opt.apply_gradient(opt.hyper_params, full, state, grads)
  # Subtree with only 'a': same update for 'a', state structure preserved.
  sub = {'a': full['a']}
  new_sub, st_sub = opt.apply_gradient(opt.hyper_params, sub, state, {'a': grads['a']})
  np.testing.assert_array_equal(new_sub['a']['x'], new_full['a']['x'])
  assert set(st_sub.param_states) == {'a', 'b'}
  np.testing.assert_array_equal(st_sub.param_states['b'].v, state.param_states['b'].v)
  with pytest.raises(ValueError, match='No Adafactor state'):
    opt.apply_gradient(opt.hyper_params, {'zzz': jnp.ones(2)}, state, {'zzz': jnp.ones(2)})
