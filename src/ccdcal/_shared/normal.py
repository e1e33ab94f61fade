"""Constants of the normal distribution (no imports: any module may take them, the numba-free
ones that a helper process loads included)."""

#: 1 / Φ⁻¹(3/4): the MAD of a normal distribution times this is its standard deviation.
MAD_TO_STD = 1.482602218505602
