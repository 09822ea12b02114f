"""Published weights into ditkit checkpoints (`pretrained`), and ditkit DiTs out to diffusers.

Importing the package registers the built-in converters: each module registers its own."""

from . import diffusers_dit, official_dit, official_udit  # noqa: F401  (each registers its converters)
