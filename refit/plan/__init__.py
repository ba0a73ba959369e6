"""Planning: pure functions from catalog descriptors to a plan (no I/O; torch only in `assemble`).

`naming` maps Megatron names to Hugging Face names, `targets` says which global rows each engine
tensor needs, `shapes` lists a model's global tensors from its dimensions, `cost` prices a link's
bytes and descriptors, `planner` turns targets into pieces and reads at the least modelled cost, and
`assemble` cuts the staged pieces into engine tensors.
"""
