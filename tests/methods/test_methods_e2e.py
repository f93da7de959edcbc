"""End to end, every method: `prompt_tuning.train` from its gin file, then `prompt_tuning.eval` from
the saved artifact.

One driver process (`run_methods_e2e.py`) trains each method for a few steps on the tiny seqio task
from a frozen tiny backbone stored as a T5X checkpoint (the shipped gin files: test/tiny_prompt.gin,
runs/prompt_finetune.gin, methods/<method>.gin), then evaluates it with runs/prompt_eval.gin plus
methods/from_artifact.gin pointed at the last checkpoint's numpy_checkpoints directory. Checked:

* only the method's parameters are trained and checkpointed (with optimizer state for them only);
* the artifact holds the inference parameters: for P-tuning and residual prompts the network's
  output alone, for projected prefixes the collapsed keys and values;
* evaluation from the artifact reproduces the predictions and the per-example log-likelihoods of
  the run's own inference evaluation (no reparameterisation network is built).
"""

import json
import os

import numpy as np
import pytest

import runtime_testlib as rt

pytestmark = pytest.mark.slow

STEPS = 3
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = 'encoder/prompt/prompt/prompt'
LAYERS = range(2)
ATTENTIONS = [f'encoder/layers_{i}/attention' for i in LAYERS] + [
    f'decoder/layers_{i}/{b}'
    for i in LAYERS
    for b in ('self_attention', 'encoder_decoder_attention')
]

# method: (extra train bindings, trained parameter paths (regex-free), artifact parameter paths)
METHODS = {
    'p_tuning': (
        {'P_TUNING_HIDDEN': '16'},
        [PROMPT[:-6] + p for p in ('embedding',)]
        + [f'encoder/prompt/prompt/dense_{i}/{w}' for i in range(3) for w in ('kernel', 'bias')],
        [PROMPT],
    ),
    'residual': (
        {'RESIDUAL_BOTTLENECK': '8', 'PROMPT_INIT': '@prompts.uniform()'},
        [
            'encoder/prompt/prompt/embedding',
            'encoder/prompt/prompt/layer_norm/scale',
            'encoder/prompt/prompt/layer_norm/bias',
        ]
        + [f'encoder/prompt/prompt/dense_{i}/{w}' for i in range(2) for w in ('kernel', 'bias')],
        [PROMPT],
    ),
    'prefix': (
        {'PREFIX_LENGTH': '2', 'PREFIX_PROJECTION_HIDDEN': '8'},
        [
            'prefix_projection/embedding',
            'prefix_projection/dense/kernel',
            'prefix_projection/dense/bias',
        ]
        + [f'{a}/prefix/dense/{w}' for a in ATTENTIONS for w in ('kernel', 'bias')],
        [f'{a}/prefix/{w}' for a in ATTENTIONS for w in ('key', 'value')],
    ),
    'per_layer': (
        {'PROMPT_LENGTH': '3', 'PER_LAYER_PROMPT': "'add'"},
        [PROMPT] + [f'encoder/layers_{i}/prompt/prompt/prompt' for i in LAYERS],
        None,  # the artifact is the trained parameters
    ),
    'dept': (
        {'PROMPT_LENGTH': '3', 'DEPT_RANK': '2', 'DEPT_MAX_LENGTH': '24'},
        [PROMPT, 'encoder/prompt/lora_embedding_a', 'encoder/prompt/lora_embedding_b'],
        None,
    ),
    'ia3': (
        {},
        [f'{a}/{c}/ia3_scaling' for a in ATTENTIONS for c in ('k_conv', 'v_conv')]
        + [
            f'{s}/layers_{i}/mlp/intermediate_conv/ia3_scaling'
            for s in ('encoder', 'decoder')
            for i in LAYERS
        ],
        None,
    ),
    'lora': (
        {
            'LORA_RANK': '2',
            'LORA_ALPHA': '4.0',
            # A large rate: after 3 steps B is far from its zero init (the artifact matters).
            'utils.create_learning_rate_scheduler.base_learning_rate': '0.3',
        },
        [
            f'{a}/{k}/lora/{f}'
            for a in ATTENTIONS
            for k in ('query', 'value')
            for f in ('lora_a', 'lora_b')
        ],
        None,
    ),
    'wayward': (
        {'TASK_STRING': "'cat rat hat'", 'WAYWARD_GAMMA': '0.5'},
        [PROMPT],
        None,
    ),
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('methods_e2e')
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'))
  spec = []
  for name, (extra, _, _) in METHODS.items():
    model_dir = str(root / name)
    train_bindings = rt.prompt_train_bindings(
        model_dir,
        frozen,
        steps=STEPS,
        period=STEPS,
        eval_period=STEPS,
        eval_steps=1,
        extra=extra,
    )
    train_bindings['train.train_eval_dataset_cfg'] = 'None'
    artifact = os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{STEPS}')
    eval_bindings = {
        'CHECKPOINT_PATH': rt.q(frozen),
        'EVAL_OUTPUT_DIR': rt.q(model_dir + '_eval'),
        'ARTIFACT_DIR': rt.q(artifact),
        **rt.task_bindings(8),
        **{k: v for k, v in extra.items() if k != 'PROMPT_INIT'},
    }
    method_gin = f'methods/{name}.gin'
    spec.append(
        {
            'name': name,
            'train': [
                ['test/tiny_prompt.gin', 'runs/prompt_finetune.gin', method_gin],
                [f'{k} = {v}' for k, v in train_bindings.items()],
            ],
            'eval': [
                [
                    'test/tiny_prompt.gin',
                    method_gin,
                    'runs/prompt_eval.gin',
                    'methods/from_artifact.gin',
                ],
                [f'{k} = {v}' for k, v in eval_bindings.items()],
            ],
        }
    )
  spec_path = str(root / 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  proc = rt.run(
      [rt.PYTHON, os.path.join(HERE, 'run_methods_e2e.py'), spec_path],
      rt.base_env(
          rt.shared_cache_dir(tmp_path_factory),
          PYTHONPATH=os.pathsep.join([HERE, rt.HERE, rt.TESTS, rt.REPO]),
      ),
      timeout=1800,
      log_path=str(root / 'driver.log'),
  )
  return {'root': str(root), 'log': proc.stdout, 'returncode': proc.returncode}


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _stage(runs, name, stage):
  path = os.path.join(runs['root'], f'{name}.{stage}.json')
  assert os.path.exists(path), f'{name} {stage} did not run:\n{runs["log"][-4000:]}'
  with open(path) as f:
    result = json.load(f)
  assert result['ok'], f'{name} {stage}: {result["error"]}\n{result["traceback"][-3000:]}'


@pytest.mark.parametrize('name', list(METHODS))
def test_trains_only_its_parameters_and_eval_from_the_artifact_reproduces_it(runs, name):
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  _stage(runs, name, 'train')
  _, trained, artifact_paths = METHODS[name]
  model_dir = os.path.join(runs['root'], name)
  ckpt = checkpoints.latest_checkpoint_path(model_dir)
  assert sorted(checkpoints.read_metadata(ckpt)['trainable_paths']) == sorted(trained)
  raw = checkpoints.restore_checkpoint(ckpt)
  assert sorted(params_lib.flatten_params(raw['trainable'])) == sorted(trained)
  slots = {p.rsplit('/', 1)[0] for p in params_lib.flatten_params(raw['opt_state'])}
  assert all(any(s.endswith(t) for t in trained) for s in slots if 'param_states' in s), slots
  # The artifact: one .npy per inference parameter.
  artifact = os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{STEPS}')
  files = sorted(os.listdir(artifact))
  expected = trained if artifact_paths is None else artifact_paths
  assert files == sorted(p.replace('/', '.') + '.npy' for p in expected)
  if artifact_paths is None:
    flat = params_lib.flatten_params(raw['trainable'])
    for p in expected:
      np.testing.assert_array_equal(
          np.load(os.path.join(artifact, p.replace('/', '.') + '.npy')), flat[p]
      )

  _stage(runs, name, 'eval')
  train_rows = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-{STEPS:06d}.jsonl'))
  eval_rows = _jsonl(os.path.join(model_dir + '_eval', 'inference_eval', f'{rt.TASK}-000000.jsonl'))
  assert len(eval_rows) == len(train_rows) == 8
  assert [r['prediction'] for r in eval_rows] == [r['prediction'] for r in train_rows]
  train_metrics = _jsonl(os.path.join(model_dir, 'inference_eval', f'{rt.TASK}-metrics.jsonl'))[-1]
  with open(os.path.join(model_dir + '_eval', 'metrics.json')) as f:
    eval_metrics = json.load(f)[rt.TASK]
  np.testing.assert_allclose(
      eval_metrics['log_likelihood'], train_metrics['log_likelihood'], rtol=1e-5
  )
