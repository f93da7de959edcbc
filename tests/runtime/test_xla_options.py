"""`xla_options.inference_compiler_options`: float32 inference on the CPU runs XLA's Eigen dots.

Checked on compiled executables (the option must actually take YNNPACK's dot fusions out of the
HLO that runs), on the doors that pass it (`PjitPartitioner.partition`, `inference.get_infer_fn`,
and `tests/serving/test_engine_compile_options.py` for the serving engine), and on numerics: the tiny model's scores and greedy
decodes with the option equal XLA's defaults (scores within 1e-5 relative, tokens identical).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import inference
from prompt_tuning.runtime import models
from prompt_tuning.runtime import partitioning
from prompt_tuning.runtime import xla_options

YNN_MARK = '__ynn_fusion'


def _compiled_text(fn, *args, **jit_kw) -> str:
  return jax.jit(fn, **jit_kw).lower(*args).compile().as_text()


def _dot(a, b):
  return jnp.dot(a, b)


def test_default_cpu_dots_are_ynnpack_and_the_option_takes_them_out():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  assert YNN_MARK in _compiled_text(_dot, a, b), 'this jaxlib no longer fuses dots into YNNPACK'
  options = xla_options.inference_compiler_options(dtype='float32')
  assert options == xla_options.EIGEN_DOTS
  assert YNN_MARK not in _compiled_text(_dot, a, b, compiler_options=options)


def test_bfloat16_and_the_opt_out_keep_xla_defaults():
  assert xla_options.inference_compiler_options(dtype='bfloat16') is None
  assert xla_options.inference_compiler_options(dtype=jnp.float16) is None
  assert xla_options.inference_compiler_options(dtype='float32', cpu_float32_dots='ynnpack') is None
  with pytest.raises(ValueError, match=r"cpu_float32_dots='onednn'.*'eigen', 'ynnpack'"):
    xla_options.inference_compiler_options(dtype='float32', cpu_float32_dots='onednn')


@pytest.mark.parametrize(
    'vendor,tcmalloc,splits',
    [
        ('GenuineIntel', True, True),
        ('GenuineIntel', False, False),  # glibc: about twice the peak memory
        ('AuthenticAMD', True, False),  # no faster there
        ('', True, False),
    ],
)
def test_training_auto_splits_on_intel_under_tcmalloc_only(monkeypatch, vendor, tcmalloc, splits):
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(xla_options, 'cpu_vendor', lambda: vendor)
  monkeypatch.setattr(launch, 'tcmalloc_loaded', lambda: tcmalloc)
  assert xla_options.split_step_pays_here() == splits
  options = xla_options.training_forward_compiler_options(dtype='float32')
  assert options == (xla_options.EIGEN_DOTS if splits else None)
  # The explicit choices ignore the CPU; bfloat16 never splits.
  assert xla_options.training_forward_compiler_options(
      dtype='float32', cpu_float32_dots='eigen'
  ) == (xla_options.EIGEN_DOTS)
  assert (
      xla_options.training_forward_compiler_options(dtype='float32', cpu_float32_dots='ynnpack')
      is None
  )
  assert xla_options.training_forward_compiler_options(dtype='bfloat16') is None


def test_auto_is_a_training_choice_only():
  with pytest.raises(ValueError, match=r"cpu_float32_dots='onednn'.*'auto', 'eigen', 'ynnpack'"):
    xla_options.training_forward_compiler_options(dtype='float32', cpu_float32_dots='onednn')
  with pytest.raises(ValueError, match=r"inference_compiler_options.cpu_float32_dots='auto'"):
    xla_options.inference_compiler_options(dtype='float32', cpu_float32_dots='auto')


def test_cpu_vendor_reads_cpuinfo(tmp_path):
  info = tmp_path / 'cpuinfo'
  info.write_text(
      'processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n'
      'processor\t: 1\nvendor_id\t: GenuineIntel\n'
  )
  assert xla_options.cpu_vendor(str(info)) == 'GenuineIntel'
  info2 = tmp_path / 'arm'
  info2.write_text('processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n')
  assert xla_options.cpu_vendor(str(info2)) == ''
  assert xla_options.cpu_vendor(str(tmp_path / 'missing')) == ''


@pytest.fixture(scope='module')
def tiny():
  import seqio  # pylint: disable=g-import-not-at-top
  import runtime_testlib as rt  # pylint: disable=g-import-not-at-top

  vocab = seqio.SentencePieceVocabulary(rt.vocab_path())
  module = prompted.PromptEncoderDecoder(t5.get_config('tiny', vocab_size=32), prompt_length=3)
  model = models.EncoderDecoderModel(
      module, vocab, vocab, decode_fn=decoding.temperature_sample, z_loss=0.0
  )
  rng = np.random.default_rng(0)
  batch = {
      'encoder_input_tokens': rng.integers(2, 30, (4, 9)).astype(np.int32),
      'decoder_input_tokens': rng.integers(2, 30, (4, 5)).astype(np.int32),
      'decoder_target_tokens': rng.integers(2, 30, (4, 5)).astype(np.int32),
      'decoder_loss_weights': np.ones((4, 5), np.int32),
  }
  batch['decoder_input_tokens'][:, 0] = 0
  shapes = {k: v.shape for k, v in batch.items()}
  params = model.get_initial_variables(jax.random.PRNGKey(1), shapes)['params']
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return model, params, batch


def test_model_dtype_reads_the_backbone_config(tiny):
  model, _, _ = tiny
  assert xla_options.model_dtype(model) == jnp.float32
  assert xla_options.inference_compiler_options(model) == xla_options.EIGEN_DOTS
  bf16 = models.EncoderDecoderModel(
      prompted.PromptEncoderDecoder(t5.get_config('tiny', vocab_size=32, dtype='bfloat16'), 3),
      model.input_vocabulary,
      model.output_vocabulary,
  )
  assert xla_options.model_dtype(bf16) == jnp.bfloat16
  assert xla_options.inference_compiler_options(bf16) is None


def test_partitioned_inference_equals_the_default_and_runs_without_ynnpack(tiny):
  model, params, batch = tiny
  options = xla_options.inference_compiler_options(model)
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  greedy = lambda p, b: model.predict_batch_with_aux(p, b, decoder_params={'topk': 1})[0]
  for fn in (model.score_batch, greedy):
    ours = partitioner.partition(fn, None, None, compiler_options=options)
    default = partitioner.partition(fn, None, None)
    assert YNN_MARK not in ours.lower(params, batch).compile().as_text()
    assert YNN_MARK in default.lower(params, batch).compile().as_text()
    got, want = np.asarray(ours(params, batch)), np.asarray(default(params, batch))
    if got.dtype.kind == 'f':
      np.testing.assert_allclose(got, want, rtol=1e-5)
    else:
      np.testing.assert_array_equal(got, want)


def test_get_infer_fn_hands_the_options_to_the_partitioner(tiny, monkeypatch):
  model, params, batch = tiny
  seen = []
  real = partitioning.PjitPartitioner.partition

  def spy(self, fn, *args, **kw):
    seen.append(kw.get('compiler_options'))
    return real(self, fn, *args, **kw)

  monkeypatch.setattr(partitioning.PjitPartitioner, 'partition', spy)
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  options = xla_options.inference_compiler_options(model)
  inference.get_infer_fn(
      lambda p, b: model.score_batch(p, b), 4, partitioner, params, compiler_options=options
  )
  assert seen == [xla_options.EIGEN_DOTS]
