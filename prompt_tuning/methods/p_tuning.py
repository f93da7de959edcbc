"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): a prompt produced by a small network.

The virtual-token embeddings `E` are not used directly: a reparameterisation network maps them to
the prompt, which is prepended to the encoder inputs as in prompt tuning. Both are trained; the
saved artifact is the network's *output* (`export_fn = @artifacts.export_prompt_output`), a plain
`[P, H]` prompt that evaluation and serving use without the network (as PEFT stores P-tuning
adapters: `inference_mode` builds the embedding only).

Networks, as Hugging Face PEFT's `PromptEncoder` (`tuners/p_tuning/model.py`):

* `'mlp'` (PEFT's default): `W3 relu(W2 relu(W1 e + b1) + b2) + b3`, `W1: H -> h`, `W2: h -> h`,
  `W3: h -> H` (three Linears and two ReLUs; PEFT's `mlp_head.{0,2,4}`).
* `'lstm'` (the paper's): a bidirectional LSTM (`num_lstm_layers` layers, hidden `h` per
  direction, torch's gate order i, f, g, o) run over the embedding rows as *one* sequence, then
  `Linear(2h -> 2h) - ReLU - Linear(2h -> H)` (`mlp_head.{0,2}`).

`h` (`hidden_size`) defaults to `H`. Initialization is torch's: embedding N(0, 1), Linear weights and
biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LSTM weights and biases U(-1/sqrt(h), 1/sqrt(h)).

Where PEFT departs for encoder-decoder models: it allocates `num_transformer_submodules = 2`
times the prompt length rows and uses the first `length` for the encoder; the LSTM then also reads
the unused rows, so the used prompt depends on them. We follow the paper and Lester et al.
(one row per prompt position, encoder only: PEFT's `num_transformer_submodules=1`); `num_rows`
reproduces PEFT's default layout (`num_rows = 2 * length`).

Parameters (under the encoder prompt, `encoder/prompt/prompt/...`): `embedding` `[rows, H]`,
`mlp_head/dense_{i}/{kernel, bias}`, and for the LSTM
`lstm/layers_{l}_{forward,backward}/{wi [in, 4h], wh [h, 4h], bias [4h]}` (torch's `b_ih + b_hh`).
"""

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from prompt_tuning import prompts
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import artifacts

Array = Any
Initializer = Callable[..., Array]

REPARAMETERIZATIONS = ('mlp', 'lstm')
REPLICATED = (None, None)  # small networks: replicated, not factored by Adafactor


def torch_uniform(fan_in: int) -> Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default Linear weight/bias and LSTM init."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, tuple(shape), dtype, -bound, bound)

  return init


def normal(stddev: float = 1.0) -> Initializer:
  """N(0, stddev^2) (torch's `nn.Embedding` init for stddev 1)."""

  def init(rng, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(rng, tuple(shape), dtype)

  return init


def saved_prompt(module: nn.Module, embedded: Optional[Array]) -> Array:
  """Inference mode of a reparameterised prompt (`module.artifact` set): the saved output, no
  network (parameter `encoder/prompt/prompt/prompt`, `[module.length, H]`)."""
  embed_dim = prompts.infer_embed_dim(module, module.embed_dim, embedded, 'prompt')
  prompt = artifacts.param(
      module,
      'prompt',
      prompts.zeros(),
      (module.length, embed_dim),
      prompts.PROMPT_AXES,
      module.artifact,
  )
  return jnp.asarray(prompt, module.dtype)


class Dense(nn.Module):
  """`x @ kernel + bias` with torch's default init; replicated parameters (small method networks).

  Attributes:
    features: output width.
    use_bias: add a bias.
    axes: logical axes of the kernel (the bias takes the second).
    kernel_init: default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bias_init: default the same.
  """

  features: int
  use_bias: bool = True
  axes: Sequence[str] = REPLICATED
  kernel_init: Optional[Initializer] = None
  bias_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = artifacts.param(
        self,
        'kernel',
        self.kernel_init or torch_uniform(fan_in),
        (fan_in, self.features),
        self.axes,
    )
    y = x @ jnp.asarray(kernel, x.dtype)
    if self.use_bias:
      bias = artifacts.param(
          self, 'bias', self.bias_init or torch_uniform(fan_in), (self.features,), self.axes[1:]
      )
      y = y + jnp.asarray(bias, x.dtype)
    return y


def lstm_direction(x: Array, wi: Array, wh: Array, bias: Array, reverse: bool = False) -> Array:
  """One LSTM direction over `x [T, in]` -> hidden states `[T, h]` (torch gate order i, f, g, o)."""
  h = wh.shape[0]
  gates_x = x @ wi + bias  # [T, 4h]

  def step(carry, gx):
    hidden, cell = carry
    z = gx + hidden @ wh
    i, f, g, o = jnp.split(z, 4, axis=-1)
    cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return (hidden, cell), hidden

  zeros = jnp.zeros((h,), x.dtype)
  _, out = jax.lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)
  return out


class LstmDirection(nn.Module):
  hidden_size: int

  @nn.compact
  def __call__(self, x: Array, reverse: bool) -> Array:
    h = self.hidden_size
    init = torch_uniform(h)
    wi = artifacts.param(self, 'wi', init, (x.shape[-1], 4 * h), REPLICATED)
    wh = artifacts.param(self, 'wh', init, (h, 4 * h), REPLICATED)
    # torch has b_ih and b_hh, each U(-1/sqrt(h), 1/sqrt(h)); only their sum matters.
    bias = artifacts.param(
        self,
        'bias',
        lambda r, s: init(r, s) + init(jax.random.fold_in(r, 1), s),
        (4 * h,),
        ('prompt_embed',),
    )
    return lstm_direction(x, wi, wh, bias, reverse=reverse)


class BidirectionalLstm(nn.Module):
  """A stacked bidirectional LSTM over one sequence `[T, in]` -> `[T, 2h]` (forward || backward)."""

  hidden_size: int
  num_layers: int = 2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for layer in range(self.num_layers):
      fwd = LstmDirection(self.hidden_size, name=f'layers_{layer}_forward')(x, False)
      bwd = LstmDirection(self.hidden_size, name=f'layers_{layer}_backward')(x, True)
      x = jnp.concatenate([fwd, bwd], axis=-1)
    return x


class PTuningPrompt(nn.Module):
  """A P-tuning prompt generator `[P, H]` (the `prompt` child of a `prompted.CombinedPrompt`).

  Attributes:
    length: P, the number of prompt positions.
    reparameterization: `'mlp'` or `'lstm'`.
    hidden_size: `h` (default H).
    num_rows: embedding rows the network runs over (default P; PEFT's seq2seq default is `2 P`);
      the first P outputs are the prompt.
    num_lstm_layers: LSTM depth (PEFT's `encoder_num_layers`, default 2).
    embedding_init: initializer of the `[rows, H]` embedding (default N(0, 1) as PEFT).
    embed_dim: H (inferred from the embedded inputs when None).
    dtype: the returned prompt's dtype.
    artifact: inference mode: the prompt is read from this artifact (no network).
  """

  length: int
  reparameterization: str = 'mlp'
  hidden_size: Optional[int] = None
  num_rows: Optional[int] = None
  num_lstm_layers: int = 2
  embedding_init: Initializer = normal(1.0)
  embed_dim: Optional[int] = None
  dtype: Any = jnp.float32
  artifact: Optional[artifacts.Artifact] = None

  def __post_init__(self):
    if self.reparameterization not in REPARAMETERIZATIONS:
      raise ValueError(
          f'P-tuning reparameterization must be one of {REPARAMETERIZATIONS}, got '
          f'{self.reparameterization!r}.'
      )
    if self.num_rows is not None and self.num_rows < self.length:
      raise ValueError(f'num_rows ({self.num_rows}) must be >= the prompt length ({self.length}).')
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
  ) -> Array:
    del tokens, prompt_ids
    if self.artifact is not None:
      return saved_prompt(self, embedded)
    embed_dim = prompts.infer_embed_dim(self, self.embed_dim, embedded, 'embedding')
    rows = self.num_rows or self.length
    e = artifacts.param(
        self, 'embedding', self.embedding_init, (rows, embed_dim), ('prompt', 'prompt_embed')
    )
    h = self.hidden_size or embed_dim
    if self.reparameterization == 'mlp':
      x = nn.relu(Dense(h, name='dense_0')(e))
      x = nn.relu(Dense(h, name='dense_1')(x))
      out = Dense(embed_dim, name='dense_2')(x)
    else:
      x = BidirectionalLstm(h, self.num_lstm_layers, name='lstm')(e)
      x = nn.relu(Dense(2 * h, name='dense_0')(x))
      out = Dense(embed_dim, name='dense_1')(x)
    return out[: self.length].astype(self.dtype)


def prompt_factory(
    length: int,
    reparameterization: str = 'mlp',
    hidden_size: Optional[int] = None,
    num_rows: Optional[int] = None,
    num_lstm_layers: int = 2,
    embedding_init: Initializer = normal(1.0),
    combine: prompts.CombineFn = prompts.prefix_prompt,
    artifact: Optional[artifacts.Artifact] = None,
) -> Callable[[], prompted.CombinedPrompt]:
  """A `prompt_factory` (for `prompted.PromptEncoderDecoder`) with a P-tuning generator."""

  def factory() -> prompted.CombinedPrompt:
    generator = PTuningPrompt(
        length=length,
        reparameterization=reparameterization,
        hidden_size=hidden_size,
        num_rows=num_rows,
        num_lstm_layers=num_lstm_layers,
        embedding_init=embedding_init,
        artifact=artifact,
        parent=None,
    )
    return prompted.CombinedPrompt(prompt=generator, combine=combine)

  factory.combine = combine
  factory.length = length
  return factory
