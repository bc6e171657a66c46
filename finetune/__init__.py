"""finetune: an LLM fine-tuning toolkit (pretrain, SFT, reward, rejection-sampling SFT, PPO)."""

__version__ = "0.1.0"
