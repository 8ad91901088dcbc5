import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest_slurm import *  # noqa

import pytest  # noqa: E402

# Modules whose tests call `train()` directly: training only reads prepared token stores
# (`pcbench prepare`), so the default spec's stores are prepared once per session, in the
# ambient cache (kept when already there: each shard's sha256 is checked).
TRAINS_DIRECTLY = {"test_train", "test_memory", "test_methods", "test_export", "test_fsdp", "test_data",
                   "test_tuned", "test_compress", "test_eval", "test_faults", "test_cuda", "test_prefetch",
                   "test_prepare"}


@pytest.fixture(scope="session")
def prepared_stores():
    from pcbench.data import shards

    for corpus, split in (("books", "train"), ("sotu", "test")):
        ref = shards.StoreRef(corpus, "bpe-512", split, "books")
        if not shards.is_prepared(ref):
            shards.prepare_store(ref, workers=2, log=lambda m: None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in TRAINS_DIRECTLY:
            item.fixturenames.insert(0, "prepared_stores")
