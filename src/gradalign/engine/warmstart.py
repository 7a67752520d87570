"""Supervised warm start of a built-in policy, cached on disk.

RL needs a policy that sometimes succeeds: a randomly initialised model never earns a
reward, so GRPO has nothing to learn from. The warm start trains the built-in model on
reference solutions of the task families (loss on completion tokens only, AdamW, cosine
decay) for a fixed number of steps, then saves it as a Hugging Face directory keyed by a
hash of everything that determines it, so a second run loads it instead of redoing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradalign.core.grpo import pack_sequences
from gradalign.data.tasks import (
    FamilyFlaws,
    Flaw,
    flaw_examples_by_family,
    warmstart_examples,
)
from gradalign.engine.policy import (
    build_model,
    build_tokenizer,
    format_prompt,
    load_pretrained,
    quiet_transformers,
)
from gradalign.storage import write_json

# bump when the recipe changes, to invalidate caches (3: trained on one CPU thread)
WARMSTART_VERSION = 3


def cache_root(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("GRADALIGN_CACHE", Path.home() / ".cache" / "gradalign"))


def warmstart_key(
    size: str,
    families: list[str],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    met: set[str],
    flaw: Flaw = "none",
    flaw_frac: float = 0.0,
    family_flaws: FamilyFlaws | None = None,
) -> str:
    """The cache key of a warm start: its whole recipe. Of the prompts it must not train on,
    only those its draw came across (`met`, from `warmstart_examples`) changed its examples,
    so only they enter the key: built-in sets, drawn from other partitions, never do (nor
    garbled filler, which no task family generates), and one warm start serves every regime
    and data seed."""
    spec = {
        "v": WARMSTART_VERSION,
        "size": size,
        "families": families,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "exclude": hashlib.sha256("\n".join(sorted(met)).encode()).hexdigest(),
        "flaw": flaw if flaw_frac > 0 else "none",
        "flaw_frac": flaw_frac if flaw != "none" else 0.0,
    }
    # a flaw for a family the warm start does not train on changes nothing, nor the key
    used = {f: list(v) for f, v in sorted((family_flaws or {}).items()) if f in families}
    if used:  # only then: the keys of warm starts without it stay as they were
        spec["family_flaws"] = used
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def one_cpu_thread():
    """Run the block on one CPU thread, then restore the process's count. A warm start's sums
    then come in one order whatever threads the process has, so a recipe (its cache key)
    gives the same weights under `make demo`, a bench run with OMP_NUM_THREADS=1 or a test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def supervised_warmstart(
    model,
    tokenizer,
    examples: list[tuple[str, str]],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train on (prompt, solution) pairs, loss on solution tokens + EOS, on one CPU thread
    (`one_cpu_thread`). Returns losses."""
    with one_cpu_thread():
        cache: dict[int, tuple[list[int], list[int]]] = {}

        def tokens(i: int) -> tuple[list[int], list[int]]:  # tokenised on first use
            if i not in cache:
                prompt, solution = examples[i]
                answer = tokenizer(solution, add_special_tokens=False)["input_ids"]
                cache[i] = (format_prompt(tokenizer, prompt), answer + [tokenizer.eos_token_id])
            return cache[i]

        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        warm = max(1, steps * 3 // 100)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
        )
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=gen)
        losses, pos = [], 0
        model.train()
        for step in range(steps):
            if pos + batch > len(order):
                order, pos = torch.randperm(len(examples), generator=gen), 0
            idx = order[pos : pos + batch].tolist()
            pos += batch
            pairs = [tokens(i) for i in idx]
            ids, attn, mask = pack_sequences(
                [p for p, _ in pairs], [a for _, a in pairs], tokenizer.pad_token_id
            )
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[
                :, :-1
            ]  # [B, T, V]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view_as(mask)  # [B, T]
            loss = (nll * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, losses[-1])
        model.eval()
        return losses


def load_or_warmstart(
    size: str,
    families: list[str],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    exclude: set[str],
    cache_dir: str = "",
    progress: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    flaw: Flaw = "none",
    flaw_frac: float = 0.0,
    family_flaws: FamilyFlaws | None = None,
):
    """The warm-started built-in (model, tokenizer): from the cache, or trained and cached.
    `flaw` / `flaw_frac`: that share of the supervised targets carry the flaw
    (`gradalign.data.tasks.flaw_target`); `family_flaws` gives listed families their own
    (flaw, share) (`gradalign.data.tasks.flaw_examples_by_family`)."""

    quiet_transformers()
    met: set[str] = set()  # drawing the examples is cheap next to loading or training
    examples = warmstart_examples(families, min(20_000, steps * batch), seed + 17, exclude, met)
    key = warmstart_key(size, families, steps, lr, batch, seed, met, flaw, flaw_frac, family_flaws)
    path = cache_root(cache_dir) / f"warmstart-{size}-{key}"
    if (path / "warmstart.json").is_file():
        try:
            model, tokenizer = load_pretrained(path)  # the same path as a user's checkpoint
        except Exception as err:  # a damaged cache entry (disk, manual edits): train it again
            log(
                f"warning: cached warm start {path} is unreadable ({type(err).__name__}); retraining"
            )
            shutil.rmtree(path, ignore_errors=True)
        else:
            log(f"warm start: loaded from cache {path}")
            return model, tokenizer
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, size, seed=seed)
    if steps == 0:
        return model, tokenizer
    examples = flaw_examples_by_family(examples, flaw, flaw_frac, family_flaws or {}, seed + 29)
    log(f"warm start: {steps} supervised steps on {len(examples)} examples ({size} model)")
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        losses = supervised_warmstart(model, tokenizer, examples, steps, lr, batch, seed, progress)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(
        tmp / "warmstart.json",
        {"steps": steps, "final_loss": losses[-1], "seconds": time.perf_counter() - t0},
    )
    if path.exists():  # another process cached the same warm start meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    log(f"warm start: done in {time.perf_counter() - t0:.0f} s, cached at {path}")
    return model, tokenizer
