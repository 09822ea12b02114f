"""The documentation: the site builds strictly, and every measurement it quotes comes from a results file.

The site (mkdocs.yml, docs/) is built with `mkdocs build --strict`: a broken link or anchor, a page
missing from the nav, a snippet naming a missing file or an API page naming a missing module fails.

Measured tables are included from benchmarks/results/ with snippets (`--8<-- "benchmarks/results/x.md"`)
and never retyped. Prose may still quote a measurement; the rule below decides what counts as one and
checks that it is there in the results (the files under benchmarks/results/: the benchmark tables, the
study reports and their CSVs), so a number typed by hand, or left behind when a benchmark is re-run,
fails.

What is read: README.md and every page under docs/, after removing what is not prose: fenced code
blocks, inline code spans (commands, settings such as `radius=8` or `lr=1e-4`), snippet lines,
link targets and image paths (`](...)`), bare URLs, HTML comments, the numbering of headings
(`## 2. Foo`), versions (`torch==2.13.0`, `torch >= 2.4`, `mkdocs 1.6`, any dotted triple such as
2.13.0) and arXiv identifiers (arXiv 2412.16112).

What is a measurement, in the prose that is left:
  1. a number with a decimal point, with or without a unit or an "x" after it: 26.5, 0.940, 1.82x,
     4.8 s, 2.4e-7, -75.7%. Its value must equal a number in a results file (26.50 equals 26.5;
     thousands separators are ignored);
  2. an integer directly followed by a unit of time (ms, s, min, h, seconds, minutes, hours), memory
     (KB, MB, GB, KiB, MiB, GiB, TiB), work (GFLOPs, TFLOPs, GMACs), quality (dB) or speed
     (steps/s), by a percent sign, or by an M/B count suffix (675M, 12B): 7 min 41 s, 569 MiB, 99%.
     The integer must occur with that unit in a results file: next to it (80 GiB, 50%), or in a
     table column whose header names the unit (2557 in a "peak MiB" column).
Not measurements: integers without a unit (resolutions such as 256 px, steps, seeds, radii, row
counts, paper years), integer ratios (2x, 4x the training size: settings), and numbers written as
code. A decimal setting in prose is written as code (`strength=0.5`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

UNITS = ("ms", "s", "min", "h", "seconds", "minutes", "hours", "KB", "MB", "GB", "KiB", "MiB", "GiB", "TiB",
         "GFLOPs", "TFLOPs", "GMACs", "dB", "steps/s")
UNIT = r"(?:%|[MB]\b|[ \t]?(?:" + "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True)) + r")(?![\w]))"
NUMBER = r"(?<![\w.,/-])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.]\d)"
MEASURE = re.compile(rf"(?P<number>{NUMBER})(?P<unit>{UNIT})?")

NOT_PROSE = [
    re.compile(r"^(?P<fence>```|~~~).*?^(?P=fence)[^\n]*$", re.S | re.M),  # fenced code blocks
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"^.*--8<--.*$", re.M),  # snippet lines
    re.compile(r"<!--.*?-->", re.S),  # HTML comments
    re.compile(r"\]\([^)]*\)"),  # link targets and image paths
    re.compile(r"https?://\S+"),  # bare URLs
    re.compile(r"^(#+[ \t]+)\d+(?:\.\d+)*\.?(?=[ \t])", re.M),  # heading numbering
    re.compile(r"(?i)\barxiv[ \t:]+\d{4}\.\d{4,5}"),  # arXiv identifiers
    re.compile(r"(?i)(?:[<>=~!]=|\b(?:python|torch|mkdocs|ditkit|diffusers|version|v))[ \t]*\d+(?:\.\d+)+"),
    re.compile(r"\b\d+\.\d+\.\d+\b"),  # dotted triples: versions
]


def prose(markdown: str) -> str:
    """The text of a page that may quote measurements (see the module docstring)."""
    for pattern in NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return markdown


def value(number: str) -> Decimal | None:
    try:
        return abs(Decimal(number.replace(",", ""))).normalize()  # "75.7% saved" quotes "-75.7%"
    except InvalidOperation:
        return None


def unit_of(match: re.Match) -> str | None:
    return match.group("unit").strip() if match.group("unit") else None


def measurements(text: str) -> list[tuple[str, Decimal, str | None]]:
    """(as written, value, unit) of every measurement in `text` (prose already extracted)."""
    found = []
    for match in MEASURE.finditer(text):
        number, unit = match.group("number"), unit_of(match)
        decimal = "." in number
        if decimal or unit:
            found.append((number + (match.group("unit") or ""), value(number), None if decimal else unit))
    return found


def header_units(header: str) -> list[str]:
    """The unit each column of a results table is in, from its header cell ('peak MiB' -> MiB)."""
    cells = [c.strip() for c in header.strip().strip("|").split("|")]
    return [next((u for u in ("%", *UNITS) if re.search(rf"(?<!\w){re.escape(u)}(?!\w)", c)), "") for c in cells]


def column_pairs(text: str) -> set[tuple[Decimal, str]]:
    """(value, unit) of every integer in a results table column whose header names a unit."""
    pairs, units = set(), []
    for line in text.splitlines():
        if not line.startswith("|"):
            units = []
        elif not units:
            units = header_units(line)
        else:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for cell, unit in zip(cells, units, strict=False):
                for match in re.finditer(NUMBER, cell):
                    if unit and value(match.group(0)) is not None:
                        pairs.add((value(match.group(0)), unit))
    return pairs


def results_numbers() -> tuple[set[Decimal], set[tuple[Decimal, str]]]:
    """Every number in the results files, and every (integer, unit) pair they hold."""
    numbers, pairs = set(), set()
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix not in (".md", ".csv"):
            continue
        text = path.read_text()
        for match in MEASURE.finditer(text.replace(",", " ") if path.suffix == ".csv" else text):
            number = value(match.group("number"))
            numbers.add(number)
            if unit_of(match):
                pairs.add((number, unit_of(match)))
        pairs |= column_pairs(text)
    return numbers, pairs


def unsourced(markdown: str, numbers: set[Decimal], pairs: set[tuple[Decimal, str]]) -> list[str]:
    """The measurements quoted in `markdown` that no results file holds."""
    missing = []
    for written, number, unit in measurements(prose(markdown)):
        known = (number, unit) in pairs if unit else number in numbers
        if not known:
            missing.append(written)
    return missing


def documentation() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.fixture(scope="module")
def sources():
    return results_numbers()


def test_every_measurement_the_docs_quote_comes_from_a_results_file(sources):
    problems = {}
    for page in documentation():
        missing = unsourced(page.read_text(), *sources)
        if missing:
            problems[str(page.relative_to(ROOT))] = missing
    assert not problems, ("measurements not found in any file under benchmarks/results/ (include the results "
                          f"file with a snippet, or quote it exactly): {problems}")


def test_a_retyped_measurement_fails_and_settings_pass(sources):
    retyped = "The quickstart took 7 min 41 s; the student reached 26.5 dB, 17.35x faster, 569 MiB, 99% legible."
    assert unsourced(retyped, *sources) == ["7 min", "41 s", "26.5 dB", "17.35", "569 MiB", "99%"]
    settings = ("Train at 256 px for 1,500 steps with `radius=8`, `lr=1e-4` and `strength=0.5`; "
                "4x the training size, seeds 0 and 1, torch >= 2.4, arXiv 2412.16112.\n"
                "```bash\nditkit bench --max-seconds 7.25\n```\n"
                '--8<-- "benchmarks/results/flux-cpu.md"\n![plot](results/a-1.5.png) [v](https://x.org/1.25)\n')
    assert unsourced(settings, *sources) == []


def test_a_measurement_from_a_results_file_passes(sources):
    quoted = "CLEAR r=8 at 2048 px: 5.29x faster than full attention, a step in 1.428 s and 144 MiB at its peak."
    assert unsourced(quoted, *sources) == []
    assert unsourced("at 4096 px a clear step peaked at 2557 MiB", *sources) == []  # a "peak MiB" column
    assert unsourced("at 4096 px a clear step peaked at 2557 GiB", *sources) == ["2557 GiB"]
    assert unsourced("a step in 1.429 s", *sources) == ["1.429 s"]


def test_the_readme_links_to_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs pages"
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_the_site_builds_strictly(tmp_path):
    for module, package in [("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings_handlers.python", "mkdocstrings[python]")]:
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is not installed: pip install -e '.[dev]' to build the docs")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    assert (tmp_path / "index.html").exists() and (tmp_path / "api" / "mixers" / "index.html").exists()
