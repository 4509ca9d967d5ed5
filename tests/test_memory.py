"""keep_freed_memory: steady-state forward passes stop page-faulting their activations in again."""

import subprocess
import sys

WORKLOAD = """
import resource, sys, torch
from causalvdm.models import CausalSTDiT
from causalvdm.utils.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
model = CausalSTDiT(in_channels=4, hidden_size=384, depth=2, num_heads=6, caption_channels=0).eval()
x, t = torch.randn(1, 4, 8, 32, 32), torch.zeros(1, 8, dtype=torch.long)
with torch.inference_mode():
    for _ in range(2):  # warm-up: the first passes grow the heap
        model(x, t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        model(x, t)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steady_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_keep_freed_memory_stops_page_faults():
    default, kept = _steady_faults("default"), _steady_faults("keep")
    # 3 MB activations and 12 MB MLP hiddens: glibc returns them to the kernel by default (~7k faults a pass)
    assert default > 4 * kept, (default, kept)
