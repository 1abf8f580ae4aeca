"""`rlhfkit grpo`; the package is also its function: `rlhfkit.grpo(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "grpo")
