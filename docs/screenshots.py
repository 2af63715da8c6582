"""Screenshots of the built docs site in headless Chromium, to look at the pages as a reader sees them.

    python docs/screenshots.py OUT_DIR                      # home, flex_attention API, benchmarks, quickstart notebook
    python docs/screenshots.py OUT_DIR --all-notebooks      # ... and every example notebook
    python docs/screenshots.py OUT_DIR --page api/masks/    # ... and other pages (paths under the site root)

Builds the site (`mkdocs build --strict`) into a temporary folder, serves it on 127.0.0.1 with
`python -m http.server`, and writes one PNG per page into OUT_DIR (`--width` x `--height` pixels, the
top of the page). Needs a Chromium binary (`apt-get install chromium` on Debian; `--chromium PATH`
picks another). Nothing leaves the machine: the server listens on the loopback address only.
"""

import argparse
import http.client
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = {"home": "", "api_flex_attention": "api/flex_attention/", "benchmarks": "benchmarks/",
         "notebook_quickstart": "examples/quickstart/"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.2)


def screenshot(chromium: str, url: str, png: pathlib.Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:   # a fresh profile each time: no state between pages
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path, help="folder for the PNG files")
    ap.add_argument("--page", action="append", default=[], help="another page, e.g. api/masks/ (repeatable)")
    ap.add_argument("--all-notebooks", action="store_true", help="every examples/*.ipynb page")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                    or shutil.which("google-chrome"))
    args = ap.parse_args(argv)
    if not args.chromium:
        sys.exit("no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium PATH")

    pages = dict(PAGES)
    if args.all_notebooks:
        pages.update({f"notebook_{p.stem}": f"examples/{p.stem}/" for p in sorted((ROOT / "examples").glob("*.ipynb"))})
    for path in args.page:
        pages[path.strip("/").replace("/", "_") or "home"] = path.lstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        site = pathlib.Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                       cwd=ROOT, check=True)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_serving(port)
            for name, path in pages.items():
                png = (args.out / f"{name}.png").resolve()
                png.unlink(missing_ok=True)
                screenshot(args.chromium, f"http://127.0.0.1:{port}/{path}", png, args.width, args.height)
                print(f"{png}  ({png.stat().st_size // 1024} KB)  <- /{path}")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
