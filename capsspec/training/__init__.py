"""Training and its data: the trainer (train), how a run is set up and resumed (settings), the
data splits and seeded draws (splits), checkpoints, evaluation, data-parallel runs (distributed),
MNIST and the generated MultiMNIST, shift augmentation, and the atomic file writes every one of
them uses.

This room builds on the specification at the root of capsspec (config, model, the backend door)
and never on the tools above it (capsspec.tools). Nothing here imports a framework.
"""
