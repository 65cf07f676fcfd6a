"""What a clinician waits for: from clicking Ask to the first words and to the whole answer on screen, in a
real headless Chromium against `medvqa demo`'s model, as a ratio to the model's own answer latency for the
same question (recorded with each answer), which is the baseline measured in the same run.

    .venv/bin/python bench/ask_latency_browser_bench.py [--questions 30] [--images 4] [--port 0]

Sets up a fresh MEDVQA_HOME (deleted afterwards) with `medvqa demo` on a few VQA-RAD training images (held
images confirmed by a reviewer through the services, as on the Review page), signs in as the demo clinician,
and asks training questions one after another on the open study. In the page, a MutationObserver stamps the
moment the streamed answer replaces "Asking the model..." (first words) and the moment the app's script state
last turns idle after that (the whole answer, after the page's rerun that shows it; a stamp counts once it has
held for a second); Selenium only reads those stamps, so polling adds nothing. Prints one markdown table:
p50 and p90 of the model's latency, click->first words, click->whole answer, and the per-question ratios to
the model's latency (goal: whole answer within 1.5x).

Needs Debian's chromium and chromium-driver and the VQA-RAD folder (../shared/data/vqa-rad). Never a test:
timings on a shared 2-core machine swing, which is why the figure is a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "vqa-rad"
MEDVQA = shutil.which("medvqa", path=str(Path(sys.executable).parent)) or "medvqa"
PASSWORD = "medvqa-demo-password"

# Stamps, in performance.now() milliseconds, of what the clinician sees after the click.
OBSERVER = """
window.__medvqa = {click: performance.now(), asking: null, first: null, done: null};
const seen = () => {
  const s = window.__medvqa, now = performance.now();
  const text = document.body.innerText;
  if (s.asking === null && text.includes('Asking the model...')) s.asking = now;
  if (s.asking !== null && s.first === null && !text.includes('Asking the model...')) s.first = now;
  const app = document.querySelector('[data-testid="stApp"]');
  const idle = app && app.getAttribute('data-test-script-state') === 'notRunning';
  if (s.first !== null && idle && s.done === null) s.done = now;
  if (!idle) s.done = null;  // a rerun started (the answer's page): the whole answer is not there yet
};
if (window.__medvqaObserver) window.__medvqaObserver.disconnect();
window.__medvqaObserver = new MutationObserver(seen);
window.__medvqaObserver.observe(document.body, {childList: true, subtree: true, characterData: true,
                                                attributes: true, attributeFilter: ['data-test-script-state']});
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def demo_data(folder: Path, images: int, questions: int) -> list[str]:
    """A VQA-RAD-shaped folder with the first `images` training images and their training questions; returns
    `questions` training questions (from the whole training set) to ask."""
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
    chosen = sorted({row["image"] for row in rows})[:images]
    (folder / "images").mkdir(parents=True)
    for image in chosen:
        shutil.copyfile(DATA / image, folder / image)
    kept = [row for row in rows if row["image"] in chosen]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    return [row["question"] for row in rows[:questions]]


def confirm_held(home: Path) -> None:
    """The demo reviewer confirms the held images (MedPix marks, arrows), as on the Review page."""
    from medvqa.config import load_settings
    from medvqa.services.database import open_database
    from medvqa.services.images import confirm_no_burned_in_text
    from medvqa.services.review import held_instances
    from medvqa.services.users import LOCAL_SOURCE, ThrottleSettings, authenticate

    settings = load_settings(home=home)
    db = open_database(settings)
    reviewer = authenticate(db, "reviewer.demo", PASSWORD, LOCAL_SOURCE, ThrottleSettings.from_settings(settings))
    waiting = [item["instance_id"] for item in held_instances(db, reviewer)]
    if waiting:
        confirm_no_burned_in_text(db, reviewer, waiting)


def model_latencies(home: Path) -> list[float]:
    """The model's own latency of every recorded answer, oldest first (preprocessing + generation)."""
    from sqlalchemy import select

    from medvqa.config import load_settings
    from medvqa.db import Answer
    from medvqa.services.database import open_database

    with open_database(load_settings(home=home)).read_session() as session:
        return [float(ms) for ms in session.scalars(select(Answer.latency_ms).order_by(Answer.id))]


def wait_healthy(url: str, server: subprocess.Popen[bytes], seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"medvqa demo exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("the workbench did not come up")


def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def settle(driver, wait) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    time.sleep(0.3)
    wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "[data-testid='stStatusWidget']")))


def ask_all(url: str, questions: list[str]) -> list[dict[str, float]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    wait = WebDriverWait(driver, 120)
    stamps = []
    try:
        driver.get(url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Username']")))
        driver.find_element(By.CSS_SELECTOR, "input[aria-label='Username']").send_keys("dr.demo")
        driver.find_element(By.CSS_SELECTOR, "input[aria-label='Password']").send_keys(PASSWORD)
        driver.find_element(By.XPATH, "//button[normalize-space(.)='Sign in']").click()
        for number, question in enumerate(questions, 1):
            field = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[aria-label='Question']")))
            settle(driver, wait)
            field = driver.find_element(By.CSS_SELECTOR, "input[aria-label='Question']")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(question, Keys.TAB)
            settle(driver, wait)
            ask = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space(.)='Ask']")))
            driver.execute_script(OBSERVER)
            ask.click()
            seen = wait.until(lambda d: settled(d))
            stamps.append({"first": seen["first"] - seen["click"], "done": seen["done"] - seen["click"]})
            print(
                f"  {number:>2}/{len(questions)}  first {stamps[-1]['first']:.0f} ms  whole {stamps[-1]['done']:.0f} ms"
            )
    except Exception:
        shot = Path(tempfile.gettempdir()) / "ask-latency-bench-failure.png"
        driver.save_screenshot(str(shot))
        print(f"stopped; the page as it was: {shot}", flush=True)
        raise
    finally:
        driver.quit()
    return stamps


def settled(driver):  # type: ignore[no-untyped-def]
    """The stamps once the app has been idle for a second after the first words (None until then)."""
    first = driver.execute_script("return window.__medvqa")
    if first["done"] is None:
        return None
    time.sleep(1.0)
    again = driver.execute_script("return window.__medvqa")
    return again if again["done"] == first["done"] else None


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--images", type=int, default=4, help="VQA-RAD training images imported by the demo")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args()
    if not (DATA / "train.jsonl").is_file():
        raise SystemExit(f"needs VQA-RAD at {DATA}")
    work = Path(tempfile.mkdtemp(prefix="medvqa-ask-bench-"))
    home, port = work / "home", args.port or free_port()
    questions = demo_data(work / "vqa-rad", args.images, args.questions + 1)
    env = {**os.environ, "MEDVQA_HOME": str(home), "MEDVQA_DEMO_DATA": str(work / "vqa-rad")}
    env |= {"STREAMLIT_SERVER_PORT": str(port), "STREAMLIT_SERVER_ADDRESS": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR", "MEDVQA_CONFIG"):
        env.pop(name, None)
    os.environ.update({"MEDVQA_HOME": str(home)})
    log = (work / "server.log").open("wb")
    server = subprocess.Popen([MEDVQA, "demo", "--no-browser"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        confirm_held(home)
        print(f"asking {args.questions} questions (+1 warm-up) through {url}")
        stamps = ask_all(url, questions)[1:]  # the first loads the model into the app: a cold start, not a wait
        model = model_latencies(home)[1:]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    if len(model) != len(stamps):
        raise SystemExit(f"{len(stamps)} questions asked but {len(model)} answers recorded")
    first = [s["first"] for s in stamps]
    whole = [s["done"] for s in stamps]
    rows = [
        ("model latency (recorded with each answer)", model, "ms"),
        ("click -> first words on screen", first, "ms"),
        ("click -> whole answer on screen", whole, "ms"),
        ("first words / model latency", [f / m for f, m in zip(first, model, strict=True)], "x"),
        ("whole answer / model latency", [w / m for w, m in zip(whole, model, strict=True)], "x"),
    ]
    print(f"\n{len(stamps)} questions, headless Chromium, one browser tab; p50 and p90\n")
    print("| measure | p50 | p90 |\n|---|---:|---:|")
    for name, values, unit in rows:
        fmt = "{:.0f} ms" if unit == "ms" else "{:.2f}x"
        print(f"| {name} | {fmt.format(percentile(values, 0.5))} | {fmt.format(percentile(values, 0.9))} |")


if __name__ == "__main__":
    main()
