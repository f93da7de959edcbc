"""Faults at their cause, in this process (issue 11): each test reproduces one fault on tiny inputs.

The entry points' side of the same faults (exit status, the one-line message, no traceback, files
intact) is tested by running them in `test_faults_e2e.py`.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import runtime_testlib as rt

PROMPT = 'encoder/prompt/prompt/prompt'


# ------------------------------------------------------------------------ helpers


def _params(config, seed=1):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  x = jnp.ones((2, 8), jnp.int32)
  variables = t5.EncoderDecoder(config).init(
      jax.random.PRNGKey(seed), x, x, x, enable_dropout=False
  )
  return jax.device_get(variables['params'])


def _prompted(params, length=5):
  """`params` plus a prompt (what the prompt-tuning model initializes)."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(params)
  width = flat['token_embedder/embedding'].shape[1]
  flat[PROMPT] = np.full((length, width), 7.0, np.float32)
  return params_lib.unflatten_params(flat)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """T5X checkpoints of the tiny T5 1.1 model and of other architectures / sizes."""
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('ckpts')
  base = t5.get_config('tiny')
  configs = {
      't5_1_1': base,
      't5_1_0': dataclasses.replace(base, mlp_activations=('relu',), logits_via_embedding=True),
      'layers_3': dataclasses.replace(base, num_encoder_layers=3, num_decoder_layers=3),
      'layers_1': dataclasses.replace(base, num_encoder_layers=1, num_decoder_layers=1),
  }
  out = {'model': _prompted(_params(base, seed=2))}
  for name, config in configs.items():
    out[name] = str(root / name / 'checkpoint_0')
    t5x_format.save(out[name], _params(config), 0)
  return out


def _load(path, target, **kw):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  return checkpoints.load_initial_params(
      path,
      target,
      assignment_map=((r'.*prompt.*', None),),
      fallback_to_scratch=True,  # as configs/models/t5_1_1_prompt.gin
      trainable=lambda p: '/prompt/' in p,
      **kw,
  )


# ------------------------------------------------ 1. a checkpoint of another architecture


def test_matching_checkpoint_fills_every_frozen_parameter_and_keeps_the_new_prompt(ckpts):
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  out = params_lib.flatten_params(_load(ckpts['t5_1_1'], ckpts['model']))
  ckpt = params_lib.flatten_params(
      _params(__import__('prompt_tuning.architectures.t5').architectures.t5.get_config('tiny'))
  )
  assert set(out) == set(ckpt) | {PROMPT}
  for name, value in ckpt.items():
    np.testing.assert_array_equal(out[name], value, err_msg=name)
  np.testing.assert_array_equal(out[PROMPT], 7.0)  # the trainable prompt starts from its init


@pytest.mark.parametrize(
    'name, needles',
    [
        (
            't5_1_0',
            [
                'T5 1.0 vs 1.1',
                'decoder/logits_dense/kernel',
                'mlp/wi_0/kernel',
                'encoder/layers_0/mlp/wi/kernel',
                'frozen parameter(s) of the model are not in it',
            ],
        ),
        (
            'layers_3',
            ['3 encoder layers in the checkpoint, 2 in the model', 'not used by the model'],
        ),
        (
            'layers_1',
            ['1 encoder layers in the checkpoint, 2 in the model', 'layers_1/', 'not in it'],
        ),
    ],
)
def test_checkpoint_of_another_architecture_is_an_error_naming_the_cause(ckpts, name, needles):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    _load(ckpts[name], ckpts['model'])
  message = str(info.value)
  for needle in needles + ['allow_partial_frozen', ckpts[name]]:
    assert needle in message, f'{needle!r} not in: {message}'
  assert '\n' not in message


def test_allow_partial_frozen_opts_in_and_leaves_the_missing_frozen_parameters_random(ckpts):
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  target = params_lib.flatten_params(ckpts['model'])
  out = params_lib.flatten_params(_load(ckpts['t5_1_0'], ckpts['model'], allow_partial_frozen=True))
  ckpt = params_lib.flatten_params(
      _params(
          dataclasses.replace(
              __import__('prompt_tuning.architectures.t5').architectures.t5.get_config('tiny'),
              mlp_activations=('relu',),
              logits_via_embedding=True,
          )
      )
  )
  np.testing.assert_array_equal(
      out['decoder/logits_dense/kernel'], target['decoder/logits_dense/kernel']
  )
  np.testing.assert_array_equal(
      out['encoder/layers_0/attention/query/kernel'],
      ckpt['encoder/layers_0/attention/query/kernel'],
  )


def test_frozen_parameters_mapped_to_none_keep_their_initializer(ckpts):
  """An explicit `(regex, None)` is the opt-in per parameter (e.g. frozen source prompts)."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  relpos = 'encoder/relpos_bias/rel_embedding'
  out = checkpoints.load_initial_params(
      ckpts['t5_1_1'],
      ckpts['model'],
      assignment_map=((r'.*prompt.*', None), (relpos, None)),
      fallback_to_scratch=True,
      trainable=lambda p: '/prompt/' in p,
  )
  target = params_lib.flatten_params(ckpts['model'])
  np.testing.assert_array_equal(params_lib.flatten_params(out)[relpos], target[relpos])


def test_trainable_parameters_without_fallback_are_still_an_error(ckpts):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  with pytest.raises(
      checkpoints.CheckpointMismatchError, match='trained parameter.*fallback_to_scratch'
  ):
    checkpoints.load_initial_params(
        ckpts['t5_1_1'], ckpts['model'], trainable=lambda p: '/prompt/' in p
    )


def test_our_prompt_checkpoint_as_initial_checkpoint_names_its_backbone(ckpts, tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  state = train_state.TrainState(
      step=jnp.asarray(4, jnp.int32),
      trainable={'encoder': {'prompt': {'prompt': {'prompt': jnp.ones((5, 32), jnp.float32)}}}},
      frozen={},
      opt_state={'v': jnp.ones((2,), jnp.float32)},
  )
  path = checkpoints.save_checkpoint(
      str(tmp_path), state, extra_metadata={'initial_checkpoint_path': ckpts['t5_1_1']}
  )
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    _load(path, ckpts['model'])
  assert 'holds only the parameters its run trained' in str(info.value)
  assert f'{ckpts["t5_1_1"]}: pass that as INITIAL_CHECKPOINT_PATH' in str(info.value)


# ------------------------------------------------------------- 2. out-of-range prompt ids


class _Bank:
  num_prompts = 2


def test_host_batches_with_out_of_range_prompt_ids_are_an_error():
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top

  model = models.EncoderDecoderModel(_Bank(), None, None)
  assert model.conditioning_feature_sizes() == {'prompt_ids': 2}
  model.check_conditioning_features({'prompt_ids': np.array([0, 1, 1, 0])})
  with pytest.raises(models.ConditioningFeatureError) as info:
    model.check_conditioning_features(
        {'prompt_ids': np.array([0, 3, 1, -1])}, task_of=lambda row: ['a', 'b', 'c', 'd'][row]
    )
  message = str(info.value)
  assert "prompt_ids 3 of task 'b' is out of range (also -1)" in message
  assert 'the prompt bank has 2 prompts (ids 0..1)' in message
  # Without a bank (no num_prompts) ids are not limited.
  models.EncoderDecoderModel(object(), None, None).check_conditioning_features(
      {'prompt_ids': np.array([9])}
  )


def test_out_of_range_ids_name_the_tasks_of_a_mixture():
  import tiny_task  # pylint: disable=g-import-not-at-top,unused-import
  from prompt_tuning.data import feature_converters  # pylint: disable=g-import-not-at-top

  found = feature_converters.out_of_range_ids('tiny_bank_mix4', 'validation', {'prompt_ids': 2})
  assert found == [('tiny_count_p2', 'prompt_ids', [2]), ('tiny_count_p3', 'prompt_ids', [3])]
  assert not feature_converters.out_of_range_ids('tiny_bank_mix', 'train', {'prompt_ids': 2})


# ------------------------------------------------------ 5. mixed-task batches of a bank


def test_interleaved_tasks_mix_in_every_batch_and_split_back_in_order():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import inference  # pylint: disable=g-import-not-at-top

  sizes = (5, 3, 4)
  datasets = [
      tf.data.Dataset.from_tensor_slices({'x': np.arange(n) + 100 * t}).enumerate()
      for t, n in enumerate(sizes)
  ]
  elements = list(inference.interleave_tasks(datasets).as_numpy_iterator())
  assert len(elements) == sum(sizes)
  first_batch = [int(ex['x']) // 100 for _, ex in elements[:3]]
  assert first_batch == [0, 1, 2]  # one example of each task per round
  outputs = [(key, int(ex['x'])) for key, ex in elements]
  per_task = inference.split_by_task(outputs, len(sizes))
  for t, n in enumerate(sizes):
    assert sorted(per_task[t]) == [(i, 100 * t + i) for i in range(n)]


# ----------------------------------------------- 3 and 9. prompt files and damaged inputs


def test_prompt_files_are_validated_on_load(tmp_path):
  from prompt_tuning import prompts  # pylint: disable=g-import-not-at-top

  good = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
  cases = {}
  for name, value in (('nan', np.nan), ('inf', np.inf)):
    bad = good.copy()
    bad[1, 2] = value
    cases[name] = str(tmp_path / f'{name}.npy')
    np.save(cases[name], bad)
  cases['text'] = str(tmp_path / 'text.npy')
  with open(cases['text'], 'w') as f:
    f.write('0.1 0.2 0.3\n')
  cases['npz'] = str(tmp_path / 'archive.npy')
  with open(cases['npz'], 'wb') as f:
    np.savez(f, prompt=good)
  cases['objects'] = str(tmp_path / 'objects.npy')
  np.save(cases['objects'], np.array([{'a': 1}], dtype=object), allow_pickle=True)
  cases['ints'] = str(tmp_path / 'ints.npy')
  np.save(cases['ints'], np.ones((5, 32), np.int32))
  cases['truncated'] = str(tmp_path / 'truncated.npy')
  np.save(cases['truncated'], good)
  with open(cases['truncated'], 'r+b') as f:
    f.truncate(200)
  expected = {
      'nan': '1 NaN and 0 infinite',
      'inf': '0 NaN and 1 infinite',
      'text': 'damaged or not a .npy array file (no .npy header)',
      'npz': 'an .npz archive',
      'objects': 'it holds Python objects',
      'ints': 'int32 values, not floating-point',
      'truncated': 'damaged or not a .npy array file',
  }
  for name, needle in expected.items():
    with pytest.raises(prompts.PromptFileError) as info:
      prompts.np_load(cases[name])
    assert needle in str(info.value) and cases[name] in str(info.value), str(info.value)
    assert 'allow_pickle' not in str(info.value)
  ok = str(tmp_path / 'ok.npy')
  np.save(ok, good)
  loaded = prompts.np_load(ok)
  np.testing.assert_array_equal(loaded, good)
  with pytest.raises(ValueError, match=f'The prompt in {ok} has shape \\(5, 32\\)'):
    prompts.from_array(loaded)(None, (4, 32))


def test_class_label_init_from_a_checkpoint_of_another_width_names_the_checkpoint(ckpts):
  from prompt_tuning import prompts  # pylint: disable=g-import-not-at-top

  class Vocab:

    def encode(self, text):
      return [3, 4]

  init = prompts.from_embedded_list(prompts.t5x_load(ckpts['t5_1_1']), Vocab(), ['yes'])
  with pytest.raises(ValueError) as info:
    init(None, (5, 64))
  message = str(info.value)
  assert f'checkpoint {ckpts["t5_1_1"]} is of a model with d_model 32' in message
  assert 'd_model 64' in message and 'embedding table has' not in message


def test_damaged_hugging_face_files_are_named(tmp_path):
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  data = safetensors_numpy.save({'shared.weight': np.ones((16, 8), np.float32)})
  good = tmp_path / 'good.safetensors'
  good.write_bytes(data)
  assert huggingface.read_safetensors(str(good))['shared.weight'].shape == (16, 8)
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(data[:-100])
  header = tmp_path / 'header.safetensors'
  header.write_bytes(data[:8] + b'\xff\xfe' + data[10:])
  short = tmp_path / 'short.safetensors'
  short.write_bytes(data[:5])
  for path, needle in (
      (truncated, 'truncated'),
      (header, 'JSON header cannot be read'),
      (short, 'fewer than the 8'),
  ):
    with pytest.raises(huggingface.DamagedFileError) as info:
      huggingface.read_safetensors(str(path))
    assert f'{path} is damaged' in str(info.value) and needle in str(info.value)
  torch_file = tmp_path / 'pytorch_model.bin'
  torch_file.write_bytes(b'not a torch file')
  with pytest.raises(huggingface.DamagedFileError, match='pytorch_model.bin is damaged'):
    huggingface.read_state_dict(str(torch_file))


# ------------------------------------------- 6. a damaged latest checkpoint, 7. a full disk


def _state(step, value=1.0, length=5):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(step)
  return train_state.TrainState(
      step=jnp.asarray(step, jnp.int32),
      trainable={
          'encoder': {
              'prompt': {'prompt': {'prompt': jnp.asarray(rng.normal(size=(length, 32)) + value)}}
          }
      },
      frozen={},
      opt_state={'v': jnp.full((2,), value, jnp.float32)},
  )


def _damage(path, how):
  if how == 'data':
    for sub in ('d', os.path.join('ocdbt.process_0', 'd')):
      shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
  elif how == 'metadata':
    os.remove(os.path.join(path, '_METADATA'))
  elif how == 'commit_marker':
    os.remove(os.path.join(path, 'prompt_tuning_checkpoint.json'))


@pytest.mark.parametrize('how', ['data', 'metadata', 'commit_marker'])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, how, capfd):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path)
  for step in (2, 4, 6):
    checkpoints.save_checkpoint(model_dir, _state(step, float(step)))
  _damage(os.path.join(model_dir, 'checkpoint_6'), how)
  path, raw = checkpoints.restore_latest(model_dir)
  assert path == os.path.join(model_dir, 'checkpoint_4') and int(raw['step']) == 4
  # The damaged checkpoint is moved aside, not deleted; no later save can overwrite it.
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_6.damaged'))
  assert not os.path.exists(os.path.join(model_dir, 'checkpoint_6'))
  assert checkpoints.all_steps(model_dir) == [2, 4]
  time.sleep(0.2)
  assert 'Event loop is closed' not in capfd.readouterr().err


def test_resume_with_no_usable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path)
  for step in (2, 4):
    checkpoints.save_checkpoint(model_dir, _state(step))
  _damage(os.path.join(model_dir, 'checkpoint_2'), 'data')
  _damage(os.path.join(model_dir, 'checkpoint_4'), 'commit_marker')
  before = sorted(os.listdir(model_dir))
  with pytest.raises(checkpoints.DamagedCheckpointError) as info:
    checkpoints.restore_latest(model_dir)
  assert 'checkpoint_4: it has no prompt_tuning_checkpoint.json' in str(info.value)
  assert 'checkpoint_2: it cannot be read' in str(info.value)
  assert sorted(os.listdir(model_dir)) == before
  assert checkpoints.restore_latest(str(tmp_path / 'empty')) == (None, None)


def test_write_errors_name_the_cause_remove_the_partial_save_and_keep_earlier_checkpoints(
    tmp_path, monkeypatch
):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path)
  checkpoints.save_checkpoint(model_dir, _state(2))

  def full_disk(self, directory, *args, **kwargs):
    os.makedirs(f'{directory}.orbax-checkpoint-tmp/d')
    raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'save', full_disk)
  with pytest.raises(faults.CheckpointWriteError) as info:
    checkpoints.save_checkpoint(model_dir, _state(4))
  assert str(info.value).startswith(f'no space left on device writing checkpoint_4 in {model_dir}')
  assert f'checkpoints up to step 2 are intact ({model_dir}/checkpoint_2)' in str(info.value)
  assert sorted(os.listdir(model_dir)) == ['checkpoint_2', 'numpy_checkpoints']
  assert faults.describe_os_error(OSError(errno.EROFS, 'x')) == 'read-only file system'


def _mount_tmpfs(path, size):
  if sys.platform != 'linux' or os.geteuid() != 0 or not shutil.which('mount'):
    return False
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
      capture_output=True,
      check=False,
  )
  return proc.returncode == 0


def test_a_real_full_disk_during_a_save(tmp_path):
  """ENOSPC from TensorStore itself, on a 200 KiB tmpfs (needs root; skipped otherwise)."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  mount = str(tmp_path / 'small')
  if not _mount_tmpfs(mount, '200k'):
    pytest.skip('mounting a small tmpfs needs root on Linux')
  try:
    model_dir = os.path.join(mount, 'model')
    checkpoints.save_checkpoint(model_dir, _state(2))
    with pytest.raises(faults.CheckpointWriteError) as info:
      checkpoints.save_checkpoint(model_dir, _state(4, length=20000))  # ~2.5 MB of noise
    assert str(info.value).startswith('no space left on device writing checkpoint_4')
    assert 'checkpoints up to step 2 are intact' in str(info.value)
    assert sorted(os.listdir(model_dir)) == ['checkpoint_2', 'numpy_checkpoints']
    assert int(checkpoints.restore_checkpoint(os.path.join(model_dir, 'checkpoint_2'))['step']) == 2
  finally:
    subprocess.run(['umount', mount], check=False)


# ------------------------------------------------------------- 8. output directories


def test_output_dir_must_be_a_writable_directory(tmp_path):
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  a_file = tmp_path / 'file'
  a_file.write_text('keep me')
  with pytest.raises(faults.OutputDirError, match=f'MODEL_DIR {a_file} is a file, not a directory'):
    faults.check_output_dir(str(a_file), 'MODEL_DIR')
  with pytest.raises(faults.OutputDirError, match='inside a file'):
    faults.check_output_dir(str(a_file / 'sub'), 'EVAL_OUTPUT_DIR')
  assert a_file.read_text() == 'keep me'
  new = tmp_path / 'new' / 'dir'
  assert faults.check_output_dir(str(new), 'MODEL_DIR') == str(new) and not os.listdir(new)


# ------------------------------------------------------------------ 11. one writer


_HOLD = """
import sys, time
from prompt_tuning.runtime import faults
faults.RunLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=rt.REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLD, model_dir], stdout=subprocess.PIPE, text=True, env=env
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(faults.ModelDirInUseError) as info:
      faults.RunLock(model_dir).acquire()
    assert f'pid {holder.pid} on host' in str(info.value) and 'started' in str(info.value)
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is taken over, with a note of whose it was.
  lock = faults.RunLock(model_dir).acquire()
  assert lock.took_over is not None and lock.took_over['pid'] == holder.pid
  with pytest.raises(faults.ModelDirInUseError):  # held by this process now
    faults.RunLock(model_dir).acquire()
  lock.release()
  info = json.loads((tmp_path / faults.LOCK_FILE).read_text())
  assert info['state'] == 'released' and info['pid'] == os.getpid()
  again = faults.RunLock(model_dir).acquire()
  assert again.took_over is None  # a released lock is not a stale one
  again.release()


def test_lock_without_flock_respects_live_holders_and_takes_over_dead_ones(tmp_path, monkeypatch):
  import socket  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  path = tmp_path / faults.LOCK_FILE
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  for pid, host, refused in (
      (os.getppid(), socket.gethostname(), True),
      (dead.pid, 'another-host', True),
      (dead.pid, socket.gethostname(), False),
  ):
    path.write_text(json.dumps({'pid': pid, 'host': host, 'state': 'running', 'start_time': 0}))
    lock = faults.RunLock(str(tmp_path))
    if refused:
      with pytest.raises(faults.ModelDirInUseError, match=f'pid {pid} on host {host}'):
        lock._acquire_without_flock()  # pylint: disable=protected-access
    else:
      lock._acquire_without_flock()  # pylint: disable=protected-access
      assert lock.took_over['pid'] == dead.pid
      assert json.loads(path.read_text())['pid'] == os.getpid()


# ----------------------------------------------------------- 10. Ctrl-C and SIGTERM


def test_signals_stop_after_a_deferred_block_and_at_once_elsewhere():
  from prompt_tuning.runtime import faults  # pylint: disable=g-import-not-at-top

  stopped = []
  interrupts = faults.Interrupts(on_stop=lambda: stopped.append(True)).install()
  try:
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert stopped == [True]  # still running: the step finishes
    with pytest.raises(faults.TrainingInterrupted) as info:
      interrupts.check()
    assert info.value.exit_code == 143
    interrupts.signum = None
    with pytest.raises(faults.TrainingInterrupted) as info:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    assert info.value.signum == signal.SIGINT and info.value.exit_code == 130
  finally:
    interrupts.restore()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  message = faults.interrupted_message(signal.SIGTERM, 6, (6, '/m/checkpoint_6'))
  assert message == (
      'terminated (SIGTERM) at step 6; last complete checkpoint 6 (/m/checkpoint_6); rerun the '
      'same command to resume.'
  )


# ------------------------------------------------------------------- 12. T5X names


def test_t5x_script_scopes_and_partitioner_name_are_accepted():
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top

  assert gin_utils._resolve_script_alias('train_script.train.eval_period = 5') == (  # pylint: disable=protected-access
      'train.eval_period = 5'
  )
  assert gin_utils._resolve_script_alias(' eval_script.evaluate.output_dir = "x"') == (  # pylint: disable=protected-access
      'evaluate.output_dir = "x"'
  )
  assert partitioning.ModelBasedPjitPartitioner is partitioning.PjitPartitioner


_PROBE = """
import json, sys
import gin
from prompt_tuning.runtime import gin_utils
out = {}
for name in sys.argv[1:]:
  gin.clear_config()
  gin_utils.parse_gin_flags([], [name], [], allow_unused_macros=False)
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  c = model.module.config
  out[name] = [c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim, c.num_encoder_layers,
               list(c.mlp_activations), c.logits_via_embedding,
               bool(model.optimizer_def.trainable_filter('encoder/layers_0/mlp/wi_0/kernel'))]
print('PROBE' + json.dumps(out))
"""

# T5X's t5x/examples/t5 gin files: d_model, heads, head_dim, d_ff, layers (T5X's own files).
T5X_INCLUDES = {
    't5x/examples/t5/t5_1_1/small.gin': [512, 6, 64, 1024, 8, ['gelu', 'linear'], False],
    't5x/examples/t5/t5_1_1/base.gin': [768, 12, 64, 2048, 12, ['gelu', 'linear'], False],
    't5x/examples/t5/t5_1_1/large.gin': [1024, 16, 64, 2816, 24, ['gelu', 'linear'], False],
    't5x/examples/t5/t5_1_1/xl.gin': [2048, 32, 64, 5120, 24, ['gelu', 'linear'], False],
    't5x/examples/t5/t5_1_1/xxl.gin': [4096, 64, 64, 10240, 24, ['gelu', 'linear'], False],
    't5x/examples/t5/t5_1_0/small.gin': [512, 8, 64, 2048, 6, ['relu'], True],
    't5x/examples/t5/t5_1_0/base.gin': [768, 12, 64, 3072, 12, ['relu'], True],
    't5x/examples/t5/t5_1_0/large.gin': [1024, 16, 64, 4096, 24, ['relu'], True],
    't5x/examples/t5/t5_1_0/3B.gin': [1024, 32, 128, 16384, 24, ['relu'], True],
    't5x/examples/t5/t5_1_0/11B.gin': [1024, 128, 128, 65536, 24, ['relu'], True],
}


@pytest.mark.slow
def test_t5x_model_includes_build_t5x_models():
  env = dict(os.environ, PYTHONPATH=rt.REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-c', _PROBE, *T5X_INCLUDES],
      cwd=rt.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  built = json.loads([l for l in proc.stdout.splitlines() if l.startswith('PROBE')][-1][5:])
  for name, expected in T5X_INCLUDES.items():
    assert built[name] == expected + [True], name  # every weight trained, as T5X's models


# --------------------------------------------------- 13. converting our own checkpoints


def test_convert_our_prompt_checkpoint_to_t5x_and_hugging_face(ckpts, tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(rt.REPO, 'scripts'))
  import convert_checkpoint  # pylint: disable=g-import-not-at-top

  prompt = np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)
  state = train_state.TrainState(
      step=jnp.asarray(6, jnp.int32),
      trainable={'encoder': {'prompt': {'prompt': {'prompt': jnp.asarray(prompt)}}}},
      frozen={},
      opt_state={'v': jnp.ones((2,), jnp.float32)},
  )
  ours = checkpoints.save_checkpoint(
      str(tmp_path / 'model'), state, extra_metadata={'initial_checkpoint_path': ckpts['t5_1_1']}
  )
  frozen = params_lib.flatten_params(t5x_format.load(ckpts['t5_1_1']))
  out = convert_checkpoint.convert(ours, str(tmp_path / 't5x' / 'checkpoint_6'), 't5x')
  converted = params_lib.flatten_params(t5x_format.load(out))
  assert t5x_format.read_step(out) == 6
  np.testing.assert_array_equal(converted[PROMPT], prompt)
  assert set(converted) == set(frozen) | {PROMPT}
  for name, value in frozen.items():
    np.testing.assert_array_equal(converted[name], value, err_msg=name)
  hf = convert_checkpoint.convert(
      str(tmp_path / 'model'), str(tmp_path / 'hf'), 'huggingface', config='tiny'
  )
  _, hf_params = huggingface.load_t5(hf)
  np.testing.assert_allclose(
      params_lib.flatten_params(hf_params)['encoder/layers_1/mlp/wo/kernel'],
      frozen['encoder/layers_1/mlp/wo/kernel'],
  )
  # Without a recorded backbone: one clear error asking for --backbone.
  orphan = checkpoints.save_checkpoint(str(tmp_path / 'orphan'), state)
  with pytest.raises(ValueError, match='--backbone=PATH'):
    convert_checkpoint.convert(orphan, str(tmp_path / 'x'), 't5x')
  assert convert_checkpoint.convert(
      orphan, str(tmp_path / 'y' / 'checkpoint_6'), 't5x', backbone=ckpts['t5_1_1']
  )


# ------------------------------------------------------------------------ 14. noise


def test_quiet_logging_keeps_our_lines_and_library_warnings_only():
  import logging  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  def record(path, level):
    return logging.LogRecord('absl', level, path, 1, 'm', (), None)

  keep = launch._QuietFilter().filter  # pylint: disable=protected-access
  ours = os.path.join(rt.REPO, 'prompt_tuning', 'runtime', 'train.py')
  site = os.path.join('venv', 'lib', 'site-packages')
  assert keep(record(ours, logging.INFO))
  assert not keep(record(os.path.join(site, 'seqio', 'dataset_providers.py'), logging.INFO))
  assert keep(record(os.path.join(site, 'seqio', 'dataset_providers.py'), logging.WARNING))
  assert not keep(record(os.path.join(site, 'orbax', 'checkpoint', 'future.py'), logging.ERROR))


class _Partitioner:

  def shard_host_batch(self, batch):
    return batch


def test_the_first_eta_leaves_out_the_compiling_step(monkeypatch, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import metrics  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  calls = []

  def step(state, batch, rng):
    del batch, rng
    calls.append(1)
    if len(calls) == 1:
      time.sleep(2.0)  # what compiling the step costs
    loss = metrics.AveragePerStep.from_value(jnp.float32(1.0)).finalize_step()
    return state.replace(step=state.step + 1), {'loss': loss}

  state = train_state.TrainState(step=jnp.int32(0), trainable={}, frozen={}, opt_state={})
  trainer = trainer_lib.Trainer(
      model=None,
      train_state=state,
      partitioner=_Partitioner(),
      eval_names=[],
      summary_dir=None,
      train_state_axes=None,
      rng=None,
      learning_rate_fn=lambda s: 0.1,
      log_period=4,
  )
  monkeypatch.setattr(trainer, '_get_train_step', lambda batch: step)
  caplog.set_level(logging.INFO, logger='absl')
  batches = iter([{'x': np.zeros((2, 3))}] * 8)
  trainer.train(batches, 8, start_step=0, total_steps=1000)
  etas = [r.getMessage() for r in caplog.records if 'ETA' in r.getMessage()]
  assert len(etas) == 2, etas
  # Counting the 2 s "compile", the first window would run 4 steps in >= 2 s: an ETA of at least
  # 996 / 2 s = 8m18s. Without it, steps 2-4 take next to no time.
  minutes, seconds = re.search(r'ETA (\d+)m(\d+)s', etas[0]).groups()
  assert int(minutes) * 60 + int(seconds) < 240, etas[0]
