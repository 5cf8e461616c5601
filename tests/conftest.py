import os

import torch
from hypothesis import settings

# Property tests: enough examples to cover shapes/ties/dtypes, few enough for a ~10 minute suite on 2 cores.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))
