"""Training scripts: ``python -m train.mnist`` and friends."""
