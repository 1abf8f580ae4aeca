"""`rlhfkit sft`; the package is also its function: `rlhfkit.sft(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "sft")
