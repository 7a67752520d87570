"""Scorers: the batched one-pass scorer (`fastscore`) with its capture hooks (`capture`), the
two kinds of parameter use and their per-group gradients (`uses`), per-parameter pieces
(`pieces`), sketch projections (`sketch`) and LESS preconditioning (`precondition`); its
sharding over torch.distributed ranks (`distributed`). Built on `core`."""
