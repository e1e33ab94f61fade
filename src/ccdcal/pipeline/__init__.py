"""The shell that runs a night: `run` (`ccdcal.reduce`), the tasks, the executors and the
options."""
