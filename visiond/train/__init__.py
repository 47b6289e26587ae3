"""Building the model: data loading, the training loop, evaluation and prediction (see loop.py)."""
