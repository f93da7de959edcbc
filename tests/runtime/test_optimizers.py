"""Tests for OptimizerDef, OptaxWrapper, MultiOptimizer and traversals."""

import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import optimizers

PROMPT_PATH = 'encoder/prompt/prompt/prompt'


def _params(seed=0):
  rng = np.random.RandomState(seed)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))

  return {
      'token_embedder': {'embedding': arr(64, 16)},
      'encoder': {
          'prompt': {'prompt': {'prompt': arr(5, 16)}},
          'layers_0': {
              'attention': {'query': {'kernel': arr(16, 16)}},
              'pre_attention_layer_norm': {'scale': arr(16)},
          },
      },
      'decoder': {'logits_dense': {'kernel': arr(16, 64)}},
  }


def _axes():
  return {
      'token_embedder': {'embedding': ('vocab', 'embed')},
      'encoder': {
          'prompt': {'prompt': {'prompt': ('prompt', 'prompt_embed')}},
          'layers_0': {
              'attention': {'query': {'kernel': ('embed', 'joined_kv')}},
              'pre_attention_layer_norm': {'scale': ('embed',)},
          },
      },
      'decoder': {'logits_dense': {'kernel': ('embed', 'vocab')}},
  }


def _grads(params, seed):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), params
  )


def _prompt_multi_optimizer(**adafactor_kwargs):
  kwargs = dict(
      decay_rate=0.8,
      step_offset=0,
      multiply_by_parameter_scale=False,
      weight_decay_rate=1e-5,
      logical_factor_rules=adafactor.standard_logical_factor_rules(),
  )
  kwargs.update(adafactor_kwargs)
  return optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
              adafactor.Adafactor(**kwargs),
          ),
      )
  )


def _subtree(tree, paths):
  flat = params_lib.flatten_params(tree)
  return params_lib.unflatten_params({p: flat[p] for p in paths})


def _run(opt, params, state, steps, subtree_paths=None, jit=True):
  apply = jax.jit(opt.apply_gradient) if jit else opt.apply_gradient
  for i in range(steps):
    grads = _grads(params, seed=100 + i)
    hp = opt.update_hyper_params(learning_rate=0.3)
    if subtree_paths is None:
      params, state = apply(hp, params, state, grads)
    else:
      sub, state = apply(hp, _subtree(params, subtree_paths), state, _subtree(grads, subtree_paths))
      flat = params_lib.flatten_params(params)
      flat.update(params_lib.flatten_params(sub))
      params = params_lib.unflatten_params(flat)
  return params, state


# ---------------------------------------------------------------------------
# match_any / traversals
# ---------------------------------------------------------------------------


def test_match_any_fullmatch_and_slashes():
  f = optimizers.match_any(['.*/prompt/.*'])
  assert f('/encoder/prompt/prompt/prompt', None)
  assert f('encoder/prompt/prompt/prompt', None)
  assert f('/prompt/prompt', None)  # top-level prompt with flax's slash
  assert f('prompt/prompt', None)
  assert not f('/encoder/layers_0/attention/query/kernel', None)
  # fullmatch, not search:
  g = optimizers.match_any('prompt')
  assert not g('/encoder/prompt/prompt/prompt', None)
  h = optimizers.match_any(['.*query.*', '.*key.*'])
  assert h('/a/key/kernel', None) and h('/a/query/kernel', None)


def test_match_any_is_the_library_helper_under_its_gin_name():
  regexes = ['.*/prompt/.*', 'decoder/logits_dense/.*']
  ours, library = optimizers.match_any(regexes), params_lib.match_any(regexes)
  assert ours is not params_lib.match_any  # A gin-configurable function of its own.
  paths = list(params_lib.flatten_params(_params())) + ['/decoder/logits_dense/bias']
  assert [p for p in paths if ours(p)] == [p for p in paths if library(p)]
  assert [p for p in paths if ours(p)] == [
      PROMPT_PATH,
      'decoder/logits_dense/kernel',
      '/decoder/logits_dense/bias',
  ]
  assert ours.regexes == tuple(regexes)
  with pytest.raises(ValueError, match=r"Invalid parameter-path regex '\(unclosed'"):
    optimizers.match_any(['(unclosed'])
  # The flatten helpers of this module are the library's.
  assert optimizers.flatten_paths is params_lib.flatten_params
  assert optimizers.unflatten_paths is params_lib.unflatten_params


def test_model_param_traversal_paths_have_leading_slash():
  seen = []
  t = optimizers.ModelParamTraversal(lambda p, v: seen.append(p) or 'prompt' in p)
  params = _params()
  selected = list(t.iterate(params))
  assert len(selected) == 1
  assert '/' + PROMPT_PATH in seen and all(p.startswith('/') for p in seen)
  updated = t.update(lambda x: x * 0, params)
  assert float(jnp.abs(optimizers.get_path(updated, PROMPT_PATH)).sum()) == 0
  np.testing.assert_array_equal(
      updated['decoder']['logits_dense']['kernel'], params['decoder']['logits_dense']['kernel']
  )


# ---------------------------------------------------------------------------
# MultiOptimizer
# ---------------------------------------------------------------------------


def test_multi_optimizer_trains_only_prompt():
  opt = _prompt_multi_optimizer()
  opt.set_param_axes(_axes())
  params = _params()
  state = opt.init_state(params)
  flat_state = params_lib.flatten_params(state.param_states)
  assert {p for p, s in flat_state.items() if s is not None} == {PROMPT_PATH}
  new_params, new_state = _run(opt, params, state, steps=3)
  assert int(new_state.step) == 3
  flat_old = params_lib.flatten_params(params)
  flat_new = params_lib.flatten_params(new_params)
  assert set(flat_old) == set(flat_new)
  for p in flat_old:
    if p == PROMPT_PATH:
      assert not np.allclose(flat_new[p], flat_old[p])
    else:
      np.testing.assert_array_equal(np.asarray(flat_new[p]), np.asarray(flat_old[p]))
      assert flat_new[p].dtype == flat_old[p].dtype
  flat_new_state = params_lib.flatten_params(new_state.param_states)
  for p, s in flat_new_state.items():
    assert (s is None) == (p != PROMPT_PATH)
  # Only the (5, 16) prompt's unfactored second moment is held.
  assert flat_new_state[PROMPT_PATH].v.shape == (5, 16)


def test_multi_optimizer_matches_plain_adafactor_on_prompt():
  params = _params()
  opt = _prompt_multi_optimizer()
  new_params, _ = _run(opt, params, opt.init_state(params), steps=3)
  plain = adafactor.Adafactor(
      decay_rate=0.8, multiply_by_parameter_scale=False, weight_decay_rate=1e-5
  )
  prompt = {'p': optimizers.get_path(params, PROMPT_PATH)}
  st = plain.init_state(prompt)
  for i in range(3):
    g = {'p': optimizers.get_path(_grads(params, seed=100 + i), PROMPT_PATH)}
    prompt, st = plain.apply_gradient(plain.update_hyper_params(learning_rate=0.3), prompt, st, g)
  np.testing.assert_allclose(
      optimizers.get_path(new_params, PROMPT_PATH), prompt['p'], rtol=1e-6, atol=1e-7
  )


def test_subtree_mode_equals_full_tree_mode():
  params = _params()
  opt = _prompt_multi_optimizer()
  full_params, full_state = _run(opt, params, opt.init_state(params), steps=3)

  trainable = [p for p in params_lib.flatten_params(params) if opt.trainable_filter(p)]
  assert trainable == [PROMPT_PATH]
  opt2 = _prompt_multi_optimizer()
  sub_state0 = opt2.init_state(_subtree(params, trainable))
  assert params_lib.flatten_params(sub_state0.param_states).keys() == {PROMPT_PATH}
  sub_params, sub_state = _run(opt2, params, sub_state0, steps=3, subtree_paths=trainable)
  np.testing.assert_array_equal(
      np.asarray(optimizers.get_path(full_params, PROMPT_PATH)),
      np.asarray(optimizers.get_path(sub_params, PROMPT_PATH)),
  )
  np.testing.assert_array_equal(
      np.asarray(optimizers.get_path(full_state.param_states, PROMPT_PATH).v),
      np.asarray(optimizers.get_path(sub_state.param_states, PROMPT_PATH).v),
  )
  # Full-tree state with a trainable-only subtree also works and keeps the
  # state's structure (None for frozen leaves).
  mixed_params, mixed_state = _run(
      opt, params, opt.init_state(params), steps=3, subtree_paths=trainable
  )
  np.testing.assert_array_equal(
      np.asarray(optimizers.get_path(mixed_params, PROMPT_PATH)),
      np.asarray(optimizers.get_path(full_params, PROMPT_PATH)),
  )
  assert jax.tree_util.tree_structure(mixed_state) == jax.tree_util.tree_structure(full_state)


def test_overlapping_traversals_raise():
  t1 = optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*']))
  t2 = optimizers.ModelParamTraversal(optimizers.match_any(['encoder/.*']))
  opt = optimizers.MultiOptimizer([(t1, adafactor.Adafactor()), (t2, adafactor.Adafactor())])
  with pytest.raises(ValueError, match='Multiple optimizers match'):
    opt.init_state(_params())


def test_two_disjoint_sub_optimizers_and_hyper_params():
  t_prompt = optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*']))
  t_dec = optimizers.ModelParamTraversal(optimizers.match_any(['/decoder/.*']))
  opt = optimizers.MultiOptimizer(
      [
          (t_prompt, adafactor.Adafactor(learning_rate=0.1)),
          (t_dec, adafactor.Adafactor(learning_rate=0.2, beta1=0.9)),
      ]
  )
  assert [hp.learning_rate for hp in opt.hyper_params] == [0.1, 0.2]
  hps = opt.update_hyper_params(learning_rate=0.5)
  assert isinstance(hps, list) and [hp.learning_rate for hp in hps] == [0.5, 0.5]
  assert [hp.learning_rate for hp in opt.hyper_params] == [0.1, 0.2]
  assert opt.trainable_filter(PROMPT_PATH)
  assert opt.trainable_filter('/decoder/logits_dense/kernel')
  assert opt.trainable_filter('decoder/logits_dense/kernel')
  assert not opt.trainable_filter('encoder/layers_0/attention/query/kernel')
  params = _params()
  state = opt.init_state(params)
  new_params, new_state = opt.apply_gradient(hps, params, state, _grads(params, 1))
  assert not np.allclose(
      new_params['decoder']['logits_dense']['kernel'], params['decoder']['logits_dense']['kernel']
  )
  np.testing.assert_array_equal(
      new_params['token_embedder']['embedding'], params['token_embedder']['embedding']
  )
  assert new_state.param_states['decoder']['logits_dense']['kernel'].m.shape == (16, 64)
  assert new_state.param_states['token_embedder']['embedding'] is None


def test_set_param_axes_and_derive_logical_axes_pass_through():
  opt = _prompt_multi_optimizer(beta1=0.9)
  opt.set_param_axes(_axes())
  fm = opt.sub_optimizers[0].hyper_params.factor_map
  assert set(fm) == {PROMPT_PATH}
  params = _params()
  state = opt.init_state(params)
  axes = opt.derive_logical_axes(state, _axes())
  assert axes.step == ()
  prompt_axes = optimizers.get_path(axes.param_states, PROMPT_PATH)
  assert prompt_axes.v == ('prompt', 'prompt_embed')
  assert prompt_axes.m == ('prompt', 'prompt_embed')
  assert prompt_axes.v_row == (None,)
  assert axes.param_states['decoder']['logits_dense']['kernel'] is None
  # Shapes line up with the state (one axis name per dimension).
  jax.tree_util.tree_map(
      lambda a, x: None if len(a) == x.ndim else pytest.fail(f'{a} {x.shape}'), axes, state
  )
  # Abstract state from eval_shape.
  abstract = jax.eval_shape(opt.init_state, params)
  assert opt.derive_logical_axes(abstract, _axes()) == axes


def test_flax_traversal_and_plain_filter_accepted():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    flax_traversal = flax.traverse_util.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*']))
  opt = optimizers.MultiOptimizer(((flax_traversal, adafactor.Adafactor()),))
  assert opt.trainable_filter(PROMPT_PATH)
  assert not opt.trainable_filter('decoder/logits_dense/kernel')
  opt2 = optimizers.MultiOptimizer(
      ((lambda path, _: path.endswith('/scale'), adafactor.Adafactor()),)
  )
  state = opt2.init_state(_params())
  flat = params_lib.flatten_params(state.param_states)
  assert [p for p, s in flat.items() if s is not None] == [
      'encoder/layers_0/pre_attention_layer_norm/scale'
  ]


def test_multi_optimizer_with_optax_sub_optimizer():
  t = optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*']))
  opt = optimizers.MultiOptimizer(((t, optimizers.adam(1e-2)),))
  assert not opt.param_shaped_state
  params = _params()
  state = opt.init_state(params)
  new_params, new_state = _run(opt, params, state, steps=3)
  # Reference: optax.adam directly on the prompt subtree.
  tx = optax.adam(1e-2)
  sub = _subtree(params, [PROMPT_PATH])
  st = tx.init(sub)
  for i in range(3):
    g = _subtree(_grads(params, seed=100 + i), [PROMPT_PATH])
    upd, st = tx.update(g, st, sub)
    sub = optax.apply_updates(sub, upd)
  np.testing.assert_allclose(
      optimizers.get_path(new_params, PROMPT_PATH), optimizers.get_path(sub, PROMPT_PATH), rtol=1e-6
  )
  np.testing.assert_array_equal(
      new_params['decoder']['logits_dense']['kernel'], params['decoder']['logits_dense']['kernel']
  )
  axes = opt.derive_logical_axes(new_state, _axes())
  adam_axes = axes.param_states[0][0]
  assert optimizers.get_path(adam_axes.mu, PROMPT_PATH) == ('prompt', 'prompt_embed')
  assert adam_axes.count == ()
  # Subtree mode gives the same result.
  opt2 = optimizers.MultiOptimizer(((t, optimizers.adam(1e-2)),))
  sub_params, _ = _run(
      opt2,
      params,
      opt2.init_state(_subtree(params, [PROMPT_PATH])),
      steps=3,
      subtree_paths=[PROMPT_PATH],
  )
  np.testing.assert_array_equal(
      np.asarray(optimizers.get_path(sub_params, PROMPT_PATH)),
      np.asarray(optimizers.get_path(new_params, PROMPT_PATH)),
  )


# ---------------------------------------------------------------------------
# OptaxWrapper
# ---------------------------------------------------------------------------


def test_adam_wrapper_equals_optax_adam():
  params = _params()
  opt = optimizers.adam(learning_rate=1e-2, b1=0.8)
  assert isinstance(opt, optimizers.OptaxWrapper)
  assert opt.hyper_params.learning_rate is None
  assert opt.trainable_filter('anything/at/all')
  state = opt.init_state(params)
  tx = optax.adam(learning_rate=1e-2, b1=0.8)
  ref_params, ref_state = params, tx.init(params)

  @jax.jit
  def ref_step(g, st, prm):
    upd, st = tx.update(g, st, prm)
    return optax.apply_updates(prm, upd), st

  apply = jax.jit(opt.apply_gradient)
  p = params
  for i in range(4):
    g = _grads(params, seed=i)
    # The learning rate override is ignored: optax owns the schedule.
    p, state = apply(opt.update_hyper_params(learning_rate=123.0), p, state, g)
    ref_params, ref_state = ref_step(g, ref_state, ref_params)
  assert int(state.step) == 4
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p, ref_params
  )


def test_optax_wrapper_derive_logical_axes():
  params = _params()
  axes = _axes()
  opt = optimizers.adamw(1e-3)
  out = opt.derive_logical_axes(opt.init_state(params), axes)
  adam_state = out.param_states[0]
  assert isinstance(adam_state, optax.ScaleByAdamState)
  assert adam_state.count == ()
  assert adam_state.mu == jax.tree_util.tree_map(
      optimizers.as_logical_axes, axes, is_leaf=lambda x: isinstance(x, tuple)
  )
  assert adam_state.nu['decoder']['logits_dense']['kernel'] == ('embed', 'vocab')
  # chain + clip; the chain's plain-tuple state is kept as a tuple.
  chained = optimizers.chain([optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)])
  st = chained.init_state(params)
  out = chained.derive_logical_axes(st, axes)
  trace = out.param_states[1][0].trace
  assert trace['token_embedder']['embedding'] == ('vocab', 'embed')
  p, _ = chained.apply_gradient(chained.hyper_params, params, st, _grads(params, 0))
  assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(params)
  # optax's factored adafactor: statistics are replicated.
  af = optimizers.adafactor(learning_rate=0.1)
  out = af.derive_logical_axes(af.init_state(params), axes)
  leaves = jax.tree_util.tree_leaves(out)
  assert leaves and all(isinstance(x, optimizers.LogicalAxes) for x in leaves)
  assert all(all(a is None for a in x) for x in leaves)
  # multi_transform: masked leaves stay MaskedNode, others get axes.
  labels = flax.traverse_util.path_aware_map(
      lambda path, _: 'train' if 'prompt' in path else 'freeze', params
  )
  mt = optimizers.OptaxWrapper(
      optax.multi_transform({'train': optax.adam(1e-3), 'freeze': optax.set_to_zero()}, labels)
  )
  out = mt.derive_logical_axes(mt.init_state(params), axes)
  inner = out.param_states.inner_states['train'].inner_state[0]
  assert optimizers.get_path(inner.mu, PROMPT_PATH) == ('prompt', 'prompt_embed')
  assert isinstance(inner.mu['decoder']['logits_dense']['kernel'], optax.MaskedNode)


def test_wrapped_constructors_exist():
  for name in ['chain', 'adam', 'adamw', 'sgd', 'adafactor', 'lion', 'rmsprop', 'adagrad', 'lamb']:
    assert callable(getattr(optimizers, name))
  assert isinstance(optimizers.lion(1e-4), optimizers.OptaxWrapper)
  assert isinstance(optimizers.rmsprop(1e-4), optimizers.OptaxWrapper)
  assert optimizers.adam.__name__ == 'adam'


def test_legacy_optimizer_object_and_state_dict():
  opt_def = adafactor.Adafactor(learning_rate=0.1)
  params = {'w': jnp.ones((3, 4))}
  optimizer = opt_def.create(params)
  optimizer = optimizer.apply_gradient({'w': jnp.ones((3, 4))})
  assert int(optimizer.state.step) == 1
  sd = optimizer.state_dict()
  assert set(sd) == {'target', 'state'}
  assert set(sd['state']['param_states']['w']) == {'v_row', 'v_col', 'v', 'm'}
  restored = opt_def.create(params).restore_state(sd)
  np.testing.assert_array_equal(restored.target['w'], optimizer.target['w'])


def test_base_optimizer_def():
  base = optimizers.OptimizerDef(optimizers.OptaxWrapperHyperParams(0.1))
  assert base.trainable_filter('x/y')
  assert base.update_hyper_params(learning_rate=0.5).learning_rate == 0.5
  assert base.hyper_params.learning_rate == 0.1
  with pytest.raises(NotImplementedError):
    base.init_state({})
  with pytest.raises(ValueError):
    optimizers.MultiOptimizer([])
