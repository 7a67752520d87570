"""How many groups one scoring forward/backward takes: ``select.groups_per_micro=0`` (auto).

A full-gradient micro-batch holds, for every token of its rows (right-padded to the batch's
length L), the activations autograd keeps for the scored blocks and the output gradients the
scorer captures there (`capture`): about 16 d + 8 d_ff numbers per token and block (d the
hidden size, d_ff the MLP's). For SmolLM2-135M's last four blocks in fp32 this estimate is
0.33 MiB per token; measured, 0.32 (the scoring step alone) to 0.38 (`gradalign diagnose`).
When the scored parameters include the LM head (a tied embedding under
``select.params=all``) the head module itself runs, and its logits and their gradient add
2 V numbers per token (V the vocabulary). The backward starts at the first block holding a
scored parameter, so every block from there up counts (all of them for ``all`` and
``lora``, N for ``last:N``).

The rule: as many whole groups as keep rows x L x (bytes per token) within `MICRO_BYTES`,
at least 1 and at most `MAX_GROUPS` (the former fixed default). 512 MiB gives SmolLM2 at
``select.params=last:4`` 3 groups of 8 rollouts of 56 tokens, which keeps its whole
diagnose under 3 GB with room to spare (4 groups peaked at 2.7-2.9 GB), and the built-in
tiny model 16 groups up to 84 tokens (its tasks: 22-38). ``select.features=output`` runs
no backward: its forward holds one block's activations at a time and bounded chunks of
logits, so it takes `MAX_GROUPS`. A model without the usual config fields (hidden_size,
intermediate_size, num_hidden_layers, vocab_size) takes `MAX_GROUPS` too. An explicit
``select.groups_per_micro`` > 0 wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from gradalign.core.logprobs import uses_head

MICRO_BYTES = 1 << 29  # 512 MiB of activations per scoring micro-batch
MAX_GROUPS = 16
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def scored_blocks(model: nn.Module, params: Sequence[Tensor], layers: int) -> int:
    """Blocks the backward runs through: from the first block holding one of `params` to the
    top (all `layers` when an input embedding is scored, 0 when only the final norm or an
    untied head are)."""
    ids = {id(p) for p in params}
    first = layers
    base: Any = getattr(model, "get_base_model", lambda: model)()
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if isinstance(embed, nn.Module) and any(id(p) in ids for p in embed.parameters()):
        return layers
    for name, p in model.named_parameters():
        match = _LAYER.search(name)
        if match and id(p) in ids:
            first = min(first, int(match.group(1)))
    return layers - first


def token_bytes(model: nn.Module, params: Sequence[Tensor]) -> int | None:
    """Estimated bytes a full-gradient scoring micro-batch holds per token (module docstring);
    None when the model's config lacks a size it needs."""
    cfg = getattr(model, "config", None)
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    sizes = [getattr(cfg, k, None) for k in need]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return None
    d, d_ff, layers, vocab = (int(v) for v in sizes)  # type: ignore[arg-type]
    numbers = scored_blocks(model, params, layers) * (16 * d + 8 * d_ff)
    numbers += 2 * vocab if uses_head(model, params) else 0
    elem = next(model.parameters()).element_size()  # activations are in the model's dtype
    return max(1, numbers * elem)


def groups_per_micro(
    model: nn.Module,
    params: Sequence[Tensor] | None,
    rows_per_group: int,
    length: int,
    requested: int = 0,
) -> int:
    """Groups per scoring micro-batch: `requested` when > 0; else the most whole groups of
    `rows_per_group` rows of `length` tokens within `MICRO_BYTES`, clamped to
    [1, `MAX_GROUPS`]. `params` None: output features (no backward), `MAX_GROUPS`."""
    if requested > 0:
        return requested
    per_token = token_bytes(model, params) if params is not None else None
    if per_token is None:
        return MAX_GROUPS
    per_group = per_token * max(1, rows_per_group) * max(1, length)
    return max(1, min(MAX_GROUPS, MICRO_BYTES // per_group))
