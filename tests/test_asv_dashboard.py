"""The asv dashboard renders: a quick asv run of a tiny subset, `asv publish`, then headless Chromium loads a
benchmark's graph page from a localhost http server (the dashboard fetches JSON, so file:// will not do) and
the DOM must hold the benchmark names and a drawn flot graph.

Skips when Chromium is absent, except in CI (CI=true), where .ci/run installs it and its absence is a failure.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = f"headless Chromium not found (looked for {', '.join(BROWSERS)}; apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + ": CI must install it (.ci/run)")
    pytest.skip(message)


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}"
    return proc.stdout


def load_config() -> dict:
    text = (ROOT / "asv.conf.json").read_text()
    return json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE))  # asv allows // comment lines


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> Path:
    """A dashboard published from a fresh quick run into a temporary results and html directory."""
    find_chromium()  # skip (or fail in CI) before the slow part
    if not (ROOT / ".git").exists():
        pytest.skip("asv needs the git checkout (results are recorded against a commit)")
    tmp = tmp_path_factory.mktemp("asv")
    conf = load_config()
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), env_dir=str(tmp / "env"),
                results_dir=str(tmp / "results"), html_dir=str(tmp / "html"))
    (tmp / "asv.conf.json").write_text(json.dumps(conf))
    env = dict(os.environ)
    # asv keeps its machine description in ~/.asv-machine.json: a private HOME leaves the real one alone;
    # the kernel caches stay where they were
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env.update(HOME=str(tmp / "home"), SEQFAST_ASV_GRID="tiny", SEQFAST_ASV_CELLS="lstm,gru",
               SEQFAST_ASV_BACKENDS="torch.nn,native,torch")
    (tmp / "home").mkdir()
    asv = [sys.executable, "-m", "asv"]
    config = ["--config", str(tmp / "asv.conf.json")]
    head = run(["git", "rev-parse", "HEAD"], env).strip()
    run([*asv, "machine", "--yes", "--machine", "dashboard-test"], env)
    run([*asv, "run", *config, "--python=same", "--quick", "--machine", "dashboard-test", "--set-commit-hash", head,
         "--bench", r"Forward\.time_forward"], env, timeout=180)
    run([*asv, "publish", *config], env)
    run([sys.executable, str(ROOT / ".ci" / "asv_offline_dashboard.py"), str(tmp / "html"),
         "--cache", str(ROOT / ".asv" / "vendor")], env, timeout=300)
    return tmp / "html"


@pytest.fixture(scope="module")
def server(dashboard: Path):
    handler = functools.partial(_QuietHandler, directory=str(dashboard))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def render(url: str, tmp_path: Path) -> str:
    """The DOM after the page's scripts ran (virtual time lets its timers and fetches finish)."""
    cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=20000", "--window-size=1280,900", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_published_files(dashboard: Path) -> None:
    index = json.loads((dashboard / "index.json").read_text())
    names = set(index["benchmarks"])
    assert "bench_recurrent.Forward.time_forward" in names, sorted(names)
    assert list(dashboard.glob("graphs/**/bench_recurrent.Forward.time_forward.json"))
    assert "https://" not in (dashboard / "index.html").read_text().split("<body")[0], "CDN scripts left in place"


def test_graph_page_renders(server: str, tmp_path: Path) -> None:
    dom = render(server + "#bench_recurrent.Forward.time_forward", tmp_path)
    assert "airspeed velocity error" not in dom, "a script failed to load: asv showed its error page"
    assert "bench_recurrent.Forward.time_forward" in dom  # the benchmark list and the graph's title
    assert 'class="flot-base"' in dom, "no flot canvas: the graph did not render"
    assert "flot-tick-label" in dom, "the graph has no axis labels"
    for param in ("lstm", "gru", "torch.nn", "native"):  # the parameter selectors
        assert param in dom


def test_summary_grid_lists_benchmarks(server: str, tmp_path: Path) -> None:
    dom = render(server, tmp_path)
    assert "bench_recurrent.Forward.time_forward" in dom
    assert 'class="flot-base"' in dom, "the summary grid drew no plot"
