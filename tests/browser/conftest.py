"""Headless Chromium on a ComfyUI frontend served by a real ComfyUI server.

Needs Debian's chromium, the Python package playwright (its own browser download, `playwright install`,
is never used: the tests launch the system chromium through executable_path) and, for frontend 1.58.1,
comfyui-frontend-package==1.58.1 in .host/frontends/1.58.1; `bash scripts/setup_browser.sh` installs all
three. When one is missing every browser test skips with that one reason.

    MIXOFSHOW_FRONTEND   bundled (default): the host's own frontend (the 2024 host's web/, or the
                         comfyui-frontend-package a current host requires);
                         1.58.1: frontend 1.58.1, classic (canvas) renderer;
                         1.58.1-vue: frontend 1.58.1 with Nodes 2.0 (Comfy.VueNodes.Enabled, set as the
                         user's setting before the page loads).
                         1.58.1 is served with --front-end-root, which the 2024 host lacks: run those with
                         MIXOFSHOW_COMFYUI=<v0.3.64 checkout> (its Python requirements installed).
    MIXOFSHOW_COMFYUI    the ComfyUI host (default: the embedded 2024 copy), as for every server test
    MIXOFSHOW_CHROMIUM   chromium binary (default: chromium, chromium-browser or google-chrome on PATH)
    MIXOFSHOW_TEST_OUT   folder for screenshots and saved workflows (default out/browser/<frontend>)
    MIXOFSHOW_UPDATE_DOCS=1  also refresh docs/region_editor*.png
"""
import os
import shutil
from pathlib import Path

import pytest

from comfyui_mixofshow.harness import host

from . import helpers

ROOT = helpers.ROOT
HERE = Path(__file__).resolve().parent
SKIP = helpers.skip_reason(host.host_dir())


def pytest_collection_modifyitems(config, items):
    """Skips every browser test, with the one reason, when something they need is missing."""
    if SKIP is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=SKIP))


@pytest.fixture(scope="session")
def out_dir():
    folder = Path(os.environ.get("MIXOFSHOW_TEST_OUT") or ROOT / "out" / "browser" / helpers.FRONTEND).resolve()
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
    extra = ["--front-end-root", str(helpers.frontend_root())] if helpers.FRONTEND_VERSION else []
    server = harness_server.Server(tmp_path_factory.mktemp("comfy-browser"), cpu=True, extra_args=extra).prepare()
    (server.models_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
    (server.models_dir("edlora") / edlora.name).symlink_to(edlora)
    import torch
    with torch.inference_mode():
        models.write_t2i_adapter(str(server.models_dir("controlnet") / helpers.KEYPOSE_MODEL))
    helpers.write_pose_image(server.run_dir / "input" / helpers.POSE_IMAGE)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    server.start(timeout=300, env=env)  # generous: a loaded 2-core machine
    client = server.client(timeout=60)
    # the current frontend greets a new user with a template browser over the canvas; mark the tour done
    client._request("/settings/Comfy.TutorialCompleted", True, method="POST")
    client._request("/settings/Comfy.VueNodes.Enabled", helpers.VUE_NODES, method="POST")
    try:
        yield server, client, {"checkpoint": checkpoint.name, "edlora": edlora.name}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=helpers.chromium_path(), headless=True,
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
    the test's output folder; errors from the extension, and deprecated frontend API it uses, fail the test."""
    server = comfy[0]
    context = browser.new_context(viewport={"width": 1800, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    log = PageLog(page)
    page.log = log
    helpers.patch_object_info(page)
    page.goto(server.url + "/", timeout=180000)
    helpers.wait_for_app(page)
    helpers.watch_deprecations(page)
    try:
        yield page
        deprecated = helpers.deprecations_from_extension(page)
    finally:
        try:
            page.screenshot(path=str(test_out / "final.png"))
        except Exception:  # noqa: BLE001 - a closed page has no screenshot
            pass
        log.dump(test_out / "console.log")
        context.close()
    assert not log.ours(), "errors from the region editor:\n" + "\n".join(log.ours())
    assert not deprecated, "the region editor uses deprecated frontend API:\n" + "\n".join(deprecated)
