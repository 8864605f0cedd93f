"""What keeps a run alive on machines that fail (docs/RELIABILITY.md).

checkpoint (orbax saves with the position and a checksum; the one reader, verified
restore), preemption (SIGTERM/SIGINT, lost peers, exit statuses), lock (one run per
workdir), divergence (the non-finite stop). None of them changes what training computes.
"""
