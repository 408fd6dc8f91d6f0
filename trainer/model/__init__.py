"""Time-LLM (Jin et al., ICLR 2024), one module per block of the paper's figure 2:
normalize -> patch embedding -> reprogramming against text prototypes -> prompt-as-prefix ->
frozen LLM -> output projection -> denormalize."""

from timellm_job.trainer.model.timellm import TimeLLM

__all__ = ["TimeLLM"]
