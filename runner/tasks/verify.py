"""task=verify: the runner against Hugging Face transformers' own model with the same weights.

The runner generates greedily; transformers then reads prompt + generated tokens in one
teacher-forced pass. Per prompt: the fraction of positions where transformers' argmax equals
the runner's token, and the largest difference of the chosen tokens' log-probabilities."""
from __future__ import annotations

import random
import tempfile

import torch

from runner.console import console, print_table
from runner.errors import RunnerError
from runner.request import SamplingParams
from runner.tasks.prompts import check_token_ids


def reference_model(loader, device: torch.device, save_dir: str):
    """transformers' model with the runner's weights, float32 (a checkpoint, or the dummy
    weights written to `save_dir` as one)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = loader.path
    if loader.load_format == "dummy":
        from runner.loaders.dummy import iter_dummy_weights
        shapes = loader.model_module().checkpoint_shapes(loader.hf_config())
        tensors = {n: t.cpu().contiguous() for n, t in
                   iter_dummy_weights(shapes, loader.seed, torch.float32, device)}
        save_file(tensors, f"{save_dir}/model.safetensors", metadata={"format": "pt"})
        loader.hf_config().save_pretrained(save_dir)
        path = save_dir
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would split the report
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


class VerifyTask:
    def __init__(self, prompt_token_ids=None, num_prompts: int = 4, max_tokens: int = 16,
                 logprob_tolerance: float = 1e-3, min_agreement: float = 1.0):
        if num_prompts < 1:
            raise RunnerError(f"task.num_prompts={num_prompts}: must be >= 1")
        if max_tokens < 1:
            raise RunnerError(f"task.max_tokens={max_tokens}: must be >= 1")
        if not 0 <= min_agreement <= 1:
            raise RunnerError(f"task.min_agreement={min_agreement}: must be a fraction in [0, 1]")
        if not logprob_tolerance >= 0:
            raise RunnerError(f"task.logprob_tolerance={logprob_tolerance}: must be >= 0")
        if prompt_token_ids is not None:
            if not prompt_token_ids:
                raise RunnerError("task.prompt_token_ids=[]: give at least one prompt, or null "
                                  "for random ones")
            prompt_token_ids = [check_token_ids(p, f"task.prompt_token_ids[{i}]")
                                for i, p in enumerate(prompt_token_ids)]
        self.prompt_token_ids = prompt_token_ids
        self.num_prompts = num_prompts
        self.max_tokens = max_tokens
        self.logprob_tolerance = logprob_tolerance
        self.min_agreement = min_agreement

    def _prompts(self, vocab_size: int) -> list[list[int]]:
        if self.prompt_token_ids is not None:
            return [list(p) for p in self.prompt_token_ids]
        rng = random.Random(0)
        lengths = [1, 7, 33, 130][:self.num_prompts] + [17] * max(0, self.num_prompts - 4)
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]

    def run(self, runner) -> dict:
        prompts = self._prompts(runner.vocab_size)
        params = SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        ids = [runner.add_request(p, params) for p in prompts]
        while runner.has_unfinished():
            runner.step()
        if not runner.plan.is_driver:
            return {}
        requests = [runner.requests[i] for i in ids]
        failed = [(i, r.error) for i, r in enumerate(requests) if r.finish_reason == "error"]
        compared = [i for i, r in enumerate(requests) if r.finish_reason != "error"]
        results = {}
        if compared:
            with tempfile.TemporaryDirectory() as save_dir:
                model = reference_model(runner.loader, runner.device, save_dir)
                results = {i: self._compare(model, requests[i], runner.device) for i in compared}
        rows = []
        for i, r in enumerate(requests):
            agree, diff = ((f"{results[i][0]:.3f}", f"{results[i][1]:.2e}") if i in results
                           else ("-", "-"))
            rows.append([i, len(r.prompt_token_ids), len(r.output_token_ids), agree, diff,
                         r.error or ""])
        print_table("runner vs transformers (teacher-forced, float32 reference)",
                    ["#", "prompt len", "tokens", "agreement", "max |dlogprob|", "error"], rows)
        agreement = min((a for a, _ in results.values()), default=None)
        max_diff = max((d for _, d in results.values()), default=None)
        ok = (not failed and agreement >= self.min_agreement
              and max_diff <= self.logprob_tolerance)
        summary = self._summary(agreement, max_diff, failed, len(requests))
        console.print(f"verify {'passed' if ok else 'FAILED'}: {summary}", markup=False,
                      highlight=False, soft_wrap=True)
        return {"min_agreement": agreement, "max_logprob_diff": max_diff,
                "failed_requests": len(failed), "exit_code": 0 if ok else 1}

    def _summary(self, agreement, max_diff, failed, num_requests: int) -> str:
        """One line: the worst agreement and logprob difference, then any failed request."""
        parts = []
        if agreement is not None:
            parts.append(f"min agreement {agreement:.3f} (need {self.min_agreement}), max logprob "
                         f"diff {max_diff:.2e} (tolerance {self.logprob_tolerance})")
        if failed:
            index, error = failed[0]
            parts.append(f"{len(failed)} of {num_requests} requests ended with an error "
                         f"(prompt {index}: {error})")
        return "; ".join(parts)

    @torch.inference_mode()
    def _compare(self, model, request, device) -> tuple[float, float]:
        """(greedy agreement with transformers, largest |logprob difference|)."""
        prompt, output = request.prompt_token_ids, request.output_token_ids
        full = torch.tensor([prompt + output], device=device)
        logits = model(full).logits[0, len(prompt) - 1:-1].float()  # predicts each output token
        logprobs = torch.log_softmax(logits, dim=-1)
        ours = torch.tensor(output, device=device)
        agree = (logits.argmax(-1) == ours).float().mean().item()
        theirs = logprobs.gather(1, ours[:, None]).squeeze(1).cpu()
        diff = (theirs - torch.tensor(request.logprobs)).abs().max().item()
        return agree, diff
