"""One-shot-colour frames: Bayer patterns made colours (:mod:`ccdcal.colour.demosaic`)."""
