"""`rollout.ignore_eos` / `rollout.min_new_tokens` (fixed-length rollouts for benchmarks) in the
native engine, on a tiny model whose logits are biased so that EOS is always the likeliest
token: without the options every response is EOS at once; with ignore_eos every response
has max_new_tokens tokens; with min_new_tokens EOS is never drawn before that many tokens.
And both options reach vLLM's SamplingParams (`ignore_eos`, `min_tokens`)."""
import types

import pytest
import torch

from megatron_rl.data.batch import Batch
from megatron_rl.rollout.native_engine import NativeEngine
from megatron_rl.rollout.protocol import SamplingParams
from tests.helpers import make_tiny_hf

EOS, PAD = 1, 0


class EosBiasedEngine(NativeEngine):
    """EOS gets +30 on every step's logits (probability ~1 unless suppressed)."""

    def _step(self, ids, pos, mask, ctx):
        logits = super()._step(ids, pos, mask, ctx)
        logits[:, EOS] += 30.0
        return logits


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from megatron_rl.models import load_checkpoint
    from megatron_rl.parallel import init_distributed

    hf = make_tiny_hf(tmp_path_factory.mktemp("len_opts"), "llama")
    init_distributed(tp=1, pp=1)
    torch.manual_seed(0)
    return EosBiasedEngine(load_checkpoint(hf, layer_spec="local"),
                           types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD))


def prompts(n=3):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, 4, dtype=torch.long)
    mask[0, :2] = 0
    return Batch({"prompt_ids": torch.randint(2, 90, (n, 4), generator=g), "prompt_mask": mask},
                 [{"uid": str(i)} for i in range(n)])


@pytest.mark.parametrize("greedy", [True, False])
def test_eos_ends_responses_without_the_options(engine, greedy):
    out = engine.generate(prompts(), SamplingParams(n=2, max_new_tokens=6, greedy=greedy, seed=3))
    assert out["response_mask"].sum(-1).tolist() == [1.0] * 6
    assert (out["response_ids"][:, 0] == EOS).all()


@pytest.mark.parametrize("greedy", [True, False])
def test_ignore_eos_gives_max_new_tokens_every_response(engine, greedy):
    out = engine.generate(prompts(), SamplingParams(n=2, max_new_tokens=6, greedy=greedy, seed=3, ignore_eos=True))
    assert out["response_ids"].shape[1] == 6
    assert out["response_mask"].sum(-1).tolist() == [6.0] * 6
    assert (out["response_ids"] == EOS).all()          # EOS drawn, but it does not end the response
    assert (out["rollout_logprob"] > -1e-3).all()        # log-prob of a ~certain token


@pytest.mark.parametrize("greedy", [True, False])
def test_min_new_tokens_masks_eos_until_then(engine, greedy):
    out = engine.generate(prompts(), SamplingParams(n=2, max_new_tokens=6, greedy=greedy, seed=3, min_new_tokens=3))
    assert out["response_mask"].sum(-1).tolist() == [4.0] * 6         # 3 forced tokens, then EOS
    ids = out["response_ids"]
    assert (ids[:, :3] != EOS).all() and (ids[:, 3] == EOS).all()
    # the suppressed draw keeps the untruncated log-prob (what the trainer recomputes): very negative
    assert (out["rollout_logprob"][:, :3] < -20).all()


def test_vllm_sampling_kwargs_carry_both_options():
    from megatron_rl.rollout.vllm_convert import vllm_sampling_kwargs

    kw = vllm_sampling_kwargs(SamplingParams(max_new_tokens=8, ignore_eos=True, min_new_tokens=5), 0, [EOS])
    assert kw["ignore_eos"] is True and kw["min_tokens"] == 5 and kw["max_tokens"] == 8
    plain = vllm_sampling_kwargs(SamplingParams(max_new_tokens=8), 0, [EOS])
    assert "ignore_eos" not in plain and "min_tokens" not in plain


def test_sampling_params_from_config_training_only():
    from megatron_rl.config.schema import Config
    from megatron_rl.trainer.phases import sampling_params

    cfg = Config()
    cfg.rollout.ignore_eos, cfg.rollout.min_new_tokens = True, 4
    sp = sampling_params(cfg, 1)
    assert sp.ignore_eos and sp.min_new_tokens == 4
    val = sampling_params(cfg, 0, validation=True)
    assert not val.ignore_eos and val.min_new_tokens == 0


def test_min_new_tokens_above_max_is_refused():
    from megatron_rl.config.schema import RolloutConfig

    with pytest.raises(ValueError, match="rollout.min_new_tokens"):
        RolloutConfig(max_new_tokens=4, min_new_tokens=5)
