"""Every method's gin file composes with a model and a run gin file, and trains what it should.

Each `configs/methods/<method>.gin` is parsed after `models/t5_1_1_base_prompt.gin` and
`runs/prompt_finetune.gin` (as users run it), the model is built and initialized abstractly (no
arrays), and the trainable parameters (the optimizer's `trainable_filter`) are counted for
T5 1.1 base (d 768, 12 heads of 64, d_ff 2048, 12 + 12 layers). The counts are those of the
methods' formulas (the README's methods table); no backbone parameter is ever trainable. The gin
files are parsed in a subprocess (gin's registrations outlive `gin.clear_config()`).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D, H, DH, F, L = 768, 12, 64, 2048, 12
ATTENTIONS = 3 * L  # encoder self, decoder self and cross per layer
P = 100  # PROMPT_LENGTH of models/t5_1_1_prompt.gin

# method: (extra bindings, trainable parameters)
EXPECTED = {
    'prompt tuning': ([], P * D),
    'p_tuning': ([], P * D + 3 * (D * D + D)),
    'residual': ([], P * D + (D * 800 + 800) + (800 * D + D) + 2 * D),
    'prefix': ([], 10 * D + (D * D + D) + ATTENTIONS * (D * 2 * H * DH + 2 * H * DH)),
    'deep_prompts': ([], ATTENTIONS * 2 * 10 * H * DH),
    'per_layer': ([], (L + 1) * 10 * D),
    'dept': ([], 40 * D + 256 * 45 + 45 * D),
    'ia3': ([], ATTENTIONS * 2 * H * DH + 2 * L * F),
    'lora': ([], ATTENTIONS * 2 * (D * 8 + 8 * H * DH)),
    # Pieces of the text x D (the init reads INITIAL_CHECKPOINT_PATH's embedding: not here).
    'wayward': (['TASK_STRING = "the cat sat"', 'PROMPT_INIT = @prompts.uniform()'], None),
}

_PROBE = """
import json, sys
import gin, jax
import numpy as np
from prompt_tuning import params as params_lib
from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import train as train_lib
import __main__
__main__.train = train_lib.train  # `import __main__ as train_script`, as `python -m prompt_tuning.train`
out = {}
for key, files, bindings in json.loads(sys.argv[1]):
  gin.clear_config()
  gin_utils.parse_gin_flags([], files, bindings)
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  shapes = {'encoder_input_tokens': (1, 8), 'decoder_input_tokens': (1, 4),
            'decoder_target_tokens': (1, 4)}
  variables = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))
  flat = params_lib.flatten_params(variables['params'])
  keep = model.optimizer_def.trainable_filter
  trained = {p: int(np.prod(v.shape)) for p, v in flat.items() if keep(p)}
  vocab = model.input_vocabulary
  out[key] = {'trained': trained, 'total': sum(int(np.prod(v.shape)) for v in flat.values()),
              'pieces': len(vocab.encode('the cat sat'))}
print('PROBE' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def probed():
  import seqio  # pylint: disable=g-import-not-at-top

  vocab = os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
  )
  common = [
      f'seqio.SentencePieceVocabulary.sentencepiece_model_file = "{vocab}"',
      'INITIAL_CHECKPOINT_PATH = None',
      'MODEL_DIR = "/nonexistent/model_dir"',  # required by the run gin; nothing is written
      'MIXTURE_OR_TASK_NAME = "unused"',
      'TASK_FEATURE_LENGTHS = {"inputs": 8, "targets": 4}',
      'TRAIN_STEPS = 1',
  ]
  cases = []
  for name, (extra, _) in EXPECTED.items():
    files = ['models/t5_1_1_base_prompt.gin', 'runs/prompt_finetune.gin']
    if name != 'prompt tuning':
      files.append(f'methods/{name}.gin')
    cases.append([name, files, common + extra])
  env = dict(
      os.environ,
      PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
  )
  proc = subprocess.run(
      [sys.executable, '-c', _PROBE, json.dumps(cases)],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('PROBE')][-1]
  return json.loads(line[len('PROBE') :])


@pytest.mark.parametrize('name', list(EXPECTED))
def test_the_method_trains_its_own_parameters_of_the_expected_size(probed, name):
  result = probed[name]
  trained = result['trained']
  assert trained, f'{name}: nothing is trainable'
  # Backbone paths have none of the methods' module names.
  methods = ('/prompt/', 'prefix', '/lora/', 'ia3_scaling')
  for path in trained:
    assert any(t in path for t in methods), f'{name}: backbone parameter {path} is trained'
  expected = EXPECTED[name][1]
  if expected is None:
    expected = result['pieces'] * D
  print(f'{name}: {sum(trained.values()):,} trainable of {result["total"]:,}')
  assert sum(trained.values()) == expected, (name, sum(trained.values()), expected)
