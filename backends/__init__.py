"""capsspec's built-in backends, one folder each (installed as capsspec.backends).

Every backend folder has the same shape: __init__.py holds the Backend subclass (cheap to
import: no framework at module level), ops.py the spec's ops and their VJPs, model.py the full
model, optim.py the spec's Adam and train_step. The numpy backend is the reference itself
(capsspec.ops, capsspec.model, capsspec.optim), registered through the same entry point
group as every other backend.
"""
