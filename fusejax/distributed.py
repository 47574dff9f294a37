"""Multi-process start-up: join the other JAX processes of a TPU pod or GPU cluster, and split work between them.

Every entry point calls :func:`initialize` first, before anything touches a JAX device: it calls
``jax.distributed.initialize`` when this process is one of several, and does nothing on a single machine
(laptop, one GPU box, one TPU VM host, Colab). Where the settings come from, first match wins:

1. ``FUSEJAX_DISTRIBUTED=off``: never initialise (e.g. to debug one worker of a pod on its own).
2. Arguments of :func:`initialize`, else ``FUSEJAX_COORDINATOR`` (``host:port`` of process 0; JAX's
   ``JAX_COORDINATOR_ADDRESS`` also works), ``FUSEJAX_NUM_PROCESSES`` and ``FUSEJAX_PROCESS_ID``; missing
   ones are filled from the launcher:
   Slurm (``SLURM_NTASKS``, ``SLURM_PROCID``, inside ``srun``), Open MPI (``OMPI_COMM_WORLD_SIZE``,
   ``OMPI_COMM_WORLD_RANK``) or MPICH / Intel MPI (``PMI_SIZE``, ``PMI_RANK``). With more than one process
   the coordinator must be known: given, or derivable by JAX from Slurm's node list or Open MPI's URI.
3. A multi-host TPU: ``FUSEJAX_DISTRIBUTED=auto`` (set by ``launch/tpu_pod.sh``: Cloud TPU VMs describe the
   pod only in the metadata server, which JAX queries itself), ``TPU_WORKER_HOSTNAMES`` or
   ``TPU_PROCESS_ADDRESSES`` naming several hosts (GKE), or ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice).
   JAX then detects every setting. ``CLOUD_TPU_TASK_ID`` is not used: it names this worker but not how many
   there are, so worker 0 could not tell a pod from a single host.
4. Anything else, Colab included: one process, nothing to do.

JAX itself is imported only inside the functions, so importing this module never starts a backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# launcher -> (variable with the process count, variable with this process's rank)
LAUNCHERS: dict[str, tuple[str, str]] = {
    "slurm": ("SLURM_NTASKS", "SLURM_PROCID"),
    "openmpi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "pmi": ("PMI_SIZE", "PMI_RANK"),
}

_initialized = False  # set once this module has called jax.distributed.initialize


class DistributedError(RuntimeError):
    """Settings that cannot start a multi-process run (the message names the variable or argument)."""


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer") from None


def _launcher(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    """``(name, num_processes, process_id)`` of the first launcher whose variables are both set."""
    for name, (size_var, rank_var) in LAUNCHERS.items():
        if size_var in env and rank_var in env:
            return name, _env_int(env, size_var), _env_int(env, rank_var)
    return None


def _jax_finds_coordinator(launcher: str | None, env: Mapping[str, str]) -> bool:
    """Whether ``jax.distributed.initialize`` derives the coordinator address itself (its Slurm and Open MPI
    cluster detection, which need exactly these variables)."""
    if launcher == "slurm":
        return all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID"))
    if launcher == "openmpi":
        return "OMPI_MCA_orte_hnp_uri" in env
    return False


def _multihost_tpu(env: Mapping[str, str]) -> bool:
    if env.get("FUSEJAX_DISTRIBUTED", "").lower() == "auto" or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def plan(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict | None:
    """The keyword arguments :func:`initialize` would pass to ``jax.distributed.initialize`` (``None`` values
    are left for JAX to detect), or ``None`` when this is a single-process run. Reads ``env`` (default:
    ``os.environ``); raises :class:`DistributedError` for settings that cannot work."""
    env = os.environ if env is None else env
    if env.get("FUSEJAX_DISTRIBUTED", "").lower() == "off":
        return None
    coordinator_address = coordinator_address or env.get("FUSEJAX_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int(env, "FUSEJAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int(env, "FUSEJAX_PROCESS_ID")
    launcher = _launcher(env)
    if launcher is not None:
        num_processes = launcher[1] if num_processes is None else num_processes
        process_id = launcher[2] if process_id is None else process_id
    kwargs = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": None if local_device_ids is None else list(local_device_ids),
    }
    if num_processes is None or num_processes <= 1:
        if _multihost_tpu(env):
            return kwargs  # JAX reads the pod's layout from the TPU metadata / GKE variables
        if coordinator_address is not None and num_processes is None:
            raise DistributedError(
                f"FUSEJAX_COORDINATOR={coordinator_address!r} is set but the number of processes is not: "
                "set FUSEJAX_NUM_PROCESSES and FUSEJAX_PROCESS_ID too"
            )
        return None
    if process_id is None:
        raise DistributedError(f"{num_processes} processes but no process id: set FUSEJAX_PROCESS_ID (0..N-1)")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is outside 0..{num_processes - 1} ({num_processes} processes)")
    if coordinator_address is None and not _jax_finds_coordinator(launcher and launcher[0], env):
        where = f" ({launcher[0]} launcher)" if launcher else ""
        raise DistributedError(
            f"{num_processes} processes{where} but no coordinator address: set FUSEJAX_COORDINATOR=host:port "
            "(host of process 0, a free port, the same on every process); under Slurm, start the processes with srun"
        )
    return kwargs


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join the other processes of a multi-process run (see the module docstring for where the settings
    come from). Call before any JAX computation or ``jax.devices()``. Returns True when this call ran
    ``jax.distributed.initialize``; False on a single machine and on every later call (idempotent)."""
    global _initialized
    if _initialized:
        return False
    kwargs = plan(coordinator_address, num_processes, process_id, local_device_ids)
    if kwargs is None:
        return False
    import jax

    if jax.distributed.is_initialized():  # someone else (a notebook, a test harness) already did it
        _initialized = True
        return False
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def is_main_process() -> bool:
    """True in JAX process 0: the one process that writes logs, manifests and reports."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every JAX process reaches the barrier ``name``; a no-op with one process."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fusejax-{name}")


def process_slice(n_items: int, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """``(start, stop)``: the contiguous range of items ``0..n_items-1`` that this process handles.

    Process ``i`` of ``p`` gets ``[i * n // p, (i + 1) * n // p)``: consecutive processes get adjacent ranges
    (one's stop is the next one's start, the first starts at 0 and the last stops at ``n``), so together they
    cover every item exactly once; sizes differ by at most one (some may be empty when ``n < p``). Process
    ``i`` owns the ``i``-th block of rows of a batch sharded over a mesh made from ``jax.devices()``, whose
    devices are ordered by process. Defaults: ``jax.process_index()`` and ``jax.process_count()``.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if n_items < 0:
        raise ValueError(f"process_slice: n_items={n_items} must be >= 0")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_slice: process_index={process_index} is outside 0..{process_count - 1}")
    return process_index * n_items // process_count, (process_index + 1) * n_items // process_count
