"""A tiny served model, its prompts, and an in-process uvicorn server for the serving tests."""

from typing import Dict, Iterator, List, Optional, Sequence

import jax
import numpy as np

from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models
from prompt_tuning.serving import app as app_lib
from prompt_tuning.serving import engine as engine_lib
from prompt_tuning.serving import prompt_table as table_lib
from prompt_tuning.serving import server as server_lib

PROMPT_LENGTH = 3
CONFIG = t5.get_config('tiny')


def vocabulary():
  import seqio  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  return seqio.SentencePieceVocabulary(
      os.path.join(
          os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
      )
  )


def backbone_params(seed: int = 0):
  """Random tiny backbone weights, large enough for varied greedy decodes."""
  module = prompted.PromptEncoderDecoder(CONFIG, prompt_length=PROMPT_LENGTH)
  x = np.ones((1, 4), np.int32)
  params = module.init(jax.random.PRNGKey(seed), x, x, x, enable_dropout=False)['params']
  params = jax.tree_util.tree_map(lambda p: np.asarray(p) * 2.5 if p.ndim == 2 else p, params)
  del params['encoder']['prompt']
  return jax.device_get(params)


def prompts(n: int, seed: int = 1) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      f'task{i}': rng.normal(0, 2.0, (PROMPT_LENGTH, CONFIG.emb_dim)).astype(np.float32)
      for i in range(n)
  }


def bank_model(capacity: int, vocab):
  module = prompted.PromptEncoderDecoder(CONFIG, prompt_length=PROMPT_LENGTH, num_prompts=capacity)
  return models.EncoderDecoderModel(module, vocab, vocab)


def engine(capacity: int, vocab, config: engine_lib.ServingConfig, backbone=None):
  model = bank_model(capacity, vocab)
  params = dict(backbone if backbone is not None else backbone_params())
  params['encoder'] = dict(params['encoder'])
  params['encoder']['prompt'] = {
      'prompt': {'prompt': np.zeros((capacity, PROMPT_LENGTH, CONFIG.emb_dim), np.float32)}
  }
  return engine_lib.ServingEngine(model, params, config, eos_id=vocab.eos_id)


def single_prompt_reference(vocab, backbone, prompt: np.ndarray):
  """Offline functions of a one-prompt model (no bank): greedy decoding and scoring."""
  module = prompted.PromptEncoderDecoder(CONFIG, prompt_length=PROMPT_LENGTH)
  greedy = models.EncoderDecoderModel(module, vocab, vocab, decode_fn=decoding.temperature_sample)
  params = dict(backbone)
  params['encoder'] = dict(params['encoder'])
  params['encoder']['prompt'] = {'prompt': {'prompt': prompt}}
  return (
      params,
      jax.jit(lambda p, b: greedy.predict_batch_with_aux(p, b, decoder_params={'topk': 1})),
      jax.jit(greedy.score_batch),
  )


free_port = server_lib.free_port
running = server_lib.run_in_thread
