"""The bits of the ``MASK`` extension (uint8; a pixel is bad when any bit is set).

====  ===================  ==========================================================
bit   name                 meaning
====  ===================  ==========================================================
1     ``MASK_SATURATED``   raw value (before any subtraction) at or above saturation
2     ``MASK_HOT``         hot pixel: the master dark is far above its noise there
4     ``MASK_LOW_FLAT``    dead or weak pixel: normalised flat below the floor (the
                           value is not divided by the flat there)
8     ``MASK_COSMIC_RAY``  cosmic-ray hit (astroscrappy L.A.Cosmic; flagged, not cleaned)
16    ``MASK_USER``        set in the user's bad-pixel map
32    ``MASK_NO_DATA``     no valid value in a master at this pixel (all rejected/NaN)
====  ===================  ==========================================================
"""

MASK_SATURATED = 1
MASK_HOT = 2
MASK_LOW_FLAT = 4
MASK_COSMIC_RAY = 8
MASK_USER = 16
MASK_NO_DATA = 32
MASK_BITS = {
    MASK_SATURATED: "saturated in the raw frame",
    MASK_HOT: "hot pixel in the master dark",
    MASK_LOW_FLAT: "dead or weak pixel: flat below the floor, not flat-fielded",
    MASK_COSMIC_RAY: "cosmic ray (astroscrappy), flagged not cleaned",
    MASK_USER: "user bad-pixel map",
    MASK_NO_DATA: "no valid value in a master frame",
}
