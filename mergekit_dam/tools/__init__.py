"""Tools a user runs on merges: compare (scores side by side, and lm-eval's through
harness.py) and inspect (an artifact's coefficients). The merge lab is in lab/."""
