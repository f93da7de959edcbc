"""Every shipped model gin file parses and builds the model it names, with the published sizes.

Sizes are those of the T5 1.1 / mT5 checkpoints (Raffel et al. 2020; Xue et al. 2021; T5X's
`t5_1_1/*.gin`), which a frozen checkpoint must match: d_model, heads x head width, d_ff, layers,
vocabulary. Building a model constructs modules only (no parameters, no vocabulary read).
"""
import glob
import os

import gin
import pytest

from prompt_tuning.architectures import prompted
from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import models

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# name: (d_model, heads, head_dim, d_ff, layers)
SIZES = {'small': (512, 6, 64, 1024, 8), 'base': (768, 12, 64, 2048, 12),
         'large': (1024, 16, 64, 2816, 24), 'xl': (2048, 32, 64, 5120, 24),
         'xxl': (4096, 64, 64, 10240, 24)}
MODEL_FILES = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, 'models', '*.gin')))


def _build(gin_file, bindings=()):
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags([], [gin_file], list(bindings))
    return gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()


def test_every_model_file_is_checked():
  assert len(MODEL_FILES) >= 14
  assert 'models/decoder_only_prompt.gin' in MODEL_FILES


@pytest.mark.parametrize('gin_file', MODEL_FILES)
def test_model_gin_builds_the_published_shape(gin_file):
  model = _build(gin_file)
  name = os.path.basename(gin_file)[:-len('.gin')]
  config = model.module.config
  size = next((s for s in SIZES if f'_{s}_' in name), 'base')  # no size file: T5 1.1 base
  d_model, heads, head_dim, d_ff, layers = SIZES[size]
  assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim) == (
      d_model, heads, head_dim, d_ff)
  assert config.num_decoder_layers == layers
  assert config.vocab_size == (250112 if name.startswith('mt5') else 32128)
  assert config.mlp_activations == ('gelu', 'linear') and not config.logits_via_embedding
  assert config.dropout_rate == 0.0 and config.dtype == 'bfloat16'
  if 'decoder_only' in name:
    assert isinstance(model, models.DecoderOnlyModel)
    assert isinstance(model.module, prompted.PromptDecoderOnly)
  else:
    assert isinstance(model, models.EncoderDecoderModel)
    assert config.num_encoder_layers == layers
  if 'prompt' in name:
    assert model.module.prompt_length == 100
    # Only the prompt is trained.
    assert model.optimizer_def.trainable_filter('encoder/prompt/prompt/prompt')
    assert model.optimizer_def.trainable_filter('decoder/prompt/prompt/prompt')
    assert not model.optimizer_def.trainable_filter('decoder/layers_0/mlp/wi_0/kernel')
  else:
    assert model.optimizer_def.trainable_filter('decoder/layers_0/mlp/wi_0/kernel')


def test_prompt_length_and_sizes_follow_the_macros():
  model = _build('models/t5_1_1_prompt.gin', ['PROMPT_LENGTH = 20', 'include "sizes/small.gin"'])
  assert model.module.prompt_length == 20
  assert model.module.config.emb_dim == 512


def test_decoder_only_is_a_prefix_lm_unless_told_otherwise():
  prefix = _build('models/decoder_only_prompt.gin')
  causal = _build('models/decoder_only_prompt.gin', ['INPUTS_BIDIRECTIONAL_ATTENTION = False'])
  assert prefix._inputs_bidirectional_attention and not causal._inputs_bidirectional_attention  # pylint: disable=protected-access


def test_directories_named_like_config_folders_do_not_break_includes(tmp_path, monkeypatch):
  """`python -m prompt_tuning.train` from a project with a `models/` directory: gin must still find
  `models/...` and the files they include on its search path."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ('models', 'architectures', 'sizes'):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  assert importlib.util.find_spec('models').origin is None  # a namespace package
  model = _build('models/t5_1_1_small_prompt.gin')
  assert model.module.config.emb_dim == 512
