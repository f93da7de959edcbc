"""The prompt library from gin: a training run adds its best prompt, eval reads `library:NAME`.

A tiny prompt-tuning run with `runs/add_to_library.gin` (`LIBRARY_SELECT = 'best'`) must add the
saved prompt of the evaluation step with the highest accuracy (recomputed here from the run's seqio
JSON logs) with its metadata; `prompts/from_library.gin` must then reproduce that step's accuracy in
`python -m prompt_tuning.eval`; and a library prompt evaluated on another backbone must stop with one
clear error naming both backbones.
"""

import json
import os

import numpy as np
import pytest

import runtime_testlib as rt
from prompt_tuning import library

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('library_runs')
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'), seed=1)
  other = rt.make_t5x_checkpoint(str(root / 'other'), seed=2)
  lib_dir = str(root / 'lib')
  model_dir = str(root / 'run')
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=6,
      period=2,
      eval_period=2,
      extra={
          'LIBRARY_DIR': rt.q(lib_dir),
          'LIBRARY_ENTRY_NAME': rt.q('tiny_a'),
          'LIBRARY_SELECT': rt.q('best'),
          'LIBRARY_METRIC': rt.q('accuracy'),
          'utils.create_learning_rate_scheduler.base_learning_rate': '1.0',
      },
  )
  proc = rt.run(
      rt.entry_args('prompt_tuning.train', (*rt.PROMPT_GIN, 'runs/add_to_library.gin'), bindings),
      env,
      log_path=str(root / 'train.log'),
  )
  rt.check_ok(proc, 'training with add_to_library.gin')
  return {
      'root': root,
      'env': env,
      'frozen': frozen,
      'other': other,
      'lib': lib_dir,
      'model_dir': model_dir,
  }


def test_training_adds_the_best_saved_prompt_with_its_metadata(run):
  entry = library.Library(run['lib']).get('tiny_a', backbone=run['frozen'])
  with open(os.path.join(run['model_dir'], 'inference_eval', f'{rt.TASK}-metrics.jsonl')) as f:
    history = {r['step']: r['accuracy'] for r in map(json.loads, f) if 'accuracy' in r}
  saved = [s for s in history if s in (2, 4, 6)]
  best = max(sorted(saved), key=lambda s: history[s])
  assert entry.metadata['steps'] == best
  assert entry.metadata['metrics'][f'{rt.TASK}/accuracy'] == history[best]
  expected = np.load(
      os.path.join(
          run['model_dir'],
          'numpy_checkpoints',
          f'checkpoint_{best}',
          'encoder.prompt.prompt.prompt.npy',
      )
  )
  np.testing.assert_array_equal(entry.array, expected)
  assert entry.metadata['task'] == rt.TASK and entry.metadata['selected'] == 'best'
  assert entry.metadata['backbone_source'] == run['frozen']
  assert 'AddToLibrary' in entry.metadata['gin'] and entry.metadata['length'] == 5


def test_eval_from_library_reproduces_the_recorded_metric(run):
  out = str(run['root'] / 'eval')
  bindings = {
      **rt.serve_bindings(run['frozen'], 'unused.npy', 'EVAL_OUTPUT_DIR', out),
      'LIBRARY_DIR': rt.q(run['lib']),
      'PROMPT_NAME': rt.q('tiny_a'),
  }
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.eval',
          ('test/tiny_prompt.gin', 'runs/prompt_eval.gin', 'prompts/from_library.gin'),
          bindings,
      ),
      run['env'],
      log_path=out + '.log',
  )
  rt.check_ok(proc, 'eval with prompts/from_library.gin')
  with open(os.path.join(out, 'metrics.json')) as f:
    metrics = json.load(f)[rt.TASK]
  entry = library.Library(run['lib']).info('tiny_a')
  assert metrics['accuracy'] == entry.metadata['metrics'][f'{rt.TASK}/accuracy']


def test_a_prompt_of_another_backbone_is_refused(run):
  out = str(run['root'] / 'eval_other')
  bindings = {
      **rt.serve_bindings(run['other'], 'library:tiny_a', 'EVAL_OUTPUT_DIR', out),
      'LIBRARY_DIR': rt.q(run['lib']),
  }
  proc = rt.run(
      rt.entry_args(
          'prompt_tuning.eval', ('test/tiny_prompt.gin', 'runs/prompt_eval.gin'), bindings
      ),
      run['env'],
  )
  rt.assert_clean_error(
      proc,
      'tiny_a',
      str(library.backbone_fingerprint(run['frozen'])),
      str(library.backbone_fingerprint(run['other'])),
  )
