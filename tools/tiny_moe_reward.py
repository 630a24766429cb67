"""Reward of configs/qwen3_moe_tiny_cpu.yaml: the fraction of response words that are "yes"."""


def emit_yes(response, sample, **kw):
    words = response.split()
    return sum(w == "yes" for w in words) / max(len(words), 1)
