"""The algorithm, beside the paper: advantages and GRPO losses (`grpo`), exact group
gradients and the validation direction (`alignment`), and the selection modes (`selection`).
Pure functions over tensors and arrays; imports nothing else of gradalign."""
