"""Serving many tasks with one frozen model: a prompt bank through `python -m prompt_tuning.infer`.

Two prompts are stacked into a bank with `scripts/make_prompt_bank.py` and served with
`configs/prompts/bank_from_file.gin`; the task `tiny_count_mixed`
gives example i the prompt `i % 2`, so every batch mixes both. Each example's prediction and score
must equal those of serving it alone with its own prompt file (the reference: one `infer` run per
prompt over the same examples).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import runtime_testlib as rt

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(rt.REPO, 'scripts', 'make_prompt_bank.py')


def _infer(out, frozen, prompt_file, task, env, extra=None, gin_files=()):
  bindings = {
      **rt.serve_bindings(frozen, prompt_file, 'INFER_OUTPUT_DIR', out, task=task),
      'infer.mode': rt.q('predict_with_aux'),
      **(extra or {}),
  }
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.infer',
          ('test/tiny_prompt.gin', 'runs/prompt_infer.gin', *gin_files),
          bindings,
      ),
      env,
      log_path=out + '.log',
  )
  rt.check_ok(proc, f'inference into {out}')
  with open(os.path.join(out, f'{task}-validation.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp('bank')
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'))
  files = []
  for seed in (0, 1):
    path = str(root / f'prompt{seed}.npy')
    np.save(path, np.random.default_rng(seed).normal(0.0, 3.0, (5, 32)).astype(np.float32))
    files.append(path)
  bank = str(root / 'bank.npy')
  proc = subprocess.run(
      [sys.executable, SCRIPT, bank] + files, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr
  single = [_infer(str(root / f'single{i}'), frozen, files[i], rt.TASK, env) for i in (0, 1)]
  mixed = _infer(
      str(root / 'mixed'),
      frozen,
      bank,
      'tiny_count_mixed',
      env,
      {'NUM_PROMPTS': '2'},
      gin_files=('prompts/bank_from_file.gin',),
  )
  # The bank without its gin file: one clear error that says what to do.
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.infer',
          ('test/tiny_prompt.gin', 'runs/prompt_infer.gin'),
          rt.serve_bindings(
              frozen, bank, 'INFER_OUTPUT_DIR', str(root / 'x'), task='tiny_count_mixed'
          ),
      ),
      env,
  )
  rt.assert_clean_error(proc, 'bank of 2 prompts', 'prompts/bank_from_file.gin', 'NUM_PROMPTS=2')
  return {'single': single, 'mixed': mixed, 'files': files, 'bank': bank, 'root': root}


def test_mixed_batches_serve_each_example_with_its_own_prompt(served):
  single, mixed = served['single'], served['mixed']
  assert len(mixed) == len(single[0]) == len(single[1]) == 8
  for i, row in enumerate(mixed):
    own = single[i % 2][i]
    assert row['inputs'] == own['inputs']
    assert row['prediction'] == own['prediction'], i
    assert row['aux']['score'] == pytest.approx(own['aux']['score'], rel=1e-5, abs=1e-5)
  # The two prompts really serve differently (otherwise the check above would be empty).
  differ = [
      i
      for i in range(8)
      if single[0][i]['aux']['score'] != pytest.approx(single[1][i]['aux']['score'], rel=1e-3)
  ]
  assert len(differ) >= 6


def test_make_prompt_bank_stacks_in_order_and_never_overwrites(served):
  bank = np.load(served['bank'])
  assert bank.shape == (2, 5, 32)
  for i, path in enumerate(served['files']):
    np.testing.assert_array_equal(bank[i], np.load(path))
  before = os.path.getmtime(served['bank'])
  proc = subprocess.run(
      [sys.executable, SCRIPT, served['bank']] + served['files'][:1],
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 2 and '--overwrite' in proc.stderr
  assert os.path.getmtime(served['bank']) == before
  odd = str(served['root'] / 'odd.npy')
  np.save(odd, np.zeros((4, 32), np.float32))
  out = str(served['root'] / 'bad_bank.npy')
  proc = subprocess.run(
      [sys.executable, SCRIPT, out, served['files'][0], odd],
      capture_output=True,
      text=True,
      check=False,
  )
  assert proc.returncode == 2 and 'differs' in proc.stderr and 'PROMPT_LENGTH' in proc.stderr
  assert not os.path.exists(out) and not [p for p in os.listdir(served['root']) if '.tmp-' in p]


def test_training_a_bank_updates_only_the_prompts_of_its_tasks(tmp_path, tmp_path_factory):
  """Multi-task prompt training: a bank of 3 prompts on a mixture whose examples use prompts 0 and 1.
  Prompt 2 gets no gradient (it only decays by Adafactor's weight decay, 3e-6 a step); the saved
  `.npy` is the whole bank, ready for `prompts/bank_from_file.gin`."""
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  frozen = rt.make_t5x_checkpoint(str(tmp_path / 'frozen'))
  model_dir = str(tmp_path / 'model')
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=6,
      period=3,
      eval_period=3,
      extra={
          'MIXTURE_OR_TASK_NAME': rt.q('tiny_count_mixed'),
          'prompted.PromptEncoderDecoder.num_prompts': '3',
      },
  )
  proc = rt.run(
      rt.entry_args('prompt_tuning.train', rt.PROMPT_GIN, bindings),
      env,
      log_path=model_dir + '.log',
  )
  rt.check_ok(proc, 'training a prompt bank')
  banks = [
      np.load(
          os.path.join(
              model_dir, 'numpy_checkpoints', f'checkpoint_{s}', 'encoder.prompt.prompt.prompt.npy'
          )
      )
      for s in (3, 6)
  ]
  assert banks[0].shape == (3, 5, 32)
  change = [
      float(np.abs(banks[1][i] - banks[0][i]).max() / np.abs(banks[0][i]).max()) for i in range(3)
  ]
  assert change[0] > 1e-2 and change[1] > 1e-2, change
  assert change[2] < 1e-4, change
