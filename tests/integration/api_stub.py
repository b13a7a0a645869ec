"""A backend that speaks every API the gateway costs, with the usage blocks and stream events
real servers send (vLLM's OpenAI, Responses and Anthropic paths, Ollama, llama.cpp, TGI and
SGLang). It reports ``len(body) // 4`` prompt tokens and ``output_tokens`` (at most the
request's limit) output tokens, and records the model each request named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Payload = dict[str, Any]


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


@dataclass
class ApiStub:
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, model)
    output_tokens: int = 16
    negative_usage: bool = False  # report absurd negative counts
    unterminated: int = 0  # a stream sends this many bytes of one event that never ends
    reported: list[tuple[int, int]] = field(default_factory=list)  # what it reported

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _usage(self, body: bytes, limit: int | None) -> tuple[int, int]:
        prompt, output = max(1, len(body) // 4), self.output_tokens
        if limit is not None:
            output = min(output, limit)
        self.reported.append((prompt, output))
        return (-(10**6), -(10**6)) if self.negative_usage else (prompt, output)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        payload: Payload = json.loads(body) if body.startswith(b"{") else {}
        self.seen.append((request.path, payload.get("model")))
        handler = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
            "/v1/messages/count_tokens": self._count_tokens,
            "/api/chat": self._ollama,
            "/api/generate": self._ollama,
            "/completion": self._llamacpp,
            "/generate": self._generate,
            "/generate_stream": self._generate,
            "/v1/rerank": self._rerank,
        }.get(request.path, self._other)
        return await handler(request, body, payload)

    async def _stream(
        self, request: web.Request, kind: str = "text/event-stream"
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": kind})
        await response.prepare(request)
        if self.unterminated:
            await response.write(b"data: " + b"x" * self.unterminated)
        return response

    async def _chat(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, p.get("max_tokens"))
        model = p["model"]
        if not p.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": output},
                }
            )
        response = await self._stream(request)
        for i in range(output):
            delta = {"index": 0, "delta": {"content": f"t{i}"}}
            await response.write(_sse({"id": "c1", "model": model, "choices": [delta]}))
        if (p.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": prompt, "completion_tokens": output}
            await response.write(_sse({"id": "c1", "model": model, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _responses(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, p.get("max_output_tokens"))
        rid = f"resp_{len(self.seen)}"
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }
        text = "t" * output
        message = {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        answer = {
            "id": rid,
            "object": "response",
            "created_at": 0,
            "model": p["model"],
            "status": "completed",
            "output": [message],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }
        if not p.get("stream"):
            return web.json_response(answer)
        response = await self._stream(request)
        created = {**answer, "status": "in_progress", "output": [], "usage": None}
        await response.write(
            _sse(
                {"type": "response.created", "sequence_number": 0, "response": created},
                "response.created",
            )
        )
        for i in range(output):
            delta = {
                "type": "response.output_text.delta",
                "sequence_number": i + 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "t",
                "logprobs": [],
            }
            await response.write(_sse(delta, "response.output_text.delta"))
        done = {"type": "response.completed", "sequence_number": output + 1, "response": answer}
        await response.write(_sse(done, "response.completed"))
        await response.write_eof()
        return response

    async def _messages(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, p.get("max_tokens"))
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": p["model"],
            "content": [{"type": "text", "text": "t" * output}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }
        if not p.get("stream"):
            return web.json_response(message)
        response = await self._stream(request)
        start = {**message, "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": prompt, "output_tokens": 1}
        await response.write(_sse({"type": "message_start", "message": start}, "message_start"))
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        await response.write(_sse(block, "content_block_start"))
        for _ in range(output):
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "t"},
            }
            await response.write(_sse(delta, "content_block_delta"))
        await response.write(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": output},
        }
        await response.write(_sse(end, "message_delta"))
        await response.write(_sse({"type": "message_stop"}, "message_stop"))
        await response.write_eof()
        return response

    async def _count_tokens(
        self, request: web.Request, body: bytes, p: Payload
    ) -> web.StreamResponse:
        return web.json_response({"input_tokens": len(body) // 4})

    async def _ollama(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, (p.get("options") or {}).get("num_predict"))
        final = {
            "model": p["model"],
            "done": True,
            "prompt_eval_count": prompt,
            "eval_count": output,
        }
        if p.get("stream") is False:
            return web.json_response({**final, "response": "t" * output})
        response = await self._stream(request, "application/x-ndjson")
        for _ in range(output):
            await response.write(
                json.dumps({"model": p["model"], "response": "t", "done": False}).encode() + b"\n"
            )
        await response.write(json.dumps(final).encode() + b"\n")
        await response.write_eof()
        return response

    async def _llamacpp(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, p.get("n_predict"))
        if not p.get("stream"):
            return web.json_response(
                {"content": "t" * output, "tokens_evaluated": prompt, "tokens_predicted": output}
            )
        response = await self._stream(request)
        for _ in range(output):
            await response.write(_sse({"content": "t", "stop": False}))
        timings = {"prompt_n": prompt, "predicted_n": output}
        await response.write(_sse({"content": "", "stop": True, "timings": timings}))
        await response.write_eof()
        return response

    async def _generate(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        params = p.get("parameters") or p.get("sampling_params") or {}
        prompt, output = self._usage(body, params.get("max_new_tokens"))
        sglang = "text" in p
        if request.path == "/generate" and not p.get("stream"):
            if sglang:
                meta = {"prompt_tokens": prompt, "completion_tokens": output}
                return web.json_response({"text": "t" * output, "meta_info": meta})
            return web.json_response(
                {"generated_text": "t" * output, "details": {"generated_tokens": output}}
            )
        response = await self._stream(request)
        for i in range(output):
            details = {"generated_tokens": output} if i == output - 1 else None
            await response.write(_sse({"token": {"id": i, "text": "t"}, "details": details}))
        await response.write_eof()
        return response

    async def _rerank(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, _ = self._usage(body, 0)
        results = [{"index": i, "relevance_score": 0.5} for i in range(len(p["documents"]))]
        return web.json_response({"results": results, "usage": {"total_tokens": prompt}})

    async def _other(self, request: web.Request, body: bytes, p: Payload) -> web.StreamResponse:
        prompt, output = self._usage(body, None)
        return web.json_response(
            {"ok": True, "usage": {"prompt_tokens": prompt, "completion_tokens": output}}
        )
