"""Training and its data: the trainer (train), how a run is set up and resumed (settings), the
data splits and seeded draws (splits), checkpoints, evaluation, data-parallel runs (distributed),
MNIST and the generated MultiMNIST, shift augmentation, the atomic file writes every one of
them uses, and the host-memory setting that lets a training step reuse the last one's pages.

This room builds on the specification at the root of capsspec (config, model, the backend door)
and never on the tools above it (capsspec.tools). Nothing here imports a framework.
"""
