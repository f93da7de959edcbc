"""The split training step (`trainer.SplitTrainStep`).

Opted into with `training_forward_compiler_options.cpu_float32_dots = 'eigen'` (bound for this
module), `Trainer` compiles a float32 model's step on the CPU as two executables: the forward (loss,
metrics and the VJP's residuals) with XLA's Eigen dots, the backward and the optimizer update with
XLA's defaults (YNNPACK dots). Checked against the one-executable step of the same Trainer:

* the choice: split for float32 on one CPU device when asked for, and by default (`'auto'`) where
  `xla_options.split_step_pays_here`; one executable with `'ynnpack'`, microbatches, bfloat16 or a
  multi-device mesh;
* four steps with dropout: losses and metrics within 1e-5, the prompt and the Adafactor state
  within 1e-5 relative, the frozen parameters untouched;
* the forward executable holds no YNNPACK fusion, the backward does where this jaxlib uses it;
* the frozen parameters among the VJP's residuals stay out of the forward's outputs (placeholders
  the backward fills from the frozen parameters it receives): no copies, the same gradient;
* a trainer restarted from the state after two steps continues bit for bit; the state is donated
  (the previous prompt's buffer is gone), the frozen parameters are not;
* one forward and one backward compilation per batch shape; the first step, compiled ahead of its
  call (`Trainer.train` frees what compiling left before running it), is not compiled again;
* a state built from page-aligned numpy arrays (as tcmalloc allocates them) is donated in place
  from the first step on (`partitioning.device_put_owned`).
"""

import collections
import logging
import re

import flax
import gin
import jax
import numpy as np
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import trainer as trainer_lib
from prompt_tuning.runtime import xla_options

LENGTHS = {'encoder_input_tokens': 16, 'decoder_input_tokens': 6, 'decoder_target_tokens': 6}
BATCH = 4


def _model(dtype='float32'):
  import tiny_task  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import adafactor  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import optimizers  # pylint: disable=g-import-not-at-top

  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
              adafactor.Adafactor(
                  decay_rate=0.8,
                  step_offset=0,
                  multiply_by_parameter_scale=False,
                  logical_factor_rules=adafactor.standard_logical_factor_rules(),
              ),
          ),
      )
  )
  vocab = tiny_task.get_vocabulary()
  config = t5.get_config('tiny', dropout_rate=0.1, dtype=dtype)
  module = prompted.PromptEncoderDecoder(config, prompt_length=4)
  return models.EncoderDecoderModel(module, vocab, vocab, optimizer_def=opt)


def _batches(n, length=LENGTHS['encoder_input_tokens']):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    enc = rng.integers(2, 30, (BATCH, length)).astype(np.int32)
    enc[:, -3:] = 0
    tgt = rng.integers(2, 30, (BATCH, LENGTHS['decoder_target_tokens'])).astype(np.int32)
    tgt[:, -1] = 0
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append(
        {
            'encoder_input_tokens': enc,
            'decoder_input_tokens': dec_in,
            'decoder_target_tokens': tgt,
            'decoder_loss_weights': (tgt > 0).astype(np.int32),
        }
    )
  return out


class _OneExecutable(trainer_lib.Trainer):
  """The same Trainer with the step kept as one executable (the reference)."""

  def _forward_compiler_options(self):
    return None


@pytest.fixture(scope='module', autouse=True)
def opt_in():
  with gin.unlock_config():
    gin.bind_parameter('training_forward_compiler_options.cpu_float32_dots', 'eigen')
  yield
  gin.clear_config()


@pytest.fixture(scope='module')
def env():
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  model = _model()
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  shapes = dict(LENGTHS, decoder_loss_weights=LENGTHS['decoder_target_tokens'])
  builder = train_state.StateBuilder(model, partitioner, {k: (BATCH, n) for k, n in shapes.items()})
  params = jax.device_get(builder.init_params(jax.random.PRNGKey(0)))
  return {'model': model, 'partitioner': partitioner, 'builder': builder, 'params': params}


def _trainer(env, cls=trainer_lib.Trainer, state=None, **kw):
  from prompt_tuning.runtime import schedules  # pylint: disable=g-import-not-at-top

  return cls(
      kw.pop('model', env['model']),
      state if state is not None else env['builder'].build(env['params']),
      kw.pop('partitioner', env['partitioner']),
      eval_names=[],
      summary_dir=None,
      train_state_axes=env['builder'].state_axes,
      rng=jax.random.PRNGKey(3),
      learning_rate_fn=schedules.create_learning_rate_scheduler(
          factors='constant', base_learning_rate=0.3
      ),
      log_period=1,
      **kw,
  )


def _flat(tree):
  state_dict = flax.serialization.to_state_dict(jax.device_get(tree))
  return {k: np.asarray(v) for k, v in params_lib.flatten_params(state_dict).items()}


def _close(a, b, rtol=1e-5):
  assert a.keys() == b.keys()
  for k in a:
    scale = max(float(np.max(np.abs(b[k]))), 1e-12)
    err = float(np.max(np.abs(a[k] - b[k]))) / scale if a[k].size else 0.0
    assert err <= rtol, (k, err)


@pytest.fixture(scope='module')
def runs(env):
  batches = _batches(4)
  split, one = _trainer(env), _trainer(env, _OneExecutable)
  out = {}
  for name, t in (('split', split), ('one', one)):
    t.train(iter(batches), 4, start_step=0)
    out[name] = t
  return {'split': split, 'one': one, 'batches': batches}


def test_float32_on_one_cpu_device_splits_and_the_rest_keeps_one_executable(env, monkeypatch):
  placed = _trainer(env).place_batch(_batches(1)[0])
  assert isinstance(_trainer(env)._get_train_step(placed), trainer_lib.SplitTrainStep)
  assert not isinstance(
      _trainer(env, num_microbatches=2)._get_train_step(placed), trainer_lib.SplitTrainStep
  )
  assert _trainer(env, model=_model('bfloat16'))._forward_compiler_options() is None

  class _TwoDevices:
    mesh = type('Mesh', (), {'devices': np.zeros(2)})()

  assert _trainer(env, partitioner=_TwoDevices())._forward_compiler_options() is None
  assert _trainer(env)._forward_compiler_options() == xla_options.EIGEN_DOTS
  with gin.unlock_config():
    gin.bind_parameter('training_forward_compiler_options.cpu_float32_dots', 'ynnpack')
  try:
    assert _trainer(env)._forward_compiler_options() is None
  finally:
    with gin.unlock_config():
      gin.bind_parameter('training_forward_compiler_options.cpu_float32_dots', 'eigen')
  # Without any binding (`'auto'`): split only where `split_step_pays_here` (Intel, tcmalloc).
  gin.clear_config()
  try:
    for pays, expected in ((False, None), (True, xla_options.EIGEN_DOTS)):
      monkeypatch.setattr(xla_options, 'split_step_pays_here', lambda pays=pays: pays)
      assert _trainer(env)._forward_compiler_options() == expected
      step = _trainer(env)._get_train_step(placed)
      assert isinstance(step, trainer_lib.SplitTrainStep) == pays
  finally:
    with gin.unlock_config():
      gin.bind_parameter('training_forward_compiler_options.cpu_float32_dots', 'eigen')


def test_split_steps_equal_the_one_executable_steps(runs):
  split, one = runs['split'], runs['one']
  assert isinstance(split._partitioned_train_step, trainer_lib.SplitTrainStep)
  assert not isinstance(one._partitioned_train_step, trainer_lib.SplitTrainStep)
  assert sorted(split.loss_history) == [1, 2, 3, 4]
  losses = [split.loss_history[s] for s in range(1, 5)]
  np.testing.assert_allclose(losses, [one.loss_history[s] for s in range(1, 5)], rtol=1e-5)
  assert losses[-1] < losses[0]  # learning rate 0.3 on the prompt: the loss moves
  assert int(split.train_state.step) == int(one.train_state.step) == 4
  _close(_flat(split.train_state.trainable), _flat(one.train_state.trainable))
  _close(_flat(split.train_state.opt_state), _flat(one.train_state.opt_state))
  frozen = _flat(split.train_state.frozen)
  for k, v in _flat(one.train_state.frozen).items():
    np.testing.assert_array_equal(frozen[k], v)


def test_forward_runs_eigen_dots_and_backward_xla_default_dots(env, runs):
  split, one = runs['split'], runs['one']
  placed = split.place_batch(runs['batches'][0])
  forward, backward = split._partitioned_train_step.compile(
      split.train_state, placed, split._base_rng
  )
  assert '__ynn_fusion' not in forward.as_text()
  default = one._partitioned_train_step.lower(one.train_state, placed, one._base_rng).compile()
  # Whatever XLA's default does with the one-executable step, the backward does too.
  assert ('__ynn_fusion' in backward.as_text()) == ('__ynn_fusion' in default.as_text())


def test_the_forward_hands_frozen_parameters_to_the_backward_without_copying_them(env):
  t = _trainer(env)
  placed = t.place_batch(_batches(1)[0])
  step = t._get_train_step(placed)
  state, rng, frozen = t.train_state, t._base_rng, t.train_state.frozen
  loss, metrics, vjp_fn = step.forward(state, placed, rng)
  is_marker = lambda x: isinstance(x, trainer_lib._FrozenLeaf)
  markers = [x for x in jax.tree_util.tree_leaves(vjp_fn, is_leaf=is_marker) if is_marker(x)]
  params = jax.tree_util.tree_leaves(frozen)
  # The kernels the backward multiplies by (attention and MLP outputs, logits) are placeholders.
  assert len(markers) >= 3, markers
  marked_bytes = sum(params[m.index].nbytes for m in markers)
  arrays = jax.tree_util.tree_leaves(vjp_fn)
  # No residual array is a frozen parameter's buffer or a copy of one.
  pointers = {p.unsafe_buffer_pointer() for p in params}
  assert not any(a.unsafe_buffer_pointer() in pointers for a in arrays)
  for a in arrays:
    for p in params:
      assert a.shape != p.shape or not np.array_equal(np.asarray(a), np.asarray(p))

  # The same forward without placeholders: the compiled forward outputs the kernels as well, and
  # the gradient from the placeholders' residuals is the same.
  def plain_forward(st, batch, base_rng):
    return trainer_lib.forward_with_vjp(
        env['model'], st, batch, jax.random.fold_in(base_rng, st.step)
    )

  plain = jax.jit(plain_forward, compiler_options=xla_options.EIGEN_DOTS)
  bytes_out = lambda f: f.lower(state, placed, rng).compile().memory_analysis().output_size_in_bytes
  saved = bytes_out(plain) - bytes_out(step.forward)
  # The kernels' bytes, and the output tuple's pointer table shorter by one entry per kernel.
  assert marked_bytes <= saved <= marked_bytes + 8 * len(markers), (saved, marked_bytes)
  ref_loss, _, ref_vjp = plain(state, placed, rng)
  grads = trainer_lib.grads_from_vjp(loss, trainer_lib._with_frozen_residuals(vjp_fn, frozen))
  ref = trainer_lib.grads_from_vjp(ref_loss, ref_vjp)
  _close(_flat(grads), _flat(ref), rtol=1e-6)


def test_restarting_from_the_state_continues_bit_for_bit(env, runs):
  batches = runs['batches']
  first = _trainer(env)
  before = first.train_state
  first.train(iter(batches[:2]), 2, start_step=0)
  # The state is donated to the backward (the first prompt's buffer is gone); the frozen
  # parameters pass through it undonated.
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(before.trainable))
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(before.frozen))
  host = jax.device_get(first.train_state)
  state = env['builder'].build(host.params, step=2)
  state = state.replace(
      opt_state=jax.tree_util.tree_map(
          lambda h, d: jax.device_put(h, d.sharding), host.opt_state, state.opt_state
      )
  )
  second = _trainer(env, state=state)
  second.train(iter(batches[2:]), 2)
  whole = runs['split']
  for s in (3, 4):
    assert second.loss_history[s] == whole.loss_history[s]
  for part in ('trainable', 'opt_state'):
    a, b = _flat(getattr(second.train_state, part)), _flat(getattr(whole.train_state, part))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_one_forward_and_one_backward_compilation_per_batch_shape(env):
  t = _trainer(env)
  t.train(iter(_batches(2) + _batches(2, length=12) + _batches(1)), 5, start_step=0)
  step = t._partitioned_train_step
  assert step.forward.cache_size() == step.backward.cache_size() == step.cache_size() == 2


def _compilations(caplog, fn):
  """`fn()`'s XLA compilations, by jitted function name (`jax.log_compiles` messages)."""
  caplog.clear()
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    fn()
  names = [re.match(r'Compiling jit\((\w+)\)', r.getMessage()) for r in caplog.records]
  return collections.Counter(m.group(1) for m in names if m)


@pytest.mark.parametrize('cls', [trainer_lib.Trainer, _OneExecutable], ids=['split', 'one'])
def test_the_first_step_is_compiled_ahead_once_and_not_again_when_called(env, caplog, cls):
  # `Trainer.train` compiles the step before running it (to hand back what compiling freed before
  # the step's temporaries are allocated); the call must then find those executables.
  t = _trainer(env, cls)
  counts = _compilations(caplog, lambda: t.train(iter(_batches(2)), 2, start_step=0))
  expected = {'forward': 1, 'backward': 1} if cls is trainer_lib.Trainer else {'train_step': 1}
  assert {k: counts[k] for k in ('forward', 'backward', 'train_step') if counts[k]} == expected


def _page_aligned(x):
  """`x` copied into page-aligned memory (as tcmalloc allocates every large numpy array)."""
  x = np.asarray(x)
  raw = np.empty(x.nbytes + 4096, np.uint8)
  start = -raw.ctypes.data % 4096
  out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
  out[...] = x
  return out


def test_a_state_from_page_aligned_numpy_is_donated_in_place_from_the_first_step(env):
  # On the CPU, `jax.device_put` wraps aligned numpy memory instead of copying it; XLA cannot write
  # into such a buffer, so a donating step allocated the whole state again (the first step's peak
  # memory). `StateBuilder.build` gives the state buffers of its own.
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top

  params = jax.tree_util.tree_map(_page_aligned, env['params'])
  leaves = [x for x in jax.tree_util.tree_leaves(params) if x.size]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  wraps = lambda a, x: a.unsafe_buffer_pointer() == x.ctypes.data
  # What this test guards against: this JAX wraps such arrays (even with `may_alias=False`).
  assert wraps(jax.device_put(leaves[0], sharding, may_alias=False), leaves[0])
  assert not any(wraps(partitioning.device_put_owned(x, sharding), x) for x in leaves)

  t = _trainer(env, _OneExecutable, state=env['builder'].build(params))
  before = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(t.train_state.frozen)]
  t.train(iter(_batches(1)), 1, start_step=0)
  after = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(t.train_state.frozen)]
  # The one-executable step donates the whole state: its outputs reuse every input buffer.
  assert before == after
