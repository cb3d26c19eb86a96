"""The workbench seen in a real browser, with the network off: `make test-browser` (not part of `make test`).

Starts JupyterLab headless on the project's environment, runs the quick-start notebook, notebook 01 and notebook 06
with small parameters through JupyterLab's menu (Run > Run All Cells) in headless Chromium, checks that no cell
errored and that every plotly figure drew (map outlines included), then drives notebook 06's steering panel as a user
would: the strength typed as 0, Generate (controls disabled and a progress bar shown meanwhile; the steered
completion equals the baseline), the slider moved to its end with the keyboard, Generate again (the steered
completion changes). Then it opens the demo's report pages (runs/demo/index.html and the pages it links) from the file
system and checks every figure drew. Every request not to this machine is refused and fails the check. Screenshots
go to docs/screenshots/.

    .venv/bin/python tests/browser/check_browser.py [--notebooks 01_space_time.ipynb ...] [--demo PATH | --skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SHOTS = ROOT / "docs" / "screenshots"
DEMO = ROOT / "runs" / "demo" / "index.html"
MAX_PNG_BYTES = 500_000
MAX_PAGE_HEIGHT = 1800
VIEWPORT = {"width": 1280, "height": 1000}
RUN_TIMEOUT_S = 1800
# Small parameters per notebook, set after its own ("{out}" is replaced by a scratch folder).
NOTEBOOK_PARAMS = {
    "00_quickstart.ipynb": {"N_PLACES": 200, "N_INSTRUCTIONS": 8, "N_SHOW": 1, "MAX_NEW_TOKENS": 12, "OUT": "{out}"},
    "01_space_time.ipynb": {"MODEL": "embedded",
                            "DATASETS": ["world_place", "us_place", "nyc_place", "art", "historical_figure",
                                         "headline"],
                            "N_ENTITIES": 300, "TEMPLATES": ["empty"], "OUT": "{out}"},
    "06_steering_panel.ipynb": {"N_INSTRUCTIONS": 16, "MAX_NEW_TOKENS": 16, "PATCH_LAYER_STEP": 3},
}
# Screenshots per notebook: file name, and the code that starts the cell shown at the top.
SCREENSHOTS = {"00_quickstart.ipynb": [("quickstart_probe.png", "px.scatter("),
                                       ("quickstart_steer.png", "side_by_side(")],
               "01_space_time.ipynb": [("space_time_maps.png", "figures = ")],
               "06_steering_panel.ipynb": [("patching_heatmap.png", "from probes.forward import chat_token_ids")]}
REPORT_SHOTS = {"space_time": "report_space_time.png", "refusal": "report_refusal.png"}  # demo folder: screenshot
MIN_OUTLINED_MAPS = {"01_space_time.ipynb": 2}  # world and US (NYC is too small for the shipped outlines)
# JupyterLab settings for the check: every cell in the DOM (so every figure draws), no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


class Offline:
    """Route handler that lets through only requests to this machine (or files) and records every other one."""

    def __init__(self) -> None:
        self.blocked: list[str] = []

    def __call__(self, route: Route) -> None:
        url = urlparse(route.request.url)
        if url.scheme in ("file", "data", "blob") or url.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lab_settings(folder: Path) -> None:
    """JupyterLab user settings (LAB_SETTINGS) under ``folder``."""
    for name, values in LAB_SETTINGS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def start_lab(port: int, token: str, scratch: Path) -> subprocess.Popen:
    """JupyterLab on notebooks/ in this Python environment, headless; returns once it answers."""
    write_lab_settings(scratch / "settings")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               JUPYTERLAB_SETTINGS_DIR=str(scratch / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(scratch / "workspaces"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--IdentityProvider.token={token}",
           f"--port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--notebook-dir={NOTEBOOKS}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           *(["--allow-root"] if os.geteuid() == 0 else [])]
    log = (scratch / "lab.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"JupyterLab exited ({proc.returncode}); see its log:\n{(scratch / 'lab.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    sys.exit("JupyterLab did not answer within 120 s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the JupyterLab server (and with it its kernels)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def prepare_notebook(name: str, folder: Path) -> Path:
    """A copy of notebooks/name in ``folder`` with NOTEBOOK_PARAMS[name] set at the end of its parameters cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        sys.exit(f"{name} needs exactly one cell tagged 'parameters'")
    out = folder / f"out_{Path(name).stem}"
    params = {k: (str(out) if v == "{out}" else v) for k, v in NOTEBOOK_PARAMS[name].items()}
    cells[0].source += "".join(f"\n{k} = {v!r}" for k, v in params.items())
    path = folder / name
    nbformat.write(nb, path)
    return path


def menu(page: Page, bar_label: str, item_label: str) -> None:
    """Click ``bar_label`` in JupyterLab's menu bar, then its item ``item_label``."""
    page.click(f".lm-MenuBar-itemLabel:text-is('{bar_label}')")
    page.click(f".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel:text-is('{item_label}')")


def notebook_state(page: Page) -> dict:
    """The open notebook's kernel status (as the status bar shows it: 'idle' once started) and input prompts."""
    return page.evaluate("""() => ({
        status: ([...document.querySelectorAll('.jp-StatusBar-Widget')].map(e => e.textContent).join(' ')
                 .match(/\\| ([A-Z][a-z]+)/) ?? [])[1]?.toLowerCase(),
        prompts: [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
                 .map(e => e.textContent.trim())})""")


def wait_until(page: Page, check, timeout_s: float, what: str, poll_s: float = 2.0) -> None:
    """Poll ``check()`` until it is true, or fail naming ``what``. Waits in the page, never in time.sleep: the
    route handler (Offline) only runs while playwright has control."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(poll_s * 1000)


def run_all_cells(page: Page, url: str) -> float:
    """Open ``url`` (a notebook in JupyterLab), run all its cells from the Run menu; seconds taken to run them."""
    page.goto(url)
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=120_000)
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()  # file browser closed: room
    wait_until(page, lambda: notebook_state(page)["status"] == "idle", 120, "the kernel to start")
    start = time.monotonic()
    menu(page, "Run", "Run All Cells")
    started = lambda: any("*" in p for p in notebook_state(page)["prompts"])  # noqa: E731
    wait_until(page, started, 60, "the cells to start running", 0.5)

    def finished() -> bool:
        state = notebook_state(page)
        return state["status"] == "idle" and not any("*" in p for p in state["prompts"])

    wait_until(page, finished, RUN_TIMEOUT_S, "the notebook to finish running")
    return time.monotonic() - start


def saved_errors(page: Page, path: Path) -> list[str]:
    """Save the open notebook from the File menu; the errors recorded in the saved file."""
    menu(page, "File", "Save Notebook")
    saved = lambda: page.locator(".lm-TabBar-tab.jp-mod-dirty").count() == 0  # noqa: E731
    wait_until(page, saved, 60, "the notebook to be saved", 0.5)
    nb = nbformat.read(path, as_version=4)
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def page_errors(page: Page) -> list[str]:
    """Tracebacks and error lines shown in the notebook's outputs, and code cells left unexecuted."""
    return page.evaluate(r"""() => {
        const out = [];
        document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').forEach((cell, i) => {
            const prompt = cell.querySelector('.jp-InputPrompt')?.textContent.trim() ?? '';
            const source = cell.querySelector('.jp-InputArea-editor')?.textContent.trim() ?? '';
            if (source && !/\[\d+\]/.test(prompt)) out.push(`code cell ${i} did not run (${prompt})`);
            cell.querySelectorAll('.jp-OutputArea-output').forEach(o => {
                const text = o.textContent;
                const stderr = o.dataset.mimeType === 'application/vnd.jupyter.stderr';
                if ((stderr && text.includes('Traceback')) || /^\w*Error\b/m.test(text))
                    out.push(`code cell ${i}: ${text.trim().split('\n').slice(-1)[0].slice(0, 200)}`);
            });
        });
        return out;
    }""")


FIGURES_JS = r"""(selector) => [...document.querySelectorAll(selector)].map(el => {
    const plot = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
    const title = el.querySelector('.gtitle')?.textContent ?? '';
    const nonEmpty = p => (p.getAttribute('d') ?? '').length > 10;
    return {
        drawn: el.querySelector('.main-svg') !== null, title,
        map: el.querySelector('.geolayer .geo') !== null || /locations|map/i.test(title),
        lineTraces: (plot?._fullData ?? []).filter(t => t.visible === true && /lines/.test(t.mode ?? '')).length,
        linesDrawn: [...el.querySelectorAll('.trace')].filter(t => [...t.querySelectorAll('path.js-line')]
                                                                .some(nonEmpty)).length,
        outlines: /outline/i.test((plot?._fullData ?? []).map(t => t.name).join(' ')),
    };
})"""


def figure_problems(figures: list[dict], where: str) -> list[str]:
    """Figures that did not draw, line traces (map outlines among them) that drew no line."""
    problems = [f"{where}: figure {i} ({f['title'] or 'untitled'}) did not draw" for i, f in enumerate(figures)
                if not f["drawn"]]
    problems += [f"{where}: figure {i} ({f['title']}) drew {f['linesDrawn']} of its {f['lineTraces']} line traces"
                 for i, f in enumerate(figures) if f["drawn"] and f["linesDrawn"] < f["lineTraces"]]
    return problems if figures else [f"{where}: no plotly figure found"]


def wait_for_figures(page: Page, selector: str, timeout_s: float = 60) -> list[dict]:
    """The figures under ``selector`` once all have drawn (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = page.evaluate(FIGURES_JS, selector)
        if all(f["drawn"] for f in figures) or time.monotonic() > deadline:
            return figures
        page.wait_for_timeout(1000)


def screenshot(page: Page, name: str, full_page: bool = False) -> Path:
    """A PNG of the page (its top MAX_PAGE_HEIGHT pixels if ``full_page``) in docs/screenshots/name, cut shorter
    until it is under MAX_PNG_BYTES."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page.mouse.move(1, VIEWPORT["height"] - 1)  # off the figures: no hover labels
    page.add_style_tag(content=".modebar-container { display: none !important; }")  # nor plotly's toolbar
    height = min(page.evaluate("() => document.documentElement.scrollHeight"), MAX_PAGE_HEIGHT) if full_page \
        else VIEWPORT["height"]
    while True:
        clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
        page.screenshot(path=path, full_page=full_page, clip=clip)
        if path.stat().st_size < MAX_PNG_BYTES or height <= 400:
            return path
        height = int(height * 0.75)


def check_notebook(context: BrowserContext, base: str, token: str, folder: Path, name: str) -> list[str]:
    """Run notebooks/name (small parameters) in JupyterLab; problems found, after its screenshot is saved."""
    path = prepare_notebook(name, folder)
    page = context.new_page()
    seconds = run_all_cells(page, f"{base}/lab/tree/{path.relative_to(NOTEBOOKS).as_posix()}?reset&token={token}")
    problems = page_errors(page) + saved_errors(page, path)
    figures = wait_for_figures(page, ".jp-NotebookPanel .jp-RenderedPlotly")
    problems += figure_problems(figures, name)
    maps = sum(f["map"] for f in figures)
    outlined = sum(f["map"] and f["outlines"] and f["linesDrawn"] > 0 for f in figures)
    print(f"{name}: ran in {seconds:.0f} s, {len(figures)} figures ({maps} maps, {outlined} with outlines drawn)")
    if outlined < MIN_OUTLINED_MAPS.get(name, 0):
        problems.append(f"{name}: {outlined} maps with outlines drawn, expected {MIN_OUTLINED_MAPS[name]}")
    if name in PANEL_CHECKS:
        problems += drive_panel(page, *PANEL_CHECKS[name])
    for file, code in SCREENSHOTS[name]:
        scroll_to_cell(page, code)
        print(f"  screenshot: {screenshot(page, file).relative_to(ROOT)}")
    page.close()
    return problems


PANEL = ".jp-NotebookPanel .steering-panel"  # steering/panel.py's CSS classes
PANEL_STATE_JS = r"""(panel) => {
    const p = document.querySelector(panel), steered = p.querySelector('.steering-steered');
    return {run: Number(p.querySelector('.steering-result')?.dataset.run ?? 0),
            baseline: p.querySelector('.steering-baseline')?.textContent ?? null, steered: steered?.textContent ?? null,
            edit: steered?.previousElementSibling?.textContent ?? '',
            error: p.querySelector('.steering-error')?.textContent ?? null,
            strength: p.querySelector('.steering-strength .widget-readout')?.textContent.trim(),
            busy: p.querySelector('.steering-generate').disabled
                  && getComputedStyle(p.querySelector('.steering-progress')).display !== 'none'};
}"""
# Notebooks with a steering panel: (screenshot of it, code that starts the cell shown above it).
PANEL_CHECKS = {"06_steering_panel.ipynb": ("steering_panel.png", "sae = load_sae(")}
GENERATE_TIMEOUT_MS = 600_000


def press_generate(page: Page) -> tuple[dict, bool]:
    """Click the panel's Generate; its state once the new result (or an error) shows, and whether Generate was
    disabled with the progress bar shown while it ran."""
    before = page.evaluate(PANEL_STATE_JS, PANEL)["run"]
    page.click(f"{PANEL} .steering-generate")
    try:
        page.wait_for_function(f"() => ({PANEL_STATE_JS})({PANEL!r}).busy", timeout=30_000, polling=100)
        busy_seen = True
    except PlaywrightTimeout:
        busy_seen = False
    page.wait_for_function(f"""() => {{ const s = ({PANEL_STATE_JS})({PANEL!r});
                                        return !s.busy && (s.run > {before} || s.error !== null); }}""",
                           timeout=GENERATE_TIMEOUT_MS, polling=250)
    return page.evaluate(PANEL_STATE_JS, PANEL), busy_seen


def drive_panel(page: Page, shot: str, code_above: str) -> list[str]:
    """Steer by hand: strength 0 typed into the slider's readout and Generate (the steered completion must equal
    the baseline), then the slider moved to its end with the keyboard and Generate (it must change); problems
    found, after a screenshot of the panel."""
    scroll_to_cell(page, code_above)
    readout = page.locator(f"{PANEL} .steering-strength .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("0")
    page.keyboard.press("Enter")
    zero, busy_zero = press_generate(page)
    page.locator(f"{PANEL} .steering-strength .noUi-handle").focus()
    page.keyboard.press("End")
    large, busy_large = press_generate(page)
    print(f"  panel at strength {zero['strength']}: {zero['steered']!r}\n"
          f"  panel at strength {large['strength']}: {large['steered']!r} (baseline {large['baseline']!r})")
    problems = [f"steering panel: {s['error']}" for s in (zero, large) if s["error"] is not None]
    if not problems:
        problems += [] if busy_zero and busy_large else ["steering panel: Generate not disabled, or no progress bar, "
                                                         "while generating"]
        problems += [] if zero["edit"].endswith("strength 0") and zero["steered"] == zero["baseline"] else \
            [f"steering panel: at strength 0 ({zero['edit']}) the steered completion differs from the baseline"]
        problems += [] if float(large["strength"]) > 0 and large["steered"] != zero["steered"] else \
            [f"steering panel: the slider moved to {large['strength']}, the steered completion did not change"]
    scroll_to_cell(page, code_above)
    print(f"  screenshot: {screenshot(page, shot).relative_to(ROOT)}")
    return problems


def scroll_to_cell(page: Page, code: str) -> None:
    """Scroll the notebook so that the first code cell starting with ``code`` is at the top."""
    page.evaluate("""(code) => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')]
        .find(c => c.querySelector('.jp-InputArea-editor')?.textContent.trim().startsWith(code))
        ?.scrollIntoView({block: 'start'})""", code)
    page.wait_for_timeout(1000)


def local_links(page: Page) -> list[str]:
    """The file:// HTML pages the open page links to."""
    return page.evaluate("""() => [...new Set([...document.querySelectorAll('a[href]')].map(a => a.href)
        .filter(h => h.startsWith('file:') && /\\.html?$/.test(h.split('#')[0])))]""")


def open_report(context: BrowserContext, url: str, shot: str | None = None) -> tuple[list[dict], list[str]]:
    """Open a report page from the file system (screenshot ``shot`` of it, full page); its figures and the local
    pages it links to."""
    page = context.new_page()
    page.goto(url)
    figures = wait_for_figures(page, ".plotly-graph-div")
    print(f"{url.removeprefix('file://')}: {len(figures)} figures, {sum(f['drawn'] for f in figures)} drawn")
    if shot:
        print(f"  screenshot: {screenshot(page, shot, full_page=True).relative_to(ROOT)}")
    links = local_links(page)
    page.close()
    return figures, links


def check_demo(context: BrowserContext, index: Path) -> list[str]:
    """The demo's index page and every report page it links to; problems found."""
    figures, links = open_report(context, index.resolve().as_uri(), "demo_index.png")
    problems = figure_problems(figures, str(index)) if figures else []
    count = len(figures)
    for link in links:
        figures, _ = open_report(context, link, REPORT_SHOTS.get(Path(urlparse(link).path).parent.name))
        problems += figure_problems(figures, link.removeprefix("file://")) if figures else []
        count += len(figures)
    if not links or not count:
        problems.append(f"{index}: links {len(links)} report pages holding {count} figures")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="*", default=list(NOTEBOOK_PARAMS), help="notebooks to run")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the demo's index page (default: %(default)s)")
    parser.add_argument("--skip-demo", action="store_true", help="do not open the demo's pages")
    args = parser.parse_args()
    missing = [n for n in args.notebooks if not (NOTEBOOKS / n).is_file()]
    missing += [] if args.skip_demo or args.demo.is_file() else [str(args.demo)]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}")
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    offline, problems = Offline(), []
    with (tempfile.TemporaryDirectory(prefix="_browser_check_", dir=NOTEBOOKS) as copies,
          tempfile.TemporaryDirectory(prefix="browser_check_lab_") as scratch, sync_playwright() as pw):
        browser: Browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT)
        context.route("**/*", offline)
        if args.notebooks:
            port, token = free_port(), secrets.token_hex(16)
            lab = start_lab(port, token, Path(scratch))
            try:
                for name in args.notebooks:
                    problems += check_notebook(context, f"http://127.0.0.1:{port}", token, Path(copies), name)
            finally:
                stop(lab)
        if not args.skip_demo:
            problems += check_demo(context, args.demo)
        browser.close()
    problems += [f"request to the network: {url}" for url in offline.blocked]
    print("\n".join(["", *problems, f"browser check: {'FAILED' if problems else 'passed'}"]))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
