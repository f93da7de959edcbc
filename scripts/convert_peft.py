#!/usr/bin/env python3
"""Converts method artifacts to Hugging Face PEFT adapters and back.

Examples::

  # A trained method's artifact (or a prompt .npy) -> a PEFT adapter directory that
  # PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(BASE), OUT) loads.
  python scripts/convert_peft.py export $MODEL_DIR/numpy_checkpoints/checkpoint_1000 /adapters/lora \\
      --checkpoint /ckpts/t5_1_1_base_hf --base_model google/t5-v1_1-base --lora_alpha 16

  # A P-tuning run's prompt as a PEFT P-tuning adapter (PEFT stores the network's output too).
  python scripts/convert_peft.py export $MODEL_DIR/numpy_checkpoints/checkpoint_1000 /adapters/pt \\
      --checkpoint /ckpts/t5_1_1_base_hf --peft_type P_TUNING

  # A PEFT adapter -> an artifact directory (one .npy per parameter) for
  # methods/from_artifact.gin (which also reads PEFT directories directly) or prompts/from_file.gin.
  python scripts/convert_peft.py import /adapters/lora /artifacts/lora --checkpoint /ckpts/t5_1_1_base_hf

`--checkpoint` is the frozen backbone (T5X, Hugging Face or ours): only its parameter shapes are
used, to check the adapter against the model (hidden size, heads, layers) and to lay it out.
Supported: prompt tuning, P-tuning, prefix tuning (decoder self-attention prefixes, PEFT's T5
layout), IA3 and LoRA. An existing output is never replaced without `--overwrite`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Dict, Sequence

try:
  import prompt_tuning  # pylint: disable=unused-import
except ImportError:  # Run from a checkout without installing.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from prompt_tuning import fs  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import peft  # pylint: disable=g-import-not-at-top


def _log(msg: str) -> None:
  print(f'[convert_peft] {msg}', flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('direction', choices=('export', 'import'))
  parser.add_argument(
      'input',
      help='export: an artifact directory or a .npy prompt; import: a PEFT adapter directory',
  )
  parser.add_argument(
      'output', help='export: the PEFT adapter directory; import: the artifact directory'
  )
  parser.add_argument(
      '--checkpoint', required=True, help='the frozen backbone checkpoint (shapes only)'
  )
  parser.add_argument(
      '--config', default=None, help='a T5 config preset to check the shapes against'
  )
  parser.add_argument('--peft_type', default=None, help='export: P_TUNING for a P-tuning prompt')
  parser.add_argument('--base_model', default='', help='export: base_model_name_or_path to record')
  parser.add_argument(
      '--lora_alpha',
      type=float,
      default=None,
      help="export: the run's LORA_ALPHA (default: the rank)",
  )
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  return parser.parse_args(argv)


def backbone_config(checkpoint: str, preset: str | None = None) -> t5.T5Config:
  """The `T5Config` of a frozen checkpoint, from its parameter shapes."""
  params = formats.load_params(checkpoint)
  return t5.config_from_shapes(params, preset)


def read_artifact(path: str) -> Dict[str, np.ndarray]:
  """`{parameter path: array}` of an artifact directory, or of one `.npy` prompt file."""
  if fs.isfile(path):
    with fs.open(path, 'rb') as f:
      value = np.load(f, allow_pickle=False)
    if value.ndim != 2:
      raise ValueError(f'{path} has shape {value.shape}; a prompt file holds one [P, H] prompt.')
    return {peft.PROMPT_PATH: value}
  out = {}
  for name in sorted(fs.listdir(path)):
    if name.endswith('.npy'):
      with fs.open(fs.join(path, name), 'rb') as f:
        out[name[: -len('.npy')].replace('.', '/')] = np.load(f, allow_pickle=False)
  if not out:
    raise FileNotFoundError(f'{path} holds no .npy files (an artifact directory or a prompt file).')
  return out


def _save_npy(path: str, value: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(value, np.float32))
  fs.write_bytes(path, buffer.getvalue())


def _check_output(path: str, overwrite: bool) -> None:
  if fs.exists(path) and fs.listdir(path) and not overwrite:
    raise FileExistsError(f'{path} exists and is not empty; pass --overwrite to replace it.')


def export(args: argparse.Namespace, config: t5.T5Config) -> Dict[str, Any]:
  params = read_artifact(args.input)
  kind = peft.detect_type(params)
  scale = None
  if kind == 'LORA':
    rank = next(v.shape[1] for k, v in params.items() if k.endswith('lora_a'))
    alpha = rank if args.lora_alpha is None else args.lora_alpha
    scale = alpha / rank
    if args.lora_alpha is None:
      _log(f'LoRA: lora_alpha not given, using the rank ({rank}): scale 1 (LORA_ALPHA = None).')
  _check_output(args.output, args.overwrite)
  cfg = peft.save_adapter(
      args.output,
      params,
      config,
      peft_type=args.peft_type,
      base_model_name_or_path=args.base_model,
      lora_scale=scale,
  )
  _log(f'Wrote a {cfg["peft_type"]} adapter ({len(params)} arrays) to {args.output}.')
  return cfg


def import_(args: argparse.Namespace, config: t5.T5Config) -> peft.Adapter:
  adapter = peft.load_adapter(args.input, config)
  _check_output(args.output, args.overwrite)
  fs.makedirs(args.output)
  for path, value in adapter.params.items():
    _save_npy(fs.join(args.output, path.replace('/', '.') + '.npy'), value)
  note = ''
  if adapter.lora_scale is not None:
    r = int(adapter.config['r'])
    note = f' Evaluate it with LORA_RANK = {r} and LORA_ALPHA = {adapter.lora_scale * r}.'
    fs.write_text(
        fs.join(args.output, 'lora.json'),
        json.dumps({'rank': r, 'alpha': adapter.lora_scale * r}, indent=1),
    )
  _log(
      f'Wrote {len(adapter.params)} arrays of a {adapter.peft_type} adapter to {args.output}.{note}'
  )
  return adapter


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    config = backbone_config(args.checkpoint, args.config)
    if args.direction == 'export':
      export(args, config)
    else:
      import_(args, config)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
