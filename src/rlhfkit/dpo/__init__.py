"""`rlhfkit dpo`; the package is also its function: `rlhfkit.dpo(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "dpo")
