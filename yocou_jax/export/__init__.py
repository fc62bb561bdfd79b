"""Exports of checkpoints to Hugging Face / PyTorch and imports of Hugging Face Llama."""
