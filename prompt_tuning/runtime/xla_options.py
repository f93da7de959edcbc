"""XLA compile options for the inference executables (scoring, decoding, teacher-forced eval).

XLA:CPU in this jaxlib hands every dot to YNNPACK by default
(`--xla_cpu_experimental_ynn_fusion_type` lists `INDIVIDUAL_DOT`). For a float32 model's forward
pass that is the slower choice on two cores: with YNNPACK switched off (the option set to an empty
list, so dots run on XLA's own Eigen kernels) the scoring forward of the benchmark's serving batch
takes 0.75x the time and greedy decoding 0.86x, outputs within 2.5e-7 relative
(`benchmarks.ab`, quiet Intel Xeon, `benchmarks/ANALYSIS.md`). The float32 training step is the
same either way (0.98-1.05x, within noise), and a bfloat16 model needs YNNPACK (its bfloat16 x
bfloat16 -> float32 dots run 2x slower on Eigen), so only float32 inference on the CPU backend
changes. Accelerators never see the option.

`inference_compiler_options(model)` is what the inference paths (`runtime/inference.py`,
`runtime/trainer.py`'s eval step, `serving/engine.py`) pass to `jax.jit(..., compiler_options=)`;
bind `inference_compiler_options.cpu_float32_dots = 'ynnpack'` in gin to keep XLA's default.
"""

import functools
from typing import Any, Dict, Optional

from absl import logging
import gin
import jax
import jax.numpy as jnp

YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# The option's value that leaves YNNPACK no dot (nor anything else) to take: XLA's Eigen dots.
EIGEN_DOTS = {YNN_FUSION_TYPE: ''}
CPU_FLOAT32_DOTS = ('eigen', 'ynnpack')


def model_dtype(model: Any) -> Optional[jnp.dtype]:
  """The activation dtype of a runtime model (`EncoderDecoderModel`/`DecoderOnlyModel`), if known."""
  config = getattr(getattr(model, 'module', None), 'config', None)
  dtype = getattr(config, 'activation_dtype', None)  # `T5Config.activation_dtype`
  return None if dtype is None else jnp.dtype(dtype)


@functools.lru_cache(maxsize=None)
def _option_supported(name: str, value: str) -> bool:
  """Whether this jaxlib's CPU compiler accepts the option (probed once on a trivial function)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
        jnp.zeros((), jnp.float32)
    ).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
        'XLA option %s=%r is not accepted here (%s); using the default dots.', name, value, e
    )
    return False
  return True


@gin.configurable
def inference_compiler_options(
    model: Any = None, dtype: Any = None, cpu_float32_dots: str = 'eigen'
) -> Optional[Dict[str, Any]]:
  """`compiler_options` for an inference executable of `model` (or of activations in `dtype`).

  Returns `EIGEN_DOTS` for a float32 model on the CPU backend when `cpu_float32_dots` is `'eigen'`
  (the default), else None (XLA's defaults). An unknown dtype counts as float32.
  """
  if cpu_float32_dots not in CPU_FLOAT32_DOTS:
    raise ValueError(
        f'inference_compiler_options.cpu_float32_dots={cpu_float32_dots!r}: use one of '
        f'{CPU_FLOAT32_DOTS}.'
    )
  if cpu_float32_dots != 'eigen' or jax.default_backend() != 'cpu':
    return None
  if dtype is None and model is not None:
    dtype = model_dtype(model)
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(jnp.float32):
    return None
  if not _option_supported(YNN_FUSION_TYPE, EIGEN_DOTS[YNN_FUSION_TYPE]):
    return None
  return dict(EIGEN_DOTS)
