"""The array core of one frame: the calibration arithmetic, master science, overscan, and the
`Recipe` of what is done to a raw frame."""
