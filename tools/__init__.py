"""Stand-alone tools, each a command (python -m tools.NAME): prepare a corpus larger than memory, draw what
a trained model has learned, compare runs, write docs/flags.md. Nothing in the lesson or machinery/ uses them."""
