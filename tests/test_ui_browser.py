"""`tuneforge ui` in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
start a 120-step run on a small model from the New run page, watch the loss plot gain points while it
trains, stop it, resume it to the end, and compare it with a run the command line made. Screenshots go to
the test's folder, and to `$TUNEFORGE_UI_SCREENSHOTS` (docs/ui) when set.

Without chromium the test skips, saying so, except under CI=true, where it fails: CI installs chromium
(scripts/setup.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REPO = Path(__file__).resolve().parents[1]

STEPS = 120  # optimizer steps of the run the page starts, stops and resumes


def _need(condition: bool, message: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run the browser test (scripts/setup.sh installs chromium)")
    pytest.skip(f"{message}: the browser test needs Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver) and selenium")


@pytest.fixture(scope="module")
def browser():
    _need(CHROMIUM is not None and DRIVER is not None, "chromium or chromedriver is not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need(False, "selenium is not installed")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1360,1000", "--disable-background-networking", "--no-first-run"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # no driver download: the local one
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A Llama-shaped model large enough that 20 steps take a few seconds (time to watch and stop it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                         tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory = tmp_path_factory.mktemp("small-llama")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_start_watch_stop_resume_and_compare_in_a_browser(browser, small_model_dir, task_file, retain_file,
                                                          tmp_path):
    from selenium.webdriver.common.by import By

    root, shots = tmp_path / "runs", tmp_path / "shots"
    root.mkdir()
    shots.mkdir()
    config = {"model": str(small_model_dir), "data": {"train": str(task_file), "max_eval_examples": 8},
              "retain": str(retain_file),
              "strategies": [{"lora": {"rank": 4, "targets": "all-linear"}}],
              # long enough that the stop lands mid-run on a quiet machine too (a run of 20 steps ended
              # before the click there)
              "train": {"max_steps": STEPS, "batch_size": 8, "lr": 5e-3, "max_seq_len": 64, "log_every": 1,
                        "eval_every": 25},
              "evaluation": {"samples": 1, "max_new_tokens": 8, "retain_examples": 4}}
    # a prompt-only baseline made by the command line (evaluation only): the page shows both, compares them
    baseline_file = tmp_path / "baseline.yaml"
    baseline_file.write_text(yaml.safe_dump({**config, "train": {**config["train"], "max_steps": 0}}))
    assert main(["train", str(baseline_file), "--output", str(root / "prompt-only")]) == 0
    # one thread per process: the server, the run and the browser share two cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    port = free_port()
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as handle:  # a file: a full pipe that nobody reads would block the server
        server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "ui", "--runs", str(root),
                                   "--port", str(port)], env=env, stdout=handle, stderr=subprocess.STDOUT)
    started, began = [], time.monotonic()
    try:
        line = wait_for(lambda: server_log.read_text(), 60, "the server to start")
        assert f"http://127.0.0.1:{port}/" in line, line
        base = f"http://127.0.0.1:{port}"
        driver = browser

        def shot(name: str) -> None:
            driver.save_screenshot(str(shots / f"{name}.png"))
            print(f"{time.monotonic() - began:.1f} s: {name}")

        # New run: the editor, validated as `tuneforge validate` does
        driver.get(base + "/new")
        driver.execute_script("var e = document.getElementById('yaml'); e.value = arguments[0];"
                              "e.dispatchEvent(new Event('input'));", yaml.safe_dump(config, sort_keys=False))
        status = driver.find_element(By.ID, "validation")
        wait_for(lambda: "ok (causal_lm" in status.text, 60, "the config to validate")
        name = driver.find_element(By.ID, "run-name")
        name.clear()
        name.send_keys("lora-ui")
        command = driver.find_element(By.ID, "command").text
        assert command == f"tuneforge train {root}/configs/lora-ui.yaml --output {root}/lora-ui"
        shot("new-run")
        driver.find_element(By.ID, "start").click()
        wait_for(lambda: driver.current_url.endswith("/run/lora-ui"), 30, "the run page")
        started.append(root / "lora-ui")

        def run_state() -> str:  # "" while the page reloads (it does when the run ends)
            return driver.execute_script("var e = document.getElementById('run-state');"
                                         "return e ? e.textContent.trim() : '';")

        # the loss plot gains points while the run trains
        def train_points() -> int:
            counts = driver.execute_script(
                "return Array.from(document.querySelectorAll('#plot polyline.series'))"
                ".filter(p => p.dataset.series === 'train loss')"
                ".map(p => p.getAttribute('points').trim().split(' ').length);")
            return counts[0] if counts else 0

        first = wait_for(train_points, 120, "the first training points")
        wait_for(lambda: train_points() > first, 60, "more training points")
        assert run_state() == "running"
        shot("run-live")

        # stop: SIGTERM, the run stops at a checkpoint
        driver.find_element(By.ID, "stop").click()
        notice = wait_for(lambda: driver.find_elements(By.ID, "notice"), 30, "the stop's answer")[0].text
        assert notice.startswith("SIGTERM sent"), notice
        wait_for(lambda: run_state() == "stopped", 60, "the run to stop")
        record = json.loads((root / "lora-ui" / "status.json").read_text())
        assert record["state"] == "stopped" and record["reason"] == "SIGTERM" and record["exit_code"] == 143
        stopped_at = record["step"]
        assert first < stopped_at < STEPS, stopped_at

        # resume: `tuneforge train RUN/config.yaml --resume`, to the end
        driver.find_element(By.ID, "resume").click()
        wait_for(lambda: run_state() in ("starting", "running", "finished"),
                 30, "the run to resume")
        wait_for(lambda: run_state() == "finished", 180, "the run to finish")
        wait_for(lambda: driver.find_elements(By.ID, "before-after"), 30, "the before/after table")
        # every step once: the resume continued where the stop left off
        wait_for(lambda: train_points() == STEPS, 20, f"all {STEPS} steps on the plot")
        results = json.loads((root / "lora-ui" / "results.json").read_text())
        assert results["steps"] == STEPS
        assert f"resumed from step-{stopped_at:08d}" in (root / ".ui" / "logs" / "lora-ui.log").read_text()
        driver.execute_script("window.scrollTo(0, 0)")
        shot("run")

        # Runs: the page's run and the command line's, both finished
        driver.get(base + "/")
        states = wait_for(lambda: driver.execute_script(  # read at once: live updates replace the rows
            "return Object.fromEntries(Array.from(document.querySelectorAll('#runs-body tr[data-run]'))"
            ".map(r => [r.dataset.run, r.querySelector('.state').textContent]));"), 20, "the runs")
        assert states == {"lora-ui": "finished", "prompt-only": "finished"}
        shot("runs")

        # Compare: `tuneforge compare`'s report in the page
        driver.get(base + "/compare")
        for box in driver.find_elements(By.CSS_SELECTOR, "input[name='run[]']"):
            box.click()
        driver.find_element(By.ID, "compare").click()
        frame = wait_for(lambda: driver.find_elements(By.ID, "report"), 120, "the comparison report")[0]
        driver.switch_to.frame(frame)
        heading = wait_for(lambda: driver.find_elements(By.TAG_NAME, "h1"), 20, "the report")[0].text
        table = driver.find_element(By.ID, "results").text
        header = driver.find_element(By.CSS_SELECTOR, "#results th.sortable")
        header.click()  # the report's own sorting script runs under its policy
        assert header.get_attribute("aria-sort") == "ascending"
        driver.switch_to.default_content()
        assert heading == "tuneforge comparison"
        assert "lora-ui" in table and "prompt-only" in table
        shot("compare")
    finally:
        for run in started:  # never leave a training process behind
            record = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
            if record.get("state") == "running":
                os.kill(record["pid"], signal.SIGKILL)
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    for path in shots.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("TUNEFORGE_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in shots.iterdir():
            shutil.copyfile(path, Path(target) / path.name)
    assert re.search(r"\d", table)
