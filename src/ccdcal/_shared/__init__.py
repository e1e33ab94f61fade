"""Private leaves every layer may use: robust estimators, memory strings and the allocator,
progress, safe names, threads, and the numba kernels (not yet split by user)."""
