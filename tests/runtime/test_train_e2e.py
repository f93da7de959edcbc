"""End to end: `python -m prompt_tuning.train|eval|infer` on a tiny seqio task with the shipped gin files.

One training run (module fixture) of a prompt on a frozen tiny backbone stored as a T5X legacy
checkpoint (so INITIAL_CHECKPOINT_PATH goes through the T5X reader, and assignment_map +
fallback_to_scratch initialize the prompt), then evaluation and inference from the saved `.npy` prompt
plus the frozen checkpoint.
"""

import json
import os

import numpy as np
import pytest

import runtime_testlib as rt
import tiny_task

pytestmark = pytest.mark.slow

PROMPT_NPY = 'encoder.prompt.prompt.prompt.npy'
STEPS, PERIOD = 6, 3


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return rt.shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope='module')
def frozen(tmp_path_factory):
  return rt.make_t5x_checkpoint(str(tmp_path_factory.mktemp('frozen')))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, frozen, cache_dir):
  model_dir = str(tmp_path_factory.mktemp('e2e') / 'model')
  bindings = rt.prompt_train_bindings(
      model_dir, frozen, steps=STEPS, period=PERIOD, eval_period=PERIOD
  )
  del bindings['utils.SaveCheckpointConfig.keep']  # runs/prompt_finetune.gin's keep = 1
  proc = rt.run(
      rt.entry_args('prompt_tuning.train', rt.PROMPT_GIN, bindings),
      rt.base_env(cache_dir),
      log_path=model_dir + '.log',
  )
  rt.check_ok(proc, 'training')
  return {'model_dir': model_dir, 'frozen': frozen, 'log': proc.stdout}


def _prompt_file(model_dir, step):
  return os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}', PROMPT_NPY)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_checkpoints_prompts_and_config_are_written(trained):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = trained['model_dir']
  assert os.path.isfile(os.path.join(model_dir, 'config.gin'))
  with open(os.path.join(model_dir, 'config.gin')) as f:
    config = f.read()
  assert 'tiny_count' in config and 'PjitPartitioner' in config
  # keep = 1: only the last checkpoint stays; every save wrote its prompt.
  assert checkpoints.all_steps(model_dir) == [STEPS]
  assert checkpoints.latest_checkpoint_path(model_dir) == os.path.join(
      model_dir, f'checkpoint_{STEPS}'
  )
  prompts = [np.load(_prompt_file(model_dir, s)) for s in (PERIOD, STEPS)]
  for p in prompts:
    assert p.shape == (5, 32) and p.dtype == np.float32 and np.all(np.isfinite(p))
  assert not np.allclose(prompts[0], prompts[1]), 'the prompt did not change between checkpoints'
  # The saved prompt is the checkpoint's trainable parameter.
  raw = checkpoints.restore_checkpoint(checkpoints.latest_checkpoint_path(model_dir))
  np.testing.assert_array_equal(
      raw['trainable']['encoder']['prompt']['prompt']['prompt'], prompts[1]
  )
  assert int(raw['step']) == STEPS


def test_only_the_prompt_is_trained(trained):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  path = checkpoints.latest_checkpoint_path(trained['model_dir'])
  meta = checkpoints.read_metadata(path)
  assert meta['trainable_paths'] == ['encoder/prompt/prompt/prompt']
  assert meta['initial_checkpoint_path'] == trained['frozen']
  raw = checkpoints.restore_checkpoint(path)
  assert list(train_state.flatten(raw['trainable'])) == ['encoder/prompt/prompt/prompt']
  # Optimizer state exists only for the prompt.
  opt_paths = [p for p in train_state.flatten(raw['opt_state']) if 'param_states' in p]
  assert opt_paths and all('prompt' in p for p in opt_paths), opt_paths
  assert 'Trainable parameters: 160 of' in trained['log']


def test_tensorboard_summaries(trained):
  model_dir = trained['model_dir']
  train = rt.read_scalars(os.path.join(model_dir, 'train'))
  assert sorted(train['loss']) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) and v > 0 for v in train['loss'].values())
  for tag in ('accuracy', 'learning_rate', 'timing/steps_per_second'):
    assert tag in train, sorted(train)
  assert train['learning_rate'][1] == pytest.approx(0.3)
  train_eval = rt.read_scalars(os.path.join(model_dir, 'training_eval', rt.TASK))
  assert sorted(train_eval['loss']) == [PERIOD, STEPS]
  infer_eval = rt.read_scalars(os.path.join(model_dir, 'inference_eval', rt.TASK))
  assert sorted(infer_eval['eval/accuracy']) == [PERIOD, STEPS]
  assert sorted(infer_eval['eval/log_likelihood']) == [PERIOD, STEPS]


def test_inference_eval_through_seqio_evaluator(trained):
  model_dir = trained['model_dir']
  metrics = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-metrics.jsonl'))
  assert [m['step'] for m in metrics] == [PERIOD, STEPS]
  for m in metrics:
    assert 0.0 <= m['accuracy'] <= 100.0 and m['log_likelihood'] < 0
  # Training improves the likelihood of the validation targets.
  assert metrics[1]['log_likelihood'] > metrics[0]['log_likelihood']
  rows = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-{STEPS:06d}.jsonl'))
  assert [r['input']['inputs_pretokenized'] for r in rows] == [
      e['inputs'] for e in tiny_task.examples('validation')
  ]


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, trained, cache_dir):
  out = str(tmp_path_factory.mktemp('eval') / 'out')
  bindings = rt.serve_bindings(
      trained['frozen'], _prompt_file(trained['model_dir'], STEPS), 'EVAL_OUTPUT_DIR', out
  )
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.eval', ('test/tiny_prompt.gin', 'runs/prompt_eval.gin'), bindings
      ),
      rt.base_env(cache_dir),
      log_path=out + '.log',
  )
  rt.check_ok(proc, 'evaluation')
  return out


def test_eval_reproduces_training_metrics(trained, evaluated):
  with open(os.path.join(evaluated, 'metrics.json')) as f:
    metrics = json.load(f)[rt.TASK]
  train_metrics = _jsonl(
      os.path.join(trained['model_dir'], 'inference_eval', f'{rt.TASK}-metrics.jsonl')
  )[-1]
  assert metrics['accuracy'] == pytest.approx(train_metrics['accuracy'])
  assert metrics['log_likelihood'] == pytest.approx(
      train_metrics['log_likelihood'], rel=1e-5, abs=1e-5
  )
  # Same decodes, example by example.
  train_rows = _jsonl(
      os.path.join(trained['model_dir'], 'inference_eval', f'{rt.TASK}-{STEPS:06d}.jsonl')
  )
  eval_rows = _jsonl(os.path.join(evaluated, 'inference_eval', f'{rt.TASK}-000000.jsonl'))
  assert [r['prediction'] for r in eval_rows] == [r['prediction'] for r in train_rows]


def test_infer_writes_predictions_with_inputs(tmp_path, trained, evaluated, cache_dir):
  out = str(tmp_path / 'infer')
  bindings = rt.serve_bindings(
      trained['frozen'], _prompt_file(trained['model_dir'], STEPS), 'INFER_OUTPUT_DIR', out
  )
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.infer', ('test/tiny_prompt.gin', 'runs/prompt_infer.gin'), bindings
      ),
      rt.base_env(cache_dir),
      log_path=out + '.log',
  )
  rt.check_ok(proc, 'inference')
  rows = _jsonl(os.path.join(out, f'{rt.TASK}-validation.jsonl'))
  expected = tiny_task.examples('validation')
  assert [r['inputs'] for r in rows] == [e['inputs'] for e in expected]
  assert [r['targets'] for r in rows] == [e['targets'] for e in expected]
  eval_rows = _jsonl(os.path.join(evaluated, 'inference_eval', f'{rt.TASK}-000000.jsonl'))
  assert [r['prediction'] for r in rows] == [r['prediction'] for r in eval_rows]
