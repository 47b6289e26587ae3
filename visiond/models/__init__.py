"""Architectures, the checkpoint format and the inference runtimes."""
