"""Analysis on top of runs: nothing here changes how a run trains.

probe (the critical-batch probe CLI) and branch (short read-only branches of a run's
checkpoints), compare (workdirs side by side) and curves (the one reader of a run's
logs, Figure 2), hlo (collectives read off compiled HLO, for tests and benchmarks).
"""
