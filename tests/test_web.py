"""The web page of ``edgetl device serve`` in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing is downloaded at test time), on a phone-sized
screen, against the real server. The camera is Chromium's fake capture device, fed a real photo.

``EDGETL_SCREENSHOT=docs/service-phone.png`` also saves the page as the test leaves it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import HYMENOPTERA
from .test_service import _free_port, _get, _serve, _until_up

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ANTS = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
BEES = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))
PHONE = (390, 844)  # CSS pixels of a common phone


def _chromium() -> tuple[str, str] | None:
    browser = os.environ.get("EDGETL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("EDGETL_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def write_y4m(photo: Path, out: Path, size: tuple[int, int] = (320, 240), frames: int = 2) -> Path:
    """A real photo as a Y4M video (4:2:0), the format Chromium's fake camera reads."""
    img = Image.open(photo).convert("RGB").resize(size)
    y, cb, cr = (np.asarray(c) for c in img.convert("YCbCr").split())
    half = (size[0] // 2, size[1] // 2)
    u = np.asarray(Image.fromarray(cb).resize(half))
    v = np.asarray(Image.fromarray(cr).resize(half))
    with open(out, "wb") as f:
        f.write(f"YUV4MPEG2 W{size[0]} H{size[1]} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes())
    return out


@pytest.fixture(scope="module")
def server(device_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    port = _free_port()
    proc = _serve(device_bundle, tmp / "store.sqlite", "--port", str(port))
    try:
        _until_up(proc, f"http://127.0.0.1:{port}/api/info", None)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium here: install Debian's 'chromium' and 'chromium-driver' (.ci/run does)")
    tmp = tmp_path_factory.mktemp("chromium")
    video = write_y4m(BEES[20], tmp / "bee.y4m")
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={PHONE[0]},{PHONE[1]}", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={video}",
                f"--user-data-dir={tmp / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=found[1]))
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _card(driver, label):
    return driver.find_element(By.CSS_SELECTOR, f'#cards .card[data-label="{label}"]')


def _wait(driver, cond, timeout=90.0, what="the page", diagnose=None):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond, message=f"waiting for {what}")
    except Exception:
        if diagnose:
            print("page state:", driver.execute_script("return " + diagnose))
        print("page text:", driver.find_element(By.TAG_NAME, "body").text[:2000])
        raise


def test_teach_from_the_page_camera_and_files(server, browser):
    d = browser
    d.get(server + "/")
    _wait(d, lambda d: d.find_element(By.ID, "app").is_displayed(), what="the app")
    _wait(d, lambda d: "head version 1" in d.find_element(By.ID, "status").text, what="the status line")
    original = _get(server + "/api/info")[1]["labels"]
    assert {c.get_attribute("data-label") for c in d.find_elements(By.CSS_SELECTOR, "#cards .card")} == set(original)

    # A new class from files: the card's photo picker.
    d.find_element(By.ID, "new-class-name").send_keys("ants")
    d.find_element(By.ID, "new-class-add").click()
    picker = _wait(d, lambda d: _card(d, "ants").find_element(By.CSS_SELECTOR, ".file-input"), what="the ants card")
    d.execute_script("arguments[0].style.display = 'block'", picker)  # a styled label hides it, as on a phone
    picker.send_keys("\n".join(str(p) for p in ANTS[:8]))
    d.execute_script("arguments[0].style.display = ''", picker)
    _wait(d, lambda d: "8 photos" in _card(d, "ants").find_element(By.CSS_SELECTOR, ".count").text,
          what="8 stored ants")
    _wait(d, lambda d: len([i for i in _card(d, "ants").find_elements(By.CSS_SELECTOR, ".thumbs img")
                            if i.get_attribute("src")]) == 8, what="8 thumbnails")

    # A new class from the camera: hold the button (Chromium's fake camera shows a bee photo).
    d.find_element(By.ID, "new-class-name").send_keys("bees")
    d.find_element(By.ID, "new-class-add").click()
    hold = _wait(d, lambda d: _card(d, "bees").find_element(By.CSS_SELECTOR, ".hold"), what="the bees card")
    d.find_element(By.ID, "camera-start").click()
    _wait(d, lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0,
          what="the camera stream", diagnose="[document.getElementById('camera-note').textContent, !!state.stream]")
    ActionChains(d).click_and_hold(hold).pause(1.5).release().perform()
    _wait(d, lambda d: "stored" in _card(d, "bees").find_element(By.CSS_SELECTOR, ".card-note").text,
          what="the camera upload")
    counts = _get(server + "/api/info")[1]["samples"]
    assert counts["ants"] == 8 and counts["bees"] >= 1, counts
    bees = _get(server + "/api/samples?label=bees")[1]["samples"]
    assert all(s["source"].startswith("camera-") for s in bees)

    # Train, and follow the job to the end.
    d.find_element(By.ID, "train").click()
    _wait(d, lambda d: d.find_element(By.ID, "job-state").text.startswith(("done", "failed")), what="the training")
    state = d.find_element(By.ID, "job-state").text
    assert state.startswith("done: version 2"), state
    assert d.find_element(By.ID, "progress").get_attribute("value") == "1"
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2, what="two history entries")
    assert "(active)" in d.find_elements(By.CSS_SELECTOR, "#history li")[0].text
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "table.confusion"), what="the confusion matrix")

    # Live predictions from the camera: top-3 bars from the new head.
    d.find_element(By.ID, "live-toggle").click()
    _wait(d, lambda d: "version 2" in d.find_element(By.ID, "prediction-meta").text, what="a live prediction")
    bars = d.find_elements(By.CSS_SELECTOR, "#bars li")
    assert len(bars) == 3
    label = d.find_element(By.ID, "prediction-label").text.rsplit(" ", 2)[0]
    assert label in original + ["ants", "bees"]
    d.find_element(By.ID, "live-toggle").click()

    # A photo file from the phone: predicted through the same API.
    picker = d.find_element(By.ID, "predict-file")
    d.execute_script("arguments[0].style.display = 'block'", picker)
    picker.send_keys(str(ANTS[30]))
    d.execute_script("arguments[0].style.display = ''", picker)
    _wait(d, lambda d: ANTS[30].name in d.find_element(By.ID, "prediction-meta").text, what="the photo's prediction")
    assert d.find_element(By.ID, "prediction-meta").text.split(" · ")[2] in ("head", "ncm", "head+ncm")

    # On a phone's screen (headless Chromium's windows are at least 500 px wide: emulate the phone's
    # viewport): nothing may stick out sideways.
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": PHONE[0], "height": PHONE[1],
                                                             "deviceScaleFactor": 2, "mobile": True})
    try:
        time.sleep(0.3)
        wide = d.execute_script(f"""return [...document.querySelectorAll('body *')].filter(e =>
              e.getBoundingClientRect().right > {PHONE[0]} + 1 && !e.parentElement.closest('.thumbs, table.confusion'))
              .map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + e.textContent.slice(0, 40))""")
        assert wide == [], f"wider than a {PHONE[0]} px phone: {wide}"
        assert d.execute_script("return window.innerWidth") == PHONE[0]
        shot = os.environ.get("EDGETL_SCREENSHOT")
        if shot:
            d.execute_script("window.scrollTo(0, 0)")
            time.sleep(0.3)
            d.save_screenshot(shot)
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # Roll back from the history list.
    d.find_element(By.CSS_SELECTOR, "#history li button.rollback").click()
    _wait(d, lambda d: "head version 1" in d.find_element(By.ID, "status").text, what="the rollback")
    assert _get(server + "/api/info")[1]["head_version"] == 1


def test_page_asks_for_the_token(device_bundle, browser, tmp_path):
    port = _free_port()
    proc = _serve(device_bundle, tmp_path / "s.sqlite", "--port", str(port), "--token", "let-me-in")
    try:
        _until_up(proc, f"http://127.0.0.1:{port}/api/info", "let-me-in")
        d = browser
        d.get(f"http://127.0.0.1:{port}/")
        d.execute_script("localStorage.clear()")
        d.get(f"http://127.0.0.1:{port}/")
        _wait(d, lambda d: d.find_element(By.ID, "token-box").is_displayed(), what="the token prompt")
        d.find_element(By.ID, "token-input").send_keys("wrong")
        d.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(d, lambda d: d.find_element(By.ID, "token-error").is_displayed(), what="the refusal")
        d.find_element(By.ID, "token-input").clear()
        d.find_element(By.ID, "token-input").send_keys("let-me-in")
        d.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(d, lambda d: d.find_element(By.ID, "app").is_displayed(), what="the app after the token")
        # The URL the service prints (#token=...) also works, and leaves the address bar clean.
        d.execute_script("localStorage.clear()")
        d.get(f"http://127.0.0.1:{port}/#token=let-me-in")
        _wait(d, lambda d: d.find_element(By.ID, "app").is_displayed(), what="the app from the link")
        assert "token" not in d.current_url
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
