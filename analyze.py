"""
The teacher-trajectory analysis (CFG fidelity-sync tradeoff, Euler-step factorial, fixed-CFG
endpoints) that the two-step schedule and the Sync-Window are derived from.

Not built yet: it needs the bidirectional teacher. See README, Status.
"""

import sys

if __name__ == "__main__":
    sys.exit("analyze.py: the trajectory analysis needs the teacher, which is not built yet (README, Status)")
