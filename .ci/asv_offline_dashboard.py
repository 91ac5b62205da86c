#!/usr/bin/env python3
"""Make a published asv dashboard work without internet: serve its JavaScript and CSS from the dashboard itself.

asv 0.6's index.html loads jQuery, flot, bootstrap, stupidtable and blueimp-md5 from CDNs, and sends the browser to
error.html when one fails to load: on a machine that reaches only package registries the dashboard never renders.
This fetches the same libraries, at the same versions, from the npm registry with `npm pack` (cached in
.asv/vendor/), copies the files into <html_dir>/vendor/, and points the <script>/<link> tags there (dropping
their subresource-integrity hashes: npm's files are not byte-identical to the CDNs' minified ones).
Run it after every `asv publish` (publish rewrites index.html). Idempotent; standard library only.

usage: python .ci/asv_offline_dashboard.py [HTML_DIR] [--cache DIR]     (defaults: .asv/html, .asv/vendor)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# CDN address -> (npm package@version, file inside the package). jsDelivr's /npm/ addresses are npm paths already.
RULES: list[tuple[str, str, str]] = [
    (r"https://code\.jquery\.com/jquery-(?P<v>[\d.]+)\.min\.js", "jquery@{v}", "dist/jquery.min.js"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/flot/(?P<v>[\d.]+)/(?P<f>jquery\.flot[\w.]*?)\.min\.js",
     "flot@{v}", "{f}.js"),
    # cdnjs's stupidtable 1.0.1 was never published to npm; 1.1.3 has the same $.fn.stupidtable API
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/stupidtable/[\d.]+/stupidtable\.min\.js",
     "stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/blueimp-md5/(?P<v>[\d.]+)/(?P<f>.+)", "blueimp-md5@{v}", "{f}"),
    (r"https://cdn\.jsdelivr\.net/npm/(?P<p>(?:@[^/@]+/)?[^/@]+)@(?P<v>[^/]+)/(?P<f>.+)", "{p}@{v}", "{f}"),
]
TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
URL = re.compile(r"""\b(src|href)=["'](https?://[^"']+)["']""", re.IGNORECASE)
SRI = re.compile(r"""\s+(integrity|crossorigin|referrerpolicy)(=["'][^"']*["'])?""", re.IGNORECASE)


def resolve(url: str) -> tuple[str, str] | None:
    for pattern, spec, path in RULES:
        match = re.fullmatch(pattern, url)
        if match:
            return spec.format(**match.groupdict()), path.format(**match.groupdict())
    return None


def fetch(spec: str, cache: Path) -> Path:
    """The unpacked npm package for `name@version`, downloaded once with `npm pack`."""
    root = cache / spec.replace("/", "__")
    if (root / "package").is_dir():
        return root / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(f"asv_offline_dashboard: npm is needed to fetch {spec} (apt-get install npm)")
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", str(root)],
                          capture_output=True, text=True, timeout=300)
    tarballs = sorted(root.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        raise SystemExit(f"asv_offline_dashboard: `npm pack {spec}` failed:\n{proc.stderr.strip()}")
    with tarfile.open(tarballs[0]) as tar:
        try:
            tar.extractall(root, filter="data")
        except TypeError:  # Python without extraction filters: npm tarballs hold plain files only
            tar.extractall(root)
    return root / "package"


def localize(html_dir: Path, cache: Path) -> list[str]:
    """Rewrite every CDN tag in html_dir/*.html; returns the addresses that were replaced."""
    replaced: list[str] = []
    for page in sorted(html_dir.glob("*.html")):
        text = page.read_text(encoding="utf-8")

        def rewrite(tag_match: re.Match) -> str:
            tag = tag_match.group(0)
            found = URL.search(tag)
            if not found or tag_match.group(1).lower() == "link" and "stylesheet" not in tag:
                return tag
            target = resolve(found.group(2))
            if target is None:
                return tag
            spec, inner = target
            package = fetch(spec, cache)
            source = package / inner
            if not source.is_file():
                raise SystemExit(f"asv_offline_dashboard: {spec} has no {inner}")
            local = Path("vendor") / spec.replace("/", "__") / inner
            (html_dir / local).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, html_dir / local)
            if source.suffix == ".css" and (source.parent.parent / "fonts").is_dir():  # bootstrap's glyphicons
                shutil.copytree(source.parent.parent / "fonts", (html_dir / local).parent.parent / "fonts",
                                dirs_exist_ok=True)
            replaced.append(found.group(2))
            tag = tag.replace(found.group(0), f'{found.group(1)}="{local.as_posix()}"')
            return SRI.sub("", tag)

        new = TAG.sub(rewrite, text)
        if new != text:
            page.write_text(new, encoding="utf-8")
    return replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", nargs="?", default=".asv/html")
    parser.add_argument("--cache", default=".asv/vendor")
    args = parser.parse_args(argv)
    html_dir = Path(args.html_dir)
    if not (html_dir / "index.html").is_file():
        print(f"asv_offline_dashboard: no {html_dir}/index.html (run `asv publish` first)", file=sys.stderr)
        return 1
    replaced = localize(html_dir, Path(args.cache).resolve())
    left = [found.group(2) for page in html_dir.glob("*.html")
            for tag in TAG.finditer(page.read_text(encoding="utf-8"))
            if (found := URL.search(tag.group(0))) and resolve(found.group(2))]
    print(f"asv_offline_dashboard: {len(replaced)} CDN files now served from {html_dir}/vendor")
    if left:
        print(f"asv_offline_dashboard: still external: {left}", file=sys.stderr)
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
