"""mkdocs hook: the example notebooks become pages of the site.

Each `examples/<name>.ipynb` of the repository is added under the same path (the file itself, not a
copy; its page is `examples/<name>/`), and the mkdocs-jupyter plugin renders it with the outputs stored
in it -- prints and plots -- without executing anything. `python examples/run_notebooks.py --save`
refreshes those outputs; tests/test_notebooks.py fails while they are stale.
"""

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@event_priority(100)   # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    for path in sorted(EXAMPLES.glob("*.ipynb")):
        # a File rooted at the repository (not a generated one): mkdocs-jupyter finds the source by its src_dir
        files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def on_serve(server, config, builder):
    server.watch(str(EXAMPLES))   # `mkdocs serve` rebuilds when a notebook changes
    return server
