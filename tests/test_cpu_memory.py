import subprocess
import sys

import pytest

from nested_learning.training.cpu_memory import keep_freed_cpu_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_cpu_memory_applies_once_and_can_be_disabled():
    assert keep_freed_cpu_memory() is True
    assert keep_freed_cpu_memory() is True  # idempotent
    code = "from nested_learning.training.cpu_memory import keep_freed_cpu_memory as k; print(k())"
    env = {"NESTED_LEARNING_KEEP_FREED_MEMORY": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
