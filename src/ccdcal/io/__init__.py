"""FITS bytes in and out, what every header keyword means, file identity (hashes), the
manifest, and the input/output rules (`guard`)."""
