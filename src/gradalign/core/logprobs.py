"""Token log-probabilities computed in chunks of tokens: never the whole [N, T, V] in fp32.

Notation: N rows · L positions · T = L - 1 next-token positions · M tokens · V vocabulary ·
d hidden size · c tokens per chunk.

    log pi(y_t | x_{<=t}) = z_t[y_t] - logsumexp(z_t),   z_t = W h_t (+ b)       [V]
    d log pi / d z_t = e_{y_t} - softmax(z_t)          (the softmax residual, negated)

`head_logprobs` takes the hidden states h [M, d] that enter the LM head and the head's weight
W [V, d]: its forward keeps one chunk of logits at a time and only logsumexp [M]; its
backward recomputes each chunk's softmax (as TRL, verl and Liger's fused linear
cross-entropy do). `logits_logprobs` does the same from logits a model already returned (its
head module must run, e.g. for hooks): it keeps the logits and no fp32 log-softmax copy.

`token_logprobs` picks: for an architecture whose logits are exactly `lm_head(h)`
(`PLAIN_HEADS`, read through a PEFT wrapper), the body's last hidden state and
`head_logprobs`; otherwise the model's logits and `logits_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

CHUNK_BYTES = 1 << 28  # fp32 logits of one chunk of tokens: c = CHUNK_BYTES // (4 V)
# Causal LMs whose forward is `lm_head(body(...).last_hidden_state)`: no logit scaling or
# soft-capping between the body and the head (Gemma2, Cohere, Granite, ... have some).
PLAIN_HEADS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Phi3ForCausalLM",
        "SmolLM3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
    }
)


def chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab))


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) with logits = head(body(...).last_hidden_state), or None when the model
    is not known to compute its logits so (`PLAIN_HEADS`) or its head is not a plain Linear
    (e.g. a LoRA-wrapped head)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()  # a peft model: its base
    if type(base).__name__ not in PLAIN_HEADS:
        return None
    head = base.get_output_embeddings()
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if type(head) is not nn.Linear or not isinstance(body, nn.Module):
        return None
    return body, head


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] per token, chunked in forward and backward. # [M] fp32"""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, c: int) -> Tensor:
        out = h.new_empty(len(h), dtype=torch.float32)
        lse = torch.empty_like(out)
        for s in range(0, len(h), c):
            z = nn.functional.linear(h[s : s + c], weight, bias).float()  # [c, V]
            lse[s : s + c] = torch.logsumexp(z, -1)
            out[s : s + c] = z.gather(1, y[s : s + c, None]).squeeze(1) - lse[s : s + c]
        ctx.save_for_backward(h, weight, bias, y, lse)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, weight, bias, y, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for s in range(0, len(h), ctx.c):
            hc, gc = h[s : s + ctx.c], g[s : s + ctx.c].float()
            z = nn.functional.linear(hc, weight, bias).float()  # [c, V]
            dz = torch.exp(z - lse[s : s + ctx.c, None]).mul_(-gc[:, None])  # -g p
            dz.scatter_add_(1, y[s : s + ctx.c, None], gc[:, None])  # g (e_y - p)  [c, V]
            if gh is not None:
                gh[s : s + ctx.c] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if gw is not None:
                gw += dz.T @ hc.float()  # [V, d]
            if gb is not None:
                gb += dz.sum(0)
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None


def head_logprobs(
    h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int | None = None
) -> Tensor:
    """log pi(y_t) = log softmax(W h_t + b)[y_t] of M tokens, c at a time. # [M, d] -> [M]"""
    c = chunk or chunk_tokens(weight.shape[0])
    return _HeadLogprobs.apply(h, weight, bias, y, c)


class _LogitsLogprobs(torch.autograd.Function):
    """log softmax(z)[y] per token from given logits, chunked; saves z and lse only."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, c: int) -> Tensor:
        out = z.new_empty(len(z), dtype=torch.float32)
        lse = torch.empty_like(out)
        for s in range(0, len(z), c):
            zc = z[s : s + c].float()  # [c, V]
            lse[s : s + c] = torch.logsumexp(zc, -1)
            out[s : s + c] = zc.gather(1, y[s : s + c, None]).squeeze(1) - lse[s : s + c]
        ctx.save_for_backward(z, y, lse)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        z, y, lse = ctx.saved_tensors
        gz = torch.empty_like(z)
        for s in range(0, len(z), ctx.c):
            gc = g[s : s + ctx.c].float()
            dz = torch.exp(z[s : s + ctx.c].float() - lse[s : s + ctx.c, None]).mul_(-gc[:, None])
            gz[s : s + ctx.c] = dz.scatter_add_(1, y[s : s + ctx.c, None], gc[:, None]).to(z.dtype)
        return gz, None, None


def logits_logprobs(z: Tensor, y: Tensor, chunk: int | None = None) -> Tensor:
    """log softmax(z_t)[y_t] of M tokens' logits, c at a time. # [M, V] -> [M]"""
    return _LogitsLogprobs.apply(z, y, chunk or chunk_tokens(z.shape[-1]))


def hidden_states(body: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The body's last hidden state, the LM head's input. # [N, L] -> [N, L, d]"""
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    head_module: bool = False,
    chunk: int | None = None,
) -> Tensor:
    """log pi(x_{t+1} | x_{<=t}) for every position, c tokens at a time. # [N, L] -> [N, T]

    ``head_module``: call the model's own LM head module on all positions (forward hooks on
    it see its use; the logits [N, L, V] are then held in the model's dtype, still never a
    fp32 log-softmax of them)."""
    split = None if head_module else split_head(model)
    n, length = input_ids.shape
    y = input_ids[:, 1:].reshape(-1)  # [N*T]
    if split is not None:
        body, head = split
        h = hidden_states(body, input_ids, attention_mask)[:, :-1]  # [N, T, d]
        logp = head_logprobs(h.reshape(n * (length - 1), -1), head.weight, head.bias, y, chunk)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        z = logits[:, :-1].reshape(n * (length - 1), -1)  # [N*T, V]
        logp = logits_logprobs(z, y, chunk)
    return logp.reshape(n, length - 1)  # [N, T]


def uses_head(model: nn.Module, params: Sequence[Tensor]) -> bool:
    """Whether one of `params` is the LM head's weight or bias (a tied embedding included):
    then hooks on the head module must see it run (``token_logprobs(head_module=True)``)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()  # a peft model: its base
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    own = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return any(id(p) in own for p in params)
