"""MkDocs hook (mkdocs.yml `hooks:`): fills the generated parts of the site at build time.

A page asks for generated content with a marker on a line of its own:

    <!-- medsr:generated NAME [ARGUMENT] -->

NAME is one of `GENERATORS` below (the model cards, the benchmark tables); an unknown name or
a missing benchmark output stops the build. Generated pictures (charts drawn from
benchmarks/results, the benchmark's example images, the Slicer panel screenshot) are added to
the site under `generated/`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_cards  # noqa: E402
import results_pages  # noqa: E402

MARKER = re.compile(r"^<!--\s*medsr:generated\s+([a-z0-9-]+)(?:\s+([^\s>]+))?\s*-->\s*$", re.MULTILINE)
#: the repository's own pictures shown on the pages: (path from the repository root, site name)
REPOSITORY_PICTURES = (("MedSRExtension/Screenshots/slicer-panel.png", "slicer-panel.png"),)


def _repository(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _results(config) -> Path:
    return _repository(config) / "benchmarks" / "results"


GENERATORS = {
    "model-cards": lambda config, arg: model_cards.markdown(),
    "gain-table": lambda config, arg: results_pages.gain_table(_results(config), arg),
    "xr-table": lambda config, arg: results_pages.xr_table(_results(config)),
    "frontier-table": lambda config, arg: results_pages.frontier_table(_results(config)),
    "through-plane-table": lambda config, arg: results_pages.through_plane_table(
        _results(config), arg or "through_plane"),
}


def on_files(files, config):
    """Add the generated pictures to the site (under generated/)."""
    try:
        pictures = results_pages.images(_results(config))
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise PluginError(f"results pictures: {error}") from error
    for source, name in REPOSITORY_PICTURES:
        path = _repository(config) / source
        if not path.is_file():
            raise PluginError(f"picture missing: {path}")
        pictures[name] = path.read_bytes()
    for name, content in pictures.items():
        files.append(File.generated(config, f"generated/{name}", content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    """Replace every generated-content marker of a page by its Markdown."""
    def replace(match: re.Match) -> str:
        name, argument = match.group(1), match.group(2)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated content {name!r} "
                              f"(known: {', '.join(sorted(GENERATORS))})")
        try:
            return GENERATORS[name](config, argument)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
            raise PluginError(f"{page.file.src_uri}: {name}: {error}") from error
    return MARKER.sub(replace, markdown)
