"""finetune: an LLM fine-tuning toolkit (pretrain, SFT, reward, rejection-sampling SFT, PPO)."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import that an optional kernels package is missing; it is
# irrelevant to everything but 4-bit CPU inference and would otherwise open every run's output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
