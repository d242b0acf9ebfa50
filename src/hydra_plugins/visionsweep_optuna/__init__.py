"""visionsweep's Hydra sweeper on current Optuna (see optuna_sweeper.py)."""
