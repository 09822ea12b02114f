"""The seed papers' claims against the committed studies: reads benchmarks/results/study-*/ (study.json and
measurements.csv) and writes benchmarks/results/study-claims.md (`ditkit.study.claims`).

    python benchmarks/study_claims.py                  # after committing a study's report folder
    python benchmarks/study_claims.py --results DIR     # studies elsewhere (e.g. the background runs)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditkit.files import atomic_write_text
from ditkit.study.claims import claims_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="the folder holding the study folders")
    parser.add_argument("--out", default=str(RESULTS / "study-claims.md"))
    args = parser.parse_args()
    table = claims_table(args.results)
    atomic_write_text(Path(args.out), table)
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
