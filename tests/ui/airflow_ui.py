"""The Airflow 3 UI as a person uses it, driven by Selenium over Debian's headless Chromium.

No browser download: the system ``chromium`` and ``chromedriver`` (``make deps`` installs them)
are named explicitly, so Selenium Manager never goes to the network. Selectors are the ones a
user's eyes follow: button texts, field names (``element_<param>``) and the form's own error
markers (``aria-invalid``, the red sections), not CSS classes that change with every UI build.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def start_chromium(width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium session on the system binaries."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException) as exc:  # the page re-rendered
            last = exc
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last})" if last else ""))


class AirflowUI:
    """Pages of the Airflow UI that the tests use.

    :param driver: a Selenium driver.
    :param base_url: e.g. ``http://127.0.0.1:8080``.
    """

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url.rstrip("/")

    # --- basics -------------------------------------------------------------------------------

    def open(self, path: str) -> None:
        self.driver.get(f"{self.base_url}/{path.lstrip('/')}")

    def login(self, user: str, password: str) -> None:
        """The simple auth manager's login page (nothing to do when the session is still valid)."""
        self.open("/")
        wait_for(lambda: self.driver.find_elements(By.NAME, "username") or self.buttons("Browse"), 30,
                 "the login form or the home page")
        if not self.driver.find_elements(By.NAME, "username"):
            return
        self.driver.find_element(By.NAME, "username").send_keys(user)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: "/auth/login" not in self.driver.current_url, 30, "the login to finish")

    def buttons(self, text: str, scope: WebElement | None = None) -> list[WebElement]:
        root = scope or self.driver
        return [b for b in root.find_elements(By.TAG_NAME, "button") if b.text.strip() == text and b.is_displayed()]

    def button(self, text: str, scope: WebElement | None = None, timeout: float = 30) -> WebElement:
        return wait_for(lambda: (self.buttons(text, scope) or [None])[0], timeout, f"a {text!r} button")

    def click(self, element: WebElement) -> None:
        # A JS click: the form's sticky footer or a toast may overlap the element.
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()", element)

    def page_text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def screenshot(self, path: Path) -> None:
        """Whole-page screenshot (CDP), so a tall form is captured, not just the viewport."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True})
            path.write_bytes(base64.b64decode(shot["data"]))
        except WebDriverException:
            self.driver.save_screenshot(str(path))

    # --- the Trigger form ---------------------------------------------------------------------

    def open_trigger_form(self, dag_id: str) -> WebElement:
        """Open the DAG's page and its Trigger dialog (Params sections stay closed; see :meth:`reveal`)."""
        self.open(f"/dags/{dag_id}")
        self.click(self.button("Trigger"))
        return wait_for(self.dialog, 30, "the Trigger dialog")

    def dialog(self) -> WebElement | None:
        """The open Trigger dialog (other ``role=dialog`` elements are dropdowns and tooltips)."""
        found = [d for d in self.driver.find_elements(By.CSS_SELECTOR, "[role=dialog]")
                 if d.find_elements(By.CSS_SELECTOR, "input[type=radio][value=single]")]
        return found[0] if found else None

    def sections(self) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, "[data-scope=accordion][data-part=item-trigger]")

    def _expand(self, name: str) -> bool:
        trigger = next(t for t in self.sections() if t.text.strip() == name)
        if trigger.get_attribute("aria-expanded") == "true":
            return True
        # A real click (zag.js accordions open on pointer events, not on a JS click()); it is
        # retried while the previous section's opening animation still moves this one.
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", trigger)
        trigger.click()
        return False

    def choose_mode(self, mode: str) -> None:
        """``single`` or ``backfill`` (the radio cards at the top of the dialog)."""
        radio = self.driver.find_element(By.CSS_SELECTOR, f"input[type=radio][value={mode}]")
        if radio.get_attribute("disabled") is not None:
            raise AssertionError(f"the {mode} mode of the Trigger form is disabled")
        label = self.driver.find_element(By.CSS_SELECTOR, f"label[for='{radio.get_attribute('id')}']")
        self.click(label)
        wait_for(lambda: radio.get_attribute("checked") is not None or radio.is_selected(), 10, f"the {mode} mode")

    def set_backfill_range(self, start: str, end: str) -> None:
        """Fill the Backfill mode's From / To pickers (``YYYY/MM/DD``, midnight)."""
        def picker(i: int) -> WebElement:
            return self.driver.find_elements(By.CSS_SELECTOR, "[data-testid=datetime-input]")[i]

        def fill(i: int, day: str) -> None:
            self.click(picker(i))
            popover = wait_for(lambda: next((p for p in self.driver.find_elements(
                By.CSS_SELECTOR, "[data-scope=popover][data-part=content]") if p.is_displayed()), None),
                10, "the date picker")
            for placeholder, value in (("YYYY/MM/DD", day), ("HH:mm", "00:00")):
                field = popover.find_element(By.CSS_SELECTOR, f"input[placeholder='{placeholder}']")
                field.send_keys(Keys.CONTROL, "a")
                field.send_keys(value)
            popover.find_element(By.CSS_SELECTOR, "input[placeholder='HH:mm']").send_keys(Keys.ENTER)

        for i, day in enumerate((start, end)):
            for attempt in range(3):
                try:
                    fill(i, day)
                    break
                except StaleElementReferenceException:  # the popover re-rendered as it opened (CI)
                    if attempt == 2:
                        raise
                    self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
                    time.sleep(0.5)
            self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            # the picker then shows the date in the UI's own format ("Jan 02, 2026 00:00")
            wait_for(lambda n=i: "Select date" not in picker(n).text, 10, f"the picker to show {day}")

    def sections_in_error(self) -> list[str]:
        """Params sections the form marks in error: their title gets an error icon (an svg next
        to the title text; the open/close chevron lives apart, in the item indicator)."""
        return [t.text.strip() for t in self.sections()
                if t.find_elements(By.CSS_SELECTOR, "div:not([data-part=item-indicator]) > svg")]

    def invalid_fields(self) -> list[str]:
        """Names (or ids) of inputs the form marks ``aria-invalid``."""
        fields = self.dialog().find_elements(By.CSS_SELECTOR, "[aria-invalid=true]")
        return [f.get_attribute("name") or f.get_attribute("id") for f in fields if f.is_displayed()]

    def submit_button(self, label: str = "Trigger") -> WebElement:
        """The dialog's submit button (the last button with this text: the page has one too)."""
        return wait_for(lambda: (self.buttons(label, self.dialog()) or [None])[-1], 30,
                        f"the dialog's {label!r} button")

    def reveal(self, param: str) -> None:
        """Open the Params section holding ``param`` (the accordion shows one section at a time)."""
        element = wait_for(lambda: self.driver.find_element(By.CSS_SELECTOR, f"[name=element_{param}], #element_{param}"),
                           30, f"the {param} field")
        content = element.find_element(By.XPATH, "./ancestor::*[@data-scope='accordion' and @data-part='item-content'][1]")
        section = content.get_attribute("id").rsplit(":", 1)[-1]
        wait_for(lambda: self._expand(section), 15, f"section {section} to open")

    def json_editor_text(self, param: str) -> str:
        """The text an object/array Param's JSON editor shows."""
        return wait_for(lambda: self.driver.find_element(By.ID, f"element_{param}").text, 30, f"the {param} editor")

    def field(self, param: str) -> WebElement:
        return wait_for(lambda: self.driver.find_element(By.NAME, f"element_{param}"), 30, f"the {param} field")

    def type_into(self, param: str, value: str) -> None:
        element = self.field(param)
        self.click(element)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        if value:
            element.send_keys(value)
        element.send_keys(Keys.TAB)
        time.sleep(0.3)

    def field_error(self, param: str) -> str:
        """The inline message the form shows under a field."""
        element = self.field(param)
        container = element.find_element(By.XPATH, "./ancestor::*[@data-scope='field' and @data-part='root'][1]")
        texts = [e.text for e in container.find_elements(By.CSS_SELECTOR, "[data-part=error-text]")]
        return " ".join(t for t in texts if t.strip())

    # --- after a trigger ----------------------------------------------------------------------

    def run_id_from_url(self) -> str | None:
        match = re.search(r"/runs/([^/?#]+)", self.driver.current_url)
        return match.group(1) if match else None

    def open_task_log(self, dag_id: str, run_id: str, task_id: str) -> None:
        self.open(f"/dags/{dag_id}/runs/{run_id}/tasks/{task_id}")

    def log_text(self) -> str:
        """The text of the task log panel (the window is tall so the virtual list renders it all)."""
        return "\n".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, "[data-testid=virtualized-list], pre, code"))

    def extra_link(self, name: str, timeout: float = 60) -> str:
        """The URL of the task page's extra-link button called ``name``."""
        def find() -> str | None:
            for a in self.driver.find_elements(By.TAG_NAME, "a"):
                if a.text.strip() == name and a.get_attribute("href"):
                    return a.get_attribute("href")
            return None
        return wait_for(find, timeout, f"the {name!r} extra link")

    @contextmanager
    def basic_auth(self, user: str, password: str) -> Iterator[None]:
        """Send HTTP basic credentials with every request (MLflow's auth), then stop sending them."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        try:
            yield
        finally:
            self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
