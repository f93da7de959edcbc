"""XLA compile options: Eigen or YNNPACK dots for float32 on the CPU.

XLA:CPU in this jaxlib hands every dot to YNNPACK by default
(`--xla_cpu_experimental_ynn_fusion_type` lists `INDIVIDUAL_DOT`). For a float32 model's forward
pass that is the slower choice on two cores: with YNNPACK switched off (the option set to an empty
list, so dots run on XLA's own Eigen kernels) the scoring forward of the benchmark's serving batch
takes 0.75x the time, greedy decoding 0.86x and the training loss alone 0.70x, outputs within
2.5e-7 relative (`benchmarks.ab`, quiet Intel Xeon, `benchmarks/ANALYSIS.md`). The backward
products are faster on YNNPACK, so a one-executable training step gains nothing (0.98-1.05x); a
bfloat16 model needs YNNPACK everywhere (its bfloat16 x bfloat16 -> float32 dots run 2x slower on
Eigen). Accelerators never see the option.

* `inference_compiler_options(model)` is what the inference paths (`runtime/inference.py`,
  `runtime/trainer.py`'s eval step, `serving/engine.py`) pass to `jax.jit(..., compiler_options=)`.
* `training_forward_compiler_options(model)` decides whether `Trainer` splits a float32 CPU
  training step in two executables (`trainer.SplitTrainStep`): the forward with Eigen dots, the
  backward and the optimizer update with the default YNNPACK dots. The split was 5-15% faster on an
  Intel Xeon and the same speed on an AMD EPYC, and holds the forward's residuals between the two
  executables: about twice the one-executable step's peak memory under glibc's allocator, about
  the same under tcmalloc. So by default (`cpu_float32_dots = 'auto'`) it splits only on an Intel
  CPU with gperftools' tcmalloc serving the process (the entry points preload it where installed,
  `launch.tune_malloc`); `'eigen'` splits everywhere, `'ynnpack'` never.

Bind `inference_compiler_options.cpu_float32_dots = 'ynnpack'` in gin to keep XLA's default for
inference.
"""

import functools
from typing import Any, Dict, Optional

from absl import logging
import gin
import jax
import jax.numpy as jnp

from prompt_tuning.runtime import launch

YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# The option's value that leaves YNNPACK no dot (nor anything else) to take: XLA's Eigen dots.
EIGEN_DOTS = {YNN_FUSION_TYPE: ''}
CPU_FLOAT32_DOTS = ('eigen', 'ynnpack')
# The training step's choices: `auto` picks one of the two by `split_step_pays_here`.
TRAINING_CPU_FLOAT32_DOTS = ('auto',) + CPU_FLOAT32_DOTS


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


@functools.lru_cache(maxsize=None)
def cpu_vendor(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU vendor `cpuinfo` names ('GenuineIntel', 'AuthenticAMD'; '' where unknown)."""
  try:
    with open(cpuinfo, encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.startswith('vendor_id'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def split_step_pays_here() -> bool:
  """Whether `'auto'` splits the float32 CPU training step: an Intel CPU and tcmalloc loaded.

  Measured on the benchmark's T5 1.1 small shape (`benchmarks/ANALYSIS.md`): on an Intel Xeon the
  split step took 0.83-0.95x the one-executable step's time (Eigen's forward products split over
  two threads better there) but, under glibc's allocator, twice its peak memory; on an AMD EPYC it
  is no faster. Under tcmalloc its peak memory is about the one-executable step's.
  """
  return cpu_vendor() == 'GenuineIntel' and launch.tcmalloc_loaded()


def _cpu_float32_options(
    what: str, model: Any, dtype: Any, cpu_float32_dots: str, choices=CPU_FLOAT32_DOTS
) -> Optional[Dict[str, Any]]:
  if cpu_float32_dots not in choices:
    raise ValueError(f'{what}.cpu_float32_dots={cpu_float32_dots!r}: use one of {choices}.')
  if cpu_float32_dots == 'auto':
    cpu_float32_dots = 'eigen' if split_step_pays_here() else 'ynnpack'
  if cpu_float32_dots != 'eigen' or jax.default_backend() != 'cpu':
    return None
  if dtype is None and model is not None:
    dtype = model_dtype(model)
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(jnp.float32):
    return None
  if not _option_supported(YNN_FUSION_TYPE, EIGEN_DOTS[YNN_FUSION_TYPE]):
    return None
  return dict(EIGEN_DOTS)


@gin.configurable
def inference_compiler_options(
    model: Any = None, dtype: Any = None, cpu_float32_dots: str = 'eigen'
) -> Optional[Dict[str, Any]]:
  """`compiler_options` for an inference executable of `model` (or of activations in `dtype`).

  Returns `EIGEN_DOTS` for a float32 model on the CPU backend when `cpu_float32_dots` is `'eigen'`
  (the default), else None (XLA's defaults). An unknown dtype counts as float32.
  """
  return _cpu_float32_options('inference_compiler_options', model, dtype, cpu_float32_dots)


@gin.configurable
def training_forward_compiler_options(
    model: Any = None, dtype: Any = None, cpu_float32_dots: str = 'auto'
) -> Optional[Dict[str, Any]]:
  """`compiler_options` for the forward half of a split training step (`trainer.SplitTrainStep`).

  `Trainer` splits the step when this returns options: the forward (loss, metrics and the VJP's
  residuals) compiled with them, the backward plus the optimizer update with XLA's defaults, as two
  executables. With None the step stays one executable. `cpu_float32_dots`:

  * `'auto'` (default): `'eigen'` where `split_step_pays_here()` (an Intel CPU, tcmalloc serving
    the process), else `'ynnpack'`.
  * `'eigen'`: `EIGEN_DOTS` for a float32 model on the CPU backend (the rule of
    `inference_compiler_options`), so the step splits there. On the benchmark's T5 1.1 small
    shape the split trained 5-15% faster on an Intel Xeon and no faster on an AMD EPYC; it holds the
    residuals between the executables: peak RSS 3.2-4.2 GiB against 1.7 GiB at P=100 under
    glibc's allocator, 1.71 against 1.70 GiB under tcmalloc (`benchmarks/ANALYSIS.md`).
  * `'ynnpack'`: None, one executable everywhere.
  """
  return _cpu_float32_options(
      'training_forward_compiler_options',
      model,
      dtype,
      cpu_float32_dots,
      choices=TRAINING_CPU_FLOAT32_DOTS,
  )
