"""CapsNet pieces written the way public implementations write them, outside capsspec: one correct
version and deliberately deviating versions of each, in PyTorch, Keras (tf.keras) and JAX, each
framework with layouts of its own. tests/test_check_your_own.py holds every one of them to the
reference with capsspec.conformance.check_op. Written for these tests; none is copied from a project.

Each module lists its pieces in CASES: (name, op, function, keyword arguments of check_op, the
deviation key that check_op must name, or None for a correct version, or "caught" for a deviation
it must catch without a name).
"""
