"""Runner: owns one rank's components; `step()` runs one scheduled batch, `generate()` runs
requests to completion.

Keep this file small and stable: a feature that only some runs need lives in its own module
and is called from here, not written here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from runner.async_decode import AsyncDecode, InflightStep
from runner.errors import RequestError, RunnerError
from runner.forward_context import ForwardContext
from runner.kv_cache import BlockAllocator, allocate_kv_caches
from runner.request import (Request, RequestOutput, SamplingParams, TokenEvent,
                            prompt_token_list, sampling_problem)
from runner.sampler import StepLogits, prompt_key, sample, step_logits
from runner.scheduler import ScheduledBatch, Scheduler, cdiv
from runner.step_inputs import DecodeBuffers, StepInputs, prefill_inputs


# Prefills past this many tokens take paths that compile nothing per size (the MoE's torch
# grouped GEMM, SDPA); warming up to max_num_batched_tokens would also need a worst-case
# prefill's activation memory at startup.
MAX_WARM_UP_TOKENS = 1024


class Runner:
    def __init__(self, model, attention, block_table, plan, graph, num_blocks: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 device: torch.device, kv_dtype: torch.dtype, eos_token_ids: Sequence[int] = (),
                 tokenizer=None, async_scheduling: bool = True):
        self.model = model
        self.attention = attention
        self.block_table = block_table
        self.plan = plan
        self.graph = graph
        self.device = device
        self.kv_dtype = kv_dtype
        self.weights_source = "dummy (random, seeded)"
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(attention, model.kv_cache_spec(), model.num_layers,
                                            num_blocks, block_table.block_size, kv_dtype, device)
        self.max_num_blocks = cdiv(max_model_len, block_table.virtual_block_size)
        self.scheduler = Scheduler(BlockAllocator(num_blocks), block_table.virtual_block_size,
                                   max_num_seqs, max_num_batched_tokens, max_model_len)
        self.decode_buffers = DecodeBuffers(max_num_seqs, self.max_num_blocks,
                                            block_table.max_local_len(max_model_len),
                                            self.vocab_size, model.lm_head.weight.dtype,
                                            device)
        self.requests: dict[int, Request] = {}
        self._next_req_id = 0
        self.async_decode = AsyncDecode(max_num_seqs, device) if async_scheduling else None
        self._inflight: InflightStep | None = None  # a launched decode step not yet read
        if device.type == "cuda":
            self.warm_up_prefill(min(max_num_batched_tokens, MAX_WARM_UP_TOKENS))
        self.graph.capture(self._decode_step, self.decode_buffers,
                           tuple(getattr(attention, "decode_length_buckets", ())))

    def warm_up_prefill(self, max_tokens: int) -> None:
        """Run the prefill path (storing nothing) at 1, 2, 4, ... tokens up to max_tokens, so
        that Triton compiles the kernels of every size class (e.g. the fused MoE's tiles) at
        startup, not within a first request's time to first token. Every rank runs the same
        sizes in the same order (their collectives pair up)."""
        num_tokens = 1
        while True:
            size = min(num_tokens, max_tokens)
            requests = [Request(-1, [0] * min(self.max_model_len, size - start), SamplingParams())
                        for start in range(0, size, self.max_model_len)]
            inputs = prefill_inputs(requests, self.block_table, self.max_num_blocks, self.device)
            inputs.meta.slot_mapping.fill_(-1)  # no blocks were given out: store nothing
            self._prefill_logits(inputs)
            if num_tokens >= max_tokens:
                break
            num_tokens *= 2

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the cache holds over the DCP group (num_blocks * block_size * dcp)."""
        return self.num_blocks * self.block_table.virtual_block_size

    # --- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; an invalid one (prompt or sampling parameters) is finished at once
        with its error, the others are unaffected."""
        request = Request(self._next_req_id, [], params)
        self._next_req_id += 1
        self.requests[request.req_id] = request
        try:
            request.prompt_token_ids = prompt_token_list(prompt_token_ids)
            self._validate(request)
            request.sample_key = prompt_key(request.prompt_token_ids)
        except RequestError as e:
            request.error = str(e)
            self.scheduler.finish(request, "error")
            return request.req_id
        self.scheduler.add(request)
        return request.req_id

    def _validate(self, request: Request) -> None:
        tokens = request.prompt_token_ids
        problem = sampling_problem(request.params)
        if problem:
            raise RequestError(problem)
        if not tokens:
            raise RequestError("empty prompt: a prompt needs at least one token")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.vocab_size})")
        if len(tokens) >= self.max_model_len:
            raise RequestError(f"prompt of {len(tokens)} tokens leaves no room to generate: "
                               f"max_model_len is {self.max_model_len}")
        if not self.scheduler.fits_alone(request):
            raise RequestError("request cannot fit in the KV cache even alone")

    def is_finished(self, req_id: int) -> bool:
        return self.requests[req_id].finish_reason is not None

    def has_unfinished(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished()

    def output(self, req_id: int) -> RequestOutput:
        """The request's tokens read so far (finish_reason None while it runs), or its result."""
        r = self.requests[req_id]
        text = self.tokenizer.decode(r.output_token_ids) if self.tokenizer else None
        return RequestOutput(r.req_id, r.prompt_token_ids, list(r.output_token_ids),
                             r.finish_reason, r.error, text)

    # --- one step ---------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Run one batch; return the token each of its requests got. With async scheduling a
        greedy decode step is read only after the next decode step has been launched."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            logits = self.run_forward(batch)
            if self.async_decode is None or not self.async_decode.overlaps(batch):
                tokens, logprobs = self.sample(batch, logits)
                return [self.append_token(r, t, lp)
                        for r, t, lp in zip(batch.requests, tokens, logprobs)]
            inflight = self._hold(batch, logits)
        batch = self.scheduler.continue_decode()  # a subset of the held greedy step's requests
        if batch is not None:
            sources = self.async_decode.sources(batch, inflight)
            self._inflight = self._hold(batch, self.run_forward(batch, sources))
            self.async_decode.num_overlapped += 1
        self.last_step_was_prefill = False
        return [self.append_token(request, token, logprob)
                for request, token, logprob in self.async_decode.read(inflight)]

    def run_forward(self, batch: ScheduledBatch, sources: list[int] | None = None) -> StepLogits:
        """The forward of a scheduled batch (decode: one graph replay when captured) -> logits of
        each request's last token, [R, vocab] fp32, with their greedy summary. `sources`: rows of
        the previous decode step whose sampled tokens this decode step feeds. A decode step's
        logits are a view of DecodeBuffers.logits: read them before the next decode step."""
        self.last_step_was_prefill = batch.is_prefill
        if batch.is_prefill:
            return self._prefill_logits(prefill_inputs(batch.requests, self.block_table,
                                                       self.max_num_blocks, self.device))
        num_reqs = len(batch.requests)
        num_padded = self.graph.padded_size(num_reqs)
        longest = self.decode_buffers.stage(batch.requests, num_padded, sources)
        max_len = self.block_table.max_local_len(longest)
        return self.graph.replay(self.decode_buffers.inputs(num_padded, max_len)).rows(num_reqs)

    def _hold(self, batch: ScheduledBatch, logits: StepLogits) -> InflightStep:
        """Hold a launched decode step; requests whose in-flight token is their last leave the
        batch now (their blocks are free for the next step), finishing when it is read."""
        step = self.async_decode.hold(batch, logits)
        for request in batch.requests:
            if self._length_reached(request, request.num_tokens - len(request.prompt_token_ids)):
                self.scheduler.stop_running(request)
        return step

    def sample(self, batch: ScheduledBatch, logits: StepLogits) -> tuple[list[int], list[float]]:
        """Each request's next token and its log-probability."""
        return sample(logits, [r.params for r in batch.requests],
                      [r.sample_key for r in batch.requests],
                      [len(r.output_token_ids) for r in batch.requests])

    def _prefill_logits(self, inputs: StepInputs) -> StepLogits:
        hidden = self._forward(inputs)
        return step_logits(self.model.compute_logits(hidden[inputs.logits_indices]))

    def _decode_step(self, inputs: StepInputs) -> StepLogits:
        """What a decode graph holds: staged rows -> inputs -> forward -> logits [padded, V], and
        the greedy tokens kept on the device for the next step (async scheduling)."""
        num_padded = inputs.input_ids.shape[0]
        self.decode_buffers.derive(num_padded, self.block_table)
        return step_logits(self.model.compute_logits(
            self._forward(inputs), out=self.decode_buffers.logits[:num_padded]),
            ids_out=self.decode_buffers.sampled_ids[:num_padded])

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        ctx = ForwardContext(inputs.meta, self.kv_caches, self.attention)
        with torch.inference_mode():
            return self.model(inputs.input_ids, inputs.positions, ctx)

    def append_token(self, request: Request, token: int, logprob: float) -> TokenEvent:
        """Give `request` its next token; finish it on EOS or at its length limit."""
        request.output_token_ids.append(token)
        request.logprobs.append(logprob)
        reason = None
        if token in self.eos_token_ids and not request.params.ignore_eos:
            reason = "stop"
        elif self._length_reached(request, len(request.output_token_ids)):
            reason = "length"
        if reason:
            self.scheduler.finish(request, reason)
        return TokenEvent(request.req_id, token, reason is not None, reason)

    def _length_reached(self, request: Request, num_outputs: int) -> bool:
        return (num_outputs >= request.params.max_tokens
                or len(request.prompt_token_ids) + num_outputs >= self.max_model_len)

    def shutdown(self) -> None:
        """Free captured graphs before the process groups go (a clean NCCL teardown)."""
        self.graph.release()

    # --- whole runs -------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], max_tokens: int = 16,
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order."""
        params = params or SamplingParams(max_tokens=max_tokens)
        problem = sampling_problem(params)  # shared by every prompt: refuse the call
        if problem:
            raise RunnerError(problem)
        ids = [self.add_request(p, params) for p in prompt_token_ids]
        while self.has_unfinished():
            self.step()
        return [self.output(i) for i in ids]
