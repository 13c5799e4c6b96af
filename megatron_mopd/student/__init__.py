"""The Megatron student: the model (`model`), per-token log-probs (`logprobs`) and the
train step through Megatron's schedule, DDP and optimizer (`train_step`).

Submodules import megatron-core lazily (importing it costs seconds), so importing this
package is cheap.
"""
