"""`ditkit quickstart`: ditkit's whole story on the built-in digits in one resumable command: train a
full-attention teacher, distil a CLEAR student, sample both at 1x and 4x, score, benchmark, report."""

from .stages import (
           SAMPLE_SETS,
           SCALES,
           STAGES,
           Quickstart,
           QuickstartSettings,
           SampleSet,
           quickstart,
           quickstart_settings,
)

__all__ = ["SAMPLE_SETS", "SCALES", "STAGES", "Quickstart", "QuickstartSettings", "SampleSet", "quickstart",
           "quickstart_settings"]
