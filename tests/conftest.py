import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Small tensors: one thread avoids oversubscription stalls on the 2-core CI machine.
torch.set_num_threads(1)
