"""The compute-to-match reading on synthetic measurements: interpolation in log compute, ties within the
seed spread, arms that never get there, sampling cost at equal quality, and students against teachers."""

import math

import pytest

from ditkit.study.config import BudgetSection
from ditkit.study.matching import (
    AHEAD,
    BEHIND,
    TIE,
    Reach,
    compute_to_reach,
    cost_at_equal_quality,
    match_arm,
    student_gaps,
)
from ditkit.study.plan import ArmPlan
from ditkit.study.report import gap_section, matching_section

BUDGET = 1000.0


def row(arm, seed, gflops, fid, legibility, kind="train", psnr=None, resolution=32, sampling=10.0, ms=2.0):
    return {"arm": arm, "label": arm, "kind": kind, "seed": seed, "train_gflops": gflops, "resolution": resolution,
            "fid": fid, "legibility": legibility, "psnr": psnr, "ssim": None, "sampling_gflops": sampling,
            "step_ms": ms}


def arm_rows(arm, curves, **extra):
    """`curves`: per seed, (fid, legibility) at 250, 500 and 1000 GFLOPs."""
    return [row(arm, seed, gflops, fid, legibility, **extra) for seed, points in enumerate(curves)
            for gflops, (fid, legibility) in zip((250.0, 500.0, BUDGET), points, strict=True)]


# DiT ends at FID 10 +/- 0.71 and legibility 90% +/- 1.4%.
DIT = arm_rows("dit", [[(30, 0.2), (20, 0.5), (10.5, 0.89)], [(30, 0.2), (20, 0.5), (9.5, 0.91)]])
# Reaches FID 10 and 90% legibility exactly half-way (in log compute) between 250 and 500 GFLOPs.
FAST = arm_rows("fast", [[(20, 0.8), (5, 0.95), (4, 0.97)], [(20, 0.8), (5, 0.95), (4.2, 0.97)]], sampling=5.0,
                ms=3.0)
LEVEL = arm_rows("level", [[(30, 0.2), (20, 0.5), (10.2, 0.9)], [(30, 0.2), (20, 0.5), (9.9, 0.9)]])
SLOW = arm_rows("slow", [[(40, 0.1), (30, 0.2), (25, 0.4)], [(41, 0.1), (31, 0.2), (26, 0.41)]])
ROWS = DIT + FAST + LEVEL + SLOW


def test_compute_to_reach_interpolates_in_log_compute():
    points = [(100.0, 20.0), (1000.0, 10.0)]
    reach = compute_to_reach(points, 15.0, lower_is_better=True)
    assert reach.exact and reach.gflops == pytest.approx(math.sqrt(100 * 1000))  # half-way in log compute
    assert compute_to_reach(points, 25.0, lower_is_better=True) == Reach(100.0, exact=False)  # an upper bound
    assert compute_to_reach(points, 5.0, lower_is_better=True) is None  # never reached
    assert compute_to_reach([(100.0, 0.2), (1000.0, 0.6)], 0.4, lower_is_better=False).gflops == pytest.approx(
        math.sqrt(100 * 1000))


def test_an_arm_ahead_of_the_baseline_matches_it_at_k_times_its_compute():
    fid = match_arm(ROWS, "fast", "dit", "fid", 32)
    assert fid.verdict == AHEAD and fid.target == pytest.approx(10.0)
    # FID 20 -> 5 between 250 and 500 GFLOPs: 10 is 2/3 of the way in value, so in log compute.
    expected = math.exp(math.log(250) + (2 / 3) * math.log(2)) / BUDGET
    assert fid.ratios == pytest.approx([expected, expected]) and not fid.bounded
    assert fid.sentence("dit").startswith(f"fast matches dit on FID at {expected:.2g} ± 0 x its compute")
    legibility = match_arm(ROWS, "fast", "dit", "legibility", 32)
    assert legibility.verdict == AHEAD and legibility.ratios == pytest.approx([0.25 * 2 ** (2 / 3)] * 2)


def test_a_difference_within_the_seed_spread_is_a_tie_and_a_worse_arm_does_not_reach_it():
    level = match_arm(ROWS, "level", "dit", "fid", 32)
    assert level.verdict == TIE and "ties dit on FID" in level.sentence("dit")
    assert "within the seed spread" in level.sentence("dit")
    slow = match_arm(ROWS, "slow", "dit", "legibility", 32)
    assert slow.verdict == BEHIND and slow.ratios == []
    assert slow.sentence("dit").startswith("slow does not reach dit's final legibility within the budget")


def test_one_seed_leaves_the_spread_unknown():
    one = [r for r in ROWS if r["seed"] == 0]
    level = match_arm(one, "level", "dit", "fid", 32)
    assert level.verdict == AHEAD and not level.spread_known  # 10.2 vs 10.5, with no spread to call it a tie


def test_sampling_cost_is_read_only_where_the_arm_reaches_the_baselines_quality():
    fast = [match_arm(ROWS, "fast", "dit", key, 32) for key in ("fid", "legibility")]
    cost = cost_at_equal_quality(ROWS, "fast", "dit", fast, 32)
    assert cost["sampling_gflops"] == pytest.approx((5.0, 0.5)) and cost["step_ms"] == pytest.approx((3.0, 1.5))
    slow = [match_arm(ROWS, "slow", "dit", key, 32) for key in ("fid", "legibility")]
    assert cost_at_equal_quality(ROWS, "slow", "dit", slow, 32) == {}


def plan(name, kind="train", teacher=None):
    return ArmPlan(name=name, kind=kind, label=name, seeds=[0, 1], resolution=32, batch_size=64, forward_gflops=0.1,
                   step_gflops=1.0, steps=1000, points=[(0.25, 250), (0.5, 500), (1.0, 1000)],
                   budget=BudgetSection(gflops=BUDGET), teacher=teacher)


def test_the_report_section_reads_every_arm_against_the_first_training_arm():
    plans = {name: plan(name) for name in ("dit", "fast", "level", "slow")}
    text = "\n".join(matching_section(ROWS, plans, 128))
    assert "## Compute to match dit" in text
    assert "- fast matches dit on FID at" in text and "- level ties dit on FID" in text
    assert "- slow does not reach dit's final FID within the budget" in text
    assert "- fast: 5 sampling GFLOPs per image (0.50 x dit's), 3.0 ms per forward (1.50 x)." in text
    assert "- slow: does not reach dit's final quality within the budget" in text
    assert matching_section(DIT, {"dit": plans["dit"]}, 128) == []  # nothing to match against


def test_a_student_is_read_against_its_teacher_and_its_untrained_self():
    teacher = [row("teacher", 0, BUDGET, 5.0, 0.99)]
    student = [row("student", seed, gflops, fid, legibility, kind="distill", psnr=psnr)
               for seed, jitter in enumerate((0.0, 0.2))
               for gflops, fid, legibility, psnr in ((0.0, 40.0, 0.3, 12.0 + jitter),
                                                     (BUDGET, 5.0 + jitter, 0.98, 30.0))]
    gaps = {gap.key: gap for gap in student_gaps(teacher + student, "student", "teacher", 32)}
    assert gaps["fid"].untrained == [40.0, 40.0] and gaps["fid"].verdict == TIE  # 5.1 +/- 0.14 vs 5.0
    assert gaps["legibility"].verdict == BEHIND  # 98% on both seeds (no spread) vs 99%, sampling error not given
    sampled = {gap.key: gap for gap in student_gaps(teacher + student, "student", "teacher", 32, samples=128)}
    assert sampled["legibility"].verdict == TIE  # 1 point: within 2 x sqrt(.98 x .02 / 256 + .99 x .01 / 128)
    many = {gap.key: gap for gap in student_gaps(teacher + student, "student", "teacher", 32, samples=100_000)}
    assert many["legibility"].verdict == BEHIND and sampled["fid"].verdict == TIE  # FID has no sampling floor
    assert gaps["psnr"].verdict == AHEAD and gaps["psnr"].teacher == []  # against the untrained student
    plans = {"teacher": plan("teacher"), "student": plan("student", "distill", "teacher")}
    text = "\n".join(gap_section(teacher + student, plans, [1], 128))
    assert "| student | 32 | FID | 5.00 | 40.00 ± 0.00 | 5.10 ± 0.14 | tie vs teacher |" in text
    assert "| student | 32 | PSNR dB | - | 12.10 ± 0.14 | 30.00 ± 0.00 | better vs untrained |" in text


def test_a_students_teacher_is_the_seed_that_taught_it():
    teachers = [row("teacher", 0, BUDGET, 5.0, 0.99), row("teacher", 1, BUDGET, 9.0, 0.5)]
    student = [row("student", 0, BUDGET, 5.0, 0.99, kind="distill")]
    taught = {gap.key: gap for gap in student_gaps(teachers + student, "student", "teacher", 32, teacher_seed=0)}
    assert taught["fid"].teacher == [5.0] and taught["fid"].verdict == TIE
    both = {gap.key: gap for gap in student_gaps(teachers + student, "student", "teacher", 32)}
    assert both["fid"].teacher == [5.0, 9.0]


def test_legibility_differences_within_their_sampling_error_are_ties():
    """Every arm is scored on one sampling seed, so one digit of 128 read otherwise moves legibility by
    0.8% on every seed alike: the seeds show no spread, the binomial error does."""
    from ditkit.study.matching import sampling_error, verdict
    from ditkit.study.report import METRICS, compare, spread

    assert sampling_error(1.0, 0.992, 128, 256) == pytest.approx(2 * math.sqrt(0.992 * 0.008 / 256))
    assert verdict([0.992, 0.992], [1.0], False, samples=128) == (TIE, True)  # 0.8 points < 1.1
    assert verdict([0.977, 0.977], [1.0], False, samples=128) == (BEHIND, True)  # 2.3 points > 1.9
    assert verdict([0.992, 0.992], [1.0], False) == (BEHIND, True)  # no samples given: the seed spread alone (0)
    legibility = next(m for m in METRICS if m.key == "legibility")
    point = [{"label": label, "seeds": 2, "legibility": spread(values)}
             for label, values in (("a", [1.0, 1.0]), ("b", [0.992, 0.992]))]
    assert "by 0.8 <= sampling error 1.1 of 128 samples: not a difference" in compare(point, legibility, 128)
    assert "> seed spread" in compare(point, legibility, 100_000)
