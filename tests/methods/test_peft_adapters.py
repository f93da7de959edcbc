"""PEFT adapters in and out (`checkpoints/peft.py`, `scripts/convert_peft.py`) against PEFT 0.21.

Round trips on one random tiny T5 1.1 saved as a local transformers directory (the base model
PEFT loads; no network):

* ours -> PEFT: our method parameters written as an adapter directory; `PeftModel.from_pretrained`
  of the base loads it and gives our logits (within 1e-5) for prompt tuning, P-tuning (its saved
  output), prefix tuning (decoder self-attention, for an even and an odd depth), IA3 and LoRA.
* PEFT -> ours: an adapter trained a few steps in PEFT (seq2seq defaults: a 2n-row prompt table,
  PEFT's shared prefix layout) and saved by `save_pretrained` is read by our model (prompts
  through `prompts/from_peft.gin`'s loader, hooks through an `Artifact`) and gives PEFT's logits.
* Adapters for another model are one clear error naming both shapes; so are unknown types.
"""

import copy
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

import methods_testlib as lib  # pylint: disable=g-import-not-at-top
from prompt_tuning import prompts  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import peft as peft_io  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import artifacts  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import ia3  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import lora  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import prefix  # pylint: disable=g-import-not-at-top

N = 3
SCRIPTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'scripts'
)


@pytest.fixture(scope='module', params=[2, 3], ids=['L2', 'L3'])
def base(request, tmp_path_factory):
  hf = lib.hf_model(num_layers=request.param, seed=request.param)
  path = str(tmp_path_factory.mktemp(f'base{request.param}'))
  config, params = lib.convert(hf, path)
  return {'path': path, 'config': config, 'params': params, 'layers': request.param}


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def _peft_from_dir(base_path, adapter_dir):
  model = transformers.T5ForConditionalGeneration.from_pretrained(base_path)
  model = peft.PeftModel.from_pretrained(model, adapter_dir)
  model.eval()
  return model


def _prefix_hooks(config, **kw):
  return prefix.PrefixHooks(
      num_prefix=N,
      num_heads=config.num_heads,
      head_dim=config.head_dim,
      blocks=('self_attention',),
      stacks=('decoder',),
      **kw,
  )


def _ours(kind, config):
  """(module, random method parameters, save_adapter kwargs) of one adapter kind."""
  rng = np.random.RandomState(7)
  if kind in ('prompt', 'p_tuning'):
    module = prompted.PromptEncoderDecoder(config, prompt_length=N)
    params = {peft_io.PROMPT_PATH: rng.uniform(-0.5, 0.5, size=(N, config.emb_dim))}
    return module, params, {'peft_type': 'P_TUNING' if kind == 'p_tuning' else None}
  if kind == 'prefix':
    module = t5.EncoderDecoder(config, hooks=_prefix_hooks(config))
  elif kind == 'ia3':
    module = t5.EncoderDecoder(config, hooks=ia3.IA3Hooks())
  else:
    module = t5.EncoderDecoder(config, hooks=lora.LoraHooks(rank=4, alpha=16.0))
  enc, tgt = lib.batch()
  shapes = lib.method_param_shapes(module, enc, tgt, lib.random_backbone(config))
  scale = 0.1 if kind == 'lora' else 0.5  # LoRA's update is scaled by 4 here
  params = {k: rng.normal(size=s) * scale + (1.0 if 'ia3' in k else 0.0) for k, s in shapes.items()}
  return module, params, {'lora_scale': 4.0} if kind == 'lora' else {}


@pytest.mark.parametrize('kind', ['prompt', 'p_tuning', 'prefix', 'ia3', 'lora'])
def test_ours_to_peft_gives_our_logits(base, kind, tmp_path):
  config = base['config']
  module, method, kwargs = _ours(kind, config)
  adapter_dir = str(tmp_path / kind)
  cfg = peft_io.save_adapter(
      adapter_dir, method, config, base_model_name_or_path=base['path'], **kwargs
  )
  assert sorted(os.listdir(adapter_dir)) == ['adapter_config.json', 'adapter_model.safetensors']
  if kind == 'prefix':  # PEFT's layout: N = L for odd depths, 2L (unshared entries) for even ones.
    assert cfg['num_layers'] == (base['layers'] if base['layers'] % 2 else 2 * base['layers'])
  model = _peft_from_dir(base['path'], adapter_dir)
  assert model.peft_config['default'].peft_type.value == cfg['peft_type']
  enc, tgt = lib.batch(seed=5)
  ours = lib.logits(module, lib.with_method_params(base['params'], method), enc, tgt)
  _close(ours, lib.peft_logits(model, enc, tgt))
  # Read back: the same parameters.
  back = peft_io.load_adapter(adapter_dir, config)
  for k, v in method.items():
    np.testing.assert_allclose(back.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def _peft_config(kind):
  task = 'SEQ_2_SEQ_LM'
  if kind == 'prompt':
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)
  if kind == 'p_tuning':
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16)
  if kind == 'prefix':
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N)
  if kind == 'ia3':
    return peft.IA3Config(task_type=task)
  return peft.LoraConfig(task_type=task, r=4, lora_alpha=8)


def _train_peft(model, steps=3):
  enc, tgt = lib.batch(seed=9)
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
  model.train()
  for _ in range(steps):
    opt.zero_grad()
    out = model(
        input_ids=torch.from_numpy(enc),
        attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
        labels=torch.from_numpy(np.where(tgt > 0, tgt, -100)),
    )
    out.loss.backward()
    opt.step()
  model.eval()


@pytest.mark.parametrize('kind', ['prompt', 'p_tuning', 'prefix', 'ia3', 'lora'])
def test_a_peft_trained_adapter_gives_peft_s_logits_in_ours(base, kind, tmp_path):
  config = base['config']
  torch.manual_seed(11)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(base['path'])
  model = peft.get_peft_model(hf, _peft_config(kind))
  _train_peft(model)
  adapter_dir = str(tmp_path / kind)
  model.save_pretrained(adapter_dir)
  enc, tgt = lib.batch(seed=6)
  theirs = lib.peft_logits(model, enc, tgt)
  # As a fresh process would: PEFT's own reload gives the same logits.
  _close(lib.peft_logits(_peft_from_dir(base['path'], adapter_dir), enc, tgt), theirs)

  if kind in ('prompt', 'p_tuning'):
    # prompts/from_peft.gin: the first n of PEFT's 2n rows initialize our prompt.
    saved = json.load(open(os.path.join(adapter_dir, 'adapter_config.json')))
    assert saved['num_transformer_submodules'] == 2
    init = prompts.from_array(peft_io.load_prompt(adapter_dir, config.emb_dim))
    module = prompted.PromptEncoderDecoder(config, prompt_length=N, prompt_init=init)
  else:
    artifact = artifacts.Artifact(adapter_dir, config)
    hooks = {
        'prefix': lambda: _prefix_hooks(config, artifact=artifact),
        'ia3': lambda: ia3.IA3Hooks(artifact=artifact),
        'lora': lambda: lora.LoraHooks(rank=4, alpha=8.0, artifact=artifact),
    }[kind]()
    module = t5.EncoderDecoder(config, hooks=hooks)
  full, _ = lib.init_method_params(module, enc, tgt, base['params'])
  _close(lib.logits(module, full, enc, tgt), theirs)


def test_mismatches_are_one_clear_error(base, tmp_path):
  if base['layers'] != 2:
    pytest.skip('one depth is enough')
  config = base['config']
  module, method, _ = _ours('lora', config)
  adapter_dir = str(tmp_path / 'lora')
  peft_io.save_adapter(adapter_dir, method, config, lora_scale=4.0)
  wider = t5.get_config('tiny', vocab_size=lib.VOCAB, emb_dim=48)
  with pytest.raises(ValueError, match=r'lora_A.weight has shape \(4, 32\).*needs \(4, 48\)'):
    peft_io.load_adapter(adapter_dir, wider)
  shallow = t5.get_config('tiny', vocab_size=lib.VOCAB, num_encoder_layers=1, num_decoder_layers=1)
  with pytest.raises(ValueError, match='decoder layer 1, but the model has 1 decoder layers'):
    peft_io.load_adapter(adapter_dir, shallow)
  # Our hooks with another scale than the adapter's: the fix is named.
  with pytest.raises(ValueError, match='set LORA_ALPHA = 16'):
    lora.LoraHooks(rank=4, alpha=8.0, artifact=artifacts.Artifact(adapter_dir, config))
  # Adapter targets our configuration would ignore.
  with pytest.raises(ValueError, match='silently ignored'):
    lora.LoraHooks(
        rank=4, alpha=16.0, kernels=('query',), artifact=artifacts.Artifact(adapter_dir, config)
    )

  _, prefix_params, _ = _ours('prefix', config)
  prefix_dir = str(tmp_path / 'prefix')
  peft_io.save_adapter(prefix_dir, prefix_params, config)
  more_heads = t5.get_config('tiny', vocab_size=lib.VOCAB, num_heads=8, head_dim=4)
  with pytest.raises(ValueError, match=r'\(4, 8\).*needs \(8, 4\)'):
    peft_io.load_adapter(prefix_dir, more_heads)
  with pytest.raises(ValueError, match='decoder self-attention only'):
    peft_io.to_peft({'encoder/layers_0/attention/prefix/key': np.zeros((N, 4, 8))}, config)
  with pytest.raises(ValueError, match='no PEFT equivalent'):
    peft_io.to_peft({'encoder/layers_0/prompt/prompt/prompt': np.zeros((N, 32))}, config)

  cfg_path = os.path.join(adapter_dir, 'adapter_config.json')
  cfg = json.load(open(cfg_path))
  cfg['peft_type'] = 'LOHA'
  with open(cfg_path, 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="unsupported PEFT adapter type 'LOHA'"):
    peft_io.load_adapter(adapter_dir, config)


def test_the_conversion_script_round_trips_an_artifact(base, tmp_path):
  if base['layers'] != 2:
    pytest.skip('one depth is enough')
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, SCRIPTS)
  import convert_peft  # pylint: disable=g-import-not-at-top

  config = base['config']
  _, method, _ = _ours('lora', config)
  artifact = tmp_path / 'artifact'
  artifact.mkdir()
  for k, v in method.items():
    np.save(artifact / (k.replace('/', '.') + '.npy'), v.astype(np.float32))
  out = str(tmp_path / 'adapter')
  args = ['export', str(artifact), out, '--checkpoint', base['path'], '--lora_alpha', '16']
  assert convert_peft.main(args) == 0
  assert json.load(open(os.path.join(out, 'adapter_config.json')))['lora_alpha'] == 16.0
  assert convert_peft.main(args) == 1  # never replaces an existing output without --overwrite
  back = str(tmp_path / 'back')
  assert convert_peft.main(['import', out, back, '--checkpoint', base['path']]) == 0
  for k, v in method.items():
    np.testing.assert_allclose(
        np.load(os.path.join(back, k.replace('/', '.') + '.npy')), v, rtol=1e-6
    )
  # The imported artifact carries its scale: a LoraHooks with another one is refused.
  with pytest.raises(ValueError, match='set LORA_ALPHA = 16'):
    lora.LoraHooks(rank=4, artifact=artifacts.Artifact(back))
