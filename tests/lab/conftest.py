import pytest


@pytest.fixture(autouse=True)
def _lab_single_thread(single_thread):
    yield
