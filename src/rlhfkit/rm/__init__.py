"""`rlhfkit rm`; the package is also its function: `rlhfkit.rm(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "rm")
