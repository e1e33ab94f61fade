"""The combine engine: scaling, rejection and combining by row bands under a memory budget
(`ccdcal.combine` is `combining.engine.combine`)."""
