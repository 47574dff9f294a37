"""fusejax.distributed: launcher detection, idempotence, process slices, a real two-process run; launch files
and mesh presets."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from fusejax import distributed
from fusejax.config import load_config
from fusejax.sharding import resolve_mesh_shape
from processes import run_processes  # tests/processes.py (pytest puts tests/ on sys.path)

REPO = Path(__file__).resolve().parents[1]

_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TPU_", "MEGASCALE_", "FUSEJAX_", "JAX_COORDINATOR", "COLAB_")


@pytest.fixture
def calls(monkeypatch):
    """A clean launcher environment, a fresh module state, and jax.distributed.initialize replaced by a
    recorder; yields the list of recorded keyword arguments."""
    import os

    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_initialized", False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return recorded


def _slurm(monkeypatch, ntasks, procid, srun=True):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", "0")
    if srun:
        monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[001-002]")


def test_single_machine_does_nothing(calls):
    assert distributed.initialize() is False
    assert calls == []


def test_single_slurm_task_does_nothing(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=1, procid=0)
    assert distributed.initialize() is False
    assert calls == []


def test_slurm_multi_task_initialises_with_its_rank(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=16, procid=9)
    assert distributed.initialize() is True
    # the coordinator is left to JAX's Slurm detection (first host of SLURM_STEP_NODELIST)
    assert calls == [dict(coordinator_address=None, num_processes=16, process_id=9, local_device_ids=None)]


def test_slurm_with_explicit_coordinator(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=2, procid=1)
    monkeypatch.setenv("FUSEJAX_COORDINATOR", "gpu001:12345")
    assert distributed.initialize() is True
    assert calls == [dict(coordinator_address="gpu001:12345", num_processes=2, process_id=1, local_device_ids=None)]


def test_slurm_outside_srun_without_coordinator_raises(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=2, procid=0, srun=False)
    with pytest.raises(distributed.DistributedError, match="FUSEJAX_COORDINATOR.*srun"):
        distributed.initialize()
    assert calls == []


def test_explicit_env_vars(calls, monkeypatch):
    monkeypatch.setenv("FUSEJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("FUSEJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("FUSEJAX_PROCESS_ID", "3")
    assert distributed.initialize() is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=None)]


def test_arguments_override_env(calls, monkeypatch):
    monkeypatch.setenv("FUSEJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("FUSEJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("FUSEJAX_PROCESS_ID", "3")
    assert distributed.initialize("h:1", num_processes=2, process_id=0, local_device_ids=(0, 1)) is True
    assert calls == [dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids=[0, 1])]


def test_openmpi_and_pmi_ranks(calls, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("FUSEJAX_COORDINATOR", "node0:999")
    assert distributed.plan()["num_processes"] == 3 and distributed.plan()["process_id"] == 2
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK")
    monkeypatch.setenv("PMI_SIZE", "5")
    monkeypatch.setenv("PMI_RANK", "4")
    assert distributed.initialize() is True
    assert calls == [dict(coordinator_address="node0:999", num_processes=5, process_id=4, local_device_ids=None)]


@pytest.mark.parametrize(
    "env",
    [
        {"FUSEJAX_DISTRIBUTED": "auto"},
        {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3", "TPU_WORKER_ID": "2"},
        {"MEGASCALE_COORDINATOR_ADDRESS": "10.1.0.5", "MEGASCALE_NUM_SLICES": "2"},
    ],
)
def test_tpu_pod_leaves_detection_to_jax(calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize() is True
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None)]


def test_single_tpu_host_and_colab_do_nothing(calls, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("CLOUD_TPU_TASK_ID", "0")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20250101-060000_RC00")
    assert distributed.initialize() is False
    assert calls == []


def test_off_wins_over_launcher(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=4, procid=1)
    monkeypatch.setenv("FUSEJAX_DISTRIBUTED", "off")
    assert distributed.initialize() is False
    assert calls == []


def test_idempotent(calls, monkeypatch):
    _slurm(monkeypatch, ntasks=2, procid=0)
    assert distributed.initialize() is True
    assert distributed.initialize() is False
    assert len(calls) == 1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FUSEJAX_NUM_PROCESSES": "two", "FUSEJAX_PROCESS_ID": "0"}, "FUSEJAX_NUM_PROCESSES='two'"),
        ({"FUSEJAX_NUM_PROCESSES": "2", "FUSEJAX_PROCESS_ID": "2", "FUSEJAX_COORDINATOR": "h:1"}, "outside 0..1"),
        ({"FUSEJAX_NUM_PROCESSES": "2", "FUSEJAX_COORDINATOR": "h:1"}, "FUSEJAX_PROCESS_ID"),
        ({"FUSEJAX_NUM_PROCESSES": "2", "FUSEJAX_PROCESS_ID": "0"}, "no coordinator"),
        ({"FUSEJAX_COORDINATOR": "h:1"}, "FUSEJAX_NUM_PROCESSES"),
    ],
)
def test_bad_settings_name_the_variable(calls, monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.initialize()
    assert calls == []


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 64, 1001])
@pytest.mark.parametrize("p", [1, 2, 3, 8, 16])
def test_process_slice_covers_each_item_once(n, p):
    slices = [distributed.process_slice(n, i, p) for i in range(p)]
    covered = [item for start, stop in slices for item in range(start, stop)]
    assert covered == list(range(n))  # contiguous, in process order, each item exactly once
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1


def test_process_slice_single_process_defaults():
    assert distributed.process_slice(10) == (0, 10)  # the test process is process 0 of 1
    assert distributed.is_main_process()
    with pytest.raises(ValueError, match="process_index=2"):
        distributed.process_slice(10, 2, 2)


TWO_PROCESS_SCRIPT = """
import numpy as np
from fusejax import distributed
assert distributed.initialize() is True
import jax, jax.numpy as jnp
from fusejax.sharding import make_mesh, named_sharding
mesh = make_mesh(data=2, fsdp=-1)
rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
start, stop = distributed.process_slice(len(rows))
sharding = named_sharding(mesh, ("batch", None), rows.shape)
x = jax.make_array_from_process_local_data(sharding, rows[start:stop], rows.shape)
total = jax.jit(jnp.sum)(x)
print("PROCESS", jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
      dict(mesh.shape), start, stop, distributed.is_main_process())
print("TOTAL", float(total))
"""


def test_two_real_processes_compute_a_global_sum():
    outputs = run_processes(TWO_PROCESS_SCRIPT, num_processes=2, devices_per_process=4)
    expected_total = float(sum(range(24)))  # 0 + 1 + ... + 23
    for i, out in enumerate(outputs):
        # other libraries may print to stdout too: read only our two lines
        lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("PROCESS ", "TOTAL ")))
        assert set(lines) == {"PROCESS", "TOTAL"}, out
        mesh = "{'data': 2, 'fsdp': 4, 'tensor': 1}"
        assert lines["PROCESS"] == f"{i} 2 8 4 {mesh} {4 * i} {4 * i + 4} {i == 0}"
        assert float(lines["TOTAL"]) == expected_total


# ------------------------------------------------------------------------------------------ launch files


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_parse_and_document_usage(script):
    path = REPO / "launch" / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    head = path.read_text().splitlines()[:40]
    assert head[0].startswith("#!")
    assert any("Usage" in line for line in head)


def test_colab_notebook_is_nbformat4():
    nb = json.loads((REPO / "launch" / "colab.ipynb").read_text())
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict)
    sources = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown")
        assert isinstance(cell["source"], (str, list)) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
        sources.append("".join(cell["source"]))
    code = "\n".join(sources)
    assert re.search(r"pip\W+install", code) and "fusejax demo" in code


# ------------------------------------------------------------------------------------------ mesh presets

# preset -> JAX devices of the slice: TPU v4 and v5p names count TensorCores (2 per chip, one JAX device per
# chip); v5e names count chips; h100x8 is one node of 8 GPUs
PRESET_CHIPS = {"v4-8": 4, "v5e-16": 16, "v5p-64": 32, "h100x8": 8}


@pytest.mark.parametrize("name, chips", PRESET_CHIPS.items())
def test_mesh_preset_fills_its_slice(name, chips, tmp_path):
    path = REPO / "configs" / "mesh" / f"{name}.yaml"
    mesh = load_config(path).mesh
    assert -1 not in (mesh.data, mesh.fsdp, mesh.tensor)
    assert mesh.data * mesh.fsdp * mesh.tensor == chips
    assert resolve_mesh_shape(mesh.data, mesh.fsdp, mesh.tensor, n_devices=chips)
    # usable as a base: a run config inherits the mesh and keeps its own settings
    run = tmp_path / "run.yaml"
    run.write_text(f"base: {path}\ntrain:\n  lr: 3.0e-5\n")
    cfg = load_config(run)
    assert cfg.mesh == mesh and cfg.train.lr == 3.0e-5


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_tpu_pod_run_recreates_a_preempted_slice_and_reruns(tmp_path):
    """launch/tpu_pod.sh against a fake gcloud: the first run is cut by a preemption, the second succeeds."""
    bin_dir, calls, state = tmp_path / "bin", tmp_path / "calls", tmp_path / "state"
    bin_dir.mkdir()
    state.write_text("READY")
    _fake_tool(
        bin_dir,
        "gcloud",
        f"""echo "$*" >> {calls}
case "$*" in
  *" describe "*) cat {state} ;;
  *" create "*) echo READY > {state} ;;
  *" delete "*) echo MISSING > {state} ;;
  *fusejax\\ train*)
    if [ ! -e {tmp_path}/preempted ]; then touch {tmp_path}/preempted; echo PREEMPTED > {state}; exit 255; fi
    echo "worker output" ;;
esac
""",
    )
    work = tmp_path / "checkout"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "run.yaml").write_text("train:\n  lr: 1.0e-5\n")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TPU_NAME": "pod",
        "ZONE": "zone-a",
        "ACCELERATOR_TYPE": "v5litepod-16",
        "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
        "FUSEJAX_SOURCE": "git+https://example.org/fusejax.git@abc123",
        "BUCKET": "gs://bkt/runs",
    }
    script = REPO / "launch" / "tpu_pod.sh"
    result = subprocess.run(
        ["bash", str(script), "run", "train", "configs/run.yaml", "train.lr=2e-5"],
        cwd=work, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    log = calls.read_text().splitlines()
    runs = [i for i, line in enumerate(log) if "fusejax train" in line]
    assert len(runs) == 2
    for i in runs:
        assert log[i].startswith("compute tpus tpu-vm ssh pod --worker=all --command=")
        assert "FUSEJAX_DISTRIBUTED=auto $HOME/fusejax-venv/bin/fusejax train configs/run.yaml train.lr=2e-5" in log[i]
        assert log[i].endswith("--zone=zone-a")
    between = log[runs[0] + 1 : runs[1]]
    assert any(line.startswith("compute tpus tpu-vm delete pod") for line in between)
    create = [line for line in between if line.startswith("compute tpus tpu-vm create pod")]
    assert create == [
        "compute tpus tpu-vm create pod --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --zone=zone-a"
    ]
    assert any("jax[tpu]" in line and "git+https://example.org/fusejax.git@abc123" in line for line in between)
    assert "gcsfuse --implicit-dirs --only-dir runs bkt /mnt/fusejax" in "\n".join(between)
    assert "worker output" in (work / "logs" / "tpu_pod-pod.log").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("per_node, device_ids", [("8", ""), ("1", "0,1,2,3,4,5,6,7")])
def test_slurm_script_runs_fusejax_under_srun(tmp_path, per_node, device_ids):
    """launch/slurm_gpu.sbatch with fake scontrol/srun: coordinator on the first node, the stage under srun."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "scontrol", "printf 'gpu017\\ngpu018\\n'\n")
    _fake_tool(bin_dir, "srun", f'echo "$FUSEJAX_COORDINATOR|${{JAX_LOCAL_DEVICE_IDS:-}}|$*" >> {calls}\n')
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "30007",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": str(2 * int(per_node)),
        "SLURM_NTASKS_PER_NODE": per_node,
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    script = REPO / "launch" / "slurm_gpu.sbatch"
    result = subprocess.run(
        ["bash", str(script), "train", "configs/run.yaml", "mesh.data=2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    coordinator, ids, command = calls.read_text().strip().split("|")
    assert coordinator == f"gpu017:{20000 + 30007 % 20000}"
    assert ids == device_ids
    assert command.endswith(f"{tmp_path}/.venv/bin/fusejax train configs/run.yaml mesh.data=2")


# ------------------------------------------------------------------------------------------ CLI wiring

_events = []


def _record_stage(cfg):
    _events.append(("stage", cfg.train.lr))


def test_cli_initialises_before_a_stage_but_not_for_config(monkeypatch, capsys):
    from fusejax import cli, stages

    _events.clear()
    monkeypatch.setattr(cli, "initialize", lambda: _events.append(("initialize",)))
    monkeypatch.setitem(stages.COMMANDS, "fakestage", (f"{__name__}:_record_stage", "a stage for this test"))
    assert cli.main(["fakestage", "train.lr=3e-5"]) == 0
    assert _events == [("initialize",), ("stage", 3e-5)]
    _events.clear()
    assert cli.main(["config", "train.lr=3e-5"]) == 0
    assert _events == []
