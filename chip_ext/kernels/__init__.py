"""The kernels' Python face: `gate_pool` and `gram_accumulate` (`ops`, dispatched to csrc/ through
the compiled `chip_ext._C`), the packed-triangle helpers (`packing`) and the float64 references
(`reference`)."""
