"""A real browser on the real Airflow UI of the local stack (``make up``).

Every UI test gets a logged-in :class:`~tests.ui.airflow_ui.AirflowUI`. When a test fails, a
whole-page screenshot and the page's HTML are written to ``test-output/ui/<test>.png|.html``
(next to the test output; ``make test`` prints the folder), so a red run shows what the user saw.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.airflow_api import AirflowAPI
from tests.ui.airflow_ui import AirflowUI, start_chromium

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "ui"


@pytest.fixture(scope="session")
def api(stack_env) -> AirflowAPI:
    return AirflowAPI(stack_env["AIRFLOW_URL"], stack_env["AIRFLOW_USER"], stack_env["AIRFLOW_PASSWORD"])


@pytest.fixture(scope="session")
def _driver():
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def ui(_driver, stack_env, request) -> AirflowUI:
    """A logged-in UI; a failing test leaves its screenshot and HTML in ``test-output/ui``."""
    page = AirflowUI(_driver, stack_env["AIRFLOW_URL"])
    page.login(stack_env["AIRFLOW_USER"], stack_env["AIRFLOW_PASSWORD"])
    yield page
    report = getattr(request.node, "_ui_report", None)
    if report is not None and report.failed:
        save_page(page, request.node.name)


def save_page(page: AirflowUI, name: str, suffix: str = "") -> Path:
    """Screenshot + HTML of the current page as ``test-output/ui/<name><suffix>.png``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + suffix
    shot = OUTPUT / f"{stem}.png"
    page.screenshot(shot)
    (OUTPUT / f"{stem}.html").write_text(page.driver.page_source)
    return shot


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item._ui_report = report
    return report
