"""The admin view in a real headless browser (Debian's chromium + chromedriver, selenium), against a node
that received a study over DICOM and processed it.

The study (a localizer only) is not analysed; its SR and PDF go to a destination that refuses connections
with ``delivery.max_attempts = 1``, so they end as dead letters that the admin replays from the browser.
With ``DICOM_NODE_SCREENSHOTS=1`` the runs page is saved to ``docs/img/admin-runs.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.models import Delivery
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.conftest import make_settings
from tests.support.node import finished_run, send

TOKEN = "browser-admin-token-0123456789"
PATIENT = StudyHeader(
    patient_name="Browser^Testpatient", patient_id="BROWSER-PID-77", patient_birth_date="19400101",
    patient_sex="F", study_instance_uid="1.2.826.0.1.3680043.10.1389.77.7", study_date="20261102",
    study_time="100000", accession_number="BROWSER-ACC-7",
)
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "admin-runs.png"


@pytest.fixture(scope="module")
def localizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    volume, affine = load_reference_brain("colin27")
    write_mr_series(volume[::4, ::4, ::4], affine, root / "loc", study=PATIENT, series_number=1, kind="localizer")
    return root


@pytest.fixture
def node(tmp_path: Path, demo_model: Path, localizer: Path) -> Iterator[Node]:
    refusing = free_port()  # nothing listens there: every delivery attempt fails
    settings = make_settings(tmp_path, **{
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": refusing}],
        "model.path": str(demo_model), "processing.isolation": "thread", "delivery.max_attempts": 1,
        "http.admin_token": TOKEN, "http.metrics_cache_s": 0, "storage.free_space_reserve_mb": 1,
    })
    running = Node(settings)
    running.start()
    send(running, localizer)
    finished_run(running)

    def dead() -> list[int]:
        with running.db.sessions() as session:
            return list(session.scalars(select(Delivery.id).where(Delivery.state == "dead")).all())
    wait_for(lambda: len(dead()) == 2, 60, "both deliveries to be dead letters")
    yield running
    running.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromedriver are not installed: run `make setup` (Debian chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,700"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def _wait_for(b: Any, element_id: str) -> Any:
    """The element once the page that holds it has loaded (clicks return before navigation ends)."""
    return WebDriverWait(b, 60).until(expected_conditions.presence_of_element_located((By.ID, element_id)))


def test_admin_view_in_a_browser(node: Node, browser: Any) -> None:
    assert node.http is not None
    base = node.http.url
    b = browser
    b.get(base + "/runs")
    rows = b.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert len(rows) == 1
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[2:4] == ["not_analysed", "no_suitable_series"] and cells[5] == "BROWSER-ACC-7"
    assert PATIENT.patient_id not in b.page_source

    # filters: a state with no run, then the accession
    b.get(base + "/runs?state=succeeded")
    assert b.find_element(By.CSS_SELECTOR, "#runs tbody").text == "no run matches"

    # the run's page, reached by clicking its short id
    b.get(base + "/runs?accession=BROWSER-ACC-7")
    b.find_element(By.CSS_SELECTOR, "#runs tbody a").click()  # a navigation: wait for the run's page
    selection = _wait_for(b, "selection").text
    assert "localizer" in selection and "refused" in selection
    assert "dead" in b.find_element(By.ID, "deliveries").text
    timeline = b.find_element(By.ID, "timeline").text
    assert "created" in timeline and "finished" in timeline

    b.get(base + "/associations")
    assert "SCANNER" in b.find_element(By.ID, "associations").text

    # dead letters: no retry button before login; log in with the token; retry one
    b.get(base + "/dead-letters")
    assert not b.find_elements(By.CSS_SELECTOR, "#dead-letters button")
    b.get(base + "/login")
    b.find_element(By.ID, "token").send_keys(TOKEN)
    b.find_element(By.ID, "login").click()  # a POST, then the redirected runs page
    WebDriverWait(b, 60).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "runs"), PATIENT.patient_id))
    if os.environ.get("DICOM_NODE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        b.get(base + "/runs")
        assert b.save_screenshot(str(SCREENSHOT))
    b.get(base + "/dead-letters")
    buttons = b.find_elements(By.CSS_SELECTOR, "#dead-letters button")
    assert len(buttons) == 2
    delivery_id = int(buttons[0].get_attribute("id").removeprefix("retry-"))
    buttons[0].click()  # a POST, then the redirected page: wait for it, not for the click to return
    flash = _wait_for(b, "flash")
    assert f"Delivery {delivery_id} queued" in flash.text
    with node.db.sessions() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None and row.state in ("pending", "dead")  # replayed (and maybe tried again)
        assert any(entry.get("event") == "replayed" for entry in row.history or [])

    b.get(base + "/config")
    config = b.find_element(By.ID, "config").text
    assert "http.admin_token *** (set)" in config and TOKEN not in config
