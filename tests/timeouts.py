"""Per-test time limits (pytest-timeout), so that a test that hangs fails in minutes, not ten.

Every test gets ``timeout`` from ``pyproject.toml`` ([tool.pytest.ini_options], 120 s: setup, call and
teardown together, a first test's session servers included). The few tests that are long by design get
more here, in one table, each bound generous over what its own steps allow; fault tests (marked ``slow``:
they restart servers, freeze and kill processes) get ``SLOW_SECONDS``. A ``@pytest.mark.timeout(N)`` on a
test itself wins over both.
"""

from __future__ import annotations

import pytest

SLOW_SECONDS = 600

# test node id (file::name, parameters left out) -> seconds; the reason is the test's own longest bound
LONG_SECONDS: dict[str, int] = {
    # make demo, farm generate and farm usage in fresh shells: 300 s + 400 s bounds on their blocks
    "tests/test_readme.py::test_quick_start_demo_then_using_it_and_usage": 600,
    "tests/test_readme.py::test_client_blocks_against_a_live_api": 480,  # 400 s bound on the README's script
    "tests/test_readme.py::test_bulk_worked_example_then_the_training_script_reads_it": 540,  # 300 + 180 s
    "tests/test_readme.py::test_celery_bulk_task_block": 420,  # 300 s
    "tests/test_readme.py::test_try_it_on_one_machine": 420,  # 300 s
    "tests/test_readme.py::test_two_workers_on_one_host_from_the_readme_pool_example": 420,  # 300 s
    "tests/test_bulk.py::test_killed_bulk_job_resumes_into_exactly_the_expected_shards": 600,  # a rerun: 600 s
    "tests/test_bulk.py::test_bulk_task_from_plain_celery_with_a_bulk_worker": 420,  # 300 s result
    "tests/test_bulk.py::test_bulk_job_over_http_for_its_owner_only": 300,  # 180 s
    "tests/test_bulk_images.py::test_a_manifest_with_an_image_column_renders_image_to_image_and_inpainting": 240,
    "tests/test_bulk_images.py::test_an_image_url_row_goes_through_the_fetch_stage": 240,  # 180 s
    "tests/test_bulk_images.py::test_over_http_an_image_column_reads_only_the_owners_folder": 300,  # 180 s
    "tests/test_unserved.py::test_a_job_whose_last_worker_leaves_mid_job_is_told_and_farm_generate_says_so": 420,
    "tests/test_worker_process.py::test_missing_weights_say_where_and_how_to_download_and_the_pool_tries_once": 360,
    "tests/test_playground.py::test_switching_from_a_model_without_workers_draws_at_once": 360,  # 250 s
    "tests/test_js_clients.py": 300,  # each Node script: 240 s (npm ci on a first run)
    "tests/test_bad_lora.py": 300,  # farm generate twice, 180 s each at most
}


def _limit(item: pytest.Item) -> int | None:
    node = item.nodeid.split("[", 1)[0]
    for key in (node, node.split("::", 1)[0]):
        if key in LONG_SECONDS:
            return LONG_SECONDS[key]
    if item.get_closest_marker("slow") is not None:
        return SLOW_SECONDS
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        seconds = _limit(item)
        if seconds is not None:
            item.add_marker(pytest.mark.timeout(seconds))
