"""rlhfkit: RLHF (SFT, reward model, PPO with PTX) for any Hugging Face causal LM."""

__version__ = "0.1.0"
