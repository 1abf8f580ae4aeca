"""`rlhfkit ppo`; the package is also its function: `rlhfkit.ppo(**options)` (rlhfkit.api.StagePackage)."""

from rlhfkit.api import stage_package

stage_package(__name__, "ppo")
