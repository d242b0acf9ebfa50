"""visionsweep's grid sweeper with a ledger (resumable sweeps) and its Hydra callbacks."""
