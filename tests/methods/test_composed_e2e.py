"""Every composed method end to end through the entry points, on a toy mixture of 3 tasks x 2
languages (`composed_tasks.py`), from its gin file in `configs/methods/`:

1. `prompt_tuning.train` is SIGKILLed inside the checkpoint write of step 4 (checkpoint 2 is the
   last complete one); the same command again resumes from step 2 and retrains steps 3 and 4 with
   exactly the losses of the killed run (same batches, same restored parameters and optimizer
   state), then trains to step 6 and runs the final inference evaluation on the mixture (one task
   per batch).
2. The task row no example uses (task 3 of 4) kept its value in the exported `.npy` (up to
   Adafactor's weight decay), while the used rows moved.
3. `prompt_tuning.infer` serves the run from its saved artifacts (the frozen checkpoint plus
   `methods/from_params_dir.gin` on `numpy_checkpoints/checkpoint_6`) on `composed_interleaved`,
   whose batches mix all tasks and languages (`mode='score'`): each example's target
   log-likelihood equals the one the training run's evaluation computed for it in its single-task
   batch. The four methods' runs are served one after the other in one process
   (`run_methods_e2e.py`: what `python -m prompt_tuning.infer` runs, the imports paid once).
4. ATTEMPT is served in `mode='predict_with_aux'`: the same predictions as the training run's
   evaluation, and each example's mixture weights in the JSONL equal a float64 numpy computation
   from the artifacts.
"""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runtime')
)
import composed_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
import runtime_testlib as rt  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
HOOKS = os.path.join(rt.HERE, 'train_with_hooks.py')
STEPS, PERIOD, KILL_AT = 6, 2, 4
NPY = 'encoder.prompt.prompt.{}.npy'

METHODS = {
    'multitask': (
        'methods/multitask.gin',
        {'NUM_TASKS': '4', 'MULTITASK_MODE': "'concat'", 'PROMPT_LENGTH': '2'},
        'task_prompts.embedding',
    ),
    'factorized': (
        'methods/factorized.gin',
        {'NUM_LANGS': '2', 'NUM_TASKS': '4', 'LANG_PROMPT_LENGTH': '2', 'TASK_PROMPT_LENGTH': '2'},
        'task_prompts.embedding',
    ),
    'mpt': (
        'methods/mpt.gin',
        {'NUM_TASKS': '4', 'MPT_RANK': '2', 'PROMPT_LENGTH': '4'},
        'prefix_task_rows',
    ),
    'attempt': (
        'methods/attempt.gin',
        {'NUM_SOURCES': '2', 'NUM_TARGETS': '4', 'ATTEMPT_BOTTLENECK': '8', 'PROMPT_LENGTH': '4'},
        'target_prompt',
    ),
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('composed')
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  env['PYTHONPATH'] = HERE + os.pathsep + env['PYTHONPATH']
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'))
  sources = []
  for i in range(2):  # ATTEMPT's frozen source prompts
    sources.append(str(root / f'source{i}.npy'))
    np.save(sources[-1], np.random.default_rng(i).normal(0, 2.0, (4, 32)).astype(np.float32))
  return {'root': root, 'env': env, 'frozen': frozen, 'sources': sources}


def _method_bindings(method, setup):
  _, bindings, _ = METHODS[method]
  bindings = dict(bindings)
  if method == 'attempt':
    bindings['ATTEMPT_SOURCE_FILES'] = repr(setup['sources'])
  return bindings


def _npy(model_dir, step, name):
  return np.load(
      os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}', NPY.format(name))
  )


def _train_eval_rows(model_dir):
  """The training run's final inference-eval rows, per task-language pair, in example order."""
  out = {}
  for t, l in composed_tasks.PAIRS:
    path = os.path.join(
        model_dir, 'inference_eval', f'{composed_tasks.task_name(t, l)}-{STEPS:06d}.jsonl'
    )
    with open(path) as f:
      out[(t, l)] = [json.loads(line) for line in f if line.strip()]
  return out


def _infer_stage(method, setup, model_dir, out_dir):
  """The `prompt_tuning.infer` command's gin files and bindings, for `run_methods_e2e.py`."""
  gin, _, _ = METHODS[method]
  bindings = {
      'CHECKPOINT_PATH': rt.q(setup['frozen']),
      'PARAMS_DIR': rt.q(os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{STEPS}')),
      'INFER_OUTPUT_DIR': rt.q(out_dir),
      **rt.task_bindings(8, 'composed_interleaved'),
      'MIXTURE_OR_TASK_MODULE': rt.q('composed_tasks'),
      'infer.mode': rt.q(_mode(method)),
      **_method_bindings(method, setup),
  }
  files = ['test/tiny_prompt.gin', gin, 'runs/prompt_infer.gin', 'methods/from_params_dir.gin']
  return [files, [f'{k} = {v}' for k, v in bindings.items()]]


def _mode(method):
  return 'predict_with_aux' if method == 'attempt' else 'score'


@pytest.fixture(scope='module')
def runs(setup):
  """Each method trained, killed in a save and resumed (2 processes each); then every method's
  run served from its artifacts by `prompt_tuning.infer`, all in one `run_methods_e2e.py`
  process (the imports paid once)."""
  out, spec = {}, []
  for method in METHODS:
    gin, _, _ = METHODS[method]
    model_dir = str(setup['root'] / method)
    bindings = rt.prompt_train_bindings(
        model_dir,
        setup['frozen'],
        steps=STEPS,
        period=PERIOD,
        eval_period=0,
        eval_steps=0,
        extra={
            'MIXTURE_OR_TASK_NAME': rt.q('composed_mixture'),
            'MIXTURE_OR_TASK_MODULE': rt.q('composed_tasks'),
            **_method_bindings(method, setup),
        },
    )
    args = rt.entry_args(
        'prompt_tuning.train', ('test/tiny_prompt.gin', gin, 'runs/prompt_finetune.gin'), bindings
    )
    killed = rt.run(
        [rt.PYTHON, HOOKS] + args[3:],
        dict(setup['env'], HOOK_KILL_IN_SAVE=str(KILL_AT)),
        log_path=model_dir + '.1.log',
    )
    first = rt.losses(model_dir, run=0) if rt.event_files(os.path.join(model_dir, 'train')) else {}
    resumed = rt.run(args, setup['env'], log_path=model_dir + '.2.log')
    out[method] = {'model_dir': model_dir, 'killed': killed, 'first': first, 'resumed': resumed}
    out_dir = str(setup['root'] / f'{method}_infer')
    out[method]['infer_dir'] = out_dir
    infer = _infer_stage(method, setup, model_dir, out_dir)
    spec.append({'name': method, 'infer': infer, 'check_macros': True})
  spec_path = str(setup['root'] / 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  driver = rt.run(
      [rt.PYTHON, os.path.join(HERE, 'run_methods_e2e.py'), spec_path],
      setup['env'],
      timeout=900,
      log_path=str(setup['root'] / 'infer_driver.log'),
  )
  return {'root': str(setup['root']), 'methods': out, 'log': driver.stdout}


def _inferred(runs, method):
  """The rows `prompt_tuning.infer` wrote for `method` (its stage must have succeeded)."""
  path = os.path.join(runs['root'], f'{method}.infer.json')
  assert os.path.exists(path), f'{method} infer did not run:\n{runs["log"][-4000:]}'
  with open(path) as f:
    result = json.load(f)
  assert result['ok'], (
      f'{method} inference from the saved artifacts failed: {result["error"]}\n'
      f'{result["traceback"][-3000:]}'
  )
  out_dir = runs['methods'][method]['infer_dir']
  with open(os.path.join(out_dir, 'composed_interleaved-validation.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize('method', list(METHODS))
def test_train_kill_resume_and_serve_mixed_batches(method, setup, runs):
  _, _, task_param = METHODS[method]
  run = runs['methods'][method]
  model_dir, killed, resumed = run['model_dir'], run['killed'], run['resumed']
  assert (
      killed.returncode == -9
  ), f'expected SIGKILL in the save of step {KILL_AT}:\n{killed.stdout[-4000:]}'
  first = run['first']
  assert sorted(first) == list(range(1, KILL_AT + 1)), first
  rt.check_ok(resumed, f'{method}: the same command again')
  assert f'Resuming from {os.path.join(model_dir, "checkpoint_2")}' in resumed.stdout
  second = rt.losses(model_dir, run=-1)
  assert sorted(second) == list(range(3, STEPS + 1)), second
  rt.assert_losses_close(second, first, [3, 4], rtol=1e-6, atol=1e-6)

  # Only the tasks of the mixture moved (task 3 of 4 has no example).
  before, after = _npy(model_dir, 2, task_param), _npy(model_dir, STEPS, task_param)
  change = [float(np.abs(after[i] - before[i]).max() / np.abs(before[i]).max()) for i in range(4)]
  assert min(change[:3]) > 1e-3 and change[3] < 1e-4, change

  # Served from the artifacts in batches that mix tasks and languages: each example gets what the
  # training run's evaluation computed for it in a single-task batch (ATTEMPT: its prediction and
  # its mixture weights; the others: the target log-likelihood).
  reference = _train_eval_rows(model_dir)
  mode = _mode(method)
  rows = _inferred(runs, method)
  pairs = composed_tasks.PAIRS
  assert len(rows) == len(pairs) * composed_tasks.SPLIT_SIZES['validation']
  for i, row in enumerate(rows):
    ref = reference[pairs[i % len(pairs)]][i // len(pairs)]
    assert row['inputs'] == ref['input']['inputs_pretokenized'], i
    if mode == 'score':
      assert row['score'] == pytest.approx(ref['score'], rel=1e-5, abs=1e-5), i
    else:
      assert row['prediction'] == ref['prediction'], i
  if mode == 'score':
    assert np.std([r['score'] for r in rows]) > 0.1  # the examples are really scored differently
  else:
    _check_mixture_weights(setup, model_dir, rows)


def _check_mixture_weights(setup, model_dir, rows):
  """Each row's mixture weights equal ATTEMPT's formula on the artifacts, in float64 numpy."""
  vocab = __import__('tiny_task').get_vocabulary()
  emb = rt.tiny_backbone_params(seed=1)['token_embedder']['embedding'].astype(np.float64)
  art = lambda n: _npy(model_dir, STEPS, n).astype(np.float64)
  down, up = art('attention.down_kernel'), art('attention.up_kernel')
  scale, bias, targets = (
      art('attention.norm_scale'),
      art('attention.norm_bias'),
      art('target_prompt'),
  )
  sources = np.stack([np.load(p) for p in setup['sources']]).astype(np.float64)
  examples = composed_tasks.interleaved('validation')
  spread = []
  for row, ex in zip(rows, examples):
    ids = list(vocab.encode(ex['inputs'])) + [1]
    pooled = emb[ids].max(0)
    hid = pooled @ down
    hid = (hid / (1 + np.exp(-hid))) @ up
    z = (hid - hid.mean()) / np.sqrt(hid.var() + 1e-5) * scale + bias
    keys = np.concatenate([sources.max(1), targets[ex['task_ids']].max(0)[None]])
    s = keys @ z / (32 * math.e)
    expected = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    weights = np.asarray(row['aux']['mixture_weights'])
    assert weights.shape == (3,)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    spread.append(weights)
  assert np.ptp(np.stack(spread), axis=0).max() > 1e-4  # per-example weights, not one mixture
