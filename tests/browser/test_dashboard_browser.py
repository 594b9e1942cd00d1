"""The dashboard in a real browser: headless Chromium through Selenium.

Skipped when Chromium or its driver is not installed, unless CRUCIBLE_REQUIRE_BROWSER=1,
which turns the skip into a failure (CI images that ship Chromium set it). Screenshots
land in var/screenshots/ for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the driver fixture (skip, or fail when required)
    webdriver = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "var" / "screenshots"
PASSWORD = "a-Strong-pass-123"
WAIT_S = 10

CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,900",
]


def _find(env_var: str, *candidates: str) -> str | None:
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in candidates:
        found = shutil.which(name) or (name if Path(name).exists() else None)
        if found:
            return found
    return None


def _unavailable(reason: str):
    if os.environ.get("CRUCIBLE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CRUCIBLE_REQUIRE_BROWSER=1 but the browser tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module, with a fresh profile."""
    if webdriver is None:
        _unavailable("selenium is not installed (pip install selenium)")
    chromium = _find("CHROMIUM_BIN", "/usr/bin/chromium", "chromium", "chromium-browser")
    chromedriver = _find("CHROMEDRIVER_BIN", "/usr/bin/chromedriver", "chromedriver")
    if not chromium or not chromedriver:
        _unavailable(
            "Chromium and chromedriver are needed for browser tests "
            f"(found chromium={chromium}, chromedriver={chromedriver}); "
            "install them with `apt-get install chromium chromium-driver`"
        )

    profile = tempfile.mkdtemp(prefix="crucible-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in [*CHROME_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    except Exception as exc:  # the binary exists but cannot start here
        shutil.rmtree(profile, ignore_errors=True)
        _unavailable(f"Chromium did not start: {type(exc).__name__}: {exc}")
    browser.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(driver, live_server):
    """The shared browser, signed out and at desktop size."""
    driver.set_window_size(1440, 900)
    driver.get(f"{live_server.url}/login/")
    driver.delete_all_cookies()
    return driver


@pytest.fixture
def ada(db):
    from config.roles import Role
    from config.services import user_create

    return user_create(
        username="ada",
        role=Role.ENGINEER,
        actor=None,
        password=PASSWORD,
        first_name="Ada",
        last_name="Lovelace",
    )


def _wait(browser) -> WebDriverWait:
    return WebDriverWait(browser, WAIT_S)


def _sign_in(browser, live_server, username: str, password: str) -> None:
    browser.get(f"{live_server.url}/login/")
    form = browser.find_element(By.CSS_SELECTOR, "form[method=post]")
    form.find_element(By.NAME, "username").send_keys(username)
    form.find_element(By.NAME, "password").send_keys(password)
    browser.execute_script("window.__crucibleLoginPage = true")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # Wait for the sign-in to land: a `get` issued while the POST is in flight aborts it, and
    # the next page then redirects to the login form (seen in CI as a timeout on a later wait).
    # The new document has no marker. Not staleness_of(form): Chromium 156 sometimes answers a
    # query on the old element with "Node with given id does not belong to the document", an
    # unknown error that staleness_of does not take for staleness (seen in CI).
    _wait(browser).until(_next_document_loaded)


def _next_document_loaded(browser) -> bool:
    try:
        return browser.execute_script(
            "return !window.__crucibleLoginPage && document.readyState === 'complete'"
        )
    except WebDriverException:  # the script ran while the page was being replaced
        return False


def _shoot(browser, name: str) -> Path:
    path = SCREENSHOTS / name
    assert browser.save_screenshot(str(path)), f"could not write {path}"
    return path


def _console_errors(browser) -> list[str]:
    """Severe console entries since the last call (failed static files, script errors)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _stylesheet_applied(browser) -> bool:
    """True when crucible.css was fetched and applied (its tokens are defined)."""
    return bool(
        browser.execute_script(
            "return getComputedStyle(document.documentElement)"
            ".getPropertyValue('--accent').trim() !== ''"
        )
    )


# The off-canvas sidebar has finished sliding in.
_SIDEBAR_SETTLED = "return document.getElementById('sidebar').getBoundingClientRect().left === 0"


def test_sign_in_lands_on_overview(browser, live_server, ada):
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Overview"))

    assert browser.title.startswith("Overview")
    assert _stylesheet_applied(browser), "crucible.css did not load under live_server"
    sections = [h.text for h in browser.find_elements(By.CSS_SELECTOR, ".content h2")]
    for heading in ("System status", "Active jobs", "Recent results"):
        assert heading in sections, sections

    sidebar = browser.find_element(By.ID, "sidebar")
    assert "Ada Lovelace" in sidebar.text
    assert sidebar.find_element(By.CSS_SELECTOR, ".role").text == "Engineer"
    active = sidebar.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Overview"

    status = browser.find_element(By.ID, "system-status")
    cards = status.find_elements(By.CSS_SELECTOR, ".status-card")
    assert len(cards) == 5, status.text
    assert "Database" in status.text
    database = next(c for c in cards if "Database" in c.text)
    assert "Operational" in database.text
    assert database.find_elements(By.CSS_SELECTOR, ".dot-ok")
    assert "Background worker" in status.text
    assert browser.execute_script("return typeof htmx") == "object", "htmx did not load"
    assert _console_errors(browser) == []

    # The status block refreshes itself through htmx: force one refresh now.
    browser.execute_script(
        "document.getElementById('system-status').dataset.stale = '1';"
        "htmx.ajax('GET', '/?part=status', {target: '#system-status', swap: 'outerHTML'});"
    )
    _wait(browser).until(
        lambda b: b.execute_script(
            "const el = document.getElementById('system-status');"
            "return el && !el.dataset.stale && el.textContent.includes('Operational');"
        )
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#system-status .status-card")) == 5
    assert len(browser.find_elements(By.TAG_NAME, "h1")) == 1, "the partial came back whole"

    toggle = browser.find_element(By.CSS_SELECTOR, ".menu-toggle")
    assert not toggle.is_displayed(), "the nav toggle is for narrow screens only"
    assert sidebar.is_displayed()
    _shoot(browser, "overview-desktop.png")

    browser.set_window_size(820, 1100)
    _wait(browser).until(ec.visibility_of(toggle))
    _wait(browser).until(ec.invisibility_of_element_located((By.ID, "sidebar")))
    _shoot(browser, "overview-tablet.png")

    toggle.click()
    assert "nav-open" in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
    assert toggle.get_attribute("aria-expanded") == "true"
    _wait(browser).until(ec.visibility_of_element_located((By.ID, "sidebar")))
    _wait(browser).until(lambda b: b.execute_script(_SIDEBAR_SETTLED))
    _shoot(browser, "overview-tablet-nav-open.png")


def test_wrong_password_shows_error(browser, live_server, ada):
    _sign_in(browser, live_server, "ada", "not-the-password")
    error = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".alert-error"))
    )
    assert "Please enter a correct username and password" in error.text
    assert browser.current_url.startswith(f"{live_server.url}/login/")
    assert browser.find_element(By.NAME, "username").get_attribute("value") == "ada"
    assert browser.find_element(By.NAME, "password").get_attribute("aria-invalid") == "true"
    assert not browser.find_elements(By.ID, "sidebar")
    assert _stylesheet_applied(browser)
    _shoot(browser, "login-error.png")


def test_anonymous_visit_redirects_to_login(browser, live_server):
    browser.get(f"{live_server.url}/")
    _wait(browser).until(ec.url_contains("/login/"))
    assert browser.current_url == f"{live_server.url}/login/?next=/"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    assert browser.find_element(By.NAME, "next").get_attribute("value") == "/"
    _shoot(browser, "login.png")
