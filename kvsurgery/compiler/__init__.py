"""What turns a rewritten graph into running code: `private_compile` (torch.compile of a private code object,
released without a global reset), `cpu_lowering` (decode ops as plain torch ops Inductor fuses on CPU),
`dynamic_shapes` (which store axes may change between calls) and `read_order` (snapshots that keep reads before
later in-place writes)."""
