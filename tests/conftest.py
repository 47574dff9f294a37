"""Test set-up: 8 fake CPU devices and an offline Hugging Face hub, fixed before JAX is first imported."""

import os

# XLA_OPT: the tests compile hundreds of small programs; XLA:CPU's backend optimisations (LLVM) cost more
# compile time than they save at these sizes (about 30% of a compile-heavy module's time)
XLA_OPT = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {XLA_OPT}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real tokenizers and corpora in ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present in the developers' checkout)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="module")
def jax_compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache for one test module, so trainers with identical programs compile
    once. Use with ``pytestmark = pytest.mark.usefixtures("jax_compile_cache")``."""
    import jax

    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


# The longest modules first: `make test` gives each of two workers a whole module at a time (--dist loadfile), so a
# long module collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_reliability", "test_embedded", "test_train", "test_chat_toy", "test_generation", "test_plan",
                 "test_multihost", "test_stages_e2e", "test_attention", "test_harness", "test_align_real",
                 "test_represent", "test_align_stage", "test_families")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order
