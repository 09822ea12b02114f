#!/bin/bash
# Issue 28's studies in the background, resumable: rerunning this script continues where it stopped
# (each study resumes stage by stage, training from its last checkpoint; finished arms are skipped).
#
#   cd REPO && setsid nohup benchmarks/study_runs.sh > RUNS/run_all.log 2>&1 &
#
# One study at a time: the 32 px backbones, then the distillation, then the 64 px backbones, each in
# RUNS/<config name>/ with its log in RUNS/<config name>.log and a line per start and end in
# RUNS/progress.log. On an idle 2-core machine, LANES=2 runs the distillation and 64 px studies beside
# the 32 px one (two single-threaded processes). The report stage is rerun every time (seconds), so a
# report always comes from the current code. Commit a finished study with its report:
#   cp -r RUNS/NAME/report/* benchmarks/results/NAME/ && cp RUNS/NAME/study.json benchmarks/results/NAME/
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
RUNS=${RUNS:-/work/runs/study-28}
THREADS=${THREADS:-1}
mkdir -p "$RUNS"

run_study() {
    local name=$1 out=$RUNS/$1
    rm -f "$out/.stages/report.json"  # the report is rewritten by the current code
    echo "$(date '+%F %T') start $name" >> "$RUNS/progress.log"
    (cd "$REPO" && PYTHONPATH="$REPO/src" OMP_NUM_THREADS=$THREADS nice -n 10 \
        python -m ditkit.cli.main study "$name" --out "$out" --resume --no-progress) >> "$RUNS/$name.log" 2>&1
    local code=$?
    echo "$(date '+%F %T') end $name (exit $code)" >> "$RUNS/progress.log"
    return $code
}

backbones() { run_study study-backbones; }
the_rest() { run_study study-distillation; run_study study-backbones-64; }

if [ "${LANES:-1}" = 2 ]; then
    backbones & the_rest & wait
else
    backbones; the_rest
fi
