"""Shared helpers of the runtime's end-to-end tests (subprocess runs, TensorBoard reading, fixtures).

Subprocess runs put `tests/runtime` and `tests` on PYTHONPATH (so `tiny_task` is importable as
MIXTURE_OR_TASK_MODULE, and gin files can use `toy_methods`) and share a persistent JAX compilation cache, so repeated compilations of the
same tiny model are cheap.
"""

import contextlib
import glob
import os
import socket
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)  # `toy_methods` (test-only methods for the backbone's doors)
REPO = os.path.dirname(TESTS)
PYTHON = sys.executable

TASK = 'tiny_count'
TASK_MODULE = 'tiny_task'
LENGTHS = "{'inputs': 24, 'targets': 8}"

# XLA flags of every test process (pytest's and the subprocesses'): LLVM's optimization level 1
# instead of the default halves the backend compile time of the tiny models, which dominates the
# end-to-end tests (on 2 cores: 48 -> 25 s of compiling in two methods' train + eval). Level 0 is
# as quick but rounds differently: the fused layouts' check (1e-6 relative) saw 1.05e-6 with it.
# The benchmarks' tests drop it: they run what users run.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'

# Signs of an unhandled traceback from deep inside JAX / TF in a user-facing error.
RAW_TRACEBACK_MARKERS = ('Traceback (most recent call last)', 'jax._src', 'jaxlib')


def vocab_path() -> str:
  import seqio  # pylint: disable=g-import-not-at-top

  return os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
  )


def shared_cache_dir(tmp_path_factory) -> str:
  """A persistent JAX compilation cache shared by every subprocess of this test session (all xdist
  workers): the same tiny model compiled by another test file is then loaded, not compiled again."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  path = root / 'jax_compilation_cache'
  path.mkdir(exist_ok=True)
  return str(path)


def q(s: str) -> str:
  """A gin string literal."""
  return repr(str(s))


def base_env(cache_dir: Optional[str] = None, **extra: str) -> Dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [HERE, TESTS, REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
  )
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  env['CUDA_VISIBLE_DEVICES'] = ''
  env['XLA_FLAGS'] = TEST_XLA_FLAGS
  env.pop('PROMPT_TUNING_TRACEBACK', None)
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
    env['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(4 << 30)  # enables jax's file lock on cache writes
  env.update(extra)
  return env


def entry_args(
    module: str,
    gin_files: Sequence[str],
    bindings: Mapping[str, str],
    extra_flags: Sequence[str] = (),
) -> List[str]:
  args = [PYTHON, '-m', module]
  args += [f'--gin_file={g}' for g in gin_files]
  args += [f'--gin.{k}={v}' for k, v in bindings.items()]
  return args + list(extra_flags)


def run(
    args: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 300,
    log_path: Optional[str] = None,
) -> subprocess.CompletedProcess:
  proc = subprocess.run(
      list(args),
      env=dict(env),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=timeout,
      check=False,
  )
  if log_path:
    with open(log_path, 'w') as f:
      f.write(proc.stdout)
  return proc


def check_ok(proc: subprocess.CompletedProcess, what: str = 'run') -> None:
  assert (
      proc.returncode == 0
  ), f'{what} failed with exit code {proc.returncode}:\n{proc.stdout[-6000:]}'


def task_bindings(batch_size: int = 8, task: str = TASK) -> Dict[str, str]:
  """The task, its lengths, the batch size and the test vocabulary (every entry point needs them)."""
  return {
      'MIXTURE_OR_TASK_NAME': q(task),
      'MIXTURE_OR_TASK_MODULE': q(TASK_MODULE),
      'TASK_FEATURE_LENGTHS': LENGTHS,
      'BATCH_SIZE': str(batch_size),
      'seqio.SentencePieceVocabulary.sentencepiece_model_file': q(vocab_path()),
  }


def serve_bindings(
    frozen: str,
    prompt_file: str,
    output_macro: str,
    output_dir: str,
    *,
    task: str = TASK,
    batch_size: int = 8,
) -> Dict[str, str]:
  """Bindings of `prompt_tuning.eval` / `infer` (runs/prompt_eval.gin, runs/prompt_infer.gin): the frozen
  checkpoint plus a prompt file; `output_macro` is EVAL_OUTPUT_DIR or INFER_OUTPUT_DIR. The batch size
  of training (8) finds the compiled decoding step in the compilation cache."""
  return {
      'CHECKPOINT_PATH': q(frozen),
      'PROMPT_FILE': q(prompt_file),
      output_macro: q(output_dir),
      **task_bindings(batch_size, task),
  }


def prompt_train_bindings(
    model_dir: str,
    init_ckpt: Optional[str],
    *,
    steps: int = 6,
    period: int = 3,
    eval_period: int = 3,
    batch_size: int = 8,
    seed: Optional[int] = 0,
    eval_steps: int = 2,
    extra: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
  """Bindings of a tiny prompt-tuning run on `tiny_count` (use with test/tiny_prompt.gin + runs/prompt_finetune.gin)."""
  b = {
      'MODEL_DIR': q(model_dir),
      **task_bindings(batch_size),
      'TRAIN_STEPS': str(steps),
      'EVAL_PERIOD': str(eval_period),
      'EVAL_STEPS': str(eval_steps),
      'INITIAL_CHECKPOINT_PATH': q(init_ckpt) if init_ckpt else 'None',
      'utils.SaveCheckpointConfig.period': str(period),
      'utils.SaveCheckpointConfig.keep': 'None',
  }
  if seed is not None:
    b['RANDOM_SEED'] = str(seed)
  b.update(extra or {})
  return b


PROMPT_GIN = ('test/tiny_prompt.gin', 'runs/prompt_finetune.gin')
MODEL_TUNING_GIN = ('test/tiny_model_tuning.gin', 'runs/model_finetune.gin')


def model_tuning_bindings(
    model_dir: str,
    *,
    steps: int = 5,
    batch_size: int = 8,
    num_partitions: int = 1,
    seed: int = 0,
    extra: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
  """Bindings of a tiny model-tuning run (every parameter trained by plain Adafactor) from scratch."""
  b = {
      'MODEL_DIR': q(model_dir),
      **task_bindings(batch_size),
      'TRAIN_STEPS': str(steps),
      'EVAL_PERIOD': '0',
      'EVAL_STEPS': '0',
      'RANDOM_SEED': str(seed),
      'INITIAL_CHECKPOINT_PATH': 'None',
      'train.infer_eval_dataset_cfg': 'None',
      'partitioning.PjitPartitioner.num_partitions': str(num_partitions),
      'utils.SaveCheckpointConfig.period': str(steps),
      # One layer each way keeps the (8-device, SPMD-partitioned) compilations short.
      'NUM_ENCODER_LAYERS': '1',
      'NUM_DECODER_LAYERS': '1',
  }
  b.update(extra or {})
  return b


def tiny_backbone_params(seed: int = 1):
  """Random parameters of the tiny T5 1.1 backbone of configs/test/tiny_*.gin (no prompt)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  module = t5.EncoderDecoder(t5.get_config('tiny'))
  x = jnp.ones((2, 8), jnp.int32)
  variables = module.init(jax.random.PRNGKey(seed), x, x, x, enable_dropout=False)
  return jax.device_get(variables['params'])


def make_t5x_checkpoint(root: str, step: int = 0, seed: int = 1) -> str:
  """Writes a random tiny backbone as a T5X legacy checkpoint; returns `<root>/checkpoint_<step>`.

  Training from it starts at `step` (TRAIN_STEPS counts the checkpoint's steps, as in T5X); the
  prompt-tuning tests use step 0 so that TRAIN_STEPS is the number of steps they train.
  """
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  path = os.path.join(root, f'checkpoint_{step}')
  t5x_format.save(path, tiny_backbone_params(seed), step)
  return path


# ----------------------------------------------------------------------------------------- TensorBoard


def event_files(logdir: str) -> List[str]:
  """Event files directly under `logdir`, oldest first (a resumed run adds a newer one)."""
  return sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*')), key=os.path.getmtime)


def read_scalars(logdir: str, files: Optional[Sequence[str]] = None) -> Dict[str, Dict[int, float]]:
  """`{tag: {step: value}}` of every scalar in the event files under `logdir` (later files win)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out: Dict[str, Dict[int, float]] = {}
  for path in (event_files(logdir) if files is None else files):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('simple_value'):
          v = float(value.simple_value)
        elif value.HasField('tensor') and value.metadata.plugin_data.plugin_name in ('scalars', ''):
          arr = tf.make_ndarray(value.tensor)
          if arr.size != 1 or arr.dtype.kind not in 'fiu':
            continue
          v = float(arr.reshape(()))
        else:
          continue
        out.setdefault(value.tag, {})[int(event.step)] = v
  return out


def losses(model_dir: str, run: Optional[int] = None) -> Dict[int, float]:
  """Per-step training losses; `run=i` reads only the i-th event file (i-th (re)start of training)."""
  logdir = os.path.join(model_dir, 'train')
  files = None if run is None else [event_files(logdir)[run]]
  return read_scalars(logdir, files).get('loss', {})


def assert_losses_close(
    actual: Mapping[int, float],
    expected: Mapping[int, float],
    steps: Sequence[int],
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
  missing = [s for s in steps if s not in actual or s not in expected]
  assert (
      not missing
  ), f'no loss logged for steps {missing}: actual={dict(actual)} expected={dict(expected)}'
  a = np.array([actual[s] for s in steps])
  e = np.array([expected[s] for s in steps])
  np.testing.assert_allclose(
      a, e, rtol=rtol, atol=atol, err_msg=f'losses at steps {list(steps)} differ'
  )


# ----------------------------------------------------------------------------------------- misc


def free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Non-zero exit, one `ERROR:` message containing every needle (case-insensitive), no raw traceback."""
  out = proc.stdout
  assert proc.returncode != 0, f'expected a failure, got exit code 0:\n{out[-3000:]}'
  errors = [line for line in out.splitlines() if line.startswith('ERROR:')]
  assert len(errors) == 1, f'expected exactly one ERROR: line, got {errors}:\n{out[-4000:]}'
  tail = out[out.index(errors[0]) :]
  for needle in needles:
    assert needle.lower() in tail.lower(), f'{needle!r} not in the error message:\n{tail}'
  for marker in RAW_TRACEBACK_MARKERS:
    assert marker not in out, f'raw traceback marker {marker!r} in the output:\n{out[-4000:]}'
  return tail


def popen_logged(args: Sequence[str], env: Mapping[str, str], log_path: str) -> subprocess.Popen:
  """Starts `args` in the repository root with stdout+stderr going to `log_path`."""
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path, proc.log_file = log_path, log
  return proc


def finish_logged(proc: subprocess.Popen, timeout: float = 400) -> subprocess.CompletedProcess:
  """Waits for a `popen_logged` process (killing it past `timeout`) and returns its exit code and log."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.log_file.close()
  with open(proc.log_path) as f:
    return subprocess.CompletedProcess(proc.args, proc.returncode, f.read())
