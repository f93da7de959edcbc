"""Device meshes and `jax.jit` partitioning with T5X's gin vocabulary.

`PjitPartitioner` keeps T5X's name and constructor, but builds a `jax.sharding.Mesh` with axes
`('data', 'model')` and partitions functions with `jax.jit(in_shardings=..., out_shardings=...)` over
`NamedSharding`s (the deprecated `pjit` and `pxla.thread_resources` are not used).

Logical axis names on parameters (`vocab`, `embed`, `mlp`, `heads`, `joined_kv`, `prompt`, ...) are
mapped to mesh axes by `standard_logical_axis_rules`, exactly as in T5X.
"""

import contextlib
import dataclasses
import functools
from absl import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen.partitioning as nn_partitioning
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PartitionSpec = PartitionSpec
LogicalAxisRules = Sequence[Tuple[str, Optional[str]]]


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[LogicalAxisRules] = None,
) -> LogicalAxisRules:
  """T5X's default logical-to-mesh axis rules.

  With (1, 1) the model axis shards `vocab`, `mlp`, `heads` and `joined_kv`; the batch is sharded over
  `data`. 2-D activation partitioning also shards `embed` over `model`; 2-D parameter partitioning
  shards `embed` over `data` (fully sharded parameters).
  """
  if activation_partitioning_dims == 1 and parameter_partitioning_dims == 1:
    rules = [
        ('batch', 'data'),
        ('vocab', 'model'),
        ('embed', None),
        ('mlp', 'model'),
        ('heads', 'model'),
        ('kv', None),
        ('joined_kv', 'model'),
    ]
  elif activation_partitioning_dims == 2 and parameter_partitioning_dims == 1:
    rules = [
        ('batch', 'data'),
        ('vocab', 'model'),
        ('mlp', 'model'),
        ('heads', 'model'),
        ('kv', None),
        ('joined_kv', 'model'),
        ('embed', 'model'),
    ]
  elif activation_partitioning_dims == 1 and parameter_partitioning_dims == 2:
    rules = [
        ('batch', 'data'),
        ('vocab', 'model'),
        ('mlp', 'model'),
        ('heads', 'model'),
        ('kv', None),
        ('joined_kv', 'model'),
        ('embed', 'data'),
    ]
  elif activation_partitioning_dims == 2 and parameter_partitioning_dims == 2:
    rules = [
        ('batch', 'data'),
        ('vocab', 'model'),
        ('mlp', 'model'),
        ('heads', 'model'),
        ('kv', None),
        ('joined_kv', 'model'),
        ('embed', 'model'),
        ('embed', 'data'),
    ]
  else:
    raise ValueError(
        f'activation_partitioning_dims={activation_partitioning_dims} and parameter_partitioning_dims='
        f'{parameter_partitioning_dims} are not supported; each must be 1 or 2.'
    )
  replicated = [
      ('relpos_buckets', None),
      ('abspos_buckets', None),
      ('length', None),
      ('layers', None),
      ('stack', None),
      ('mlp_activations', None),
  ]
  return rules + replicated + list(additional_rules or [])


def prompt_logical_axis_rules() -> LogicalAxisRules:
  """Rules that keep prompts replicated, so the saved `.npy` is always the whole prompt."""
  return [('prompt', None), ('prompt_embed', None), ('tasks', None)]


def device_put_owned(x: Any, sharding: Any) -> jax.Array:
  """`jax.device_put(x, sharding)` with buffers XLA owns, so that a jitted step can donate them.

  On the CPU, JAX wraps a numpy array whose data is suitably aligned instead of copying it (even
  with `may_alias=False`). XLA cannot write outputs into memory numpy owns, so a step that donates
  such an array (the training step donates the whole train state) still allocates every output
  anew: the first training step held the state twice (294 MiB more peak memory for T5 1.1 small).
  Large numpy arrays are page-aligned under tcmalloc, so with it every parameter loaded from a
  checkpoint was such a wrapper. Here each buffer that aliases `x` is copied once (a device-side
  copy, one leaf at a time); elsewhere (accelerators, copied or unaligned data) this is
  `jax.device_put`.
  """
  arr = jax.device_put(x, sharding)
  if not isinstance(x, np.ndarray) or x.nbytes == 0:
    return arr
  lo, hi = x.ctypes.data, x.ctypes.data + x.nbytes
  for shard in arr.addressable_shards:
    if shard.device.platform != 'cpu':
      continue
    if lo <= shard.data.unsafe_buffer_pointer() < hi:
      return jax.device_put(arr, sharding, may_alias=False)
  return arr


@dataclasses.dataclass
class DataLayout:
  """How the global batch is split over processes (T5X's `DataLayout`)."""

  batch_size: int
  shard_id: int
  num_shards: int
  is_first_host_in_replica_set: bool = True


def _ordered_devices(backend: Optional[str] = None):
  devices = jax.devices(backend)
  # Keep each process's devices contiguous so the data axis splits by host.
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def default_mesh(
    num_partitions: int,
    model_parallel_submesh: Optional[Tuple[int, ...]] = None,
    backend: Optional[str] = None,
) -> Mesh:
  """A ('data', 'model') mesh over every device; model parallelism stays inside a host when possible."""
  devices = _ordered_devices(backend)
  n = len(devices)
  if model_parallel_submesh is not None:
    num_partitions = int(np.prod(model_parallel_submesh))
  if num_partitions < 1 or n % num_partitions:
    raise ValueError(
        f'num_partitions={num_partitions} does not divide the {n} available devices; choose a divisor '
        f'of {n} (e.g. num_partitions=1 for pure data parallelism).'
    )
  data = n // num_partitions
  platform = devices[0].platform
  if platform in ('tpu', 'gpu', 'cuda', 'rocm') and n > 1:
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

      local = jax.local_device_count(backend)
      if jax.process_count() > 1 and num_partitions <= local and local % num_partitions == 0:
        grid = mesh_utils.create_hybrid_device_mesh(
            (local // num_partitions, num_partitions), (jax.process_count(), 1), devices=devices
        )
      else:
        grid = mesh_utils.create_device_mesh((data, num_partitions), devices=devices)
      return Mesh(grid, ('data', 'model'))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Topology-aware mesh creation failed (%s); using device order.', e)
  return Mesh(np.asarray(devices, dtype=object).reshape(data, num_partitions), ('data', 'model'))


class PjitPartitioner:
  """T5X-compatible partitioner built on `jax.jit` and `NamedSharding`.

  Exactly one of `num_partitions` (size of the model axis) or `model_parallel_submesh` (a TPU submesh
  shape whose product is the model-axis size) should be set; neither means `num_partitions=1`.
  """

  def __init__(
      self,
      num_partitions: Optional[int] = None,
      model_parallel_submesh: Optional[Tuple[int, ...]] = None,
      params_on_devices: bool = True,
      backend: Optional[str] = None,
      ici_mesh_shape: Optional[Tuple[int, ...]] = None,
      dcn_mesh_shape: Optional[Tuple[int, ...]] = None,
      logical_axis_rules: Optional[LogicalAxisRules] = None,
  ):
    if num_partitions is not None and model_parallel_submesh is not None:
      raise ValueError('Set only one of `num_partitions` and `model_parallel_submesh`, not both.')
    del params_on_devices, ici_mesh_shape, dcn_mesh_shape
    self._num_partitions = num_partitions or 1
    self._model_parallel_submesh = model_parallel_submesh
    self._backend = backend
    if logical_axis_rules is None:
      logical_axis_rules = standard_logical_axis_rules(additional_rules=prompt_logical_axis_rules())
    rules = list(logical_axis_rules)
    # Prompts are replicated unless the user says otherwise.
    known = {r[0] for r in rules}
    for rule in prompt_logical_axis_rules():
      if rule[0] not in known:
        rules.append(rule)
    self._logical_axis_rules = tuple(tuple(r) for r in rules)

  @functools.cached_property
  def mesh(self) -> Mesh:
    return default_mesh(self._num_partitions, self._model_parallel_submesh, self._backend)

  @property
  def logical_axis_rules(self):
    return self._logical_axis_rules

  @property
  def data_partition_spec(self) -> PartitionSpec:
    return PartitionSpec('data')

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.data_partition_spec)

  def get_data_layout(
      self, batch_size: Optional[int] = None, host_index: Optional[int] = None
  ) -> DataLayout:
    """Which rows of each global batch this process feeds (T5X's `DataLayout`).

    Processes whose devices hold the same rows of the `data` axis (model parallelism across processes)
    read the same shard; otherwise each process reads a disjoint contiguous `1/num_shards` slice.
    """
    data_size = self.mesh.shape['data']
    if batch_size is not None and batch_size % data_size:
      raise ValueError(
          f'Batch size {batch_size} must be divisible by the data-parallel size {data_size} '
          f'({jax.device_count()} devices / num_partitions={self.mesh.shape["model"]}); change BATCH_SIZE '
          'or num_partitions.'
      )
    if host_index is not None:
      return DataLayout(batch_size=batch_size, shard_id=host_index, num_shards=jax.process_count())
    if jax.process_count() == 1:
      return DataLayout(batch_size=batch_size, shard_id=0, num_shards=1)
    # Rows of the data axis held by this process's devices.
    rows = sorted(
        {
            i[0]
            for i, d in np.ndenumerate(self.mesh.devices)
            if d.process_index == jax.process_index()
        }
    )
    per = len(rows)
    if rows != list(range(rows[0], rows[0] + per)) or data_size % per or rows[0] % per:
      raise ValueError(
          f'Process {jax.process_index()} holds non-contiguous data rows {rows} of the mesh; '
          'use a mesh whose data axis is split by process.'
      )
    num_shards = data_size // per
    shard_id = rows[0] // per
    if batch_size is not None and batch_size % num_shards:
      raise ValueError(
          f'Batch size {batch_size} is not divisible by the number of data shards {num_shards}.'
      )
    first = min(d.process_index for i, d in np.ndenumerate(self.mesh.devices) if i[0] in rows)
    return DataLayout(
        batch_size=batch_size,
        shard_id=shard_id,
        num_shards=num_shards,
        is_first_host_in_replica_set=first == jax.process_index(),
    )

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical-rule context: activation sharding constraints take effect inside it."""
    with jax.set_mesh(self.mesh), nn_partitioning.axis_rules(self._logical_axis_rules):
      yield

  def logical_to_mesh_axes(self, logical_axes: Any) -> Any:
    """Maps a tree of logical `PartitionSpec`s (or None) to mesh `PartitionSpec`s."""

    def one(x):
      if x is None:
        return PartitionSpec()
      return nn_partitioning.logical_to_mesh_axes(tuple(x), self._logical_axis_rules)

    return jax.tree_util.tree_map(
        one, logical_axes, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec)
    )

  def get_mesh_axes(self, logical_axes: Any) -> Any:
    return self.logical_to_mesh_axes(logical_axes)

  def mesh_axes_to_sharding(self, mesh_axes: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda p: NamedSharding(self.mesh, p),
        mesh_axes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )

  def logical_to_sharding(self, logical_axes: Any) -> Any:
    return self.mesh_axes_to_sharding(self.logical_to_mesh_axes(logical_axes))

  def partition(
      self,
      fn: Callable,
      in_axis_resources,
      out_axis_resources,
      static_argnums: Sequence[int] = (),
      donate_argnums: Sequence[int] = (),
      compiler_options: Optional[Mapping[str, Any]] = None,
  ) -> 'PartitionedFn':
    """jit `fn` with shardings given as trees of mesh PartitionSpecs or NamedShardings (None = replicated).

    `compiler_options` (XLA debug options, e.g. `xla_options.inference_compiler_options(model)`)
    go to `jax.jit`.
    """
    to_sharding = (
        lambda tree: None
        if tree is None
        else jax.tree_util.tree_map(
            lambda p: p
            if isinstance(p, NamedSharding)
            else NamedSharding(self.mesh, p if p is not None else PartitionSpec()),
            tree,
            is_leaf=lambda x: x is None or isinstance(x, (PartitionSpec, NamedSharding)),
        )
    )
    jitted = jax.jit(
        fn,
        in_shardings=to_sharding(in_axis_resources),
        out_shardings=to_sharding(out_axis_resources),
        static_argnums=static_argnums,
        donate_argnums=donate_argnums,
        compiler_options=dict(compiler_options) if compiler_options else None,
    )
    return PartitionedFn(jitted, self)

  def compile(self, partitioned_fn: 'PartitionedFn', *args):
    return partitioned_fn.lower(*args).compile()

  def shard_host_batch(self, batch: Any) -> Any:
    """Turns this process's slice of the batch (numpy, see `get_data_layout`) into global arrays."""
    sharding = self.data_sharding
    if jax.process_count() == 1:
      return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), sharding), batch)
    num_shards = self.get_data_layout().num_shards

    def one(x):
      x = np.asarray(x)
      global_shape = (x.shape[0] * num_shards,) + x.shape[1:]
      return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map(one, batch)


# T5X's name for the same partitioner (`partitioning.ModelBasedPjitPartitioner` in its gin files):
# one class, so gin bindings of either name configure it.
ModelBasedPjitPartitioner = PjitPartitioner


class PartitionedFn:
  """A jitted function that runs inside its partitioner's mesh and logical-rule context."""

  def __init__(self, jitted, partitioner: PjitPartitioner):
    self._jitted = jitted
    self._partitioner = partitioner

  def __call__(self, *args, **kwargs):
    with self._partitioner.context():
      return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._partitioner.context():
      return self._jitted.lower(*args, **kwargs)

  def cache_size(self) -> int:
    """How many executables (argument shapes) this function has compiled."""
    return self._jitted._cache_size()  # pylint: disable=protected-access
