"""Wayward prompts (Khashabi et al. 2022), as google-research/prompt-tuning `extended/train/wayward.py`.

The loss gains `gamma * d(P, D)` where `P` is the soft prompt, `D` the embedded discrete prompt
(the task description) and `d(x, y) = (1/l) sum_t sum_h (x_th - y_th)^2` the squared L2 distance
summed over the hidden axis and averaged over the `l` prompt positions (`squared_l2_distance`),
with `gamma = 0.01`. The prompt is initialized from the same embedded string, so the term starts
at zero; it measures (and, with a larger gamma, limits) how far the prompt wanders from an
interpretable discrete prompt.

`D = embeddings[vocab.encode(text)[:l]]` written into a zero matrix (the original's
`from_embedded_string(..., initializer=zeros)`), read from the frozen checkpoint's
`token_embedder/embedding`. `PROMPT_LENGTH` is the number of pieces of the text (`length`).

The term enters through the runtime's loss door (`models.EncoderDecoderModel.loss_terms`), so it
is reported as `loss_terms/wayward` (and its distance as `wayward/distance`); the original left it
out of the metrics.
"""

import threading
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from prompt_tuning import params as params_lib
from prompt_tuning import prompts

Array = Any
PROMPT_PATH = 'encoder/prompt/prompt/prompt'


def length(vocab: Any, text: str) -> int:
  """The number of pieces `vocab` encodes `text` to (the prompt length of a wayward run)."""
  n = len(list(vocab.encode(text)))
  if n == 0:
    raise ValueError(f'The discrete prompt {text!r} encodes to no pieces.')
  return n


def discrete_prompt(embeddings: Any, vocab: Any, text: str, prompt_length: int) -> np.ndarray:
  """`D`: the embedded pieces of `text` in a zero `[prompt_length, H]` matrix (numpy).

  The same matrix as `prompts.from_embedded_string(embeddings, vocab, text, prompts.zeros())`
  (the prompt's init): the pieces of `vocab.encode(text)` (no EOS), truncated to the length.
  """
  table = np.asarray(prompts._resolve(embeddings))  # pylint: disable=protected-access
  ids = list(vocab.encode(text))[:prompt_length]
  if ids and max(ids) >= table.shape[0]:
    raise ValueError(
        f'{text!r} encodes to ids {ids} but the embedding table has {table.shape[0]} rows: the '
        'vocabulary does not match the model.'
    )
  out = np.zeros((prompt_length, table.shape[-1]), np.float32)
  out[: len(ids)] = table[ids]
  return out


def squared_l2_distance(x: Array, y: Array) -> Array:
  """`(1/l) sum_t sum_h (x_th - y_th)^2` over `[l, H]` arrays (the original's)."""
  return jnp.sum(jnp.square(x - y)) / x.shape[0]


class WaywardLoss:
  """The loss term `gamma * squared_l2_distance(prompt, D)` (a `loss_terms` entry).

  Attributes:
    gamma: the weight (0.01 in the original).
    name: the term's name in the metrics.
  """

  def __init__(
      self,
      embeddings: Any,
      vocab: Any,
      text: str,
      prompt_length: Optional[int] = None,
      gamma: float = 0.01,
      prompt_path: str = PROMPT_PATH,
      name: str = 'wayward',
  ):
    """The term for the discrete prompt `text`.

    Args:
      embeddings: the `[V, H]` input embedding, or a loader (`prompts.t5x_load(...)`).
      vocab: a seqio vocabulary (encodes `text`).
      text: the discrete prompt (the task description).
      prompt_length: l (default: the number of pieces of `text`).
      gamma: the weight.
      prompt_path: the soft prompt's parameter path.
      name: the term's name.
    """
    self.embeddings, self.vocab, self.text = embeddings, vocab, text
    self.prompt_length = prompt_length
    self.gamma = float(gamma)
    self.prompt_path = prompt_path
    self.name = name
    self._target: Optional[np.ndarray] = None
    self._lock = threading.Lock()

  @property
  def target(self) -> np.ndarray:
    """`D` `[l, H]` (read once)."""
    with self._lock:
      if self._target is None:
        n = self.prompt_length or length(self.vocab, self.text)
        self._target = discrete_prompt(self.embeddings, self.vocab, self.text, n)
      return self._target

  def __call__(
      self, params: Mapping[str, Any], batch: Mapping[str, Array], outputs: Mapping[str, Array]
  ) -> Tuple[Array, Dict[str, Array]]:
    del batch, outputs
    flat = params_lib.flatten_params(params)
    if self.prompt_path not in flat:
      raise ValueError(
          f'The wayward loss needs the soft prompt {self.prompt_path!r}, which the model does not '
          'have (use a prompted model, configs/models/*_prompt.gin).'
      )
    prompt = jnp.asarray(flat[self.prompt_path], jnp.float32)
    target = self.target
    if tuple(prompt.shape) != tuple(target.shape):
      raise ValueError(
          f'The soft prompt has shape {tuple(prompt.shape)} but the embedded discrete prompt '
          f'{tuple(target.shape)}: set PROMPT_LENGTH to the number of pieces of the text '
          f'({length(self.vocab, self.text)}).'
      )
    distance = squared_l2_distance(prompt, jnp.asarray(target))
    return self.gamma * distance, {'distance': distance}
