"""Registering and stacking calibrated lights: `workflow` (`ccdcal.stack`), the stack `engine`,
star detection and registration (`register`), resampling (`resample`)."""
