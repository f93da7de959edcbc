"""The faults of issue 11 through the real entry points (`python -m prompt_tuning.train|eval|infer`).

Each scenario reproduces one fault on the tiny configs and checks the exit status, the one line the
user sees (no traceback) and that earlier checkpoints and files are intact. The scenarios run from
one module fixture, at most `PARALLEL` processes at a time (each holds TensorFlow and JAX, ~1 GiB);
they share the persistent compilation cache, so the tiny model compiles about once.
"""

import concurrent.futures
import dataclasses
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

pytestmark = pytest.mark.slow

PARALLEL = 3
DAMAGE = ('data', 'metadata', 'marker')
HOOKS = os.path.join(rt.HERE, 'train_with_hooks.py')
NOISE = ('orbax', 'oneDNN', 'cudart_stub', 'absl::InitializeLog')


def _train_args(model_dir, frozen, *, steps=6, period=2, extra=None, gin_files=rt.PROMPT_GIN):
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=steps,
      period=period,
      eval_period=0,
      eval_steps=0,
      extra={'train.infer_eval_dataset_cfg': 'None', **(extra or {})},
  )
  return rt.entry_args('prompt_tuning.train', gin_files, bindings)


def _hooked(args):
  """The same command through tests/runtime/train_with_hooks.py."""
  return [rt.PYTHON, HOOKS] + args[3:]


def _serve_args(module, frozen, prompt_file, out, task, *, bank=0, extra=None, flags=()):
  macro = 'EVAL_OUTPUT_DIR' if module == 'prompt_tuning.eval' else 'INFER_OUTPUT_DIR'
  run = 'runs/prompt_eval.gin' if module == 'prompt_tuning.eval' else 'runs/prompt_infer.gin'
  gins = ('test/tiny_prompt.gin', run) + (('prompts/bank_from_file.gin',) if bank else ())
  bindings = rt.serve_bindings(frozen, prompt_file, macro, out, task=task)
  if bank:
    bindings['NUM_PROMPTS'] = str(bank)
  bindings.update(extra or {})
  return rt.entry_args(module, gins, bindings, flags)


class _Runner:
  """Runs scenarios (callables) at most PARALLEL at a time; collects their results."""

  def __init__(self, root, env):
    self.root, self.env = root, env
    self.pool = concurrent.futures.ThreadPoolExecutor(PARALLEL)
    self.chains = concurrent.futures.ThreadPoolExecutor(1)  # scenarios that wait on the pool

  def start(self, name, args, env=None):
    return rt.popen_logged(args, env or self.env, os.path.join(self.root, f'{name}.log'))

  def run(self, name, args, env=None, timeout=400):
    return rt.finish_logged(self.start(name, args, env), timeout)


def _wait_for(predicate, proc, timeout=400):
  start = time.time()
  while time.time() - start < timeout and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _steps(model_dir):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  return checkpoints.all_steps(model_dir)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Checkpoints, prompt files and gin files the scenarios use; a runner of entry points."""
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp('faults'))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  out = {'root': root, 'env': env, 'runner': _Runner(root, env), 'files': {}}
  files = out['files']
  out['frozen'] = rt.make_t5x_checkpoint(os.path.join(root, 'frozen'))
  tiny = t5.get_config('tiny')
  for name, config in (
      ('t5_1_0', dataclasses.replace(tiny, mlp_activations=('relu',), logits_via_embedding=True)),
      ('wide', dataclasses.replace(tiny, emb_dim=64)),
  ):
    files[name] = os.path.join(root, name, 'checkpoint_0')
    t5x_format.save(files[name], _params_of(config), 0)
  files['hf'] = os.path.join(root, 'hf_truncated')
  huggingface.save_t5(files['hf'], tiny, _params_of(tiny))
  weights = os.path.join(files['hf'], 'model.safetensors')
  with open(weights, 'r+b') as f:
    f.truncate(os.path.getsize(weights) - 1000)

  rng = np.random.default_rng(0)
  prompts = [rng.normal(0.0, 3.0, (5, 32)).astype(np.float32) for _ in range(2)]
  for i, p in enumerate(prompts):
    files[f'prompt{i}'] = os.path.join(root, f'prompt{i}.npy')
    np.save(files[f'prompt{i}'], p)
  files['bank'] = os.path.join(root, 'bank.npy')
  np.save(files['bank'], np.stack(prompts))
  nan = prompts[0].copy()
  nan[2, 3] = np.nan
  files['nan'] = os.path.join(root, 'nan_prompt.npy')
  np.save(files['nan'], nan)
  files['text'] = os.path.join(root, 'text_prompt.npy')
  with open(files['text'], 'w') as f:
    f.write('0.1 0.2 0.3\n')
  files['typo_gin'] = os.path.join(root, 'typo.gin')
  with open(files['typo_gin'], 'w') as f:
    f.write('TRAIN_STEP = 5\n')
  files['t5x_gin'] = os.path.join(root, 't5x_names.gin')
  with open(files['t5x_gin'], 'w') as f:
    f.write(
        'from __gin__ import dynamic_registration\n'
        'import __main__ as train_script\n'
        'from prompt_tuning.runtime import partitioning\n'
        'train_script.train.partitioner = @partitioning.ModelBasedPjitPartitioner()\n'
        'partitioning.ModelBasedPjitPartitioner.num_partitions = 1\n'
    )
  files['a_file'] = os.path.join(root, 'a_file')
  with open(files['a_file'], 'w') as f:
    f.write('not a directory')
  yield out
  out['runner'].chains.shutdown()
  out['runner'].pool.shutdown()


def _run_all(runner, scenarios):
  futures = {k: runner.pool.submit(v) for k, v in scenarios.items()}
  return {k: f.result() for k, f in futures.items()}


def _errors_scenarios(setup):
  """Faults found before or at the first step: each run must end in one ERROR line.

  Returns the scenarios and a cleanup to call once they have all ended.
  """
  runner, frozen, files = setup['runner'], setup['frozen'], setup['files']
  md = lambda name: os.path.join(setup['root'], name)
  readonly = md('readonly')
  os.makedirs(readonly)
  # Root writes through permissions: for root the read-only MODEL_DIR is a read-only file system.
  mounted = os.geteuid() == 0 and _mount_readonly(readonly)
  if not mounted:
    os.chmod(readonly, 0o555)
  class_labels = {'CLASS_LABELS': "['one', 'two']"}
  scenarios = {
      'arch': lambda: runner.run('arch', _train_args(md('arch'), files['t5_1_0'])),
      'hf_damaged': lambda: runner.run('hf_damaged', _train_args(md('hf_damaged'), files['hf'])),
      'class_label_width': lambda: runner.run(
          'class_label_width',
          _train_args(
              md('class_label_width'),
              files['wide'],
              extra=class_labels,
              gin_files=(
                  'test/tiny_prompt.gin',
                  'prompts/from_class_labels.gin',
                  'runs/prompt_finetune.gin',
              ),
          ),
      ),
      'ids_train': lambda: runner.run(
          'ids_train',
          _train_args(
              md('ids_train'),
              frozen,
              extra={
                  'MIXTURE_OR_TASK_NAME': rt.q('tiny_bank_mix4'),
                  'prompted.PromptEncoderDecoder.num_prompts': '2',
              },
          ),
      ),
      'ids_infer': lambda: runner.run(
          'ids_infer',
          _serve_args(
              'prompt_tuning.infer',
              frozen,
              files['bank'],
              md('ids_infer'),
              'tiny_bank_mix4',
              bank=2,
          ),
      ),
      'nan_prompt': lambda: runner.run(
          'nan_prompt',
          _serve_args(
              'prompt_tuning.eval',
              frozen,
              files['nan'],
              md('nan_eval'),
              rt.TASK,
              extra={'MY_EXTRA_MACRO': '1'},
              flags=['--allow_unused_macros'],
          ),
      ),
      'text_npy': lambda: runner.run(
          'text_npy',
          _serve_args('prompt_tuning.infer', frozen, files['text'], md('text_infer'), rt.TASK),
      ),
      'macros': lambda: runner.run(
          'macros',
          _train_args(md('macros'), frozen, extra={'BATCHSIZE': '4'})
          + [f'--gin_file={files["typo_gin"]}'],
      ),
      'file_model_dir': lambda: runner.run('file_model_dir', _train_args(files['a_file'], frozen)),
      'readonly_model_dir': lambda: runner.run(
          'readonly_model_dir', _train_args(os.path.join(readonly, 'model'), frozen)
      ),
      'verbose': lambda: runner.run(
          'verbose',
          _train_args(md('verbose'), frozen, extra={'MIXTURE_OR_TASK_NAME': rt.q('tiny_cont')})
          + ['--verbose'],
      ),
  }

  def unmount():
    if mounted:
      subprocess.run(['umount', readonly], check=False)

  return scenarios, unmount


def _base_run(setup):
  """The run that `_trained_chain` damages: T5X's names (a user gin file with
  ModelBasedPjitPartitioner, the train_script scope)."""
  runner, files = setup['runner'], setup['files']
  model_dir = os.path.join(setup['root'], 'base')
  args = _train_args(model_dir, setup['frozen'], gin_files=rt.PROMPT_GIN + (files['t5x_gin'],))
  return lambda: runner.run('base', args + ['--gin.train_script.train.stats_period=None'])


def _trained_chain(setup, base):
  """The `_base_run` (a future of the pool); then copies of it with a damaged latest checkpoint,
  resumed. Runs outside the pool (it waits on runs of the pool)."""
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  runner, frozen = setup['runner'], setup['frozen']
  md = lambda name: os.path.join(setup['root'], name)
  out = {'base': base.result()}
  if out['base'].returncode != 0:
    return dict(out, root=setup['root'])

  def damaged(how):
    name = f'damaged_{how}'
    shutil.copytree(md('base'), md(name), ignore=shutil.ignore_patterns('prompt_tuning.lock'))
    path = os.path.join(md(name), 'checkpoint_6')
    if how == 'data':
      for sub in ('d', os.path.join('ocdbt.process_0', 'd')):
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    elif how == 'metadata':
      os.remove(os.path.join(path, '_METADATA'))
    else:
      os.remove(os.path.join(path, checkpoints.METADATA_FILE))
    return runner.run(name, _train_args(md(name), frozen, steps=8))

  out.update(_run_all(runner, {f'damaged_{h}': (lambda h=h: damaged(h)) for h in DAMAGE}))
  return dict(out, root=setup['root'])


def _during_training_scenarios(setup):
  """A full disk, Ctrl-C, SIGTERM and a second writer while training runs."""
  runner, frozen, env = setup['runner'], setup['frozen'], setup['env']
  md = lambda name: os.path.join(setup['root'], name)

  def enospc():
    args = _train_args(md('enospc'), frozen)
    first = runner.run('enospc', _hooked(args), env=dict(env, HOOK_ENOSPC_IN_SAVE='4'))
    listing = sorted(os.listdir(md('enospc')))
    again = runner.run('enospc_rerun', args)
    return first, listing, again

  def interrupted(name, sig):
    args = _train_args(md(name), frozen, steps=40, period=2)
    proc = runner.start(name, _hooked(args), env=dict(env, HOOK_STEP_DELAY='0.5'))
    _wait_for(lambda: 2 in _steps(md(name)), proc)
    time.sleep(1.2)
    proc.send_signal(sig)
    first = rt.finish_logged(proc, 200)
    steps = _steps(md(name))
    again = runner.run(f'{name}_rerun', args) if sig == signal.SIGTERM else None
    return first, steps, again

  def writers():
    # The holder runs 0.5 s a step for 200 s: long enough for a second run to start under load.
    args = _train_args(md('writers'), frozen, steps=400, period=10)
    holder = runner.start('writer_a', _hooked(args), env=dict(env, HOOK_STEP_DELAY='0.5'))
    _wait_for(lambda: 10 in _steps(md('writers')), holder)
    second = runner.run('writer_b', args)
    holder.send_signal(signal.SIGKILL)  # dies holding the lock
    first = rt.finish_logged(holder, 100)
    third = runner.run('writer_c', args)
    return holder.pid, first, second, third

  # The longest first (the holder of `writers` mostly sleeps; so do the interrupted runs).
  return {
      'writers': writers,
      'sigterm': lambda: interrupted('sigterm', signal.SIGTERM),
      'sigint': lambda: interrupted('sigint', signal.SIGINT),
      'enospc': enospc,
  }


def _mixed_scenarios(setup):
  """A prompt bank evaluated and served over a mixture; one prompt served alone for reference."""
  runner, frozen, files = setup['runner'], setup['frozen'], setup['files']
  md = lambda name: os.path.join(setup['root'], name)
  extra = {'infer.mode': rt.q('predict_with_aux')}
  scenarios = {
      'mixed_eval': lambda: runner.run(
          'mixed_eval',
          _serve_args(
              'prompt_tuning.eval',
              frozen,
              files['bank'],
              md('mixed_eval'),
              'tiny_bank_mix',
              bank=2,
              extra={'TASK_FEATURE_LENGTHS': 'None'},
          ),
      ),
      'mixed_infer': lambda: runner.run(
          'mixed_infer',
          _serve_args(
              'prompt_tuning.infer',
              frozen,
              files['bank'],
              md('mixed_infer'),
              'tiny_bank_mix',
              bank=2,
              extra=extra,
          ),
      ),
      'single_infer': lambda: runner.run(
          'single_infer',
          _serve_args(
              'prompt_tuning.infer',
              frozen,
              files['prompt1'],
              md('single_infer'),
              rt.TASK,
              extra=extra,
          ),
      ),
  }
  return scenarios


@pytest.fixture(scope='module')
def started(setup):
  """Every scenario of the module, started at once (at most PARALLEL at a time, in this order):
  no fixture waits for the last scenarios of another before its own start, so the processors
  stay busy. The fixtures below wait for their own scenarios."""
  runner = setup['runner']
  submit = lambda scenarios: {k: runner.pool.submit(v) for k, v in scenarios.items()}
  trained_future = runner.chains.submit(_trained_chain, setup, runner.pool.submit(_base_run(setup)))
  out = {'trained': trained_future}
  unmount = lambda: None
  try:
    out['during_training'] = submit(_during_training_scenarios(setup))
    error_scenarios, unmount = _errors_scenarios(setup)
    out['errors'] = submit(error_scenarios)
    out['mixed'] = submit(_mixed_scenarios(setup))
    yield out
  finally:
    pending = [trained_future] + [f for k in out if k != 'trained' for f in out[k].values()]
    concurrent.futures.wait(pending)
    unmount()


def _results(futures):
  return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope='module')
def errors(setup, started):
  return dict(_results(started['errors']), root=setup['root'], files=setup['files'])


@pytest.fixture(scope='module')
def trained(started):
  return started['trained'].result()


@pytest.fixture(scope='module')
def during_training(setup, started):
  return dict(_results(started['during_training']), root=setup['root'])


@pytest.fixture(scope='module')
def mixed(setup, started):
  return dict(_results(started['mixed']), root=setup['root'])


def _mount_readonly(path):
  if sys.platform != 'linux' or not shutil.which('mount'):
    return False
  proc = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', path], capture_output=True, check=False
  )
  return proc.returncode == 0


def _params_of(config):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  x = jnp.ones((2, 8), jnp.int32)
  return jax.device_get(
      t5.EncoderDecoder(config).init(jax.random.PRNGKey(1), x, x, x, enable_dropout=False)['params']
  )


def _no_traceback(out):
  for marker in rt.RAW_TRACEBACK_MARKERS:
    assert marker not in out, f'raw traceback marker {marker!r} in the output:\n{out[-4000:]}'


# ------------------------------------------------------------------------------ silent wrong results


def test_1_checkpoint_of_another_architecture_stops_before_training(errors):
  rt.assert_clean_error(
      errors['arch'],
      'CheckpointMismatchError',
      'T5 1.0 vs 1.1',
      'decoder/logits_dense/kernel',
      'allow_partial_frozen',
  )
  assert not os.path.exists(os.path.join(errors['root'], 'arch', 'checkpoint_2'))


def test_2_out_of_range_prompt_ids_name_the_task_the_id_and_the_bank_size(errors):
  for name in ('ids_train', 'ids_infer'):
    rt.assert_clean_error(
        errors[name],
        'ConditioningFeatureError',
        "prompt_ids 2 of task 'tiny_count_p2' is out of range",
        'the prompt bank has 2 prompts',
    )
  assert 'tiny_count_p3' in errors['ids_train'].stdout  # the other task with bad ids is named too
  assert not os.path.exists(os.path.join(errors['root'], 'ids_train', 'checkpoint_2'))
  assert not [n for n in os.listdir(os.path.join(errors['root'], 'ids_infer')) if 'jsonl' in n]


def test_3_a_prompt_file_with_nan_is_refused(errors):
  rt.assert_clean_error(
      errors['nan_prompt'], 'PromptFileError', errors['files']['nan'], '1 NaN and 0 infinite'
  )
  # --allow_unused_macros let the extra macro through (the error is the prompt file's).
  assert 'MY_EXTRA_MACRO' not in errors['nan_prompt'].stdout.split('ERROR:')[-1]


def test_4_typod_macros_are_an_error_with_the_closest_names(errors):
  proc = errors['macros']
  assert proc.returncode == 2
  tail = rt.assert_clean_error(
      proc, 'BATCHSIZE, set on the command line', 'BATCH_SIZE', 'TRAIN_STEP, set in a gin file'
  )
  assert 'TRAIN_STEPS' in tail and '--allow_unused_macros' in tail
  assert not os.path.exists(os.path.join(errors['root'], 'macros'))


def test_5_a_bank_evaluates_a_mixture_in_mixed_batches(mixed):
  proc = mixed['mixed_eval']
  rt.check_ok(proc, 'bank eval over a mixture')
  assert 'Evaluating 2 tasks in mixed batches' in proc.stdout
  assert 'at step -1' not in proc.stdout and 'tiny_count_p0/accuracy at step 0' in proc.stdout
  with open(os.path.join(mixed['root'], 'mixed_eval', 'metrics.json')) as f:
    assert set(json.load(f)) == {'tiny_count_p0', 'tiny_count_p1'}


def test_5_mixed_batches_give_each_example_its_own_prompt(mixed):
  rt.check_ok(mixed['mixed_infer'], 'bank infer over a mixture')
  rt.check_ok(mixed['single_infer'], 'single-prompt infer')
  assert 'Ran 2 tasks in mixed batches' in mixed['mixed_infer'].stdout

  def rows(name, task):
    with open(os.path.join(mixed['root'], name, f'{task}-validation.jsonl')) as f:
      return [json.loads(line) for line in f if line.strip()]

  got, want = rows('mixed_infer', 'tiny_count_p1'), rows('single_infer', rt.TASK)
  assert [r['inputs'] for r in got] == [r['inputs'] for r in want]
  assert [r['prediction'] for r in got] == [r['prediction'] for r in want]
  np.testing.assert_allclose(
      [r['aux']['score'] for r in got], [r['aux']['score'] for r in want], rtol=1e-5, atol=1e-5
  )
  assert len(rows('mixed_infer', 'tiny_count_p0')) == 8


@pytest.mark.parametrize('how', DAMAGE)
def test_6_a_damaged_latest_checkpoint_is_moved_aside_and_resume_goes_on(trained, how):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  rt.check_ok(trained['base'], 'the training run that is damaged')
  proc = trained[f'damaged_{how}']
  rt.check_ok(proc, f'resume past damaged ({how}) checkpoint_6')
  model_dir = os.path.join(trained['root'], f'damaged_{how}')
  damaged = os.path.join(model_dir, 'checkpoint_6')
  assert f'Checkpoint {damaged} is damaged' in proc.stdout
  assert f'Resuming from {os.path.join(model_dir, "checkpoint_4")}' in proc.stdout
  assert os.path.isdir(damaged + '.damaged')  # moved aside, not deleted
  assert checkpoints.all_steps(model_dir) == [2, 4, 6, 8]
  assert 'Event loop is closed' not in proc.stdout
  _no_traceback(proc.stdout)


def test_7_a_full_disk_during_a_save_is_one_line_and_the_rerun_is_clean(during_training):
  first, listing, again = during_training['enospc']
  model_dir = os.path.join(during_training['root'], 'enospc')
  tail = rt.assert_clean_error(
      first,
      'CheckpointWriteError',
      f'no space left on device writing checkpoint_4 in {model_dir}',
      'checkpoints up to step 2 are intact',
  )
  assert len(tail.splitlines()) <= 3
  assert not [n for n in listing if 'tmp' in n], listing
  rt.check_ok(again, 'rerun after the full disk')
  assert f'Resuming from {os.path.join(model_dir, "checkpoint_2")}' in again.stdout
  assert _steps(model_dir) == [2, 4, 6]


def test_8_model_dir_must_be_a_writable_directory(errors):
  rt.assert_clean_error(errors['file_model_dir'], 'is a file, not a directory', 'MODEL_DIR')
  with open(errors['files']['a_file']) as f:
    assert f.read() == 'not a directory'
  proc = errors['readonly_model_dir']
  tail = rt.assert_clean_error(proc, 'MODEL_DIR', 'is not writable')
  assert 'permission denied' in tail or 'read-only file system' in tail
  assert 'Trainable parameters' not in proc.stdout  # before any work


def test_9_damaged_inputs_are_named(errors):
  proc = errors['text_npy']
  rt.assert_clean_error(proc, errors['files']['text'], 'damaged or not a .npy array file')
  assert 'allow_pickle' not in proc.stdout
  rt.assert_clean_error(
      errors['hf_damaged'],
      'DamagedFileError',
      os.path.join(errors['files']['hf'], 'model.safetensors'),
      'is damaged (truncated',
  )
  rt.assert_clean_error(
      errors['class_label_width'],
      f'checkpoint {errors["files"]["wide"]} is of a model with d_model 64',
      'the model being built has d_model 32',
  )


def test_10_ctrl_c_ends_in_one_line(during_training):
  proc, steps, _ = during_training['sigint']
  assert proc.returncode == 130, proc.stdout[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('interrupted (Ctrl-C) at step')]
  assert len(lines) == 1, proc.stdout[-3000:]
  step = int(re.search(r'at step (\d+)', lines[0]).group(1))
  assert step >= 2 and f'last complete checkpoint {steps[-1]}' in lines[0]
  assert 'rerun the same command to resume' in lines[0]
  _no_traceback(proc.stdout)
  assert 'KeyboardInterrupt' not in proc.stdout


def test_10_sigterm_saves_the_current_step_then_resumes_from_it(during_training):
  proc, steps, again = during_training['sigterm']
  assert proc.returncode == 143, proc.stdout[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('terminated (SIGTERM) at step')]
  assert len(lines) == 1, proc.stdout[-3000:]
  step = int(re.search(r'at step (\d+)', lines[0]).group(1))
  assert step > 2 and steps[-1] == step, (lines, steps)  # the step it stopped at was saved
  assert f'last complete checkpoint {step}' in lines[0]
  _no_traceback(proc.stdout)
  rt.check_ok(again, 'rerun after SIGTERM')
  model_dir = os.path.join(during_training['root'], 'sigterm')
  assert f'Resuming from {os.path.join(model_dir, f"checkpoint_{step}")}' in again.stdout
  assert _steps(model_dir)[-1] == 40


def test_11_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(during_training):
  pid, first, second, third = during_training['writers']
  assert first.returncode == -signal.SIGKILL, first.stdout[-3000:]
  rt.assert_clean_error(second, 'ModelDirInUseError', f'pid {pid} on host', 'started')
  assert 'Trainable parameters' not in second.stdout  # refused before any work
  rt.check_ok(third, 'the run after the holder died')
  assert f'no longer running (pid {pid} on host' in third.stdout
  assert 'taking the lock over' in third.stdout
  assert _steps(os.path.join(during_training['root'], 'writers'))[-1] == 400


def test_12_t5x_names_train_and_14_the_output_is_quiet(trained):
  proc = trained['base']
  rt.check_ok(proc, 'training with T5X names')
  assert _steps(os.path.join(trained['root'], 'base')) == [2, 4, 6]
  for noise in NOISE:
    assert noise not in proc.stdout, f'{noise!r} in the output:\n{proc.stdout[-3000:]}'
  # INFO lines are this project's only (library warnings, e.g. seqio's, stay).
  info = [l for l in proc.stdout.splitlines() if re.match(r'^I\d{4} ', l)]
  ours = r' (train|trainer|checkpoints|t5x_format)\.py:\d+\]'
  assert info and not [l for l in info if not re.search(ours, l)]
  assert proc.stdout.count('Saved checkpoint') == 3
  assert len(re.findall(r'step \d+/6: loss=', proc.stdout)) == 3


def test_14_verbose_shows_the_traceback(errors):
  proc = errors['verbose']
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stdout
  assert "Unknown seqio task or mixture 'tiny_cont'" in proc.stdout
