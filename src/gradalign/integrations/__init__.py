"""Integrations with other trainers: the TRL callback (`trl_callback`), the train sampler it
installs (`round_sampler`) and TRL's rows, prompt tokens and reward functions (`trl_rows`)."""
