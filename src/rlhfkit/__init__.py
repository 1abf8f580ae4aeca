"""rlhfkit: SFT, reward models, PPO, GRPO and DPO for any Hugging Face causal LM, from the command line or Python.

    import rlhfkit
    sft = rlhfkit.sft(model="runs/base", data=rows, output="runs/sft", max_steps=200)
    help(rlhfkit.ppo)  # every keyword argument, with its default and meaning

The stage functions (rlhfkit.api) load on first use: `import rlhfkit` itself imports neither torch nor transformers.
"""

from rlhfkit.config import ConfigError
from rlhfkit.data.readers import DataError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "Run", "sft", "rm", "ppo", "grpo", "dpo", "eval_rm", "compare", "demo"]
_STAGES = {"sft", "rm", "ppo", "grpo", "dpo", "demo"}  # packages that are also their stage's function
_API = {"Run", "eval_rm", "compare"}


def __getattr__(name: str):
    import importlib

    if name in _STAGES:  # once imported, the package is an attribute of rlhfkit and this is not called again
        return importlib.import_module(f"rlhfkit.{name}")
    if name in _API:
        return getattr(importlib.import_module("rlhfkit.api"), name)
    raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _STAGES | _API)
