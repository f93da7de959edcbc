"""Training from host arrays imports neither seqio nor TensorFlow; feature converters still resolve.

seqio pulls in TensorFlow (~800 MiB resident). The train step, the state builder, the trainer and
the model classes must not need it, so a process that trains or serves from numpy batches (the
benchmarks, a notebook) keeps its memory. Checked in a fresh interpreter, since this test process
has imported both long ago.
"""

import os
import subprocess
import sys
import textwrap

import seqio

from prompt_tuning.runtime import models

_TRAIN_WITHOUT_TF = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from prompt_tuning.architectures import prompted, t5
    from prompt_tuning.runtime import (adafactor, decoding, models, optimizers, partitioning,
                                       schedules, train_state, trainer)

    config = t5.get_config('tiny', vocab_size=32)
    opt = optimizers.MultiOptimizer(((
        optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
        adafactor.Adafactor(decay_rate=0.8, multiply_by_parameter_scale=False)),))
    model = models.EncoderDecoderModel(prompted.PromptEncoderDecoder(config, prompt_length=3),
                                       None, None, optimizer_def=opt,
                                       decode_fn=decoding.temperature_sample)
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 32, (4, 5)).astype(np.int32)
    batch = {'encoder_input_tokens': rng.integers(2, 32, (4, 9)).astype(np.int32),
             'decoder_input_tokens': np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1),
             'decoder_target_tokens': tgt, 'decoder_loss_weights': np.ones_like(tgt, np.float32)}
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    builder = train_state.StateBuilder(model, partitioner, {k: v.shape for k, v in batch.items()},
                                       {k: v.dtype for k, v in batch.items()})
    state = builder.build(builder.init_params(jax.random.PRNGKey(0)))
    tr = trainer.Trainer(model, state, partitioner, eval_names=[], summary_dir=None,
                         train_state_axes=builder.state_axes, rng=jax.random.PRNGKey(1),
                         learning_rate_fn=schedules.create_learning_rate_scheduler(
                             factors='constant', base_learning_rate=0.3), log_period=10**9)
    out = tr.train(iter([batch] * 3), 3)
    assert np.isfinite(float(out['loss'])), out
    assert int(tr.train_state.step) == 3
    print('IMPORTED', sorted(m for m in ('seqio', 'tensorflow') if m in sys.modules))
""")


def test_training_from_host_arrays_imports_neither_seqio_nor_tensorflow():
  proc = subprocess.run(
      [sys.executable, '-c', _TRAIN_WITHOUT_TF],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'IMPORTED []' in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_feature_converter_cls_resolves_to_seqio_and_can_be_overridden():
  from prompt_tuning.data import feature_converters  # pylint: disable=g-import-not-at-top
  # seqio's converters, keeping a per-example `prompt_ids` (prompt banks).
  assert (
      models.EncoderDecoderModel.FEATURE_CONVERTER_CLS is feature_converters.EncDecFeatureConverter
  )
  assert issubclass(models.EncoderDecoderModel.FEATURE_CONVERTER_CLS, seqio.EncDecFeatureConverter)
  assert models.DecoderOnlyModel.FEATURE_CONVERTER_CLS is feature_converters.DecoderFeatureConverter
  assert issubclass(models.DecoderOnlyModel.FEATURE_CONVERTER_CLS, seqio.DecoderFeatureConverter)

  class PrefixLM(models.DecoderOnlyModel):
    FEATURE_CONVERTER_CLS = seqio.PrefixLMFeatureConverter

  assert PrefixLM.FEATURE_CONVERTER_CLS is seqio.PrefixLMFeatureConverter
  # T5X's constructor argument replaces the class default on the instance only.
  model = models.DecoderOnlyModel(None, None, feature_converter_cls=seqio.PrefixLMFeatureConverter)
  assert model.FEATURE_CONVERTER_CLS is seqio.PrefixLMFeatureConverter
  assert models.DecoderOnlyModel.FEATURE_CONVERTER_CLS is feature_converters.DecoderFeatureConverter
