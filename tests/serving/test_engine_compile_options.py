"""The serving engine compiles its float32 buckets with `xla_options.inference_compiler_options`."""

import serving_testlib as st
from prompt_tuning.runtime import xla_options
from prompt_tuning.serving import engine as engine_lib


def test_serving_engine_compiles_its_buckets_without_ynnpack():
  config = engine_lib.ServingConfig(
      batch_buckets=(2,), input_buckets=(8,), target_buckets=(4,), max_decode_length=4
  )
  engine = st.engine(2, st.vocabulary(), config)
  assert xla_options.inference_compiler_options(engine.model) == xla_options.EIGEN_DOTS
  kinds = set()
  for key in engine.keys():
    if key[0] in kinds:
      continue
    kinds.add(key[0])
    text = engine._compile(key).as_text()  # pylint: disable=protected-access
    assert 'dot(' in text or 'dot_general' in text or 'convolution' in text, key
    assert '__ynn_fusion' not in text, key
  assert {'sample', 'score'} <= kinds
