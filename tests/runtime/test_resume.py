"""Preemption: `kill -9` during training (and during a checkpoint write), then the same command again.

The resumed run must continue from the last complete checkpoint and reproduce, step by step, the losses
of an uninterrupted run with the same seed (same data order: the train dataset seed derives from
RANDOM_SEED, or from the seed recorded in the checkpoint when RANDOM_SEED is unset; same dropout masks).
"""

import os
import shutil
import signal
import time

import numpy as np
import pytest

import runtime_testlib as rt

STEPS, PERIOD = 8, 2
HOOKS = os.path.join(rt.HERE, 'train_with_hooks.py')


# ------------------------------------------------------------------------------------------- unit tests


def _tiny_state(step, value):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  return train_state.TrainState(
      step=jnp.asarray(step, jnp.int32),
      trainable={
          'encoder': {'prompt': {'prompt': {'prompt': jnp.full((2, 3), value, jnp.float32)}}}
      },
      frozen={},
      opt_state={'v': jnp.full((2,), value, jnp.float32)},
  )


def test_incomplete_checkpoints_are_never_restored(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path)
  checkpoints.save_checkpoint(model_dir, _tiny_state(2, 1.0), data_state={'batches_consumed': 2})
  assert checkpoints.latest_checkpoint_path(model_dir) == os.path.join(model_dir, 'checkpoint_2')

  # A crash inside the write of step 4 (after orbax wrote its files, before the commit).
  original = ocp.PyTreeCheckpointer.save

  def save_then_crash(self, directory, *args, **kwargs):
    original(self, directory, *args, **kwargs)
    raise KeyboardInterrupt('simulated preemption')

  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'save', save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save_checkpoint(model_dir, _tiny_state(4, 2.0))
  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'save', original)
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_4.tmp'))
  # A checkpoint directory that lacks the commit marker (e.g. copied or written by hand, half done).
  shutil.copytree(os.path.join(model_dir, 'checkpoint_2'), os.path.join(model_dir, 'checkpoint_6'))
  os.remove(os.path.join(model_dir, 'checkpoint_6', checkpoints.METADATA_FILE))

  assert checkpoints.all_steps(model_dir) == [2]
  assert checkpoints.latest_checkpoint_path(model_dir) == os.path.join(model_dir, 'checkpoint_2')
  for bad in ('checkpoint_4.tmp', 'checkpoint_6'):
    with pytest.raises(ValueError, match='not a complete'):
      checkpoints.restore_checkpoint(os.path.join(model_dir, bad))
  raw = checkpoints.restore_checkpoint(checkpoints.latest_checkpoint_path(model_dir))
  assert int(raw['step']) == 2 and int(raw['data']['batches_consumed']) == 2
  np.testing.assert_array_equal(
      raw['trainable']['encoder']['prompt']['prompt']['prompt'], np.ones((2, 3))
  )

  # The next save commits normally and removes the leftovers of the interrupted one.
  checkpoints.save_checkpoint(model_dir, _tiny_state(8, 3.0), keep=1)
  assert checkpoints.all_steps(model_dir) == [8]
  assert not [n for n in os.listdir(model_dir) if '.tmp' in n]


def test_train_data_order_derives_from_the_seed():
  import seqio  # pylint: disable=g-import-not-at-top
  import tiny_task  # pylint: disable=g-import-not-at-top,unused-import
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  cfg = utils.DatasetConfig(
      mixture_or_task_name=rt.TASK,
      task_feature_lengths={'inputs': 24, 'targets': 8},
      split='train',
      batch_size=8,
      shuffle=True,
      seed=None,
  )

  def first_batches(seed, n=3):
    ds = utils.get_dataset(cfg, 0, 1, seqio.EncDecFeatureConverter, num_epochs=None, seed=seed)
    return np.stack([b['encoder_input_tokens'] for b in ds.take(n).as_numpy_iterator()])

  np.testing.assert_array_equal(first_batches(0), first_batches(0))
  assert not np.array_equal(first_batches(0), first_batches(1))
  # Skipping k batches (what a resumed run does) continues the same stream.
  ds = utils.get_dataset(cfg, 0, 1, seqio.EncDecFeatureConverter, num_epochs=None, seed=0)
  np.testing.assert_array_equal(
      next(ds.skip(2).as_numpy_iterator())['encoder_input_tokens'], first_batches(0)[2]
  )


# ------------------------------------------------------------------------------------------- end to end


def _args(frozen, model_dir, seed=0, script=None):
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=STEPS,
      period=PERIOD,
      eval_period=0,
      eval_steps=0,
      seed=seed,
      extra={'train.infer_eval_dataset_cfg': 'None'},
  )
  args = rt.entry_args('prompt_tuning.train', rt.PROMPT_GIN, bindings)
  return [rt.PYTHON, script] + args[3:] if script else args


def _finish(proc, timeout=400):
  done = rt.finish_logged(proc, timeout)
  return done.returncode, done.stdout


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three runs at once (uninterrupted; killed mid-training; killed inside a checkpoint write), then
  the two interrupted ones are started again with the same command (also at once)."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp('resume'))
  frozen = rt.make_t5x_checkpoint(os.path.join(root, 'frozen'))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  dirs = {k: os.path.join(root, k) for k in ('reference', 'killed', 'killed_in_save')}
  args = {
      'reference': _args(frozen, dirs['reference']),
      'killed': _args(frozen, dirs['killed']),
      # RANDOM_SEED unset: the resumed run must reuse the seed recorded in the checkpoint.
      'killed_in_save': _args(frozen, dirs['killed_in_save'], seed=None),
  }
  out = {'dirs': dirs}

  # Phase 1. The uninterrupted run starts first; once it has compiled (first checkpoint written), the
  # others start and find its executables in the persistent compilation cache.
  reference = rt.popen_logged(args['reference'], env, dirs['reference'] + '.log')
  start = time.time()
  while (
      time.time() - start < 400
      and reference.poll() is None
      and not checkpoints.all_steps(dirs['reference'])
  ):
    time.sleep(0.1)
  procs = {
      'reference': reference,
      # Slowed to 0.5 s/step by a test hook so that the kill lands mid-training.
      'killed': rt.popen_logged(
          [rt.PYTHON, HOOKS] + args['killed'][3:],
          dict(env, HOOK_STEP_DELAY='0.5'),
          dirs['killed'] + '.1.log',
      ),
      'killed_in_save': rt.popen_logged(
          [rt.PYTHON, HOOKS] + args['killed_in_save'][3:],
          dict(env, HOOK_KILL_IN_SAVE='6'),
          dirs['killed_in_save'] + '.1.log',
      ),
  }
  killed = procs['killed']
  start = time.time()
  while time.time() - start < 400 and killed.poll() is None:
    steps = checkpoints.all_steps(dirs['killed'])
    if steps and steps[-1] >= 4:
      break
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  out['phase1'] = {k: _finish(p) for k, p in procs.items()}
  out['killed_steps'] = checkpoints.all_steps(dirs['killed'])
  out['killed_in_save_steps'] = checkpoints.all_steps(dirs['killed_in_save'])
  out['tmp_after_kill_in_save'] = os.path.isdir(
      os.path.join(dirs['killed_in_save'], 'checkpoint_6.tmp')
  )

  # What a kill during a write could leave behind, next to the last complete checkpoint.
  last = out['killed_steps'][-1] if out['killed_steps'] else 0
  if last:
    os.makedirs(os.path.join(dirs['killed'], f'checkpoint_{last + 2}.tmp', 'd'))
    shutil.copytree(
        os.path.join(dirs['killed'], f'checkpoint_{last}'),
        os.path.join(dirs['killed'], f'checkpoint_{last + 1}'),
    )
    os.remove(os.path.join(dirs['killed'], f'checkpoint_{last + 1}', checkpoints.METADATA_FILE))
  out['latest_with_decoys'] = checkpoints.latest_checkpoint_path(dirs['killed'])

  # Phase 2: the same commands again.
  procs = {
      k: rt.popen_logged(args[k], env, dirs[k] + '.2.log') for k in ('killed', 'killed_in_save')
  }
  out['phase2'] = {k: _finish(p) for k, p in procs.items()}
  return out


def _prompt(model_dir, step):
  return np.load(
      os.path.join(
          model_dir, 'numpy_checkpoints', f'checkpoint_{step}', 'encoder.prompt.prompt.prompt.npy'
      )
  )


@pytest.mark.slow
def test_kill_during_training_then_resume(runs):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  rc, log = runs['phase1']['reference']
  assert rc == 0, log[-4000:]
  reference = rt.losses(runs['dirs']['reference'])
  assert sorted(reference) == list(range(1, STEPS + 1))

  rc, log = runs['phase1']['killed']
  assert (
      rc == -signal.SIGKILL
  ), f'the run ended before it was killed (exit code {rc}):\n{log[-4000:]}'
  last = runs['killed_steps'][-1]
  assert 4 <= last < STEPS, f'the kill did not land mid-training (last checkpoint {last})'
  model_dir = runs['dirs']['killed']
  # The decoys (a `.tmp` directory, a directory without the commit marker) are ignored.
  assert runs['latest_with_decoys'] == os.path.join(model_dir, f'checkpoint_{last}')

  rc, log = runs['phase2']['killed']
  assert rc == 0, log[-4000:]
  assert f'Resuming from {os.path.join(model_dir, f"checkpoint_{last}")}' in log
  resumed = rt.losses(model_dir, run=-1)
  assert sorted(resumed) == list(range(last + 1, STEPS + 1))
  rt.assert_losses_close(resumed, reference, range(last + 1, STEPS + 1))
  assert checkpoints.all_steps(model_dir)[-1] == STEPS
  assert not [n for n in os.listdir(model_dir) if '.tmp' in n]
  np.testing.assert_allclose(
      _prompt(model_dir, STEPS), _prompt(runs['dirs']['reference'], STEPS), rtol=1e-6, atol=1e-6
  )


@pytest.mark.slow
def test_kill_inside_checkpoint_write_then_resume_without_random_seed(runs):
  """SIGKILL while checkpoint_6 is written; RANDOM_SEED unset (the resumed run reuses checkpoint_4's seed)."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = runs['dirs']['killed_in_save']
  rc, log = runs['phase1']['killed_in_save']
  assert rc == -signal.SIGKILL, log[-4000:]
  assert 'No RANDOM_SEED given' in log
  assert runs['tmp_after_kill_in_save'], 'the hook did not fire inside the save of step 6'
  assert runs['killed_in_save_steps'] == [2, 4]
  killed = rt.losses(model_dir, run=0)
  assert sorted(killed) == list(range(1, 7))

  rc, log = runs['phase2']['killed_in_save']
  assert rc == 0, log[-4000:]
  assert f'Resuming from {os.path.join(model_dir, "checkpoint_4")}' in log
  assert 'random seed' in log and 'recorded in' in log
  resumed = rt.losses(model_dir, run=-1)
  assert sorted(resumed) == list(range(5, STEPS + 1))
  # Steps 5 and 6 are trained again on the same batches with the same dropout masks.
  rt.assert_losses_close(resumed, killed, [5, 6])
  assert checkpoints.all_steps(model_dir)[-1] == STEPS
  assert not os.path.exists(os.path.join(model_dir, 'checkpoint_6.tmp'))
