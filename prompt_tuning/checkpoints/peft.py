"""Hugging Face PEFT adapters in and out: prompt tuning, P-tuning, prefix tuning, IA3 and LoRA on T5.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`;
`PeftModel.from_pretrained(T5ForConditionalGeneration..., dir)` loads it. This module converts
between such a directory and this project's parameters (flattened paths, flaxformer names), for
a backbone described by a `T5Config`:

| PEFT type | safetensors | ours |
|---|---|---|
| `PROMPT_TUNING`, `P_TUNING` | `prompt_embeddings` `[n * S, d]` | `encoder/prompt/prompt/prompt` `[n, d]` |
| `PREFIX_TUNING` | `prompt_embeddings` `[n, 2 N d']` | `decoder/layers_l/self_attention/prefix/{key,value}` `[n, heads, dh]` |
| `IA3` | `base_model.model.<module>.ia3_l` | `<attention>/{k_conv,v_conv}/ia3_scaling`, `<mlp>/intermediate_conv/ia3_scaling` |
| `LORA` | `base_model.model.<module>.lora_{A,B}.weight` | `<kernel's module>/lora/lora_{a,b}` (transposed) |

Layouts read as PEFT defines them (methods.md §1-4):

* Prompt tuning / P-tuning on seq2seq keep `n * num_transformer_submodules` rows (S = 1 or 2) and
  prepend only the first n to the encoder: import reads those. A P-tuning adapter is its
  network's output (PEFT saves no network), i.e. a plain prompt. Export writes S = 1.
* Prefix tuning on T5 feeds the decoder's self-attention only: decoder layer l reads table entries
  `(4 l mod 2N, 4 l + 1 mod 2N)` of the `[n, 2N, heads, d'/heads]` view (N = `num_layers`). Export
  writes N = L for an odd number of decoder layers L (the entries are then a permutation of the
  layers' keys and values) and N = 2L for an even L (layer l then reads entries 4l, 4l + 1, and the
  other entries are unused); `token_dim = heads * head_dim`, so PEFT's head width is ours.
* IA3 for T5 scales the outputs of `k` and `v` (`[heads * dh, 1]`) and the input of `wo`
  (`[1, mlp]`); mT5's mapping scales the output of `wi_1` (`[mlp, 1]`), the same function.
* LoRA: `y = W x + (alpha / r) B A x` (`alpha / sqrt(r)` with rsLoRA); `A [r, in]`, `B [out, r]`.
  Our `lora_a = A^T`, `lora_b = B^T`; the scale stays the adapter's (`Adapter.lora_scale`).

Errors name the cause and both shapes: an adapter for another hidden size, number of layers or
heads; an unknown or unsupported `peft_type`; options this project does not implement (DoRA,
per-module ranks). Writes are atomic (a temporary sibling renamed into place, the config last).
This module imports neither torch nor PEFT.
"""

import dataclasses
import json
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import t5

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
PROMPT_KEY = 'prompt_embeddings'
PROMPT_PATH = 'encoder/prompt/prompt/prompt'
SUPPORTED = ('PROMPT_TUNING', 'P_TUNING', 'PREFIX_TUNING', 'IA3', 'LORA')
MODEL_PREFIX = 'base_model.model.'

_ATTENTION_HF = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_ATTENTION_OURS = {v: k for k, v in _ATTENTION_HF.items()}
_MLP_KERNELS = ('wi', 'wi_0', 'wi_1', 'wo')


@dataclasses.dataclass
class Adapter:
  """A PEFT adapter converted to this project's parameters.

  Attributes:
    peft_type: PEFT's type name (`LORA`, ...).
    config: the adapter's `adapter_config.json`.
    params: flat `{our parameter path: float32 array}`.
    lora_scale: LoRA's `alpha / r` (or `alpha / sqrt(r)`); None for other types.
  """

  peft_type: str
  config: Dict[str, Any]
  params: Dict[str, np.ndarray]
  lora_scale: Optional[float] = None


# ----------------------------------------------------------------------------------------------
# Module names: transformers T5 <-> flaxformer.
# ----------------------------------------------------------------------------------------------


def hf_module_to_path(name: str) -> str:
  """`encoder.block.0.layer.0.SelfAttention.q` -> `encoder/layers_0/attention/query`.

  Raises:
    ValueError: not a T5 attention, MLP or output module.
  """
  if name == 'lm_head':
    return 'decoder/logits_dense'
  m = re.fullmatch(r'(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(\w+)\.(\w+)', name)
  if not m:
    raise ValueError(f'{name!r} is not a T5 attention or MLP module.')
  stack, layer, sub, block, kernel = m.groups()
  base = f'{stack}/layers_{layer}'
  if block == 'SelfAttention' and kernel in _ATTENTION_HF:
    attn = 'attention' if stack == 'encoder' else 'self_attention'
    return f'{base}/{attn}/{_ATTENTION_HF[kernel]}'
  if block == 'EncDecAttention' and stack == 'decoder' and kernel in _ATTENTION_HF:
    return f'{base}/encoder_decoder_attention/{_ATTENTION_HF[kernel]}'
  if block == 'DenseReluDense' and kernel in _MLP_KERNELS:
    return f'{base}/mlp/{kernel}'
  raise ValueError(f'{name!r} is not a T5 attention or MLP module this project maps.')


def path_to_hf_module(path: str) -> str:
  """`encoder/layers_0/attention/query` -> `encoder.block.0.layer.0.SelfAttention.q`."""
  if path == 'decoder/logits_dense':
    return 'lm_head'
  m = re.fullmatch(r'(encoder|decoder)/layers_(\d+)/(\w+)/(\w+)', path)
  if not m:
    raise ValueError(f'{path!r} is not a kernel module path of an attention or MLP.')
  stack, layer, block, kernel = m.groups()
  if block in ('attention', 'self_attention') and kernel in _ATTENTION_OURS:
    return f'{stack}.block.{layer}.layer.0.SelfAttention.{_ATTENTION_OURS[kernel]}'
  if block == 'encoder_decoder_attention' and kernel in _ATTENTION_OURS:
    return f'{stack}.block.{layer}.layer.1.EncDecAttention.{_ATTENTION_OURS[kernel]}'
  if block == 'mlp' and kernel in _MLP_KERNELS:
    sub = 1 if stack == 'encoder' else 2
    return f'{stack}.block.{layer}.layer.{sub}.DenseReluDense.{kernel}'
  raise ValueError(f'{path!r} is not a kernel module path of an attention or MLP.')


def _kernel_shape(config: t5.T5Config, path: str) -> Tuple[int, int]:
  """`(in, out)` of the kernel at module path `path` for `config`."""
  inner = config.num_heads * config.head_dim
  kernel = path.rsplit('/', 1)[1]
  if kernel in ('query', 'key', 'value'):
    return config.emb_dim, inner
  if kernel == 'out':
    return inner, config.emb_dim
  if kernel == 'wo':
    return config.mlp_dim, config.emb_dim
  if kernel == 'logits_dense':
    return config.emb_dim, config.vocab_size
  return config.emb_dim, config.mlp_dim


def _check_layer(config: t5.T5Config, path: str, what: str) -> None:
  m = re.match(r'(encoder|decoder)/layers_(\d+)/', path)
  if m:
    n = config.num_encoder_layers if m.group(1) == 'encoder' else config.num_decoder_layers
    if int(m.group(2)) >= n:
      raise ValueError(
          f'The {what} has a module in {m.group(1)} layer {m.group(2)}, but the model has '
          f'{n} {m.group(1)} layers: it is an adapter for another model.'
      )


def _mismatch(what: str, found, expected, cause: str) -> ValueError:
  return ValueError(
      f'The PEFT adapter {what} has shape {tuple(found)}, but this model needs {tuple(expected)} '
      f'({cause}): the adapter was trained for another model.'
  )


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def read_adapter_files(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """`(adapter_config, tensors)` of a PEFT adapter directory (safetensors, float32)."""
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  config_path = fs.join(path, CONFIG_NAME)
  if not fs.exists(config_path):
    raise FileNotFoundError(f'{path!r} is not a PEFT adapter directory: {CONFIG_NAME} is missing.')
  cfg = json.loads(fs.read_text(config_path))
  weights = fs.join(path, WEIGHTS_NAME)
  if fs.exists(weights):
    tensors = huggingface.read_safetensors(weights)
  elif fs.exists(fs.join(path, 'adapter_model.bin')):
    tensors = huggingface.read_state_dict(fs.join(path, 'adapter_model.bin'))
  else:
    raise FileNotFoundError(f'The PEFT adapter {path!r} has no {WEIGHTS_NAME} (or .bin) file.')
  return cfg, tensors


def _strip_adapter_name(name: str) -> str:
  """PEFT saves without the adapter name; tolerate `.default.` left in by hand-made files."""
  return name.replace('.default.', '.').replace('.default', '')


def _peft_type(cfg: Mapping[str, Any]) -> str:
  peft_type = str(getattr(cfg.get('peft_type'), 'value', cfg.get('peft_type', '')))
  if peft_type not in SUPPORTED:
    raise ValueError(
        f'Unknown or unsupported PEFT adapter type {peft_type!r}; supported: {", ".join(SUPPORTED)}.'
    )
  task = getattr(cfg.get('task_type'), 'value', cfg.get('task_type'))
  if task not in (None, 'SEQ_2_SEQ_LM'):
    raise ValueError(
        f'The PEFT adapter is for task_type {task!r}; only SEQ_2_SEQ_LM (T5) adapters are supported.'
    )
  return peft_type


def _prompt_rows(cfg, tensors, config) -> np.ndarray:
  table = tensors.get(PROMPT_KEY)
  if table is None:
    raise ValueError(f'The PEFT {cfg["peft_type"]} adapter has no {PROMPT_KEY!r} tensor.')
  n = int(cfg['num_virtual_tokens'])
  if config is not None and table.shape[-1] != config.emb_dim:
    raise _mismatch(PROMPT_KEY, table.shape, (table.shape[0], config.emb_dim), 'hidden size')
  if table.shape[0] < n:
    raise ValueError(
        f'The PEFT prompt table has {table.shape[0]} rows, fewer than num_virtual_tokens={n}.'
    )
  # Seq2seq: n * num_transformer_submodules rows; the encoder uses the first n.
  return np.asarray(table[:n], np.float32)


def _prefix_params(cfg, tensors, config) -> Dict[str, np.ndarray]:
  table = tensors.get(PROMPT_KEY)
  if table is None:
    raise ValueError(f'The PEFT PREFIX_TUNING adapter has no {PROMPT_KEY!r} tensor.')
  n, num_layers = int(cfg['num_virtual_tokens']), int(cfg['num_layers'])
  if int(cfg.get('num_transformer_submodules') or 2) != 2:
    raise ValueError(
        'PEFT prefix adapters for T5 have num_transformer_submodules=2 (PEFT cannot run a '
        f'seq2seq prefix with {cfg["num_transformer_submodules"]} either).'
    )
  heads, token_dim = int(cfg['num_attention_heads']), int(cfg['token_dim'])
  expected = (n, 2 * num_layers * token_dim)
  if tuple(table.shape) != expected:
    raise _mismatch(
        PROMPT_KEY, table.shape, expected, 'num_virtual_tokens x 2 num_layers token_dim'
    )
  if token_dim % heads:
    raise ValueError(f'token_dim {token_dim} is not a multiple of num_attention_heads {heads}.')
  if (heads, token_dim // heads) != (config.num_heads, config.head_dim):
    raise _mismatch(
        'prefix (heads, head width)',
        (heads, token_dim // heads),
        (config.num_heads, config.head_dim),
        'heads and head width of the decoder self-attention',
    )
  if num_layers < config.num_decoder_layers:
    raise ValueError(
        f"The PEFT prefix has num_layers={num_layers}, fewer than the model's "
        f'{config.num_decoder_layers} decoder layers: it is an adapter for another model.'
    )
  view = table.reshape(n, 2 * num_layers, heads, token_dim // heads)
  out = {}
  for layer in range(config.num_decoder_layers):
    k, v = (4 * layer) % (2 * num_layers), (4 * layer + 1) % (2 * num_layers)
    site = f'decoder/layers_{layer}/self_attention/prefix'
    out[f'{site}/key'] = np.asarray(view[:, k], np.float32)
    out[f'{site}/value'] = np.asarray(view[:, v], np.float32)
  return out


def _module_tensors(tensors: Mapping[str, np.ndarray], suffixes: Iterable[str]):
  """`(module name, suffix, array)` for tensors named `base_model.model.<module>.<suffix>`."""
  suffixes = tuple(suffixes)
  for name, value in tensors.items():
    name = _strip_adapter_name(name)
    if not name.startswith(MODEL_PREFIX):
      raise ValueError(f'Unexpected tensor {name!r} in the PEFT adapter (no {MODEL_PREFIX!r}).')
    body = name[len(MODEL_PREFIX) :]
    for suffix in suffixes:
      if body.endswith('.' + suffix):
        yield body[: -len(suffix) - 1], suffix, value
        break
    else:
      raise ValueError(f'Unexpected tensor {name!r} in the PEFT adapter.')


def _ia3_params(cfg, tensors, config) -> Dict[str, np.ndarray]:
  out = {}
  inner = config.num_heads * config.head_dim
  for module, _, value in _module_tensors(tensors, ('ia3_l',)):
    path = hf_module_to_path(module)
    _check_layer(config, path, 'IA3 adapter')
    base, kernel = path.rsplit('/', 1)
    if kernel in ('key', 'value'):
      if tuple(value.shape) != (inner, 1):
        raise _mismatch(f'{module}.ia3_l', value.shape, (inner, 1), 'heads x head width')
      conv = 'k_conv' if kernel == 'key' else 'v_conv'
      out[f'{base}/{conv}/ia3_scaling'] = value.reshape(config.num_heads, config.head_dim)
    elif kernel == 'wo':  # Feed-forward: scales wo's input.
      if tuple(value.shape) != (1, config.mlp_dim):
        raise _mismatch(f'{module}.ia3_l', value.shape, (1, config.mlp_dim), 'mlp width')
      out[f'{base}/intermediate_conv/ia3_scaling'] = value.reshape(-1)
    elif kernel == 'wi_1':  # mT5's mapping: scales wi_1's output, the same function.
      if tuple(value.shape) != (config.mlp_dim, 1):
        raise _mismatch(f'{module}.ia3_l', value.shape, (config.mlp_dim, 1), 'mlp width')
      out[f'{base}/intermediate_conv/ia3_scaling'] = value.reshape(-1)
    else:
      raise ValueError(
          f'IA3 on {module!r} is not supported: this project rescales the keys and values of the '
          'attentions and the MLP activations (PEFT target modules k, v, wo or wi_1).'
      )
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _lora_params(cfg, tensors, config) -> Tuple[Dict[str, np.ndarray], float]:
  for option in ('use_dora', 'lora_bias'):
    if cfg.get(option):
      raise ValueError(f'LoRA adapters with {option}=True are not supported.')
  for option in ('rank_pattern', 'alpha_pattern'):
    if cfg.get(option):
      raise ValueError(
          f'LoRA adapters with a per-module {option} are not supported (got {cfg[option]}).'
      )
  if cfg.get('bias', 'none') != 'none':
    raise ValueError(f'LoRA adapters with bias={cfg["bias"]!r} are not supported.')
  r, alpha = int(cfg['r']), float(cfg['lora_alpha'])
  scale = alpha / (r**0.5 if cfg.get('use_rslora') else r)
  out = {}
  for module, suffix, value in _module_tensors(tensors, ('lora_A.weight', 'lora_B.weight')):
    path = hf_module_to_path(module)
    _check_layer(config, path, 'LoRA adapter')
    fan_in, fan_out = _kernel_shape(config, path)
    if suffix == 'lora_A.weight':
      if tuple(value.shape) != (r, fan_in):
        raise _mismatch(f'{module}.lora_A.weight', value.shape, (r, fan_in), 'rank x input width')
      out[f'{path}/lora/lora_a'] = np.asarray(value.T, np.float32)
    else:
      if tuple(value.shape) != (fan_out, r):
        raise _mismatch(f'{module}.lora_B.weight', value.shape, (fan_out, r), 'output width x rank')
      out[f'{path}/lora/lora_b'] = np.asarray(value.T, np.float32)
  for path in out:
    other = path[:-1] + ('b' if path.endswith('a') else 'a')
    if other not in out:
      raise ValueError(f'The LoRA adapter has {path} but not {other}.')
  return out, scale


def adapter_from_state(
    cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray], config: t5.T5Config
) -> Adapter:
  """Converts a PEFT config + state dict (as saved) to our parameters for `config`."""
  peft_type = _peft_type(cfg)
  scale = None
  if peft_type in ('PROMPT_TUNING', 'P_TUNING'):
    params = {PROMPT_PATH: _prompt_rows(cfg, tensors, config)}
  elif peft_type == 'PREFIX_TUNING':
    params = _prefix_params(cfg, tensors, config)
  elif peft_type == 'IA3':
    params = _ia3_params(cfg, tensors, config)
  else:
    params, scale = _lora_params(cfg, tensors, config)
  cfg = dict(cfg, peft_type=peft_type)
  return Adapter(peft_type, cfg, params, scale)


def load_adapter(path: str, config: t5.T5Config) -> Adapter:
  """Reads a PEFT adapter directory as our parameters for a backbone with `config`."""
  cfg, tensors = read_adapter_files(path)
  try:
    return adapter_from_state(cfg, tensors, config)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def load_prompt(path: str, embed_dim: Optional[int] = None) -> np.ndarray:
  """The encoder prompt `[n, d]` of a PEFT prompt-tuning or P-tuning adapter (a prompt initializer
  source: `prompts.from_array.prompt = @peft.load_prompt()`, `configs/prompts/from_peft.gin`)."""
  cfg, tensors = read_adapter_files(path)
  if _peft_type(cfg) not in ('PROMPT_TUNING', 'P_TUNING'):
    raise ValueError(
        f'{path} is a {cfg["peft_type"]} adapter, not a prompt (PROMPT_TUNING or P_TUNING).'
    )
  prompt = _prompt_rows(cfg, tensors, None)
  if embed_dim is not None and prompt.shape[1] != embed_dim:
    raise _mismatch(PROMPT_KEY, prompt.shape, (prompt.shape[0], embed_dim), 'hidden size')
  return prompt


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def detect_type(params: Mapping[str, Any]) -> str:
  """The PEFT type our flat `params` correspond to (an artifact of prompt tuning, prefix, ...)."""
  paths = list(params_lib.flatten_params(params))
  kinds = set()
  for p in paths:
    if p == PROMPT_PATH:
      kinds.add('PROMPT_TUNING')
    elif re.search(r'/prefix/(key|value)$', p):
      kinds.add('PREFIX_TUNING')
    elif p.endswith('/ia3_scaling'):
      kinds.add('IA3')
    elif re.search(r'/lora/lora_[ab]$', p):
      kinds.add('LORA')
    else:
      raise ValueError(
          f'{p!r} has no PEFT equivalent (PEFT has prompt tuning, P-tuning, prefix tuning, IA3 '
          'and LoRA; per-layer prompts, DePT and projected prefixes before collapsing do not).'
      )
  if len(kinds) != 1:
    raise ValueError(
        f'Cannot tell the PEFT type of parameters of several methods: {sorted(kinds)}.'
    )
  return kinds.pop()


def _base_config(peft_type: str, base_model_name_or_path: str) -> Dict[str, Any]:
  return {
      'peft_type': peft_type,
      'task_type': 'SEQ_2_SEQ_LM',
      'auto_mapping': None,
      'base_model_name_or_path': base_model_name_or_path,
      'revision': None,
      'inference_mode': True,
  }


def _prompt_learning_config(config: t5.T5Config, n: int, num_layers: int) -> Dict[str, Any]:
  return {
      'num_virtual_tokens': n,
      'token_dim': config.emb_dim,
      'num_transformer_submodules': 1,
      'num_attention_heads': config.num_heads,
      'num_layers': num_layers,
      'modules_to_save': None,
  }


def to_peft(
    params: Mapping[str, Any],
    config: t5.T5Config,
    *,
    peft_type: Optional[str] = None,
    base_model_name_or_path: str = '',
    lora_scale: Optional[float] = None,
    p_tuning: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """`(adapter_config, safetensors tensors)` of our parameters (flat or nested) for `config`.

  Args:
    params: our method parameters (an artifact: `{path: array}`).
    config: the backbone's config.
    peft_type: default `detect_type(params)`; `P_TUNING` for a P-tuning prompt.
    base_model_name_or_path: recorded in the config (PEFT loads the base model passed to it).
    lora_scale: LoRA's `alpha / r` of the run; written as `lora_alpha = scale * r`.
    p_tuning: optional PEFT P-tuning fields (`encoder_reparameterization_type`,
      `encoder_hidden_size`) recorded in the config.
  """
  flat = {k: np.asarray(v, np.float32) for k, v in params_lib.flatten_params(params).items()}
  detected = detect_type(flat)
  peft_type = peft_type or detected
  if detected == 'PROMPT_TUNING' and peft_type in ('PROMPT_TUNING', 'P_TUNING'):
    pass
  elif peft_type != detected:
    raise ValueError(f'The parameters are a {detected} adapter, not {peft_type}.')
  cfg = _base_config(peft_type, base_model_name_or_path)
  if peft_type in ('PROMPT_TUNING', 'P_TUNING'):
    prompt = flat[PROMPT_PATH]
    if prompt.ndim != 2 or prompt.shape[1] != config.emb_dim:
      raise _mismatch('prompt', (config.emb_dim,), prompt.shape, 'hidden size')
    cfg.update(_prompt_learning_config(config, prompt.shape[0], config.num_encoder_layers))
    if peft_type == 'PROMPT_TUNING':
      cfg.update(
          prompt_tuning_init='RANDOM',
          prompt_tuning_init_text=None,
          tokenizer_name_or_path=None,
          tokenizer_kwargs=None,
      )
    else:
      extra = dict(p_tuning or {})
      cfg.update(
          encoder_reparameterization_type=str(
              extra.get('encoder_reparameterization_type', 'MLP')
          ).upper(),
          encoder_hidden_size=int(extra.get('encoder_hidden_size') or config.emb_dim),
          encoder_num_layers=int(extra.get('encoder_num_layers', 2)),
          encoder_dropout=0.0,
      )
    return cfg, {PROMPT_KEY: prompt}
  if peft_type == 'PREFIX_TUNING':
    return _prefix_to_peft(flat, config, cfg)
  if peft_type == 'IA3':
    return _ia3_to_peft(flat, config, cfg)
  return _lora_to_peft(flat, config, cfg, lora_scale)


def _prefix_to_peft(flat, config, cfg):
  layers = config.num_decoder_layers
  sites = {}
  for path, value in flat.items():
    m = re.fullmatch(r'(\w+)/layers_(\d+)/(\w+)/prefix/(key|value)', path)
    if not m or m.group(1) != 'decoder' or m.group(3) != 'self_attention':
      raise ValueError(
          f'{path}: PEFT prefix tuning on T5 has prefixes on the decoder self-attention only; '
          'this prefix also has encoder or cross-attention prefixes (train with '
          "PrefixHooks.blocks=('self_attention',), stacks=('decoder',) to export to PEFT)."
      )
    sites[(int(m.group(2)), m.group(4))] = value
  missing = [(l, w) for l in range(layers) for w in ('key', 'value') if (l, w) not in sites]
  if missing:
    raise ValueError(f'PEFT prefixes need every decoder layer; missing {missing}.')
  n, heads, dh = sites[(0, 'key')].shape
  if (heads, dh) != (config.num_heads, config.head_dim):
    raise _mismatch('prefix', (n, heads, dh), (n, config.num_heads, config.head_dim), 'heads')
  # Odd L: PEFT's entries (4l, 4l+1) mod 2L are a permutation. Even L: N = 2L gives layer l the
  # entries 4l and 4l+1 (the others are unused).
  num_layers = layers if layers % 2 else 2 * layers
  table = np.zeros((n, 2 * num_layers, heads, dh), np.float32)
  for layer in range(layers):
    table[:, (4 * layer) % (2 * num_layers)] = sites[(layer, 'key')]
    table[:, (4 * layer + 1) % (2 * num_layers)] = sites[(layer, 'value')]
  cfg.update(_prompt_learning_config(config, n, num_layers))
  cfg.update(
      # PEFT's seq2seq layout (it concatenates the table with itself); with 1 PEFT's own forward
      # fails on T5.
      num_transformer_submodules=2,
      token_dim=heads * dh,
      encoder_hidden_size=heads * dh,
      prefix_projection=False,
      init_weights=None,
  )
  return cfg, {PROMPT_KEY: table.reshape(n, -1)}


def _ia3_to_peft(flat, config, cfg):
  tensors = {}
  for path, value in flat.items():
    base, conv = path.rsplit('/', 2)[0], path.rsplit('/', 2)[1]
    if conv in ('k_conv', 'v_conv'):
      module = path_to_hf_module(f'{base}/{"key" if conv == "k_conv" else "value"}')
      tensors[f'{MODEL_PREFIX}{module}.ia3_l'] = value.reshape(-1, 1)
    elif conv == 'intermediate_conv':
      module = path_to_hf_module(f'{base}/wo')
      tensors[f'{MODEL_PREFIX}{module}.ia3_l'] = value.reshape(1, -1)
    else:
      raise ValueError(f'{path} is not an IA3 parameter.')
  cfg.update(
      target_modules=['k', 'v', 'wo'],
      feedforward_modules=['wo'],
      exclude_modules=None,
      fan_in_fan_out=False,
      init_ia3_weights=True,
      modules_to_save=None,
  )
  return cfg, tensors


def _lora_to_peft(flat, config, cfg, lora_scale):
  tensors = {}
  targets = set()
  ranks = set()
  for path, value in flat.items():
    base, name = path[: -len('/lora/lora_a')], path.rsplit('/', 1)[1]
    module = path_to_hf_module(base)
    targets.add(module.rsplit('.', 1)[1])
    if name == 'lora_a':
      tensors[f'{MODEL_PREFIX}{module}.lora_A.weight'] = value.T
      ranks.add(value.shape[1])
    else:
      tensors[f'{MODEL_PREFIX}{module}.lora_B.weight'] = value.T
  if len(ranks) != 1:
    raise ValueError(f'PEFT LoRA adapters have one rank; these factors have ranks {sorted(ranks)}.')
  r = ranks.pop()
  scale = 1.0 if lora_scale is None else float(lora_scale)
  cfg.update(
      r=r,
      lora_alpha=scale * r,
      target_modules=sorted(targets),
      lora_dropout=0.0,
      bias='none',
      use_rslora=False,
      use_dora=False,
      init_lora_weights=True,
      fan_in_fan_out=False,
      rank_pattern={},
      alpha_pattern={},
      layers_to_transform=None,
      layers_pattern=None,
      modules_to_save=None,
      lora_bias=False,
  )
  return cfg, tensors


def save_adapter(
    path: str,
    params: Mapping[str, Any],
    config: t5.T5Config,
    **kwargs: Any,
) -> Dict[str, Any]:
  """Writes a PEFT adapter directory (`to_peft(params, config, **kwargs)`); returns its config.

  The weights are written first and the config last, each to a temporary sibling renamed into
  place, so a reader never sees half a file and an interrupted export leaves no config.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  cfg, tensors = to_peft(params, config, **kwargs)
  fs.makedirs(path)
  data = safetensors_numpy.save(
      {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
      metadata={'format': 'pt'},
  )
  fs.write_bytes(fs.join(path, WEIGHTS_NAME), data)
  fs.write_text(fs.join(path, CONFIG_NAME), json.dumps(cfg, indent=2, sort_keys=True))
  return cfg
