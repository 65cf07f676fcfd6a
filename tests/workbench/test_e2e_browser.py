"""End to end in a real headless browser: `medvqa demo` sets up demo accounts and studies and starts the app;
Debian's chromium, driven by Selenium through Debian's chromedriver (no browser download), signs in as the demo
clinician, opens a demo study, asks, rates, and saves a screenshot to test-artifacts/ (or MEDVQA_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from medvqa.cli import DEMO_PASSWORD
from medvqa.db import Answer, AuditEvent, Feedback, Question, Study
from tests.test_demo import fake_vqa_rad

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("MEDVQA_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
MEDVQA = shutil.which("medvqa", path=str(Path(sys.executable).parent)) or "medvqa"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
        ".ci/run installs them: apt-get install chromium chromium-driver",
    ),
]


REAL_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa-rad" / "images"


def demo_data(root: Path) -> Path:
    """Three demo images: the fake VQA-RAD's rows, with real radiographs in place of its flat shades when the
    dataset is beside the checkout (so the screenshot shows what a clinician sees)."""
    folder = fake_vqa_rad(root)
    real = sorted(REAL_IMAGES.glob("*.jpg"))[:3] if REAL_IMAGES.is_dir() else []
    for source, name in zip(real, ("synpic1", "synpic2", "synpic3"), strict=False):
        shutil.copyfile(source, folder / "images" / f"{name}.jpg")
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_healthy(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the workbench exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the workbench did not come up")


@pytest.fixture
def server(app_env, tmp_path):
    """`medvqa demo` on three demo images, serving on a free port given through Streamlit's own variable."""
    port = free_port()
    env = {**app_env, "STREAMLIT_SERVER_PORT": str(port), "STREAMLIT_SERVER_ADDRESS": "127.0.0.1"}
    env |= {"MEDVQA_DEMO_DATA": str(demo_data(tmp_path / "vqa-rad"))}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a busy 2-core machine: keep torch on one thread
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([MEDVQA, "demo", "--no-browser"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def click(wait, xpath):
    """Click the element at `xpath` once it is there and clickable; Streamlit redraws elements on each rerun,
    so a click that meets a replaced (stale) element waits and tries again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    def clicked(driver):
        try:
            ec.element_to_be_clickable((By.XPATH, xpath))(driver).click()
            return True
        except (StaleElementReferenceException, AttributeError):
            return False

    wait.until(clicked)


def type_into(wait, css, *keys):
    """Type into the input at `css` once it is there; a rerun that replaces the input meanwhile (a stale element)
    makes it find the new one and type again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    def typed(driver):
        try:
            ec.presence_of_element_located((By.CSS_SELECTOR, css))(driver).send_keys(*keys)
            return True
        except StaleElementReferenceException:
            return False

    wait.until(typed)


def settle(wait):
    """Wait until the app has finished its rerun (Streamlit shows its status widget while a script runs)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    time.sleep(0.3)  # the status widget appears a moment after the rerun starts
    wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "[data-testid='stStatusWidget']")))


def button(label):
    return f"//button[normalize-space(.)='{label}']"


def choose(driver, wait, label, option):
    """Pick `option` in the Streamlit selectbox labelled `label` (a combobox with a list of options)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"input[role='combobox'][aria-label='{label}']"))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, f"//*[@role='option'][normalize-space(.)='{option}']"))).click()


def confirm_held_as_demo_reviewer(db) -> list[int]:
    """The real VQA-RAD pictures carry MedPix marks, uploader names and dates: OCR holds them at import. The demo
    reviewer confirms them first (as a reviewer would, on the Review page), so the clinician may ask."""
    from medvqa.db import Instance, User
    from medvqa.services.audit import Actor
    from medvqa.services.images import confirm_no_burned_in_text

    with db.read_session() as session:
        reviewer = session.scalars(select(User).where(User.username == "reviewer.demo")).one()
        held = session.scalars(
            select(Instance.id).where(
                Instance.held_for_burned_in_text.is_(True), Instance.burned_in_confirmed_by.is_(None)
            )
        ).all()
    return confirm_no_burned_in_text(db, Actor("reviewer.demo", "reviewer", reviewer.id), list(held)) if held else []


def test_demo_sign_in_ask_and_rate_in_a_real_browser(db, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    confirm_held_as_demo_reviewer(db)
    wait = WebDriverWait(browser, 120)
    browser.get(server)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Username']")))
    browser.find_element(By.CSS_SELECTOR, "input[aria-label='Username']").send_keys("dr.demo")
    browser.find_element(By.CSS_SELECTOR, "input[aria-label='Password']").send_keys(DEMO_PASSWORD)
    click(wait, button("Sign in"))
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), '4 of 4 studies')]")))
    choose(browser, wait, "Modality", "MR")  # the demo study of synpic1, an MRI by its training questions
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), '1 of 4 studies')]")))
    settle(wait)
    type_into(wait, "input[aria-label='Question']", "Is there a fracture?", Keys.TAB)
    settle(wait)  # the rerun that commits the question
    click(wait, button("Ask"))
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'the exact image the model saw')]")))
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Not validated for clinical use')]")))
    settle(wait)
    click(wait, button("Submit rating"))  # nothing chosen: nothing is recorded, and the page says so
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'nothing was recorded')]")))
    settle(wait)
    click(wait, "//label[normalize-space(.)='Partly correct']")
    click(wait, button("Submit rating"))
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Your rating is recorded')]")))
    settle(wait)
    click(wait, "//label[normalize-space(.)='Where the model looked']")  # the heatmap, after its sanity checks
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'where the model looked (brighter')]")))
    settle(wait)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "workbench-ask-and-rate.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    with db.read_session() as session:
        answers = session.scalars(select(Answer)).all()
        asked_about = select(Question.study_id).where(Question.id == answers[0].question_id).scalar_subquery()
        study = session.scalars(select(Study).where(Study.id == asked_about)).one()
        feedback = session.scalars(select(Feedback)).all()
    assert study.modality == "MR"
    assert len(answers) == 1 and [(f.answer_id, f.verdict.value) for f in feedback] == [(answers[0].id, "partial")]
    # A refresh keeps the clinician signed in, on the same study and its thread: the session rides in an
    # HttpOnly, SameSite=Strict cookie that the page's scripts cannot read.
    cookie = browser.get_cookie("medvqa_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert "medvqa_session" not in browser.execute_script("return document.cookie")
    linked = f"study={study.id}"
    assert linked in browser.current_url and "/ask" in browser.current_url
    browser.refresh()
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Signed in as dr.demo')]")))
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Is there a fracture?')]")))
    assert linked in browser.current_url
    # A link to a page the clinician may not open shows the refusal (audited), not a 404.
    browser.get(f"{server}/audit")
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Refused')]")))
    settle(wait)
    click(wait, button("Sign out"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Username']")))
    wait.until(lambda driver: driver.get_cookie("medvqa_session") is None)
    browser.get(f"{server}/ask?{linked}")  # signed out, the link asks for a sign-in first
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Username']")))
    with db.read_session() as session:
        trail = session.scalars(select(AuditEvent).where(AuditEvent.actor_name == "dr.demo")).all()
    kinds = [(event.action, event.outcome) for event in trail]
    assert ("auth:session:resume", "success") in kinds and ("audit:event:read", "denied") in kinds
    assert kinds[-1] == ("auth:session:logout", "success")
