"""`avar-net app` in a real browser: Playwright drives Debian's chromium-headless-shell (never `playwright install`).

Trains a tiny run (SynthAVAR, random-tiny backbones), starts the app on a free loopback port, uploads clips and checks
what the page shows; a broken and an oversized upload each give their message; two pages at once both get their own
result; no request leaves 127.0.0.1. The screenshot of the result goes to `$AVAR_APP_SCREENSHOT` (default: tmp)."""
import os, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = os.environ.get("AVAR_CHROMIUM", "/usr/lib/chromium/chromium-headless-shell")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"{CHROMIUM} missing: apt-get install chromium-headless-shell")
playwright_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _clip(path, label, seconds):
    from avar_net.synth import write_mp4
    from avar_net.synthclip import render_clip
    frames, audio, fps, sr = render_clip(label, seed=3, size=64, duration_s=seconds, fps=10)
    return write_mp4(path, frames, fps, audio, sr)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    from avar_net.synth import generate_synthavar
    from avar_net.features import FeatureConfig
    from avar_net.extract import extract_dataset
    from avar_net.train import TrainConfig, train
    from avar_net.infer import Predictor
    t = tmp_path_factory.mktemp("app")
    root = generate_synthavar(t / "data", "tiny", seed=0, classes=["Normal", "Explosion", "Police siren"],
                              clips_per_class=3, duration_s=[1.0, 1.0])
    extract_dataset(root, t / "feats", FeatureConfig(audio_backbone="random-tiny", video_backbone="random-tiny"),
                    progress=False)
    train(t / "feats", t / "run", dict(num_stages=2, num_layers=2, num_f_maps=8), TrainConfig(epochs=2, batch_size=4),
          progress=False)
    clips = {"a": _clip(t / "explosion.mp4", "Explosion", 3.0), "b": _clip(t / "siren.mp4", "Police siren", 2.0)}
    (t / "notes.mp4").write_text("this is a text file, not a video\n" * 10)
    (t / "big.mp4").write_bytes(os.urandom(3 * 2**20 // 2))          # 1.5 MB, over the 1 MB limit below
    pred = Predictor(t / "run", device="cpu")
    expected = {k: pred.predict(p)["label"] for k, p in clips.items()}
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(t)}      # HOME: no user Streamlit config is read
    log = open(t / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "avar_net.cli", "app", "--model", str(t / "run"), "--port",
                             str(port), "--max-upload-mb", "1", "--examples", str(t / "examples")], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read().strip() == b"ok": break
            except OSError: pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start: {(t / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"url": url, "tmp": t, "clips": clips, "expected": expected, "proc": proc}
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def pages(app, browser):
    "New pages, each in its own browser context (its own Streamlit session); every request's host is recorded."
    made, hosts = [], set()
    def new():
        ctx = browser.new_context(viewport={"width": 1300, "height": 1200})
        ctx.on("request", lambda r: hosts.add(urlparse(r.url).hostname or urlparse(r.url).scheme))
        page = ctx.new_page(); page.set_default_timeout(240_000)
        page.goto(app["url"]); page.get_by_text("AVAR-Net: try it on your own video").first.wait_for()
        made.append(ctx); return page
    yield new, hosts
    for c in made: c.close()
    assert hosts <= {"127.0.0.1", "data", "blob"}, f"requests left the machine: {sorted(hosts)}"


def _upload(page, path): page.locator("input[type=file]").set_input_files(str(path))


def test_upload_shows_prediction_timeline_audio_note(app, pages):
    new, hosts = pages
    page = new()
    _upload(page, app["clips"]["a"])
    page.get_by_text("Top class:").wait_for()
    assert f"Top class: {app['expected']['a']} (" in page.inner_text("body")
    page.get_by_text("Audio track found").wait_for()
    img = page.locator("[data-testid=stImage] img").first
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert img.evaluate("img => img.naturalWidth") > 0
    page.get_by_text("3.0 s of video analysed").wait_for()
    assert "This run is a machinery test (synthetic data and random-weight backbones)" in page.inner_text("body")
    shot = Path(os.environ.get("AVAR_APP_SCREENSHOT") or app["tmp"] / "app_result.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert "127.0.0.1" in hosts


def test_broken_and_oversized_uploads_give_their_message(app, pages):
    new, _ = pages
    page = new()
    _upload(page, app["tmp"] / "notes.mp4")
    page.get_by_text("notes.mp4: cannot be read as a video").wait_for()
    assert "Traceback" not in page.inner_text("body")
    page2 = new()
    _upload(page2, app["tmp"] / "big.mp4")
    page2.get_by_text("or smaller").first.wait_for()              # refused in the browser: 1 MB limit
    assert "Top class" not in page2.inner_text("body")
    assert app["proc"].poll() is None                             # the server is still up


def test_two_uploads_at_once_both_succeed(app, pages):
    new, _ = pages
    p1, p2 = new(), new()
    _upload(p1, app["clips"]["a"]); _upload(p2, app["clips"]["b"])
    p1.get_by_text("3.0 s of video analysed").wait_for()
    p2.get_by_text("2.0 s of video analysed").wait_for()
    assert f"Top class: {app['expected']['a']} (" in p1.inner_text("body")
    assert f"Top class: {app['expected']['b']} (" in p2.inner_text("body")
    left = [p for p in Path(tempfile.gettempdir()).glob("avar_app_*") if list(p.glob("*.mp4"))]
    assert not left, f"uploads not deleted: {left}"


def test_bundled_example(app, pages):
    new, _ = pages
    page = new()
    page.get_by_text("Bundled example").click()
    page.get_by_role("button", name="Analyse this example").click()      # the first example: SynthAVAR, Explosion
    # 6 s: a SynthAVAR example (SynthXD's last 10 s)
    page.get_by_text("6.0 s of video analysed").wait_for()
    assert "Top class:" in page.inner_text("body")
