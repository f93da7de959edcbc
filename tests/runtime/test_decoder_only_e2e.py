"""End to end, decoder-only: `configs/models/decoder_only_prompt.gin` (a prefix LM) through
`python -m prompt_tuning.train` and `prompt_tuning.eval` on the tiny seqio task.

The frozen backbone is a T5X checkpoint of a tiny decoder-only model; seqio's DecoderFeatureConverter
turns the task's inputs and targets into prefix-LM features, the prompt goes before the inputs, and
only the prompt (`decoder/prompt/prompt/prompt`) is trained.
"""

import json
import os

import numpy as np
import pytest

import runtime_testlib as rt
import tiny_task

pytestmark = pytest.mark.slow

GIN = ('test/tiny_decoder_only_prompt.gin',)
PROMPT_NPY = 'decoder.prompt.prompt.prompt.npy'
STEPS, PERIOD = 20, 10


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return rt.shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope='module')
def frozen(tmp_path_factory):
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  variables = t5.init_variables(t5.get_config('tiny'), jax.random.PRNGKey(1), decoder_only=True)
  root = tmp_path_factory.mktemp('frozen_lm')
  return t5x_format.save(str(root / 'checkpoint_0'), jax.device_get(variables['params']), 0)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, frozen, cache_dir):
  model_dir = str(tmp_path_factory.mktemp('lm') / 'model')
  bindings = rt.prompt_train_bindings(
      model_dir, frozen, steps=STEPS, period=PERIOD, eval_period=PERIOD
  )
  proc = rt.run(
      rt.entry_args('prompt_tuning.train', GIN + ('runs/prompt_finetune.gin',), bindings),
      rt.base_env(cache_dir),
      log_path=model_dir + '.log',
  )
  rt.check_ok(proc, 'training')
  return {'model_dir': model_dir, 'frozen': frozen}


def test_only_the_decoder_prompt_is_trained(trained):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = trained['model_dir']
  path = checkpoints.latest_checkpoint_path(model_dir)
  assert checkpoints.read_metadata(path)['trainable_paths'] == ['decoder/prompt/prompt/prompt']
  prompts = [
      np.load(os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{s}', PROMPT_NPY))
      for s in (PERIOD, STEPS)
  ]
  assert prompts[0].shape == (5, 32)
  assert not np.allclose(prompts[0], prompts[1])
  raw = checkpoints.restore_checkpoint(path)
  np.testing.assert_array_equal(
      raw['trainable']['decoder']['prompt']['prompt']['prompt'], prompts[1]
  )


def test_inference_eval_decodes_every_example_and_improves(trained):
  model_dir = trained['model_dir']
  metrics = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-metrics.jsonl'))
  assert [m['step'] for m in metrics] == [PERIOD, STEPS]
  assert metrics[1]['log_likelihood'] > metrics[0]['log_likelihood']
  rows = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-{STEPS:06d}.jsonl'))
  assert [r['input']['inputs_pretokenized'] for r in rows] == [
      e['inputs'] for e in tiny_task.examples('validation')
  ]
  assert all(isinstance(r['prediction'], str) for r in rows)


def test_eval_from_the_prompt_file_reproduces_training(tmp_path, trained, cache_dir):
  out = str(tmp_path / 'eval')
  prompt = os.path.join(
      trained['model_dir'], 'numpy_checkpoints', f'checkpoint_{STEPS}', PROMPT_NPY
  )
  bindings = rt.serve_bindings(trained['frozen'], prompt, 'EVAL_OUTPUT_DIR', out)
  proc = rt.run(
      rt.entry_args('prompt_tuning.eval', GIN + ('runs/prompt_eval.gin',), bindings),
      rt.base_env(cache_dir),
      log_path=out + '.log',
  )
  rt.check_ok(proc, 'evaluation')
  with open(os.path.join(out, 'metrics.json')) as f:
    metrics = json.load(f)[rt.TASK]
  trained_metrics = _jsonl(
      os.path.join(trained['model_dir'], 'inference_eval', f'{rt.TASK}-metrics.jsonl')
  )[-1]
  assert metrics['log_likelihood'] == pytest.approx(trained_metrics['log_likelihood'], rel=1e-5)
  trained_rows = _jsonl(
      os.path.join(trained['model_dir'], 'inference_eval', f'{rt.TASK}-{STEPS:06d}.jsonl')
  )
  eval_rows = _jsonl(os.path.join(out, 'inference_eval', f'{rt.TASK}-000000.jsonl'))
  assert [r['prediction'] for r in eval_rows] == [r['prediction'] for r in trained_rows]
