"""The training engine: learns the coefficients of one merge (see trainer.py)."""
