"""A run: what it is built from (`setup`: task sets, policy, rollout engine), the round loop
(`loop`), its run directory artifacts (`artifacts`), checkpoints and resume (`checkpoint`), and
building a run from files and a local model (`sources`)."""
