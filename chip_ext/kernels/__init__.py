"""The kernels' Python face: `gate_pool`, `gram_accumulate` and `sample_gates_into` (`ops`, dispatched to
csrc/ through the compiled `chip_ext._C`), the packed-triangle helpers (`packing`) and the float64 references
(`reference`)."""
