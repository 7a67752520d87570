"""The policy and what acts on it: models and tokenizers (`policy`), the supervised warm
start (`warmstart`), rollouts with HF generate or vLLM (`rollout`, `vllm_backend`), scoring and
selecting a round's chunk (`round_scoring`), GRPO training through TRL (`training`). Built on
`core`, `scoring` and `data`."""
