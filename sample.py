"""
Lip-sync a video with the causal student, stream, and benchmark.

Not built yet: the sampler needs the causal student (block-causal DiT, KV cache, two-step
schedule), which comes after the teacher. Until then the foundation's own job is
`python train.py eval` (see README).
"""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: the lip-sync sampler needs the causal student, which is not built yet; "
             "run `python train.py eval` for the foundation table (README, Status)")
