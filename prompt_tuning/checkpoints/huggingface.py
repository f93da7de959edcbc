"""Import and export transformers T5 checkpoints (T5 1.0, T5 1.1, LM-adapted, mT5).

`load_t5(path)` reads a transformers `T5ForConditionalGeneration` directory (`config.json` plus
`model.safetensors`, sharded `model.safetensors.index.json`, or `pytorch_model.bin[.index.json]`
when torch is installed) and returns `(T5Config, params)` with flaxformer parameter names.
`save_t5(path, config, params)` writes a directory that transformers loads back to the same logits.

Two on-disk layouts of the output head exist:

- transformers < 5: T5 1.1 configs have `tie_word_embeddings: false` and a separate
  `lm_head.weight`; T5 1.0 configs tie `lm_head` to `shared` and scale the decoder output by
  `d_model**-0.5`.
- transformers 5: `T5Config` always sets `tie_word_embeddings = True` and records the scaling in
  `scale_decoder_outputs` (`= tie_word_embeddings is not False` in the original config). A saved
  model has no `lm_head.weight` when it equals `shared.weight`; a checkpoint whose `lm_head.weight`
  differs from `shared.weight` is loaded untied.

Here: scaled and tied -> `logits_via_embedding=True` (T5 1.0); unscaled -> a
`decoder/logits_dense/kernel` (T5 1.1) equal to `lm_head.weight.T` (or `shared.weight.T` when
there is no separate head); scaled but untied (unusual) -> `logits_dense` with the scale folded in.

Name mapping (HF `nn.Linear.weight` is `[out, in]`, so kernels are transposed; HF keeps the
relative attention bias `[buckets, heads]` in block 0 of each stack only):

```
shared.weight                                            token_embedder/embedding
encoder.block.{i}.layer.0.layer_norm.weight              encoder/layers_{i}/pre_attention_layer_norm/scale
encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight encoder/layers_{i}/attention/{query,key,value,out}/kernel (.T)
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight  encoder/relpos_bias/rel_embedding (.T)
encoder.block.{i}.layer.1.layer_norm.weight              encoder/layers_{i}/pre_mlp_layer_norm/scale
encoder.block.{i}.layer.1.DenseReluDense.{wi|wi_0,wi_1,wo}.weight  encoder/layers_{i}/mlp/{...}/kernel (.T)
encoder.final_layer_norm.weight                          encoder/encoder_norm/scale
decoder.block.{i}.layer.0 (SelfAttention)                decoder/layers_{i}/pre_self_attention_layer_norm, self_attention
decoder.block.{i}.layer.1 (EncDecAttention)              decoder/layers_{i}/pre_cross_attention_layer_norm, encoder_decoder_attention
decoder.block.{i}.layer.2 (DenseReluDense)               decoder/layers_{i}/pre_mlp_layer_norm, mlp
decoder.final_layer_norm.weight                          decoder/decoder_norm/scale
lm_head.weight                                           decoder/logits_dense/kernel (.T)
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import t5

T5Config = t5.T5Config

CONFIG_NAME = 'config.json'
GENERATION_CONFIG_NAME = 'generation_config.json'
SAFETENSORS_NAME = 'model.safetensors'
SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json'
PYTORCH_NAME = 'pytorch_model.bin'
PYTORCH_INDEX_NAME = 'pytorch_model.bin.index.json'

# HF tensors that carry no information of their own (tied copies, unused parameters).
_IGNORED_HF_KEYS = (
    'encoder.embed_tokens.weight',
    'decoder.embed_tokens.weight',
    'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',
)

# HF activation name -> flaxformer activation name (for the non-gated case; gated 'gelu' is the
# tanh approximation in HF, see `_activations_from_hf`).
_HF_ACT_TO_FLAX = {
    'relu': 'relu',
    'gelu': 'gelu_exact',
    'gelu_new': 'gelu',
    'gelu_pytorch_tanh': 'gelu',
    'gelu_fast': 'gelu',
    'silu': 'silu',
    'swish': 'silu',
    'tanh': 'tanh',
    'sigmoid': 'sigmoid',
}

_FLAX_ACT_TO_HF = {
    ('relu',): 'relu',
    ('gelu_exact',): 'gelu',
    ('gelu',): 'gelu_new',
    ('gelu_new',): 'gelu_new',
    ('silu',): 'silu',
    ('swish',): 'silu',
    ('gelu', 'linear'): 'gated-gelu',
    ('gelu_new', 'linear'): 'gated-gelu',
    ('relu', 'linear'): 'gated-relu',
    ('silu', 'linear'): 'gated-silu',
    ('swish', 'linear'): 'gated-silu',
}

_ATTN = (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _activations_from_hf(hf_config: Mapping[str, Any]) -> Tuple[str, ...]:
  proj = str(hf_config.get('feed_forward_proj', 'relu'))
  parts = proj.split('-')
  gated = len(parts) == 2 and parts[0] == 'gated'
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f'Unsupported feed_forward_proj {proj!r} in the HF T5 config.')
  act = parts[-1]
  if gated and act == 'gelu':
    act = 'gelu_new'  # transformers maps "gated-gelu" to the tanh approximation.
  if act not in _HF_ACT_TO_FLAX:
    raise ValueError(f'Unsupported T5 activation {act!r} (feed_forward_proj={proj!r}).')
  flax_act = _HF_ACT_TO_FLAX[act]
  return (flax_act, 'linear') if gated else (flax_act,)


def hf_scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
  """Whether transformers multiplies the decoder output by `d_model**-0.5` before `lm_head`."""
  if 'scale_decoder_outputs' in hf_config:
    return bool(hf_config['scale_decoder_outputs'])
  return hf_config.get('tie_word_embeddings', True) is not False


def config_from_hf(
    hf_config: Mapping[str, Any], *, separate_lm_head: Optional[bool] = None, **overrides: Any
) -> T5Config:
  """Builds a `T5Config` from a transformers T5 `config.json` dict.

  Args:
    hf_config: the parsed `config.json`.
    separate_lm_head: whether the checkpoint has an `lm_head.weight` different from
      `shared.weight` (None: decide from the config alone).
    **overrides: `T5Config` fields to set (e.g. `dtype='bfloat16'`, `dropout_rate=0.1`).
      Defaults: `dtype='float32'`, `dropout_rate` from the HF config.
  """
  model_type = hf_config.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise ValueError(
        f'Only T5/mT5 checkpoints are supported, got model_type={model_type!r} '
        '(UMT5, LongT5 and others have different parameters).'
    )
  if hf_config.get('is_encoder_decoder', True) is False:
    raise ValueError(
        'The HF config describes an encoder-only or decoder-only model; '
        'load_t5 needs a T5ForConditionalGeneration checkpoint.'
    )
  num_layers = int(hf_config.get('num_layers', 6))
  num_decoder_layers = hf_config.get('num_decoder_layers')
  scale = hf_scales_decoder_outputs(hf_config)
  tied = scale if separate_lm_head is None else (scale and not separate_lm_head)
  kwargs = dict(
      vocab_size=int(hf_config.get('vocab_size', 32128)),
      emb_dim=int(hf_config.get('d_model', 512)),
      num_heads=int(hf_config.get('num_heads', 8)),
      head_dim=int(hf_config.get('d_kv', 64)),
      mlp_dim=int(hf_config.get('d_ff', 2048)),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(num_layers if num_decoder_layers is None else num_decoder_layers),
      mlp_activations=_activations_from_hf(hf_config),
      logits_via_embedding=bool(tied),
      dropout_rate=float(hf_config.get('dropout_rate', 0.1)),
      dtype='float32',
      relative_attention_num_buckets=int(hf_config.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(hf_config.get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(hf_config.get('layer_norm_epsilon', 1e-6)),
  )
  kwargs.update(overrides)
  return T5Config(**kwargs)


def config_to_hf(config: T5Config) -> Dict[str, Any]:
  """The transformers `config.json` dict for `config` (readable by transformers 4 and 5)."""
  acts = tuple(config.mlp_activations)
  if acts not in _FLAX_ACT_TO_HF:
    raise ValueError(f'mlp_activations={acts} has no transformers T5 equivalent.')
  tied = bool(config.logits_via_embedding)
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': float(config.dropout_rate),
      'layer_norm_epsilon': float(config.layer_norm_epsilon),
      'initializer_factor': 1.0,
      'feed_forward_proj': _FLAX_ACT_TO_HF[acts],
      'is_encoder_decoder': True,
      'use_cache': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
      # transformers < 5 reads the head layout from tie_word_embeddings; transformers 5 reads the
      # output scaling from scale_decoder_outputs (and unties a differing lm_head.weight).
      'tie_word_embeddings': tied,
      'scale_decoder_outputs': tied,
  }


# ----------------------------------------------------------------------------------------------
# Reading tensors
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    'F64': np.float64,
    'F32': np.float32,
    'F16': np.float16,
    'I64': np.int64,
    'I32': np.int32,
    'I16': np.int16,
    'I8': np.int8,
    'U8': np.uint8,
    'BOOL': np.bool_,
}


def _np_dtype(code: str) -> np.dtype:
  if code == 'BF16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return np.dtype(ml_dtypes.bfloat16)
  if code not in _SAFETENSORS_DTYPES:
    raise ValueError(f'Unsupported safetensors dtype {code}.')
  return np.dtype(_SAFETENSORS_DTYPES[code])


class DamagedFileError(ValueError):
  """A checkpoint file is truncated or corrupt."""


def _damaged(path: str, why: str) -> DamagedFileError:
  return DamagedFileError(
      f'{path} is damaged ({why}); it is not a complete checkpoint file. Download or convert the '
      'checkpoint again.'
  )


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads a `.safetensors` file into numpy (floating tensors as float32; bf16 supported).

  Raises:
    DamagedFileError: naming the file, when it is truncated or its header is corrupt.
  """
  data = fs.read_bytes(path)
  if len(data) < 8:
    raise _damaged(path, f'it has {len(data)} bytes, fewer than the 8 of the header length')
  (header_len,) = struct.unpack('<Q', data[:8])
  if 8 + header_len > len(data):
    raise _damaged(path, f'its header should have {header_len} bytes but the file has {len(data)}')
  try:
    header = json.loads(data[8 : 8 + header_len].decode('utf-8'))
  except (UnicodeDecodeError, ValueError):
    raise _damaged(path, 'its JSON header cannot be read') from None
  if not isinstance(header, dict):
    raise _damaged(path, 'its header is not a JSON object')
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      start, end = (int(x) for x in info['data_offsets'])
      dtype = _np_dtype(info['dtype'])
      shape = [int(d) for d in info['shape']]
    except (KeyError, TypeError, ValueError):
      raise _damaged(path, f'the header entry of tensor {name!r} is malformed') from None
    if base + end > len(data):
      raise _damaged(
          path, f'truncated: tensor {name!r} ends at byte {base + end} but the file has {len(data)}'
      )
    if end - start != int(np.prod(shape)) * dtype.itemsize or start > end:
      raise _damaged(path, f'the byte range of tensor {name!r} does not match its shape {shape}')
    arr = np.frombuffer(
        data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start
    ).reshape(shape)
    out[name] = _to_float32(arr)
  return out


def safetensors_index(path: str) -> Dict[str, Tuple[str, str, Tuple[int, ...], int, int]]:
  """`{tensor name: (file, dtype code, shape, start, end)}` of a `.safetensors` file or of a
  transformers directory's `model.safetensors[.index.json]`, reading only the headers."""
  if fs.isfile(path):
    files = [path]
  elif fs.exists(fs.join(path, SAFETENSORS_NAME)):
    files = [fs.join(path, SAFETENSORS_NAME)]
  elif fs.exists(fs.join(path, SAFETENSORS_INDEX_NAME)):
    weight_map = json.loads(fs.read_text(fs.join(path, SAFETENSORS_INDEX_NAME)))['weight_map']
    files = [fs.join(path, shard) for shard in sorted(set(weight_map.values()))]
  else:
    raise FileNotFoundError(f'No {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} in {path!r}.')
  out = {}
  for file in files:
    with fs.open(file, 'rb') as f:
      (header_len,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(header_len))
    base = 8 + header_len
    for name, info in header.items():
      if name == '__metadata__':
        continue
      start, end = info['data_offsets']
      out[name] = (file, info['dtype'], tuple(info['shape']), base + start, base + end)
  return out


def read_safetensor(entry: Tuple[str, str, Tuple[int, ...], int, int]) -> np.ndarray:
  """Reads one tensor described by a `safetensors_index` entry (floating tensors as float32)."""
  file, code, shape, start, end = entry
  with fs.open(file, 'rb') as f:
    f.seek(start)
    data = f.read(end - start)
  return _to_float32(np.frombuffer(data, dtype=_np_dtype(code)).reshape(shape))


def lazy_params(path: str) -> Tuple[T5Config, Dict[str, Any]]:
  """`(config, {flattened flax path: zero-argument loader})` of a transformers T5 directory.

  With safetensors weights each loader reads (and transposes) only its own tensor, so a caller
  can go through a checkpoint larger than memory one parameter at a time. `pytorch_model.bin`
  checkpoints cannot be read per tensor: they are loaded whole once, and the loaders index it.
  """
  hf_config = read_hf_config(path)
  scale = hf_scales_decoder_outputs(hf_config)
  try:
    index = safetensors_index(path)
  except FileNotFoundError:
    logging.warning('%s has no safetensors weights: reading the whole checkpoint.', path)
    sd = read_state_dict(path)
    index = None

  def read(name):
    return read_safetensor(index[name]) if index is not None else sd[name]

  names = set(index if index is not None else sd)
  shared = 'shared.weight' if 'shared.weight' in names else 'encoder.embed_tokens.weight'
  separate = 'lm_head.weight' in names and not np.array_equal(read('lm_head.weight'), read(shared))
  config = config_from_hf(hf_config, separate_lm_head=separate)
  loaders: Dict[str, Any] = {}
  for hf_name, flax_path, transpose in name_mapping(config):
    hf_name = shared if hf_name == 'shared.weight' else hf_name
    if hf_name not in names:
      raise ValueError(f'The HF checkpoint {path} lacks {hf_name} (needed by its config.json).')
    loaders[flax_path] = (
        lambda n=hf_name, t=transpose: np.ascontiguousarray(read(n).T) if t else read(n)
    )
  if not config.logits_via_embedding:
    head = 'lm_head.weight' if 'lm_head.weight' in names else shared
    factor = np.float32(config.emb_dim**-0.5) if scale else None

    def head_kernel(n=head):
      kernel = np.ascontiguousarray(read(n).T)
      return kernel * factor if factor is not None else kernel

    loaders['decoder/logits_dense/kernel'] = head_kernel
  return config, loaders


def _to_float32(arr: np.ndarray) -> np.ndarray:
  if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == 'bfloat16':
    return np.array(arr, dtype=np.float32)
  return np.array(arr)


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{path} is a PyTorch checkpoint and reading it needs torch: `pip install torch` (CPU '
        'build is enough), or convert the checkpoint to model.safetensors.'
    ) from e
  try:
    if fs.is_remote(path):
      import io  # pylint: disable=g-import-not-at-top

      state = torch.load(io.BytesIO(fs.read_bytes(path)), map_location='cpu', weights_only=True)
    else:
      state = torch.load(fs.abspath(path), map_location='cpu', weights_only=True)
  except (FileNotFoundError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(path, f'torch cannot read it: {str(e).splitlines()[0][:200]}') from None
  out = {}
  for name, tensor in state.items():
    if tensor.is_floating_point():
      out[name] = tensor.detach().to(torch.float32).numpy().copy()
    else:
      out[name] = tensor.detach().numpy().copy()
  return out


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads all tensors of a transformers checkpoint directory (or a single weights file)."""
  if fs.isfile(path):
    return read_safetensors(path) if path.endswith('.safetensors') else _read_torch(path)
  candidates = [
      (SAFETENSORS_NAME, read_safetensors),
      (SAFETENSORS_INDEX_NAME, None),
      (PYTORCH_NAME, _read_torch),
      (PYTORCH_INDEX_NAME, None),
  ]
  for name, reader in candidates:
    full = fs.join(path, name)
    if not fs.exists(full):
      continue
    if reader is not None:
      return reader(full)
    weight_map = json.loads(fs.read_text(full))['weight_map']
    shard_reader = read_safetensors if name == SAFETENSORS_INDEX_NAME else _read_torch
    out = {}
    for shard in sorted(set(weight_map.values())):
      out.update(shard_reader(fs.join(path, shard)))
    return out
  raise FileNotFoundError(
      f'No transformers weights in {path!r}: expected one of {SAFETENSORS_NAME}, '
      f'{SAFETENSORS_INDEX_NAME}, {PYTORCH_NAME} or {PYTORCH_INDEX_NAME}.'
  )


# ----------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------


def _mlp_names(config: T5Config) -> List[Tuple[str, str]]:
  if len(config.mlp_activations) == 1:
    names = ['wi']
  elif len(config.mlp_activations) == 2:
    names = ['wi_0', 'wi_1']
  else:
    raise ValueError('transformers T5 supports one or two MLP input projections only.')
  return [(n, n) for n in names + ['wo']]


def name_mapping(config: T5Config) -> List[Tuple[str, str, bool]]:
  """`(hf_name, flattened flax path, transpose)` for every parameter except the output head."""
  out = [('shared.weight', 'token_embedder/embedding', False)]
  for stack, n_layers in (
      ('encoder', config.num_encoder_layers),
      ('decoder', config.num_decoder_layers),
  ):
    out.append(
        (
            f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
            f'{stack}/relpos_bias/rel_embedding',
            True,
        )
    )
    for i in range(n_layers):
      hf, fx = f'{stack}.block.{i}.layer', f'{stack}/layers_{i}'
      if stack == 'encoder':
        out.append((f'{hf}.0.layer_norm.weight', f'{fx}/pre_attention_layer_norm/scale', False))
        out += [
            (f'{hf}.0.SelfAttention.{a}.weight', f'{fx}/attention/{b}/kernel', True)
            for a, b in _ATTN
        ]
        mlp_layer = 1
      else:
        out.append(
            (f'{hf}.0.layer_norm.weight', f'{fx}/pre_self_attention_layer_norm/scale', False)
        )
        out += [
            (f'{hf}.0.SelfAttention.{a}.weight', f'{fx}/self_attention/{b}/kernel', True)
            for a, b in _ATTN
        ]
        out.append(
            (f'{hf}.1.layer_norm.weight', f'{fx}/pre_cross_attention_layer_norm/scale', False)
        )
        out += [
            (
                f'{hf}.1.EncDecAttention.{a}.weight',
                f'{fx}/encoder_decoder_attention/{b}/kernel',
                True,
            )
            for a, b in _ATTN
        ]
        mlp_layer = 2
      out.append((f'{hf}.{mlp_layer}.layer_norm.weight', f'{fx}/pre_mlp_layer_norm/scale', False))
      out += [
          (f'{hf}.{mlp_layer}.DenseReluDense.{a}.weight', f'{fx}/mlp/{b}/kernel', True)
          for a, b in _mlp_names(config)
      ]
    norm = 'encoder_norm' if stack == 'encoder' else 'decoder_norm'
    out.append((f'{stack}.final_layer_norm.weight', f'{stack}/{norm}/scale', False))
  return out


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    config: T5Config,
    *,
    scale_decoder_outputs: Optional[bool] = None,
) -> Dict[str, Any]:
  """Maps HF T5 tensors to a flaxformer-named parameter tree (float32 numpy).

  Args:
    state_dict: HF tensor name -> array.
    config: the config of the checkpoint (from `config_from_hf`).
    scale_decoder_outputs: whether HF scales the decoder output (only used when
      `config.logits_via_embedding` is False; default False).

  Raises:
    ValueError: missing or unexpected tensors.
  """
  sd = dict(state_dict)
  if 'shared.weight' not in sd:
    for alt in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
      if alt in sd:
        sd['shared.weight'] = sd[alt]
        break
  flat: Dict[str, np.ndarray] = {}
  missing = []
  used = set(_IGNORED_HF_KEYS)
  for hf_name, path, transpose in name_mapping(config):
    if hf_name not in sd:
      missing.append(hf_name)
      continue
    arr = np.asarray(sd[hf_name], dtype=np.float32)
    flat[path] = np.ascontiguousarray(arr.T) if transpose else arr
    used.add(hf_name)
  if not config.logits_via_embedding:
    head = sd.get('lm_head.weight', sd.get('shared.weight'))
    if head is None:
      missing.append('lm_head.weight')
    else:
      kernel = np.asarray(head, np.float32).T
      if scale_decoder_outputs:
        kernel = kernel * np.float32(config.emb_dim**-0.5)
      flat['decoder/logits_dense/kernel'] = np.ascontiguousarray(kernel)
  used.add('lm_head.weight')
  if missing:
    raise ValueError(
        f'The HF checkpoint lacks {len(missing)} tensor(s) this config needs, e.g. '
        f'{missing[:5]}; check num_layers / num_decoder_layers / feed_forward_proj '
        'in config.json.'
    )
  unexpected = sorted(k for k in sd if k not in used)
  if unexpected:
    hint = ''
    if any('relative_attention_bias' in k for k in unexpected):
      hint = (
          ' Per-layer relative attention biases (UMT5-style) are not supported: T5 shares '
          'one bias per stack, stored in block 0.'
      )
    raise ValueError(
        f'Unexpected tensors in the HF checkpoint: {unexpected[:8]}'
        f'{" ..." if len(unexpected) > 8 else ""}; the checkpoint does not match its '
        f'config.json (more layers or a different architecture?).{hint}'
    )
  return params_lib.unflatten_params(flat)


def params_to_state_dict(params: Mapping[str, Any], config: T5Config) -> Dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: flaxformer-named params -> HF tensors (float32)."""
  flat = params_lib.flatten_params(params)
  sd = {}
  for hf_name, path, transpose in name_mapping(config):
    arr = np.asarray(flat[path], dtype=np.float32)
    sd[hf_name] = np.ascontiguousarray(arr.T if transpose else arr)
  if not config.logits_via_embedding:
    kernel = np.asarray(flat['decoder/logits_dense/kernel'], dtype=np.float32)
    sd['lm_head.weight'] = np.ascontiguousarray(kernel.T)
  return sd


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def read_hf_config(path: str) -> Dict[str, Any]:
  """Parses `<path>/config.json`."""
  cfg_path = fs.join(path, CONFIG_NAME)
  if not fs.exists(cfg_path):
    raise FileNotFoundError(f'{cfg_path} not found: {path!r} is not a transformers T5 directory.')
  try:
    return json.loads(fs.read_text(cfg_path))
  except (UnicodeDecodeError, ValueError):
    raise _damaged(cfg_path, 'it is not valid JSON') from None


def load_t5(
    path: str, config: Optional[T5Config] = None, **overrides: Any
) -> Tuple[T5Config, Dict[str, Any]]:
  """Loads a transformers T5 directory as `(T5Config, params)`.

  Args:
    path: directory with `config.json` and the weights.
    config: the config the caller expects (e.g. a gin-selected preset). The checkpoint is checked
      against it and it is returned; by default the config is derived from `config.json`.
    **overrides: `T5Config` fields to replace in the returned config (e.g. `dtype='bfloat16'`).

  Returns:
    The config and a nested dict of float32 numpy parameters with flaxformer names.

  Raises:
    ValueError: the checkpoint does not match `config` (message names the parameter path, both
      shapes and the likely cause), or the checkpoint is inconsistent with its `config.json`.
  """
  hf_config = read_hf_config(path)
  sd = read_state_dict(path)
  scale = hf_scales_decoder_outputs(hf_config)
  shared = sd.get('shared.weight', sd.get('encoder.embed_tokens.weight'))
  head = sd.get('lm_head.weight')
  separate = head is not None and (
      shared is None or head.shape != shared.shape or not np.array_equal(head, shared)
  )
  ckpt_config = config_from_hf(hf_config, separate_lm_head=separate)
  if scale and separate:
    logging.warning(
        '%s: decoder outputs are scaled by d_model**-0.5 but lm_head is not tied to '
        'the embedding; folding the scale into decoder/logits_dense.',
        path,
    )
  params = state_dict_to_params(sd, ckpt_config, scale_decoder_outputs=scale)
  target = ckpt_config if config is None else config
  if overrides:
    target = dataclasses.replace(target, **overrides)
  t5.check_params(target, params, what=f'HF checkpoint {path}')
  return target, params


def save_t5(path: str, config: T5Config, params: Mapping[str, Any]) -> None:
  """Writes `config.json`, `generation_config.json` and `model.safetensors` for transformers.

  Prompt parameters (if any) are not exported. The weights are float32. Each file is written to a
  temporary sibling and renamed into place, weights first and `config.json` last, so an
  interrupted save never leaves a truncated file (other files in `path` are kept).
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  t5.check_params(config, params, what='parameter tree')
  fs.makedirs(path)
  sd = params_to_state_dict(params, config)
  weights = fs.join(path, SAFETENSORS_NAME)
  if fs.is_remote(path):
    fs.write_bytes(weights, safetensors_numpy.save(sd, metadata={'format': 'pt'}))
  else:
    tmp = f'{fs.abspath(weights)}.tmp-{os.getpid()}'
    try:
      safetensors_numpy.save_file(sd, tmp, metadata={'format': 'pt'})
      fs.rename(tmp, weights, overwrite=True)
    finally:
      fs.remove(tmp, missing_ok=True)
  generation = {'decoder_start_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 0}
  fs.write_text(fs.join(path, GENERATION_CONFIG_NAME), json.dumps(generation, indent=2))
  fs.write_text(
      fs.join(path, CONFIG_NAME), json.dumps(config_to_hf(config), indent=2, sort_keys=True)
  )
