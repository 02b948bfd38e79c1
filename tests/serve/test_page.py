"""docs/serving.md end to end: its ```sh test commands (export with kept items, search) run
on digit records with a random model, then its ``mmalign serve`` command starts on a free
port, and headless Chromium (Debian's ``chromium`` and ``chromium-driver``, via selenium)
types a text query into the page: the top-5 cards are the CLI's rows, in its order. The
screenshot is written next to the export (``page.png``). SIGTERM stops the service with
status 0."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmalign.model import AlignmentModel
from tests.serve_support import TOWERS, write_digit_shard
from tests.test_guides import ROOT, output_of, run_guide, search_rows
from tests.train_support import free_port

GUIDE = ROOT / "docs" / "serving.md"
BROWSER = shutil.which("chromium"), shutil.which("chromedriver")


def serve_command() -> list[str]:
    """The guide's ```sh serve command, as arguments of ``python -m mmalign``."""
    text = GUIDE.read_text()
    (line,) = text.split("```sh serve\n", 1)[1].split("```", 1)[0].strip().splitlines()
    program, *arguments = shlex.split(line)
    assert program == "mmalign"
    return arguments


def start_service(arguments: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mmalign serve`` on a free port; its process and the URL it printed."""
    port = arguments.index("--port") + 1
    arguments = [*arguments[:port], str(free_port()), *arguments[port + 1 :]]
    process = subprocess.Popen(
        [sys.executable, "-m", "mmalign", *arguments],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # the URL, once the service listens
    assert line.startswith("mmalign serve: http://127.0.0.1:"), line + process.stdout.read()
    return process, line.split()[2]


def browser() -> object:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(BROWSER[1]))


def cards_for(driver: object, url: str, text: str, k: int, target: str) -> list[str]:
    """Type ``text`` into the page, ask for ``k`` results of ``target``; the keys of the
    cards shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    driver.find_element(By.ID, "text").send_keys(text)
    Select(driver.find_element(By.ID, "target")).select_by_value(target)
    k_box = driver.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(k))
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searched"))
    wait.until(
        lambda d: all(i.get_property("complete") for i in d.find_elements(By.TAG_NAME, "img"))
    )
    return [card.get_attribute("data-key") for card in driver.find_elements(By.CLASS_NAME, "card")]


@pytest.mark.launches
def test_the_serving_guide_and_its_page_in_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not all(BROWSER):
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium "
            "chromium-driver); the page's browser test needs them (CI installs them)"
        )
    torch.manual_seed(0)
    config = {"dim": 64, "matryoshka": [16, 32, 64], "towers": TOWERS}
    AlignmentModel.from_config(config).save_pretrained(tmp_path / "runs/guides/serving/model")
    write_digit_shard(tmp_path / "data/demo/digits/test-000000.tar", count=60)
    outputs = run_guide(GUIDE, tmp_path, monkeypatch)
    expected = [row["key"] for row in search_rows(output_of(outputs, "mmalign search"))]
    assert len(expected) == 5
    process, url = start_service(serve_command(), tmp_path)
    driver = None
    try:
        driver = browser()
        assert cards_for(driver, url, "the digit seven", k=5, target="image") == expected
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        if driver is not None:
            driver.quit()
        process.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        assert process.wait(timeout=30) == 0
        assert time.perf_counter() - started < 30
    assert (tmp_path / "page.png").stat().st_size > 10_000
