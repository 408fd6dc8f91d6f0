"""What runs: the data, the Time-LLM model over a frozen quantized backbone, the training loop
and its checkpoint state. It resumes from checkpoints and knows nothing of restarts."""
