"""The documentation site in a real browser: `avar-net docs` builds it from this checkout (once per session), a
loopback server serves it, and Debian's chromium-headless-shell, driven by Playwright, opens every page. A page
fails on a load error, an image that did not decode, a console error, a failed or off-machine request, or a results
table (from figures/MANIFEST.json) missing from the page of the notebook that discusses it."""
import csv, functools, http.server, json, threading
from pathlib import Path
import nbformat, pytest
from avar_net.docs import build_site, reading_order
from avar_net.reproduce import readme_blocks

ROOT = Path(__file__).resolve().parents[1]
BROWSER = Path("/usr/lib/chromium/chromium-headless-shell")

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    build_site(out, root=ROOT, log=print)
    return out

@pytest.fixture(scope="module")
def served(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown(); srv.server_close()

@pytest.fixture(scope="module")
def browser():
    if not BROWSER.exists():
        pytest.skip(f"{BROWSER} is absent: apt-get install -y --no-install-recommends chromium-headless-shell")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(BROWSER), args=["--no-sandbox"])
        yield b
        b.close()

def test_every_notebook_of_the_reading_order_has_a_page(site):
    order = reading_order(ROOT / "nbs")
    assert len(order) > 20 and order[0].name == "index.ipynb"
    # independent of reading_order: every numbered notebook in nbs/ is in it
    assert {p.name for p in (ROOT / "nbs").glob("[0-9][0-9]*.ipynb")} <= {p.name for p in order}
    missing = [p.name for p in order if not (site / f"{p.stem}.html").exists()]
    assert not missing, f"notebooks without a page: {missing}"
    nav = (site / "index.html").read_text()
    assert all(f'href="{p.stem}.html"' in nav for p in order), "the navigation misses a page"

def _tables(manifest):
    "{notebook: [(table name, its CSV columns)]} for every table of the committed reproduction."
    out = {}
    for f, a in manifest["artifacts"].items():
        if a["kind"] == "table" and f.endswith(".csv"):
            with open(ROOT / "figures" / f, newline="") as fh: cols = next(csv.reader(fh))
            out.setdefault(a["notebook"], []).append((a["name"], cols))
    return out

def _ran(nb, name: str) -> bool:
    "Whether the executed copy ran (and shows the output of) the cell that saves table or figure `name`."
    return any(c.cell_type == "code" and f'"{name}"' in c.source and c.outputs for c in nb.cells)

def test_every_page_in_a_browser(site, served, browser, tmp_path_factory):
    manifest = json.loads((ROOT / "figures" / "MANIFEST.json").read_text())
    tables, kept = _tables(manifest), manifest.get("notebooks", {})
    figures = {}
    for a in manifest["artifacts"].values():
        if a["kind"] == "figure": figures.setdefault(a["notebook"], []).append(a["name"])
    shots = tmp_path_factory.mktemp("screenshots")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems, seen = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: seen.append(r.url))
    # nothing may leave the machine: any other origin is refused (and reported as a failed request)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((served, "data:"))
               else route.abort())
    checked, required = [], set()
    kept_nb = lambda stem: nbformat.read(str(ROOT / "figures" / kept[stem]["file"]), as_version=4)
    for html in sorted(site.glob("*.html")):
        stem, n0 = html.stem, len(problems)
        resp = page.goto(served + html.name, wait_until="networkidle")
        if resp is None or resp.status != 200: problems.append(f"HTTP {resp and resp.status}")
        page.evaluate("() => new Promise(done => (window.MathJax && MathJax.Hub) ? MathJax.Hub.Queue(done) : done())")
        imgs = page.eval_on_selector_all("img",
                                         "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth])")
        problems += [f"image did not decode: {src}" for src, w in imgs if not w]
        if stem == "index":  # the front page shows the README's result tables
            heads = page.eval_on_selector_all("table",
                                              "ts => ts.map(t => [...t.querySelectorAll('th')].map(h => "
                                              "h.innerText.trim()))")
            for name, body in readme_blocks((ROOT / "README.md").read_text()).items():
                header = next(l for l in body.splitlines() if l.lstrip().startswith("|"))
                cols = [c.strip() for c in header.strip().strip("|").split("|")]
                required.add(name)
                if not any(set(cols) <= set(h) for h in heads):
                    problems.append(f"README result table {name} ({cols[:3]}…) missing")
        if stem in kept:     # every figure the executed copy made (and showed) is on the page
            made = [n for n in figures.get(stem, []) if _ran(kept_nb(stem), n)]
            if len([w for _, w in imgs if w]) < len(made):
                problems.append(f"{len(made)} figures made ({made}), {len(imgs)} shown")
        # the results of an executed copy must be on its page: every table it saved, with its columns
        if stem in kept:
            heads = page.eval_on_selector_all("table",
                                              "ts => ts.map(t => [...t.querySelectorAll('th')].map(h => "
                                              "h.innerText.trim()))")
            for name, cols in tables.get(stem, []):
                if not _ran(kept_nb(stem), name): continue          # e.g. a cell the ci profile skips
                required.add(name)
                if not any(set(cols) <= set(h) for h in heads):
                    problems.append(f"results table {name} ({cols[:3]}…) missing")
        problems[n0:] = [f"{html.name}: {p}" for p in problems[n0:]]
        if stem in ("index", "20_fusion_ablation"):
            # the whole page: its tables and figure
            page.screenshot(path=str(shots / f"{stem}.png"), full_page=stem != "index")
        checked.append(stem)
    page.close()
    print(f"\nchecked {len(checked)} pages, {len(seen)} requests; screenshots: {shots}/index.png, "
          f"{shots}/20_fusion_ablation.png")
    assert not problems, "\n".join(problems)
    assert not [u for u in seen if not u.startswith((served, "data:"))], "requests left the machine"
    assert {"fusion_ablation", "temporal_ablation"} <= required, "the fusion-ablation tables were not checked"
    assert (shots / "index.png").stat().st_size and (shots / "20_fusion_ablation.png").stat().st_size
