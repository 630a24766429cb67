"""tools/gpu_vllm_vl.py's vLLM run on CPU against a fake `vllm.LLM` (the GPU run happens once,
so its code path is checked here): the Trainer with rollout.engine=vllm on the tiny Qwen2.5-VL
logs rollout/logprob_diff and the weight sync, the engine gets the image kwargs, the tower is
synced only when it trains, and the script's expansion probe compares vLLM's prompts with ours."""
import types

import pytest
import torch


class FakeLLM:
    """Expands each <|image_pad|> by the image's grid as vLLM's Qwen2-VL prompt update does
    (the model's own image processor, with the `mm_processor_kwargs` size); samples text tokens."""

    instances: list = []

    def __init__(self, **kwargs):
        from megatron_rl.data.multimodal import VisionTokens, load_image_processor
        from transformers import AutoTokenizer

        self.kwargs, self.loaded = kwargs, []
        self.ip = load_image_processor(kwargs["model"])
        self.size = (kwargs.get("mm_processor_kwargs") or {}).get("size")
        tok = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        self.pad, self.text_ids = VisionTokens.of(tok).pad, [tok.convert_tokens_to_ids(w) for w in ("1", "2", "red")]
        FakeLLM.instances.append(self)

    def generate(self, requests, params, use_tqdm=False):
        outs, g = [], torch.Generator().manual_seed(0)
        for req, sp in zip(requests, params):
            images = (req.get("multi_modal_data") or {}).get("image", [])
            counts = iter([])
            if images:
                grid = self.ip(images=images, return_tensors="pt", **({"size": self.size} if self.size else {}))
                counts = iter((grid["image_grid_thw"].prod(-1) // self.ip.merge_size ** 2).tolist())
            expanded = []
            for t in req["prompt_token_ids"]:
                expanded += [t] * next(counts) if t == self.pad else [t]
            comps = []
            for j in range(sp.kw.get("n", 1)):
                ids = [self.text_ids[int(i)] for i in torch.randint(0, 3, (sp.kw["max_tokens"],), generator=g)]
                lps = [{t: -1.1} for t in ids] if "logprobs" in sp.kw else None
                comps.append(types.SimpleNamespace(index=j, token_ids=ids, finish_reason="length", logprobs=lps))
            outs.append(types.SimpleNamespace(prompt_token_ids=expanded, outputs=comps))
        return outs

    def apply_model(self, fn):
        return [fn(types.SimpleNamespace(load_weights=lambda ws: [self.loaded.append(n) for n, _ in ws]))]

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        pass

    def reset_prefix_cache(self):
        pass


def _plan_as_on_gpu(monkeypatch):
    import megatron_rl.plan as plan_pkg
    resolve = plan_pkg.resolve_plan          # the plan refuses vllm on cpu: plan as on a GPU, run on CPU
    monkeypatch.setattr(plan_pkg, "resolve_plan", lambda cfg, **kw: resolve(cfg, **{**kw, "device": "cuda"}))


@pytest.mark.parametrize("run", ["tiny_frozen", "tiny_tower"])
def test_script_vllm_run_logs_logprob_diff_sync_and_expansion(fake_vllm, monkeypatch, tmp_path, run):
    import tools.gpu_vllm_vl as script

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    fake_vllm.LLM = FakeLLM
    _plan_as_on_gpu(monkeypatch)
    FakeLLM.instances.clear()
    script.tiny_assets(tmp_path)
    out = tmp_path / "res.json"
    assert script.child(run, tmp_path, 1, out) == 0, out.read_text()
    res = __import__("json").loads(out.read_text())
    (step,) = res["steps"]
    assert step["rollout/logprob_diff"] > 0 and step["weight_sync/bytes"] > 0
    assert "engine check passed every step; probe 8/8 rows equal" in res["expanded_match"]
    (llm,) = FakeLLM.instances
    assert llm.kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0} and llm.kwargs["max_model_len"] == 256
    assert llm.kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 64, "longest_edge": 1024}}
    assert llm.kwargs["enforce_eager"] is True
    towers = [n for n in llm.loaded if n.startswith("visual.")]
    assert (len(towers) > 0) == (run == "tiny_tower") and len(llm.loaded) > len(towers)
    assert "|" in script.table([res])


class OtherGridLLM(FakeLLM):
    """vLLM's processor chose another grid: one image pad more than ours."""

    def generate(self, requests, params, use_tqdm=False):
        outs = super().generate(requests, params, use_tqdm)
        for o in outs:
            if self.pad in o.prompt_token_ids:
                o.prompt_token_ids.insert(o.prompt_token_ids.index(self.pad), self.pad)
        return outs


def test_script_reports_a_prompt_expansion_mismatch(fake_vllm, monkeypatch, tmp_path):
    import json

    import tools.gpu_vllm_vl as script

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    fake_vllm.LLM = OtherGridLLM
    _plan_as_on_gpu(monkeypatch)
    script.tiny_assets(tmp_path)
    out = tmp_path / "res.json"
    assert script.child("tiny_frozen", tmp_path, 1, out) == 1
    res = json.loads(out.read_text())
    assert res["ok"] is False and res["expanded_match"].startswith("NO: vLLM expanded prompt row 0")
    assert "| NO: RuntimeError: vLLM expanded prompt" in script.table([res])
