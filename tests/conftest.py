"""Test set-up: 8 fake CPU devices and an offline Hugging Face hub, fixed before JAX is first imported."""

import os
import shutil
import tempfile
from pathlib import Path

# XLA_OPT: the tests compile hundreds of small programs; XLA:CPU's backend optimisations (LLVM) cost more
# compile time than they save at these sizes (about 30% of a compile-heavy module's time), and its fusion
# emitters take about 3x the compile time of the elemental emitter on a tiny train step
XLA_OPT = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {XLA_OPT}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda runs the GPU-only tests on a GPU
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent JAX compilation cache per test run, shared by the pytest-xdist workers and the processes tests
# start (they inherit the environment the first process sets here): the many tests that build the same tiny
# models and trainers compile each program once. Removed when the run ends.
if "FUSEJAX_TESTS_JAX_CACHE" not in os.environ:
    os.environ["FUSEJAX_TESTS_JAX_CACHE"] = tempfile.mkdtemp(prefix="fusejax-tests-jax-cache-")
JAX_CACHE = Path(os.environ["FUSEJAX_TESTS_JAX_CACHE"])
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real tokenizers and corpora in ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present in the developers' checkout)")
    return SHARED_DATA.resolve()


# The longest modules first: `make test` gives each of two workers a whole module at a time (--dist loadfile), so a
# long module collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_reliability", "test_embedded", "test_train", "test_chat_toy", "test_generation", "test_plan",
                 "test_multihost", "test_stages_e2e", "test_attention", "test_harness", "test_align_real",
                 "test_represent", "test_align_stage", "test_families")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist), after every worker
        shutil.rmtree(JAX_CACHE, ignore_errors=True)
