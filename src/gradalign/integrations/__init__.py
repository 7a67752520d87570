"""Integrations with other trainers: the TRL callback (`trl_callback`)."""
