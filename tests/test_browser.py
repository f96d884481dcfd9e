"""The web page in headless Chromium (Debian's chromium and chromium-driver, driven by selenium):
a prompt typed, Generate clicked, the image appears with its time; a bad value shows the
server's error; an image uploaded is edited; the text an Instruct model writes appears as it is
streamed, then the image. EPDIFF_SCREENSHOT=path keeps a screenshot of the page (docs/server.png)."""

from __future__ import annotations

import os
import shutil

import pytest

from serve_helpers import healthy_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with healthy_server(["-dp", "2", "--enable-expert-parallel"], tmp_path_factory.mktemp("browser") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,760", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(server, browser):
    browser.get(server.url + "/")
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: "EP=2" in d.find_element(By.ID, "model").text)
    return browser


def fill(driver, **fields):
    for field, value in fields.items():
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def test_a_prompt_typed_and_generate_clicked_shows_the_image(page, server):
    fill(page, prompt="a large red circle on the left", steps="100", seed="3", guidance="")  # seconds: the page polls
    page.find_element(By.ID, "generate").click()
    # The page reads the engine's step progress while the image is being made.
    WebDriverWait(page, TIMEOUT_S, poll_frequency=0.05).until(
        lambda d: "of 100" in d.find_element(By.ID, "status").text)
    # Previews fill the image first (the page asks for 2); the status tells the final image has come.
    WebDriverWait(page, TIMEOUT_S).until(
        lambda d: d.execute_script("return document.getElementById('image').naturalWidth") > 0)
    WebDriverWait(page, TIMEOUT_S).until(lambda d: "steps:" in d.find_element(By.ID, "status").text)
    status = page.find_element(By.ID, "status").text
    assert "128x128, seed 3, 100 steps" in status and "denoise and decode" in status, status
    assert page.find_element(By.ID, "error").text == ""
    assert page.find_element(By.ID, "generate").is_enabled()
    screenshot = os.environ.get("EPDIFF_SCREENSHOT")
    if screenshot:
        page.save_screenshot(screenshot)


@pytest.mark.parametrize("fields,message", [
    ({"steps": "0"}, "num_inference_steps must be at least 1, got 0"),
    ({"size": "100x1000"}, "size '100x1000' (width x height)"),
    ({"prompt": "   "}, "prompt is empty"),
])
def test_a_bad_value_shows_the_error(page, fields, message):
    fill(page, **fields)
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, TIMEOUT_S).until(lambda d: d.find_element(By.ID, "error").text)
    assert message in page.find_element(By.ID, "error").text


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    from instruct_cases import make_checkpoint

    folder = make_checkpoint(str(tmp_path_factory.mktemp("distil")), "instruct-distil")
    with healthy_server(["--model", folder], tmp_path_factory.mktemp("browser-edit") / "server.log") as s:
        yield s


def test_an_image_uploaded_on_the_page_is_edited(edit_server, browser, tmp_path):
    from instruct_cases import input_image

    path = tmp_path / "wide.png"
    input_image("wide-circle").save(path)
    browser.get(edit_server.url + "/")
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: d.find_element(By.ID, "images").is_displayed())
    fill(browser, prompt="make it blue", steps="2", seed="5")
    browser.find_element(By.ID, "images").send_keys(str(path))
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: "steps:" in d.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status").text
    assert "320x192, seed 5, 2 steps" in status, status  # the uploaded image's own aspect bucket


def test_the_text_the_model_writes_appears_then_the_image(edit_server, browser):
    browser.get(edit_server.url + "/")
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: d.find_element(By.ID, "task").is_displayed())
    task = Select(browser.find_element(By.ID, "task"))
    assert [o.text for o in task.options] == ["image", "think", "recaption", "think_recaption"]
    task.select_by_value("think_recaption")
    # A size given: the model's own choice may be a large one, slow to decode on the CPU.
    fill(browser, prompt="a red circle", steps="2", seed="5", size="256x256", tokens="8")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, TIMEOUT_S, poll_frequency=0.05).until(lambda d: d.find_element(By.ID, "text").text)
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: "steps:" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "text").text.startswith("<think>")
    assert browser.execute_script("return document.getElementById('image').naturalWidth") == 256
    status = browser.find_element(By.ID, "status").text
    assert "256x256, seed 5, 2 steps" in status and browser.find_element(By.ID, "error").text == "", status
