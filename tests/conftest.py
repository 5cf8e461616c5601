import os

import torch
from hypothesis import settings

# Property tests: enough examples to cover shapes/ties/dtypes, few enough for a ~10 minute suite on 2 cores.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Small shapes dominate the suite: one thread avoids OpenMP hand-offs that cost far more than the work
# on a shared 2-core machine (the benchmarks, not the tests, measure multi-threaded speed).
torch.set_num_threads(1)
