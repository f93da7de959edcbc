"""Length-bucketed batches in the runtime: training, the train step's compilations, eval, infer, resume.

The reference is always the unbucketed run: the same examples padded to TASK_FEATURE_LENGTHS.
- Per-example losses of every training example are those of the unbucketed stream (1e-6), and
  training steps on bucketed batches equal steps on the same batches padded back (1e-6).
- The train step is traced and compiled once per bucket shape (counted).
- Inference-eval metrics, predictions and scores (`InferenceEvaluator`, `infer.infer`) equal those
  of the unbucketed run, in dataset order.
- End to end (slow): `runs/bucketing.gin` training killed with SIGKILL and resumed reproduces the
  uninterrupted bucketed run bit for bit; `prompt_tuning.eval` gives the same metrics with and
  without buckets.
"""

import collections
import json
import os
import signal
import time

import numpy as np
import pytest

import runtime_testlib as rt
import tiny_task

from prompt_tuning.data import bucketing

LENGTHS = {'inputs': 24, 'targets': 8}
FULL = {
    'encoder_input_tokens': 24,
    'decoder_input_tokens': 8,
    'decoder_target_tokens': 8,
    'decoder_loss_weights': 8,
}
BUCKETS = bucketing.BucketConfig(num_buckets=3, multiple_of=2)


def _model(trace_counter=None):
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import adafactor  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import decoding  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import optimizers  # pylint: disable=g-import-not-at-top

  class CountingModel(models.EncoderDecoderModel):
    """Counts the traces of `loss_fn` (once per compiled shape of the train step)."""

    def loss_fn(self, params, batch, dropout_rng):
      if trace_counter is not None:
        trace_counter.append(tuple(batch['encoder_input_tokens'].shape))
      return super().loss_fn(params, batch, dropout_rng)

  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
              adafactor.Adafactor(
                  decay_rate=0.8,
                  step_offset=0,
                  multiply_by_parameter_scale=False,
                  weight_decay_rate=1e-5,
                  logical_factor_rules=adafactor.standard_logical_factor_rules(),
              ),
          ),
      )
  )
  vocab = tiny_task.get_vocabulary()
  module = prompted.PromptEncoderDecoder(t5.get_config('tiny', dropout_rate=0.0), prompt_length=5)
  # Greedy decoding (compiles faster than beam search; the bucketing under test is the same).
  return CountingModel(
      module, vocab, vocab, optimizer_def=opt, z_loss=1e-4, decode_fn=decoding.temperature_sample
  )


def _cfg(split='train', batch_size=4, bucketing_config=BUCKETS, **kw):
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  return utils.DatasetConfig(
      mixture_or_task_name=rt.TASK,
      task_feature_lengths=LENGTHS,
      split=split,
      batch_size=batch_size,
      shuffle=split == 'train',
      seed=0 if split == 'train' else 42,
      bucketing=bucketing_config,
      **kw,
  )


def _pad(batch):
  """A bucketed batch padded back to the full lengths (the unbucketed layout of the same rows)."""
  out = {}
  for k, v in batch.items():
    if k in FULL:
      p = np.zeros((v.shape[0], FULL[k]), v.dtype)
      p[:, : v.shape[1]] = v
      out[k] = p
    else:
      out[k] = v
  return out


def _key(batch, r):
  return (
      tuple(batch['encoder_input_tokens'][r][batch['encoder_input_tokens'][r] > 0].tolist())
      + (-1,)
      + tuple(batch['decoder_target_tokens'][r].tolist())
  )


@pytest.fixture(scope='module')
def env():
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  model = _model()
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  fc = model.FEATURE_CONVERTER_CLS
  shapes = {k: (4, n) for k, n in FULL.items()}
  builder = train_state.StateBuilder(model, partitioner, shapes)
  params = jax.device_get(builder.init_params(jax.random.PRNGKey(0)))
  bucketed = list(utils.get_dataset(_cfg(), 0, 1, fc, num_epochs=1).as_numpy_iterator())
  plain = list(
      utils.get_dataset(_cfg(bucketing_config=None), 0, 1, fc, num_epochs=1).as_numpy_iterator()
  )
  return {
      'model': model,
      'partitioner': partitioner,
      'builder': builder,
      'params': params,
      'bucketed': bucketed,
      'plain': plain,
      'fc': fc,
  }


def _trainer(env, model=None, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import schedules  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  return trainer_lib.Trainer(
      model or env['model'],
      env['builder'].build(env['params']),
      env['partitioner'],
      eval_names=[],
      summary_dir=None,
      train_state_axes=env['builder'].state_axes,
      rng=jax.random.PRNGKey(0),
      learning_rate_fn=schedules.create_learning_rate_scheduler(
          factors='constant', base_learning_rate=0.3
      ),
      log_period=1,
      **kwargs,
  )


def test_bucketed_batches_are_shorter_and_hold_the_training_examples(env):
  shapes = collections.Counter(b['encoder_input_tokens'].shape[1] for b in env['bucketed'])
  assert len(shapes) > 1 and max(shapes) < 24, shapes
  plain_keys = {_key(b, r) for b in env['plain'] for r in range(4)}
  assert {_key(b, r) for b in env['bucketed'] for r in range(4)} <= plain_keys


def test_per_example_losses_equal_the_unbucketed_run(env):
  """Every example's loss (target log-likelihood) in its bucketed batch equals its loss in the
  unbucketed stream, where it sits in another batch padded to TASK_FEATURE_LENGTHS."""
  import jax  # pylint: disable=g-import-not-at-top

  model, params = env['model'], env['params']
  score = jax.jit(model.score_batch)
  reference = {}
  for b in env['plain']:
    s = np.asarray(score(params, b))
    for r in range(4):
      reference[_key(b, r)] = s[r]
  compared = 0
  for b in env['bucketed']:
    s = np.asarray(score(params, b))
    padded = np.asarray(score(params, _pad(b)))
    np.testing.assert_allclose(s, padded, rtol=1e-6, atol=1e-6)
    for r in range(4):
      np.testing.assert_allclose(s[r], reference[_key(b, r)], rtol=1e-6, atol=1e-6)
      compared += 1
  assert compared >= 48
  assert len(set(np.round(list(reference.values()), 3))) > 10  # not a constant


def test_training_on_bucketed_batches_equals_training_on_them_padded(env):
  """Six steps on the bucketed stream and six on the same batches padded back: same losses and
  metrics at every step, same prompt (1e-5) and optimizer state (1e-6) after."""
  import jax  # pylint: disable=g-import-not-at-top

  batches = env['bucketed'][:6]
  assert len({b['encoder_input_tokens'].shape for b in batches}) > 1
  runs = {}
  for name, data in (('bucketed', batches), ('padded', [_pad(b) for b in batches])):
    trainer = _trainer(env)
    trainer.train(iter(data), len(data), start_step=0)
    runs[name] = (dict(trainer.loss_history), jax.device_get(trainer.train_state))
  (loss_b, state_b), (loss_p, state_p) = runs['bucketed'], runs['padded']
  assert sorted(loss_b) == list(range(1, 7))
  rt.assert_losses_close(loss_b, loss_p, range(1, 7))
  prompt_b = state_b.trainable['encoder']['prompt']['prompt']['prompt']
  prompt_p = state_p.trainable['encoder']['prompt']['prompt']['prompt']
  # Rounding only: the two runs sum over different shapes. Measured 1.7e-6 at most (the prompt
  # moves by up to 1.4) with XLA's default compile, 6.6e-6 with the tests' LLVM level 1.
  np.testing.assert_allclose(prompt_b, prompt_p, rtol=1e-5, atol=1e-5)
  initial = env['params']['encoder']['prompt']['prompt']['prompt']
  assert not np.allclose(prompt_b, initial)  # it did train
  for a, b in zip(
      jax.tree_util.tree_leaves(state_b.opt_state), jax.tree_util.tree_leaves(state_p.opt_state)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_waiting_for_each_step_changes_no_number(env):
  """`wait_for_each_step` (on by default under tcmalloc or mimalloc) only changes when steps start:
  the same losses and state, bit for bit, as steps dispatched without waiting."""
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  # None: on the CPU under tcmalloc or mimalloc
  assert _trainer(env).wait_for_each_step == launch.caching_allocator_loaded()
  batches = env['bucketed'][:4]
  runs = {}
  for wait in (True, False):
    trainer = _trainer(env, wait_for_each_step=wait)
    assert trainer.wait_for_each_step is wait
    trainer.train(iter(batches), len(batches), start_step=0)
    assert trainer.wait_for_each_step is wait  # the user's choice stays
    runs[wait] = (dict(trainer.loss_history), jax.device_get(trainer.train_state))
  assert sorted(runs[True][0]) == [1, 2, 3, 4]
  assert runs[True][0] == runs[False][0]
  for a, b in zip(
      jax.tree_util.tree_leaves(runs[True][1]), jax.tree_util.tree_leaves(runs[False][1])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_default_stops_waiting_when_steps_are_quick(env, monkeypatch):
  """Under tcmalloc (made to look present here) the default waits, and stops after three timed
  steps quicker than `QUICK_STEP_S` (this tiny model's steps take milliseconds); slower steps keep
  the wait."""
  from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(trainer_lib, 'wait_for_each_step_by_default', lambda: True)
  batches = env['plain'][:5]  # one shape: no timed step compiles
  for quick_step_s, waits_after in ((trainer_lib.QUICK_STEP_S, False), (0.0, True)):
    monkeypatch.setattr(trainer_lib, 'QUICK_STEP_S', quick_step_s)
    trainer = _trainer(env)
    assert trainer.wait_for_each_step
    trainer.train(iter(batches[:3]), 3, start_step=0)  # the compiling step and two timed ones
    assert trainer.wait_for_each_step
    trainer.train(iter(batches[3:]), 2, start_step=3)
    assert trainer.wait_for_each_step is waits_after


def test_train_step_is_compiled_once_per_bucket(env):
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  traces = []
  trainer = _trainer(env, _model(traces))
  ds = utils.get_dataset(_cfg(), 0, 1, env['fc'], num_epochs=None, seed=0)
  seen = []

  def stream():
    for b in ds.as_numpy_iterator():
      seen.append(b['encoder_input_tokens'].shape)
      yield b

  trainer.train(stream(), 24, start_step=0)
  shapes = set(seen[:24])
  assert len(shapes) >= 3, shapes  # several buckets occurred, some of them many times
  assert len(seen[:24]) > len(shapes)
  step = trainer._partitioned_train_step  # pylint: disable=protected-access
  assert step.cache_size() == len(shapes)
  assert sorted(traces) == sorted(shapes)  # one trace per shape, never again


# ------------------------------------------------------------------------------- eval and infer


@pytest.fixture(scope='module')
def served(env, tmp_path_factory):
  import seqio  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import infer as infer_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import inference  # pylint: disable=g-import-not-at-top

  model, partitioner = env['model'], env['partitioner']
  root = tmp_path_factory.mktemp('bucketed_infer')
  params, axes = eval_lib.restore_params(model, None, partitioner, 2, fallback_init_rng=0)
  # Lengths given per bucket; 8 validation examples, batches of 2 within a bucket.
  config = bucketing.BucketConfig(lengths={'inputs': [12, 24]}, window=4)
  out = {}
  for name, b in (('plain', None), ('bucketed', config)):
    cfg = _cfg('validation', 2, b)
    evaluator = inference.InferenceEvaluator(cfg, seqio.Evaluator, model, partitioner)
    out[name] = {'metrics': evaluator.evaluate(params, step=0)}
    for mode in ('predict_with_aux',):
      path = infer_lib.infer(
          mode=mode,
          model=model,
          dataset_cfg=cfg,
          restore_checkpoint_cfg=None,
          partitioner=partitioner,
          output_dir=str(root / f'{name}_{mode}'),
          fallback_init_rng=0,
      )
      with open(path) as f:
        out[name][mode] = [json.loads(line) for line in f]
  out['batches'] = list(
      bucketing.bucket_host_examples(
          enumerate(
              model.FEATURE_CONVERTER_CLS(pack=False)(
                  seqio.get_mixture_or_task(rt.TASK).get_dataset(
                      LENGTHS, split='validation', shuffle=False
                  ),
                  LENGTHS,
              ).as_numpy_iterator()
          ),
          2,
          config,
      )
  )
  del axes
  return out


@pytest.mark.slow
def test_eval_batches_are_bucketed(served):
  widths = [b['encoder_input_tokens'].shape[1] for _, b in served['batches']]
  assert len(set(widths)) > 1 and min(widths) < 24, widths
  assert sorted(int(i) for idx, _ in served['batches'] for i in idx) == list(range(8))


@pytest.mark.slow
def test_eval_metrics_equal_the_unbucketed_run(served):
  plain, bucketed = served['plain']['metrics'], served['bucketed']['metrics']
  assert set(plain) == set(bucketed) == {rt.TASK}
  assert plain[rt.TASK]['accuracy'] == bucketed[rt.TASK]['accuracy']
  np.testing.assert_allclose(
      bucketed[rt.TASK]['log_likelihood'], plain[rt.TASK]['log_likelihood'], rtol=1e-6
  )


@pytest.mark.slow
def test_infer_outputs_equal_the_unbucketed_run_in_dataset_order(served):
  for mode in ('predict_with_aux',):
    plain, bucketed = served['plain'][mode], served['bucketed'][mode]
    assert len(plain) == len(bucketed) == 8
    assert [r['inputs'] for r in plain] == [r['inputs'] for r in bucketed]
    assert [r['inputs'] for r in plain] == [e['inputs'] for e in tiny_task.examples('validation')]
    if mode == 'score':
      np.testing.assert_allclose(
          [r['score'] for r in bucketed], [r['score'] for r in plain], rtol=1e-6, atol=1e-6
      )
    else:
      assert [r['prediction'] for r in bucketed] == [r['prediction'] for r in plain]
      np.testing.assert_allclose(
          [r['aux']['score'] for r in bucketed],
          [r['aux']['score'] for r in plain],
          rtol=1e-5,
          atol=1e-5,
      )


def test_too_short_buckets_stop_training_with_a_clear_error(env):
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  cfg = _cfg(bucketing_config=bucketing.BucketConfig(lengths={'inputs': [8, 16]}))
  with pytest.raises(bucketing.BucketError, match=r'Add 24 as the last bucket'):
    utils.get_dataset(cfg, 0, 1, env['fc'])


# ------------------------------------------------------------------------------- end to end

STEPS, PERIOD = 8, 2
HOOKS = os.path.join(rt.HERE, 'train_with_hooks.py')
BUCKET_GIN = rt.PROMPT_GIN + ('runs/bucketing.gin',)


def _train_args(frozen, model_dir, script=None):
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=STEPS,
      period=PERIOD,
      eval_period=0,
      eval_steps=0,
      extra={'train.infer_eval_dataset_cfg': 'None', 'NUM_BUCKETS': '3'},
  )
  args = rt.entry_args('prompt_tuning.train', BUCKET_GIN, bindings)
  return [rt.PYTHON, script] + args[3:] if script else args


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
  """A bucketed run, and the same run killed (SIGKILL) mid-training then started again."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp('bucket_resume'))
  frozen = rt.make_t5x_checkpoint(os.path.join(root, 'frozen'))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  dirs = {k: os.path.join(root, k) for k in ('reference', 'killed')}
  reference = rt.popen_logged(
      _train_args(frozen, dirs['reference']), env, dirs['reference'] + '.log'
  )
  killed = rt.popen_logged(
      _train_args(frozen, dirs['killed'], HOOKS),
      dict(env, HOOK_STEP_DELAY='0.5'),
      dirs['killed'] + '.1.log',
  )
  # Generous: on a loaded 2-core machine two concurrent tiny runs take minutes to compile.
  start = time.time()
  while time.time() - start < 900 and killed.poll() is None:
    steps = checkpoints.all_steps(dirs['killed'])
    if steps and steps[-1] >= 4:
      break
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  out = {
      'dirs': dirs,
      'frozen': frozen,
      'env': env,
      'phase1': {
          'reference': rt.finish_logged(reference, 900),
          'killed': rt.finish_logged(killed, 900),
      },
      'killed_steps': checkpoints.all_steps(dirs['killed']),
  }
  out['phase2'] = rt.finish_logged(
      rt.popen_logged(_train_args(frozen, dirs['killed']), env, dirs['killed'] + '.2.log'), 900
  )
  return out


def _prompt(model_dir, step):
  return np.load(
      os.path.join(
          model_dir, 'numpy_checkpoints', f'checkpoint_{step}', 'encoder.prompt.prompt.prompt.npy'
      )
  )


@pytest.mark.slow
def test_bucketed_training_resumes_bit_exactly_after_kill(resumed):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  ref = resumed['phase1']['reference']
  rt.check_ok(ref, 'the uninterrupted bucketed run')
  assert 'Training with length buckets inputs: [' in ref.stdout
  killed = resumed['phase1']['killed']
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-4000:]
  assert resumed['killed_steps'], 'the killed run wrote no checkpoint before it was killed'
  last = resumed['killed_steps'][-1]
  assert 4 <= last < STEPS, f'the kill did not land mid-training (last checkpoint {last})'
  model_dir = resumed['dirs']['killed']
  meta = checkpoints.read_metadata(os.path.join(model_dir, f'checkpoint_{last}'))
  lengths = meta['train_bucket_lengths']['inputs']
  assert lengths[-1] == 24 and len(lengths) > 1
  rt.check_ok(resumed['phase2'], 'the resumed run')
  assert 'Resuming with the training bucket lengths recorded in' in resumed['phase2'].stdout
  reference = rt.losses(resumed['dirs']['reference'])
  assert sorted(reference) == list(range(1, STEPS + 1))
  after = rt.losses(model_dir, run=-1)
  assert sorted(after) == list(range(last + 1, STEPS + 1))
  for step in after:  # bit for bit
    assert after[step] == reference[step], (step, after[step], reference[step])
  np.testing.assert_array_equal(
      _prompt(model_dir, STEPS), _prompt(resumed['dirs']['reference'], STEPS)
  )


@pytest.mark.slow
def test_eval_entry_point_metrics_equal_with_and_without_buckets(resumed, tmp_path):
  rt.check_ok(resumed['phase1']['reference'], 'the uninterrupted bucketed run')
  prompt = os.path.join(
      resumed['dirs']['reference'],
      'numpy_checkpoints',
      f'checkpoint_{STEPS}',
      'encoder.prompt.prompt.prompt.npy',
  )
  metrics = {}
  for name, extra in (('plain', ()), ('bucketed', ('runs/bucketing.gin',))):
    out = str(tmp_path / name)
    bindings = rt.serve_bindings(resumed['frozen'], prompt, 'EVAL_OUTPUT_DIR', out, batch_size=2)
    proc = rt.run(
        rt.entry_args(
            'prompt_tuning.eval', ('test/tiny_prompt.gin', 'runs/prompt_eval.gin') + extra, bindings
        ),
        resumed['env'],
        log_path=out + '.log',
    )
    rt.check_ok(proc, f'{name} eval')
    with open(os.path.join(out, 'metrics.json')) as f:
      metrics[name] = json.load(f)[rt.TASK]
  assert metrics['plain']['accuracy'] == metrics['bucketed']['accuracy']
  np.testing.assert_allclose(
      metrics['bucketed']['log_likelihood'], metrics['plain']['log_likelihood'], rtol=1e-6
  )
