"""The decisions (DESIGN.md parts 4 and 5): the offline profile they read, the online
estimates, the SLA, the SPINN scheduler, the baselines and the ``Policy`` protocol. Pure:
time comes in as ``now``."""
