"""Run one Python script as several real JAX processes on this machine (fake CPU devices, localhost coordinator).

    outputs = run_processes(SCRIPT, num_processes=2, devices_per_process=4)

Each process gets ``FUSEJAX_COORDINATOR`` / ``FUSEJAX_NUM_PROCESSES`` / ``FUSEJAX_PROCESS_ID`` and its own
``XLA_FLAGS`` device count, so a script that calls ``fusejax.distributed.initialize()`` first joins the others
and then sees ``num_processes * devices_per_process`` global devices. Cross-process collectives on CPU use
JAX's default (gloo). Returns each process's stdout, in process order; any failure raises with every
process's stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# variables of real launchers that must not leak from the test runner into the child processes
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TPU_", "MEGASCALE_", "FUSEJAX_", "JAX_COORDINATOR")


def xla_flags(devices: int | None) -> str:
    """This test run's XLA_FLAGS (see conftest.py) for a child process with ``devices`` fake CPU devices
    (None: one, XLA's default)."""
    count = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    return " ".join(flags + ([] if devices is None else [f"{count}={devices}"]))


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(
    script: str, num_processes: int = 2, devices_per_process: int = 4, timeout: float = 120, extra_env=None
) -> list[str]:
    """Start ``num_processes`` copies of ``python -c script`` and wait for all; returns their stdouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(devices_per_process),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        FUSEJAX_COORDINATOR=f"localhost:{free_port()}",
        FUSEJAX_NUM_PROCESSES=str(num_processes),
        **(extra_env or {}),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**env, "FUSEJAX_PROCESS_ID": str(i)},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    codes = [p.returncode for p in procs]
    if any(codes):
        report = "\n".join(
            f"--- process {i} (exit {code}) stderr:\n{err[-4000:]}" for i, (code, (_, err)) in enumerate(zip(codes, results))
        )
        raise RuntimeError(f"multi-process run failed (exit codes {codes}):\n{report}")
    return [out for out, _ in results]
