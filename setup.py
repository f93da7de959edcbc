"""Package metadata for prompt_tuning: T5X-style soft-prompt tuning in JAX/Flax."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def _gin_files():
  out = []
  root = os.path.join(HERE, 'configs')
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith('.gin'):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return out


_JAX = ['jax>=0.10.0,<0.11', 'jaxlib>=0.10.0,<0.11']

setuptools.setup(
    name='prompt_tuning',
    version='0.1.0',
    description='Parameter-efficient prompt tuning of frozen T5-family models, T5X style, in JAX/Flax.',
    long_description=open(os.path.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10,<3.13',
    packages=setuptools.find_packages(
        include=['prompt_tuning', 'prompt_tuning.*', 'tasks', 'tasks.*']
    )
    + ['prompt_tuning.configs'],
    package_dir={'prompt_tuning.configs': 'configs'},
    package_data={
        'prompt_tuning.configs': _gin_files(),
        'tasks': ['toy_data/*.model', 'toy_data/*.md'],
    },
    install_requires=_JAX
    + [
        'flax>=0.12.0,<0.13',
        'optax>=0.2.5,<0.3',
        'orbax-checkpoint>=0.12.0,<0.13',
        'gin-config>=0.5.0,<0.6',
        'seqio>=0.0.20,<0.0.21',
        'tensorflow>=2.21,<2.22',
        'tensorflow-text>=2.21,<2.22',
        'tensorflow-datasets>=4.9.8,<4.10',
        'tensorstore>=0.1.80,<0.2',
        'sentencepiece>=0.2.0,<0.3',
        'safetensors>=0.4,<1.0',
        'msgpack>=1.0,<2',
        'numpy>=1.26,<3',
        'absl-py>=2.0,<3',
        'clu>=0.0.12,<0.1',
        'tensorboard>=2.15,<3',
        'matplotlib>=3.7,<4',
        # 0.7.0 registers its NumPy ufunc loops so slowly that `import jax` takes 1.1 s more and
        # a process importing JAX and TensorFlow 3.5 s more (9.0 against 5.4 s on 2 cores).
        'ml_dtypes>=0.5,<0.7',
        # The CPU allocator that keeps XLA's per-call temporaries where gperftools' tcmalloc is not
        # installed (`launch.tune_malloc`): a wheel, so `pip` alone brings it.
        'cmeel-mimalloc>=3.4,<4; sys_platform == "linux"',
    ],
    extras_require={
        'test': [
            'pytest>=8,<10',
            'pyink==26.5.1',  # the formatter tests/test_style.py checks; pinned: styles change between releases
            'pytest-xdist>=3.8,<4',
            'scikit-learn>=1.4,<2',
            'scipy>=1.11,<2',
            'torch==2.13.0',
            'transformers>=4.50,<6',
            'peft>=0.15,<1',
            # The Ray executor of the sweeps and the HTTP server are tested too.
            'ray>=2.40,<3',
            'fastapi>=0.110,<1',
            'uvicorn>=0.29,<1',
            'httpx>=0.27,<1',
            'prometheus_client>=0.17,<1',
        ],
        'ray': ['ray>=2.40,<3'],
        'serve': ['fastapi>=0.110,<1', 'uvicorn>=0.29,<1', 'prometheus_client>=0.17,<1'],
        'bench': [
            'torch==2.13.0',
            'transformers>=4.50,<6',
            'peft>=0.15,<1',
            'psutil>=5.9,<8',
        ],
        'gpu': ['jax[cuda12]>=0.10.0,<0.11'],
        'tpu': ['jax[tpu]>=0.10.0,<0.11'],
    },
    entry_points={
        'console_scripts': [
            'prompt-tuning-train=prompt_tuning.train:console_main',
            'prompt-tuning-eval=prompt_tuning.eval:console_main',
            'prompt-tuning-infer=prompt_tuning.infer:console_main',
        ],
    },
)
