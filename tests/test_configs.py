"""Every shipped model gin file parses and builds the model it names, with the published sizes.

Sizes are those of the T5 1.1 / mT5 checkpoints (Raffel et al. 2020; Xue et al. 2021; T5X's
`t5_1_1/*.gin`), which a frozen checkpoint must match: d_model, heads x head width, d_ff, layers,
vocabulary. Building a model constructs modules only (no parameters, no vocabulary read). The gin
files are parsed in a subprocess: gin's dynamic registrations outlive `gin.clear_config()` and would
leak into other tests of this process.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')
# name: (d_model, heads, head_dim, d_ff, layers)
SIZES = {
    'small': (512, 6, 64, 1024, 8),
    'base': (768, 12, 64, 2048, 12),
    'large': (1024, 16, 64, 2816, 24),
    'xl': (2048, 32, 64, 5120, 24),
    'xxl': (4096, 64, 64, 10240, 24),
}
MODEL_FILES = sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, 'models', '*.gin'))
)

_PROBE = """
import json, sys
import gin
from prompt_tuning.runtime import gin_utils
out = {}
for key, files, bindings in json.loads(sys.argv[1]):
  gin.clear_config()
  gin_utils.parse_gin_flags([], files, bindings)
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  c = model.module.config
  opt = model.optimizer_def
  out[key] = {
      'model': type(model).__name__, 'module': type(model.module).__name__,
      'sizes': [c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim, c.num_encoder_layers, c.num_decoder_layers],
      'vocab_size': c.vocab_size, 'mlp_activations': list(c.mlp_activations),
      'logits_via_embedding': c.logits_via_embedding, 'dropout_rate': c.dropout_rate, 'dtype': str(c.dtype),
      'prompt_length': getattr(model.module, 'prompt_length', None),
      'bidirectional': getattr(model, '_inputs_bidirectional_attention', None),
      'trains': {p: bool(opt.trainable_filter(p)) for p in (
          'encoder/prompt/prompt/prompt', 'decoder/prompt/prompt/prompt', 'decoder/layers_0/mlp/wi_0/kernel')},
  }
print('PROBE' + json.dumps(out))
"""


def _probe(cases, cwd=REPO):
  env = dict(
      os.environ,
      PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
  )
  proc = subprocess.run(
      [sys.executable, '-c', _PROBE, json.dumps(cases)],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('PROBE')][-1]
  return json.loads(line[len('PROBE') :])


@pytest.fixture(scope='module')
def built():
  cases = [[f, [f], []] for f in MODEL_FILES]
  cases += [
      [
          'small20',
          ['models/t5_1_1_prompt.gin'],
          ['PROMPT_LENGTH = 20', 'include "sizes/small.gin"'],
      ],
      ['causal', ['models/decoder_only_prompt.gin'], ['INPUTS_BIDIRECTIONAL_ATTENTION = False']],
  ]
  return _probe(cases)


def test_every_model_file_is_checked():
  assert len(MODEL_FILES) >= 14
  assert 'models/decoder_only_prompt.gin' in MODEL_FILES


@pytest.mark.parametrize('gin_file', MODEL_FILES)
def test_model_gin_builds_the_published_shape(built, gin_file):
  model = built[gin_file]
  name = os.path.basename(gin_file)[: -len('.gin')]
  size = next((s for s in SIZES if f'_{s}_' in name), 'base')  # no size file: T5 1.1 base
  d_model, heads, head_dim, d_ff, layers = SIZES[size]
  emb, n_heads, width, mlp, enc_layers, dec_layers = model['sizes']
  assert (emb, n_heads, width, mlp, dec_layers) == (d_model, heads, head_dim, d_ff, layers)
  assert model['vocab_size'] == (250112 if name.startswith('mt5') else 32128)
  assert model['mlp_activations'] == ['gelu', 'linear'] and not model['logits_via_embedding']
  assert model['dropout_rate'] == 0.0 and model['dtype'] == 'bfloat16'
  if 'decoder_only' in name:
    assert (model['model'], model['module']) == ('DecoderOnlyModel', 'PromptDecoderOnly')
    assert model['bidirectional'] is True  # a prefix LM unless told otherwise
  else:
    assert model['model'] == 'EncoderDecoderModel'
    assert enc_layers == layers
  trains = model['trains']
  if 'prompt' in name:
    assert model['prompt_length'] == 100
    assert trains['encoder/prompt/prompt/prompt'] and trains['decoder/prompt/prompt/prompt']
    assert not trains['decoder/layers_0/mlp/wi_0/kernel']  # only the prompt is trained
  else:
    assert trains['decoder/layers_0/mlp/wi_0/kernel']


def test_macros_override_prompt_length_size_and_attention(built):
  assert built['small20']['prompt_length'] == 20 and built['small20']['sizes'][0] == 512
  assert built['causal']['bidirectional'] is False


def test_directories_named_like_config_folders_do_not_break_includes(tmp_path):
  """`python -m prompt_tuning.train` from a project with a `models/` directory (a namespace package on
  sys.path): gin must still find `models/...` and the files they include on its search path."""
  for name in ('models', 'architectures', 'sizes'):
    (tmp_path / name).mkdir()
  out = _probe([['small', ['models/t5_1_1_small_prompt.gin'], []]], cwd=str(tmp_path))
  assert out['small']['sizes'][0] == 512
