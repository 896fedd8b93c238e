"""Where a run starts and how it reports running out of memory (training/device.py)."""

import torch

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.device import dtype_name, out_of_memory, resident_bytes, start_run


def test_a_run_starts_seeded_in_the_dtype_auto_gives():
    dtype, _ = start_run(DamSettings(seed=5), torch.device("cpu"))
    first = torch.rand(3)
    start_run(DamSettings(seed=5), torch.device("cpu"))
    assert dtype == torch.float32 and torch.equal(first, torch.rand(3))
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_out_of_memory_is_one_line_with_what_to_lower():
    error = out_of_memory(torch.device("cpu"), DamSettings(max_length=512, batch_size=4), "at step 3", checkpoint=True)
    message = str(error)
    assert message.startswith("dam: cpu ran out of memory at step 3 (peak ") and "\n" not in message
    assert "lower max_length (now 512) or batch_size (now 4)" in message and message.endswith("the same command resumes from it")


def test_resident_memory_is_read_on_linux():
    assert resident_bytes() > 10 * 2**20
