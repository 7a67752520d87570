"""The algorithm, beside the paper: advantages and GRPO losses (`grpo`), exact group
gradients and the validation direction (`alignment`), the selection modes (`selection`) and
the constants they share (`common`). Pure functions over tensors and arrays; imports nothing
else of gradalign. The method: docs/method.md."""
