import logging

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


def all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]


@pytest.fixture(scope="session")
def logging_at_start():
    return {id(x): (x.handlers[:], x.level, x.propagate, x.disabled) for x in all_loggers()}


@pytest.fixture(autouse=True)
def own_log_handlers(logging_at_start):
    """Hydra's in-process jobs (also in module fixtures) configure loggers with handlers on the
    stderr of a CLI runner; a later test's log call would then write to that closed stream
    ("Logging error"). Every test ends with the session's first loggers as they began (loggers
    created later, e.g. torch's, keep their own settings)."""
    yield
    for x in all_loggers():
        if id(x) in logging_at_start:
            x.handlers[:], x.level, x.propagate, x.disabled = logging_at_start[id(x)]
