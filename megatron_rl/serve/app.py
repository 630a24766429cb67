"""An OpenAI-compatible server for our checkpoints on the native engine (FastAPI + uvicorn).

    megatron-rl serve --model DIR [--port 8000] [--host 127.0.0.1]

`/v1/chat/completions` (the tokenizer's chat template renders the messages) and
`/v1/completions` (a prompt string), `/v1/models`, `/health` (with `max_inflight`, the most
requests seen in flight at once: how tests check a client's concurrency bound). One process,
one model (TP=PP=1); requests wait in the event loop while one batch generates on a worker
thread (the engine is not re-entrant). Loopback by default: it has no authentication.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str = "default"
    messages: list[ChatMessage]
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None


class CompletionRequest(BaseModel):
    model: str = "default"
    prompt: str
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int


class NativeGenerator:
    """Text in, text out on the native engine; one call at a time (a lock)."""

    def __init__(self, model_dir: str, dtype: str = "float32"):
        import transformers

        from megatron_rl.models.loading import load_model_chunks
        from megatron_rl.parallel import init_distributed
        from megatron_rl.rollout.native_engine import NativeEngine

        init_distributed()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        chunks = load_model_chunks(model_dir, dtype=dtype)
        for c in chunks:
            c.eval()
        self.engine = NativeEngine(chunks, self.tokenizer)
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            return "\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, text: str, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 stop: list[str], chat: bool) -> Generated:
        import torch

        from megatron_rl.data.collate import collate_prompts, pad_token_id
        from megatron_rl.rollout.protocol import SamplingParams

        ids = list(self.tokenizer.encode(text, add_special_tokens=not chat))
        batch = collate_prompts([{"prompt_ids": ids, "uid": "request"}], pad_token_id(self.tokenizer))
        sp = SamplingParams(temperature=max(temperature, 1e-5), top_p=top_p, n=1, max_new_tokens=max_tokens,
                            stop=stop, greedy=temperature == 0.0, seed=seed if seed is not None else 0)
        with self.lock, torch.no_grad():
            out = self.engine.generate(batch, sp)
        keep = out["response_mask"][0] > 0
        resp = out["response_ids"][0][keep].tolist()
        return Generated(self.tokenizer.decode(resp, skip_special_tokens=True), len(ids), len(resp))


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def build_app(generator, model_name: str = "default"):
    """The FastAPI app over `generator.generate(...)` / `generator.chat_prompt(...)`."""
    from fastapi import FastAPI

    app = FastAPI(title="megatron-rl serve")
    state = {"inflight": 0, "max_inflight": 0, "requests": 0}

    async def run(text: str, req, chat: bool) -> Generated:
        state["inflight"] += 1
        state["requests"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            return await asyncio.to_thread(generator.generate, text, req.max_tokens, req.temperature, req.top_p,
                                           req.seed, _stops(req.stop), chat)
        finally:
            state["inflight"] -= 1

    def usage(g: Generated) -> dict:
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        g = await run(generator.chat_prompt([m.model_dump() for m in req.messages]), req, chat=True)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "usage": usage(g),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": "length" if g.completion_tokens >= req.max_tokens else "stop"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        g = await run(req.prompt, req, chat=False)
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text,
                             "finish_reason": "length" if g.completion_tokens >= req.max_tokens else "stop"}]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "megatron-rl"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **state}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32") -> None:
    import uvicorn

    app = build_app(NativeGenerator(model_dir, dtype), model_name=model_dir)
    uvicorn.run(app, host=host, port=port, log_level="warning")
