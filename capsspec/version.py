"""capsspec's version, in a module of its own so that every module can read it from below
(the package's __init__ re-exports it as capsspec.__version__)."""

__version__ = "0.1.0"
