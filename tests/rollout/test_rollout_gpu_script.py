"""tools/gpu_vllm.py imports and answers --help on a machine without CUDA or vLLM."""
import subprocess
import sys


def test_rollout_gpu_vllm_script_help():
    out = subprocess.run([sys.executable, "tools/gpu_vllm.py", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--model-config" in out.stdout and "--sections" in out.stdout
