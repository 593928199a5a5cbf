"""The device mesh (axes ``data``, ``fsdp``, ``tensor``) and the one logical-axis sharding table.

Parameters and activations name logical axes; ``LOGICAL_AXIS_RULES`` maps each to
mesh axes. Changing parallelism is a change of mesh sizes, never of model code.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Parameters shard their `embed` dim over fsdp and their
# head/mlp/vocab dims over tensor; activations shard `batch` over data and fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def initialize_distributed() -> None:
    """Join a multi-process job when launched as one, before anything touches the backend.

    - ``JAX_COORDINATOR_ADDRESS`` set (any launcher; ``launch/`` exports it): the address, with
      ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
    - TPU pod slices and SLURM jobs: detected by JAX itself.

    ``JAX_LOCAL_DEVICE_IDS`` (comma-separated) names the accelerators a process drives.

    CPU-only jobs get the gloo collectives. A process whose peer dies fails within
    ``MRJAX_HEARTBEAT_TIMEOUT`` seconds (default 100) instead of waiting forever.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    detected = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"))
    if not address and not detected:
        return
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(heartbeat_timeout_seconds=int(os.environ.get("MRJAX_HEARTBEAT_TIMEOUT", "100")),
                    initialization_timeout=int(os.environ.get("MRJAX_INIT_TIMEOUT", "300")))
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")  # e.g. "0,1,2,3,4,5,6,7": one process drives all its host's GPUs
    if local:
        timeouts["local_device_ids"] = [int(i) for i in local.split(",")]
    if address:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} is not: "
                             "every process needs the process count and its own id")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            **timeouts,
        )
    else:  # JAX reads the slice or the SLURM step (under SLURM it gives each process one GPU unless told)
        jax.distributed.initialize(**timeouts)
    if jax.process_index() != 0:  # one process reports; the others say only what goes wrong
        logging.getLogger("mrjax").setLevel(logging.WARNING)
    log.info("%d processes, %d devices in all (%d per process)", jax.process_count(), jax.device_count(),
             jax.local_device_count())


# ----------------------------------------------------------------------------- many processes
# Every process runs the same program (SPMD). Only process 0 writes files; decisions read from
# the run directory are process 0's, broadcast, so no process takes another branch (and waits
# in a collective the others never enter); results are gathered to every process in one order.


def is_main_process() -> bool:
    return jax.process_index() == 0


def agreed(value: Any) -> Any:
    """Process 0's ``value`` (a bool or number), on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return type(value)(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value))).item())


def barrier(name: str) -> None:
    """Wait until every process gets here (e.g. until process 0's files of a stage are written)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
    """``jax.device_get`` that also works for arrays split over processes: numpy arrays, whole, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def _glibc():
    """The C library if it is glibc (its malloc tunables), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and hand the heap's freed pages back to the OS (glibc's malloc_trim), so that one
    stage of a run does not stack its peak on memory the previous stage freed but the process kept
    (on XLA:CPU a generation stage leaves gigabytes of such pages behind)."""
    import gc

    gc.collect()
    if (libc := _glibc()) is not None:  # not glibc: nothing to trim
        libc.malloc_trim(0)


def allocate_large_blocks_apart(threshold: int = 1 << 20) -> None:
    """Serve heap allocations of ``threshold`` bytes or more with their own pages (glibc's
    M_MMAP_THRESHOLD), so a freed one goes back to the OS at once. glibc otherwise raises that
    threshold to 32 MiB as blocks are freed, and XLA:CPU's many-MiB buffers then fragment the heap:
    the pages a stage frees stay the process's until ``release_memory``. A no-op without glibc."""
    M_MMAP_THRESHOLD = -3
    if (libc := _glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, int(threshold))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes (data, fsdp, tensor); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into fsdp*tensor*data={known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices are available; "
            "set the sizes so their product is the device count (or use -1 for one axis)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_from_settings(settings: Any) -> Mesh:
    """Build the mesh from a ``config.MeshSettings``."""
    return make_mesh(settings.data, settings.fsdp, settings.tensor)


def logical_to_spec(
    names: Iterable[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry logical ``names``.

    A mesh axis is used at most once per array (first dim wins). With ``shape`` and
    ``mesh`` given, a dim that the mesh axes do not divide evenly stays replicated
    (e.g. SmolLM2's 9 heads on tensor=4) rather than failing.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[dim] % int(np.prod([mesh.shape[a] for a in axes])):
                log.debug("dim %d (%s, size %d) not divisible by %s: replicated", dim, name, shape[dim], axes)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def batch_ways(mesh: Mesh) -> int:
    """How many ways the ``batch`` logical axis splits (the data x fsdp mesh axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def put(array: Any, sharding: NamedSharding) -> jax.Array:
    """Host data (the same on every process) onto ``sharding``: each process places only its own
    shards, so this works unchanged on one process and on many."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_batch(mesh: Mesh, array: Any) -> jax.Array:
    """``array`` [rows, ...] with its rows split over the batch axis."""
    array = np.asarray(array)
    return put(array, named_sharding(mesh, ("batch",) + (None,) * (array.ndim - 1), array.shape))


def put_replicated(mesh: Mesh, array: Any) -> jax.Array:
    """``array`` whole on every device of the mesh."""
    return put(array, NamedSharding(mesh, PartitionSpec()))


def tree_shardings(mesh: Mesh, logical_tree: Any, abstract_tree: Any) -> Any:
    """Shardings for a tree of arrays given the matching tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: named_sharding(mesh, names, x.shape),
        logical_tree,
        abstract_tree,
        is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(a, (str, type(None))) for a in n),
    )


def constrain(x: jax.Array, mesh: Mesh | None, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (a no-op without a mesh)."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))
