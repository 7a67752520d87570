"""Scorers: the batched one-pass scorer with sketch projections and Adam preconditioning
(`fastscore`), and its sharding over torch.distributed ranks (`distributed`). Built on `core`."""
