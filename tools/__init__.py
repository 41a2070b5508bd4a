"""Stand-alone tools around a run, each a command of its own (python -m tools.NAME): prepare a
corpus larger than memory, draw what a trained model has learned, compare runs. They use the
lesson and machinery/; nothing there uses them."""
