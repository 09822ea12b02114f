"""`ditkit study`: compute-matched comparisons of backbones, mixers and distillation settings, arm by
arm and seed by seed, resumable, into a report folder (tables over seeds, plots, a computed reading)."""

from .config import ArmConfig, BudgetSection, EvalSection, StudyConfig
from .plan import ArmPlan, plan_study
from .runner import STUDY_OUTPUTS, Study, run_study

__all__ = ["STUDY_OUTPUTS", "ArmConfig", "ArmPlan", "BudgetSection", "EvalSection", "Study", "StudyConfig",
           "plan_study", "run_study"]
