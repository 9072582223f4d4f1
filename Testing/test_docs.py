"""The documentation is tested: the MkDocs site builds in strict mode (a broken link, a missing
page, an unresolved API reference or a missing benchmark output fails the build), its generated
parts come from the shipped model cards and the benchmark outputs, and the Python examples on
its pages and in the README run on the bundled sample.

Python examples: every fenced block marked ```python runs, the blocks of one page in order in
one namespace (like a notebook), in a temporary folder that holds the bundled sample CT under
the names the examples use (`SAMPLE_NAMES`). A block that cannot run here says so on its first
line: `# docs-test: skip (reason)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCS = REPOSITORY / "docs"
#: the file names under which the examples find the bundled sample (256 x 256 x 16 CT, HU)
SAMPLE_NAMES = ("ct.nii.gz", "my_scan.nii.gz")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"^\s*#\s*docs-test:\s*skip\b")
#: internal shorthand a reader who was not in the room cannot follow
SHORTHAND = re.compile(r"\b(issue|paper)s? \d{1,3}\b|\bour machines?\b", re.IGNORECASE)


def _pages() -> list[Path]:
    pages = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts and "scripts" not in p.parts)
    return pages + [REPOSITORY / "README.md"]


def _package_root() -> Path:
    spec = importlib.util.find_spec("MedSRLib")
    assert spec is not None and spec.submodule_search_locations, "MedSRLib is not importable"
    return Path(list(spec.submodule_search_locations)[0])


def _bundled_sample() -> Path:
    found = sorted(_package_root().rglob("ct_abdomen_sample.nrrd"))
    assert found, "the bundled sample ct_abdomen_sample.nrrd is not in the installed package"
    return found[0]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, dedented code) of every ```python block of a Markdown page."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("body").splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, code))
    return blocks


def _mkdocs_missing() -> str | None:
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings", "mkdocstrings"),
                            ("mkdocstrings_handlers.python", "mkdocstrings-python"),
                            ("matplotlib", "matplotlib")):
        try:
            if importlib.util.find_spec(module) is None:
                return package
        except ModuleNotFoundError:
            return package
    return None


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    missing = _mkdocs_missing()
    if missing:
        pytest.skip(f"{missing} is not installed: pip install -e '.[docs]' to build the site")
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(REPOSITORY / "mkdocs.yml"), "--site-dir", str(site)],
                            cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return site


def test_site_builds_in_strict_mode_with_every_page(built_site):
    for page in _pages()[:-1]:
        relative = page.relative_to(DOCS).with_suffix("")
        html = built_site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert html.is_file(), f"{page.relative_to(REPOSITORY)} was not built ({html})"


def test_model_page_has_a_section_for_every_shipped_card(built_site):
    cards = sorted(_package_root().rglob("weights/*.json"))
    assert cards, "no model cards in the installed package"
    html = (built_site / "models" / "index.html").read_text(encoding="utf-8")
    for card in cards:
        anchor = "card-" + card.stem.replace("_", "-").replace(".", "-").lower()
        assert f'id="{anchor}"' in html, f"no section for the card {card.name}"
        model = json.loads(card.read_text(encoding="utf-8")).get("model")
        assert model and f"<code>{model}</code>" in html


def test_results_page_is_generated_from_the_benchmark_outputs(built_site):
    from PIL import Image

    results = REPOSITORY / "benchmarks" / "results"
    html = (built_site / "results" / "index.html").read_text(encoding="utf-8")
    frontier = json.loads((results / "frontier" / "frontier.json").read_text(encoding="utf-8"))
    for row in frontier["rows"]:
        if row["frontier"]:
            assert f"{row['gain_db']:+.2f} dB / {row['ms']:.0f} ms" in html, row
    for benchmark in ("ct", "mr", "xr"):
        command = json.loads((results / benchmark / "results.json").read_text(encoding="utf-8"))["command"]
        assert command in html, f"the {benchmark} table does not come from {benchmark}/results.json"
    for chart in ("frontier.png", "per_volume_ct.png", "per_volume_mr.png", "through_plane_gain.png"):
        path = built_site / "generated" / chart
        assert f"generated/{chart}" in html
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200, chart


def test_pages_use_no_internal_shorthand():
    found = [f"{page.relative_to(REPOSITORY)}:{number}: {match.group(0)!r}"
             for page in _pages()
             for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1)
             for match in SHORTHAND.finditer(line)]
    assert not found, "internal shorthand:\n" + "\n".join(found)


def test_built_site_uses_no_internal_shorthand(built_site):
    """Also what the site renders from docstrings and model cards."""
    import html

    found = []
    for page in sorted(built_site.rglob("*.html")):
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))))
        found += [f"{page.relative_to(built_site)}: ...{text[max(0, m.start() - 60):m.end() + 30]}..."
                  for m in SHORTHAND.finditer(text)]
    assert not found, "internal shorthand in the built site:\n" + "\n".join(found)


def test_readme_fits_two_screens_and_shows_the_essentials():
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:60])
    for needed in ("make demo", "make test", "medsr upscale", "MedSRLib.upscale", ".png)"):
        assert needed in first_screen, f"{needed!r} is not in the README's first screen"
    for picture in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text):
        path = REPOSITORY / picture
        assert path.is_file(), f"README picture missing: {picture}"
        assert path.stat().st_size < 500_000, f"{picture} is {path.stat().st_size} bytes"


#: the README's examples run in their own test below, which also checks what they wrote
PAGES_WITH_EXAMPLES = [p for p in _pages()[:-1] if python_blocks(p)]


def run_examples(page: Path, folder: Path) -> int:
    """Run a page's ```python blocks in `folder` (holding the sample); returns how many ran."""
    import SimpleITK as sitk

    sample = sitk.ReadImage(str(_bundled_sample()))
    for name in SAMPLE_NAMES:
        sitk.WriteImage(sample, str(folder / name))
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    for line, code in python_blocks(page):
        if SKIP.match(code):
            continue
        try:
            exec(compile(code, f"{page.relative_to(REPOSITORY)}:{line}", "exec"), namespace)
        except Exception as error:  # the page, the line and the error are the report
            pytest.fail(f"{page.relative_to(REPOSITORY)}, example at line {line}: "
                        f"{type(error).__name__}: {error}")
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES,
                         ids=[str(p.relative_to(REPOSITORY)) for p in PAGES_WITH_EXAMPLES])
def test_python_examples_run_on_the_bundled_sample(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if run_examples(page, tmp_path) == 0:
        pytest.skip(f"every example on {page.name} is marked '# docs-test: skip'")


def test_readme_own_scan_example_writes_the_upscaled_volume(tmp_path, monkeypatch):
    import SimpleITK as sitk

    monkeypatch.chdir(tmp_path)
    assert run_examples(REPOSITORY / "README.md", tmp_path) >= 1
    source = sitk.ReadImage(str(tmp_path / "my_scan.nii.gz"))
    result = sitk.ReadImage(str(tmp_path / "my_scan_x2.nrrd"))
    assert result.GetSize() == (2 * source.GetSize()[0], 2 * source.GetSize()[1], source.GetSize()[2])
    assert result.GetSpacing()[0] == pytest.approx(source.GetSpacing()[0] / 2, rel=1e-6)
    assert result.GetPixelID() == source.GetPixelID()
