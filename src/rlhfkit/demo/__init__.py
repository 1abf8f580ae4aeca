"""`rlhfkit demo`; the package is also its function: `rlhfkit.demo(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "demo")
