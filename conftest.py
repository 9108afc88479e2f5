import os

import pytest

# The tests run on the offline profile and never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Notebook 05 reloads the adapter notebook 04 trains and saves (or, when 04 has not run, trains a stand-in under
# the same name): under pytest-xdist they must run on one worker, 04 first.
RUN_TOGETHER = {"04_qlora_sft.ipynb": "notebooks 04 and 05", "05_merge_and_export.ipynb": "notebooks 04 and 05"}


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist reads the groups (its worker plugin registers after this file)
def pytest_collection_modifyitems(config, items):
    """For `make test`'s two workers (`-n 2 --dist loadgroup`): every item in its file's group, so a notebook's
    cells share one kernel and one worker, and notebooks 04 and 05 in one group, in collection order. (Taking the
    longest groups first was tried and was slower: 04's training ran beside 09, 06 and 07 instead of beside unit
    tests, 155-160 s -> 187 s; docs/measurements.md.)"""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(RUN_TOGETHER.get(item.path.name, str(item.path))))


@pytest.fixture(scope="session")
def assets():
    """The offline profile's shipped assets (SHA-256 checked)."""
    from qlora_helpers.core.offline import ensure_offline_assets
    return ensure_offline_assets()


@pytest.fixture(scope="session")
def offline_profile(assets):
    """The offline profile on the kit's tiny model: the unit tests are about code paths, fast."""
    from qlora_helpers.core.runtime import get_profile, use_threads
    profile = get_profile("offline", model="tiny")
    use_threads(profile)  # one thread, as the notebooks on the tiny model run
    return profile


@pytest.fixture(scope="session")
def real_profile():
    """The offline profile on the real model (SmolLM2-135M-Instruct; fetched and converted once)."""
    from qlora_helpers.core.real_model import ensure_real_model
    from qlora_helpers.core.runtime import get_profile
    ensure_real_model()
    return get_profile("offline", model="smollm2")


@pytest.fixture(scope="session")
def tok(offline_profile):
    """The offline tokenizer (tests that change padding_side restore it)."""
    from qlora_helpers.core.runtime import load_tokenizer
    return load_tokenizer(offline_profile)
