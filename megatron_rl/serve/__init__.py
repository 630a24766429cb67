"""`megatron-rl serve`: a checkpoint behind an OpenAI-compatible API (`app.py`)."""
