"""Pure decisions over the frames found: the inventory (`ccdcal.scan`) and the plan of masters
and lights."""
