"""app.py: the page in a real headless Chromium (driven by Playwright), plus the no-checkpoint case, and the
Space folder export.py writes, served from a copy far from the repository.

The browser test needs Debian's chromium package (/usr/bin/chromium); CI installs it. Playwright's own
browser download is never used.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from inference_fixtures import ROOT, a_val_image, demo_checkpoint  # noqa: F401  (a fixture)

import app
import export
import predict

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "demo_app.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp_path: Path, *args, cwd: Path = ROOT, clean: bool = False) -> tuple[subprocess.Popen, str]:
    """app.py from cwd on a free port. clean: as a Space starts it, nothing from the repository on the module
    path and no CHECKPOINT_PATH (the folder's app finds its own weights)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "PYTHONUNBUFFERED": "1"}
    if clean:
        env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "CHECKPOINT_PATH")}
    log = open(tmp_path / f"app-{port}.log", "w")  # noqa: SIM115  (closed with the process, below)
    proc = subprocess.Popen([sys.executable, "app.py", *map(str, args), "--port", str(port)],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc, f"http://127.0.0.1:{port}/"


def space_copy(checkpoint: Path, tmp_path: Path) -> Path:
    """export.py space from the checkpoint, copied away from where it was written."""
    assert export.main(["space", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    return Path(shutil.copytree(tmp_path / "exported", tmp_path / "elsewhere" / "space"))


def as_the_page_shows(predictions: list[dict]) -> list[tuple[str, str]]:
    """predict.py's top-5 as gr.Label prints it: the label and Math.round(100 * probability) percent."""
    return [(p["label"], f"{math.floor(100 * p['probability'] + 0.5)}%") for p in predictions]


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}: {Path(proc.log.name).read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app.py did not serve {url} within {timeout} s: {Path(proc.log.name).read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()


def test_no_checkpoint_means_no_predictions(tmp_path):
    clf, status = app.load_for_page(str(tmp_path / "missing.pth"))
    assert clf is None and "No model is loaded" in status
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 100)
    clf, status = app.load_for_page(str(broken))
    assert clf is None and "is not a model file" in status
    scores, message, crop = app.predict(None, status, str(a_val_image()))
    assert scores is None and crop is None and message == status


def test_bad_uploads_are_answered(demo_checkpoint, tmp_path):  # noqa: F811
    clf, _ = app.load_for_page(str(demo_checkpoint))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4 not an image")
    for path in (tmp_path / "empty.jpg", tmp_path / "doc.pdf"):
        scores, message, crop = app.predict(clf, "", str(path))
        assert scores is None and crop is None and "Cannot classify" in message
    scores, message, _ = app.predict(clf, "", None)
    assert scores is None and "Upload an image" in message
    scores, _, crop = app.predict(clf, "", str(a_val_image()))
    assert len(scores) == 5 and crop.size[0] >= app.PREVIEW_SIZE


def test_missing_gradio_and_a_taken_port_are_one_line(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "gradio", None)  # what `import gradio` meets when it is not installed
        code = app.main(["--checkpoint", str(tmp_path / "missing.pth"), "--port", str(free_port())])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.strip().splitlines() == [
        "error: app.py needs the gradio package, which is not installed: pip install -r requirements-app.txt"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code = app.main(["--checkpoint", str(tmp_path / "missing.pth"), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"Port {port} is in use" in err and "--port" in err


def test_the_space_folder_finds_its_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("CHECKPOINT_PATH", raising=False)
    monkeypatch.setattr(app, "__file__", str(tmp_path / "app.py"))
    assert app.default_checkpoint() == app.DEFAULT_CHECKPOINT
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert app.default_checkpoint() == str(tmp_path / "model.safetensors")
    monkeypatch.setenv("CHECKPOINT_PATH", "elsewhere.pth")
    assert app.default_checkpoint() == "elsewhere.pth"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install -y chromium); CI installs it")
def test_pages_in_a_real_browser(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    """The repository's app, the same with no model, and the exported Space: one browser for all three, the
    servers started together, so the test costs about one app's start-up."""
    from playwright.sync_api import expect, sync_playwright

    space = space_copy(demo_checkpoint, tmp_path)
    capsys.readouterr()  # export.py's report
    assert predict.main([str(a_val_image(5)), "--checkpoint", str(demo_checkpoint), "--json"]) == 0
    expected = as_the_page_shows(json.loads(capsys.readouterr().out)["predictions"])
    served, url = start_app(tmp_path, "--checkpoint", demo_checkpoint)
    no_model, no_model_url = start_app(tmp_path, "--checkpoint", tmp_path / "missing.pth")
    space_app, space_url = start_app(tmp_path, cwd=space, clean=True)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text, not a picture")
    try:
        wait_until_serving(served, url)
        wait_until_serving(no_model, no_model_url)
        wait_until_serving(space_app, space_url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(url)
            rows = page.locator("#predictions .confidence-set")
            upload = page.locator("#upload input[type=file]")
            clear = page.locator("#upload button[aria-label='Clear']")

            upload.set_input_files(str(a_val_image(3)))
            expect(rows).to_have_count(5, timeout=30_000)
            for i in range(5):  # each row: a class label and a percentage
                expect(rows.nth(i).locator("dt")).to_have_text(re.compile(r"^digit_\d$"))
                expect(rows.nth(i).locator("dd")).to_have_text(re.compile(r"^\d+%$"))
            expect(page.locator("#message")).to_contain_text("Top 5 of 10 classes")
            page.screenshot(path=str(tmp_path / SCREENSHOT), full_page=True)

            clear.click()
            upload.set_input_files(str(not_image))
            expect(page.locator("#message")).to_contain_text("Cannot classify this upload", timeout=30_000)
            expect(page.locator("#message")).to_contain_text("notes.jpg is not a usable image")
            expect(rows).to_have_count(0)

            clear.click()  # the server kept serving: a good image after the bad one works
            upload.set_input_files(str(a_val_image(7)))
            expect(rows).to_have_count(5, timeout=30_000)

            page.goto(no_model_url)
            expect(page.locator("#model-status")).to_contain_text("No model is loaded", timeout=30_000)
            upload.set_input_files(str(a_val_image(3)))
            expect(page.locator("#message")).to_contain_text("No model is loaded", timeout=30_000)
            expect(rows).to_have_count(0)

            # The Space: its own weights, found without --checkpoint, and predict.py's top-5 for the image.
            page.goto(space_url)
            expect(page.locator("#model-status")).to_contain_text("from model.safetensors", timeout=30_000)
            upload.set_input_files(str(a_val_image(5)))
            expect(rows).to_have_count(5, timeout=30_000)
            shown = list(zip(rows.locator("dt").all_inner_texts(), rows.locator("dd").all_inner_texts(), strict=True))
            assert shown == expected
            browser.close()
        assert served.poll() is None and no_model.poll() is None and space_app.poll() is None
    finally:
        stop(served)
        stop(no_model)
        stop(space_app)
    print(f"screenshot: {tmp_path / SCREENSHOT}")
