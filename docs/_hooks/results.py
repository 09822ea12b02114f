"""MkDocs hook: serve benchmarks/results/ under results/ in the site.

The measured tables, plots, CSVs and study reports are written by the benchmark and study scripts
into benchmarks/results/, outside docs/. Pages include their tables with snippets; this hook also
makes every file there linkable as `results/...` (each table and study report a page of its own,
listed under "Measured results" in the nav), so the docs never keep a copy of a measurement and a
new results file needs no edit here.
"""

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def site_path(path: Path) -> str:
    return f"results/{path.relative_to(RESULTS).as_posix()}"


def on_config(config):
    pages = sorted(RESULTS.rglob("*.md"))
    entries = [{p.parent.name if p.name == "report.md" else p.stem: site_path(p)} for p in pages]
    config["nav"].append({"Measured results": entries})
    return config


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            files.append(File.generated(config, site_path(path), abs_src_path=str(path)))
    return files
