import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (long trainings, torch.compile)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow (long training or torch.compile): run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def outputs_root(tmp_path, monkeypatch):
    """Every test writes its runs under its own tmp folder, never into the repo's outputs/."""
    monkeypatch.setenv("IHSTUDY_OUTPUTS", str(tmp_path))
    return tmp_path
