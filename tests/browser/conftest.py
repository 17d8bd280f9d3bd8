"""Headless Chromium against the embedded host's frontend, served by a real ComfyUI server.

Needs Debian's chromium (`apt-get install -y chromium`) and the Python package playwright
(`pip install playwright`; its own browser download, `playwright install`, is never used: the
tests launch the system chromium through executable_path). Without a chromium the tests skip.
With MIXOFSHOW_COMFYUI=/path/to/ComfyUI (pytest run by that checkout's Python) the same tests run
against a current ComfyUI and its frontend (comfyui-frontend-package).

    MIXOFSHOW_CHROMIUM   chromium binary (default: chromium, chromium-browser or google-chrome on PATH)
    MIXOFSHOW_TEST_OUT   folder for screenshots and saved workflows (default out/browser)
    MIXOFSHOW_UPDATE_DOCS=1  also refresh docs/region_editor.png
"""
import os
import shutil
from pathlib import Path

import pytest

from comfyui_mixofshow.harness import host

from . import helpers

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = helpers.chromium_path()


@pytest.fixture(scope="session")
def out_dir():
    folder = Path(os.environ.get("MIXOFSHOW_TEST_OUT") or ROOT / "out" / "browser").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def test_out(out_dir, request):
    folder = out_dir / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """(server, client, files): a ComfyUI server in a temporary run folder with the demo checkpoint and
    ED-LoRA, a seeded test T2I-Adapter and the test pose image in input/."""
    host.add_host_to_path()
    from comfyui_mixofshow.harness import demo_models, models
    from comfyui_mixofshow.harness import server as harness_server

    checkpoint, edlora = demo_models.ensure_demo_models()
    server = harness_server.Server(tmp_path_factory.mktemp("comfy-browser"), cpu=True).prepare()
    (server.models_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
    (server.models_dir("edlora") / edlora.name).symlink_to(edlora)
    import torch
    with torch.inference_mode():
        models.write_t2i_adapter(str(server.models_dir("controlnet") / helpers.KEYPOSE_MODEL))
    helpers.write_pose_image(server.run_dir / "input" / helpers.POSE_IMAGE)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    server.start(timeout=120, env=env)
    client = server.client(timeout=60)
    # the current frontend greets a new user with a template browser over the canvas; mark the tour done
    client._request("/settings/Comfy.TutorialCompleted", True, method="POST")
    try:
        yield server, client, {"checkpoint": checkpoint.name, "edlora": edlora.name}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("chromium is installed but the Python package playwright is not: pip install playwright "
                    "(do not run `playwright install`; the tests use the system chromium)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            yield instance
        finally:
            instance.close()


class PageLog:
    """Console messages and uncaught page errors of one page."""

    def __init__(self, page):
        self.messages = []
        self.errors = []
        page.on("console", lambda m: self.messages.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.errors.append(f"{e}\n{getattr(e, 'stack', '') or ''}"))
        page.on("requestfailed", lambda r: self.messages.append(("requestfailed", r.failure or "", r.url)))
        page.on("response", lambda r: r.status >= 400 and self.messages.append(("http", str(r.status), r.url)))

    def ours(self):
        """Errors raised in or about the extension's files (its URL or name in the message or stack)."""
        def mine(text):
            return any(key in text for key in (helpers.EXTENSION_URL, "region_editor", "region_box", "mixofshow.RegionEditor"))
        bad = [f"pageerror: {e}" for e in self.errors if mine(e)]
        bad += [f"{kind}: {text} ({url})" for kind, text, url in self.messages
                if kind in ("error", "requestfailed", "http") and (mine(url) or mine(text))]
        return bad

    def dump(self, path):
        lines = [f"{kind}\t{text}\t{url}" for kind, text, url in self.messages]
        lines += [f"pageerror\t{e}" for e in self.errors]
        Path(path).write_text("\n".join(lines) + "\n")


@pytest.fixture
def page(browser, comfy, test_out):
    """A fresh page on the server's frontend with the app loaded; its console log is written to
    the test's output folder, and errors from the extension fail the test."""
    server = comfy[0]
    context = browser.new_context(viewport={"width": 1800, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    log = PageLog(page)
    page.log = log
    helpers.patch_object_info(page)
    page.goto(server.url + "/")
    helpers.wait_for_app(page)
    try:
        yield page
    finally:
        try:
            page.screenshot(path=str(test_out / "final.png"))
        except Exception:  # noqa: BLE001 - a closed page has no screenshot
            pass
        log.dump(test_out / "console.log")
        context.close()
    assert not log.ours(), "errors from the region editor:\n" + "\n".join(log.ours())
