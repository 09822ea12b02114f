import csv

import pytest
import torch

from ditkit import DitkitError
from ditkit.metrics.bench import fitted_slopes, loglog_slope, markdown_report, run_bench, write_report

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loglog_slope_recovers_a_power_law():
    tokens = [64, 256, 1024]
    assert loglog_slope(tokens, [3 * n**2 for n in tokens]) == pytest.approx(2.0)
    assert loglog_slope(tokens, [n for n in tokens]) == pytest.approx(1.0)
    assert loglog_slope([64], [1.0]) is None


@pytest.fixture(scope="module")
def rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module-scoped fixture cannot use
    yield run_bench(["DiT-Nano/4", "U-DiT-Nano"], ["full", "clear"], [32, 64, 100], mixer_opts={"radius": 2},
                    repeats=1, progress=False, log=lambda _: None)
    torch.set_num_threads(threads)


def test_rows_cover_every_model_mixer_and_size(rows):
    assert len(rows) == 2 * 2 * 3
    dit = [r for r in rows if r["model"] == "DiT-Nano/4" and r["mixer"] == "full"]
    assert [r["tokens"] for r in dit[:2]] == [1, 4]  # 32 px -> 4x4 latent -> 1 patch of 4
    assert dit[2]["status"].startswith("skipped (size must be a multiple of 32 px)")
    clear = next(r for r in rows if r["mixer"] == "clear radius=2")
    assert clear["status"] == "ok" and clear["step_ms"] > 0 and clear["peak_mib"] > 0 and clear["gmacs"] > 0


def test_a_slow_step_stops_its_series():
    rows = run_bench(["DiT-Nano/4"], ["full"], [32, 64], max_seconds=0, repeats=1, memory=False,
                     progress=False, log=lambda _: None)
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("skipped (budget")


def test_unknown_names_fail_before_anything_runs():
    with pytest.raises(DitkitError, match="unknown mixer 'nope'"):
        run_bench(["DiT-Nano/4"], ["full", "nope"], [32], progress=False)
    with pytest.raises(DitkitError, match="unknown model 'DiT-Z'"):
        run_bench(["DiT-Z"], ["full"], [32], progress=False)


def test_report_files(rows, tmp_path):
    md, table, png = write_report(rows, tmp_path)
    text = md.read_text()
    assert "| U-DiT-Nano | clear radius=2 | 64 | 64 |" in text and "time slope" in text
    assert len(list(csv.DictReader(table.open()))) == len(rows) and png.stat().st_size > 1000
    slopes = fitted_slopes(rows)
    udit = slopes["U-DiT-Nano + full"]
    assert udit["points"] == 2 and udit["flops_points"] == 2 and udit["flops"] > 0.9
    assert "skipped" in markdown_report(rows)


def test_a_step_projected_over_budget_is_skipped_before_it_runs():
    rows = run_bench(["DiT-Nano/4"], ["full"], [32, 512], max_seconds=0.05, repeats=1, memory=False,
                     progress=False, log=lambda _: None)
    assert rows[1]["status"].startswith("skipped (budget: ~") and rows[1]["gmacs"] > rows[0]["gmacs"]


def test_model_args_override_every_model_config():
    """A pixel-space model (vae_scale 1): 32 px are 32x32 cells, 8x8 patches of 4."""
    rows = run_bench(["DiT-Nano/4"], ["full"], [32], model_args={"in_channels": 1, "vae_scale": 1}, repeats=1,
                     memory=False, progress=False, log=lambda _: None)
    assert rows[0]["tokens"] == 64 and rows[0]["status"] == "ok"
    with pytest.raises(DitkitError, match="no field"):
        run_bench(["DiT-Nano/4"], ["full"], [32], model_args={"colour": 1}, progress=False, log=lambda _: None)
