"""A method's saved artifact: the parameters inference needs, as `.npy` files (or a PEFT adapter).

Training saves, at every checkpoint, the arrays inference needs under
`MODEL_DIR/numpy_checkpoints/checkpoint_<step>/`, one `.npy` per parameter path (`/` -> `.`, e.g.
`decoder.layers_0.self_attention.query.lora.lora_a.npy`). For most methods these are the trained
parameters themselves (`export_trainable`). Where training uses a reparameterisation that inference
does not need (P-tuning's MLP/LSTM, residual prompt tuning's MLP, prefix tuning's projection), the
method's `export_fn` computes the inference parameters from the trained ones (the prompt the
network outputs, the projected keys and values), so evaluation and serving load plain arrays.

`Artifact(path)` reads such a directory, or a Hugging Face PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, converted by `checkpoints/peft.py`), and
`param(...)` creates a method parameter that is initialized from it when one is given, else from its
initializer. Gin: `configs/methods/from_artifact.gin` (`ARTIFACT_DIR`), used by
`configs/methods/eval.gin` and `infer.gin`.
"""

import json
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from prompt_tuning import fs
from prompt_tuning import params as params_lib

Array = Any
Initializer = Callable[..., Array]

PROMPT_PATH = 'encoder/prompt/prompt/prompt'
PEFT_CONFIG_NAME = 'adapter_config.json'


def file_name(path: str) -> str:
  """The artifact file of parameter `path` (`a/b/c` -> `a.b.c.npy`), as the checkpointer names it."""
  return path.replace('/', '.') + '.npy'


class Artifact:
  """Inference parameters read from a directory, by flattened parameter path.

  The directory is either an artifact written by training (`.npy` files named by `file_name`) or a
  PEFT adapter directory, converted to this project's parameter names for `config` (a `T5Config`;
  needed for PEFT adapters only). Arrays are read on first use and kept.

  Instances compare by identity, so hooks and prompt modules holding one stay hashable.
  """

  def __init__(self, path: str, config: Any = None):
    if not path:
      raise ValueError('Artifact needs a directory: set ARTIFACT_DIR.')
    self.path = str(path)
    self.config = config
    self._lock = threading.Lock()
    self._peft: Any = None
    if not fs.isdir(self.path):
      raise FileNotFoundError(
          f'ARTIFACT_DIR {self.path!r} is not a directory. Point it at '
          'MODEL_DIR/numpy_checkpoints/checkpoint_<step> of a training run, or at a PEFT adapter '
          f'directory ({PEFT_CONFIG_NAME} + adapter_model.safetensors).'
      )

  @property
  def is_peft(self) -> bool:
    return fs.exists(fs.join(self.path, PEFT_CONFIG_NAME))

  def _adapter(self) -> Any:
    with self._lock:
      if self._peft is None:
        from prompt_tuning.checkpoints import peft  # pylint: disable=g-import-not-at-top

        if self.config is None:
          raise ValueError(
              f'{self.path} is a PEFT adapter: reading it needs the model config '
              '(Artifact.config = %T5_CONFIG, as configs/methods/from_artifact.gin binds it).'
          )
        self._peft = peft.load_adapter(self.path, self.config)
      return self._peft

  def _peft_params(self) -> Dict[str, np.ndarray]:
    return self._adapter().params

  def lora_scale(self) -> Optional[float]:
    """LoRA's `alpha / r` when the artifact records it (a PEFT adapter, or `lora.json`)."""
    if self.is_peft:
      return self._adapter().lora_scale
    info = fs.join(self.path, 'lora.json')
    if fs.exists(info):
      meta = json.loads(fs.read_text(info))
      return float(meta['alpha']) / float(meta['rank'])
    return None

  def check_covers(self, wanted: Callable[[str], bool], what: str, fix: str) -> None:
    """Raises if the artifact holds parameters the model would not load (`wanted` is False)."""
    extra = [p for p in self.paths() if not wanted(p)]
    if extra:
      raise ValueError(
          f'The artifact {self.path} has {what} parameters this configuration does not create, '
          f'e.g. {extra[:4]}: they would be silently ignored. {fix}'
      )

  def paths(self) -> Sequence[str]:
    """The parameter paths the artifact holds."""
    if self.is_peft:
      return sorted(self._peft_params())
    return sorted(
        n[: -len('.npy')].replace('.', '/') for n in fs.listdir(self.path) if n.endswith('.npy')
    )

  def get(self, path: str, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The array of parameter `path`; checks `shape` when given.

    Raises:
      KeyError: the artifact has no such parameter (the message lists what it has).
      ValueError: the stored array has another shape (both shapes are named).
    """
    if self.is_peft:
      flat = self._peft_params()
      if path not in flat:
        raise KeyError(
            f'The PEFT adapter {self.path} has no parameter for {path!r}; it holds '
            f'{sorted(flat)[:8]}{" ..." if len(flat) > 8 else ""}. Is it an adapter of this method '
            '(and of the same target modules)?'
        )
      value = flat[path]
    else:
      name = fs.join(self.path, file_name(path))
      if not fs.exists(name):
        have = self.paths()
        raise KeyError(
            f'The artifact {self.path} has no {file_name(path)} (parameter {path!r}); it holds '
            f'{have[:8]}{" ..." if len(have) > 8 else ""}. Was it written by a run of this method '
            'with the same configuration?'
        )
      with fs.open(name, 'rb') as f:
        value = np.load(f, allow_pickle=False)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(
          f'Parameter {path!r} of the artifact {self.path} has shape {tuple(value.shape)}, but the '
          f'model expects {tuple(shape)}: the artifact was made for another model size or method '
          'configuration (prompt length, rank, heads, layers).'
      )
    return np.asarray(value, np.float32)

  def initializer(self, path: str) -> Initializer:
    """An initializer `(rng, shape, dtype)` returning the artifact's array for `path`."""

    def init(rng, shape, dtype=jnp.float32):
      del rng
      return jnp.asarray(self.get(path, shape), dtype)

    return init

  def __repr__(self) -> str:
    return f'Artifact({self.path!r})'


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[Optional[str]],
    artifact: Optional[Artifact] = None,
) -> Array:
  """`param_with_axes(name, ...)` of `module`, initialized from `artifact` when one is given."""
  if artifact is not None:
    init = artifact.initializer('/'.join(tuple(module.path) + (name,)))
  shape = tuple(int(d) for d in shape)
  return partitioning.param_with_axes(name, lambda rng, s: init(rng, s), shape, axes=tuple(axes))


def prompt_init(artifact: Artifact) -> Initializer:
  """The encoder prompt's initializer from an artifact (`PROMPT_INIT` in from_artifact.gin)."""
  return artifact.initializer(PROMPT_PATH)


# ----------------------------------------------------------------------------------------------
# Export functions (`utils.SaveCheckpointConfig.export_fn`).
# ----------------------------------------------------------------------------------------------


def export_trainable(model: Any, params: Mapping[str, Any]) -> Dict[str, Array]:
  """The trainable parameters as they are (`model.optimizer_def.trainable_filter`)."""
  flat = params_lib.flatten_params(params)
  keep = model.optimizer_def.trainable_filter
  return {p: v for p, v in flat.items() if keep(p)}


def module_output(model: Any, params: Mapping[str, Any], fn: Callable[[nn.Module], Any]) -> Any:
  """`fn(bound_module)` run inside `model.module` with `params` (e.g. a submodule's method).

  The model module's submodules are reachable from the bound module (`m.encoder.prompt`); an
  export function uses this to compute inference parameters from trained ones with the very
  modules that were trained.
  """
  return model.module.apply({'params': params}, method=fn)


def encoder_prompt(module: nn.Module) -> Array:
  """The encoder prompt module's output for one example, `[P, H]` (prompt generators' output)."""
  return module.encoder.prompt.get_prompt(1)[0]


def export_prompt_output(model: Any, params: Mapping[str, Any]) -> Dict[str, Array]:
  """The encoder prompt as inference sees it (the output of a reparameterised prompt).

  Written as `encoder.prompt.prompt.prompt.npy`, the plain prompt of prompt tuning: evaluation and
  serving use it with `prompts/from_file.gin` (or `methods/from_artifact.gin`) and no network.
  """
  return {PROMPT_PATH: module_output(model, params, encoder_prompt)}
