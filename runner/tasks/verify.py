"""task=verify: the runner against Hugging Face transformers' own model with the same weights.

The runner generates greedily; transformers then reads prompt + generated tokens in one
teacher-forced pass. Per prompt: the fraction of positions where transformers' argmax equals
the runner's token, and the largest difference of the chosen tokens' log-probabilities."""
from __future__ import annotations

import random
import tempfile

import torch

from runner.console import console, print_table
from runner.request import SamplingParams


def reference_model(loader, device: torch.device, save_dir: str):
    """transformers' model with the runner's weights, float32 (a checkpoint, or the dummy
    weights written to `save_dir` as one)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = loader.path
    if loader.load_format == "dummy":
        from runner.loaders.dummy import iter_dummy_weights
        shapes = loader.model_module().checkpoint_shapes(loader.hf_config())
        tensors = {n: t.cpu().contiguous() for n, t in
                   iter_dummy_weights(shapes, loader.seed, torch.float32, device)}
        save_file(tensors, f"{save_dir}/model.safetensors", metadata={"format": "pt"})
        loader.hf_config().save_pretrained(save_dir)
        path = save_dir
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


class VerifyTask:
    def __init__(self, prompt_token_ids=None, num_prompts: int = 4, max_tokens: int = 16,
                 logprob_tolerance: float = 1e-3, min_agreement: float = 1.0):
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
        with tempfile.TemporaryDirectory() as save_dir:
            model = reference_model(runner.loader, runner.device, save_dir)
            rows = [self._compare(model, runner.requests[i], runner.device) for i in ids]
        print_table("runner vs transformers (teacher-forced, float32 reference)",
                    ["#", "prompt len", "tokens", "agreement", "max |dlogprob|"],
                    [[i, r[0], r[1], f"{r[2]:.3f}", f"{r[3]:.2e}"] for i, r in enumerate(rows)])
        agreement = min(r[2] for r in rows)
        max_diff = max(r[3] for r in rows)
        ok = agreement >= self.min_agreement and max_diff <= self.logprob_tolerance
        console.print(f"verify {'passed' if ok else 'FAILED'}: min agreement {agreement:.3f} "
                      f"(need {self.min_agreement}), max logprob diff {max_diff:.2e} "
                      f"(tolerance {self.logprob_tolerance})")
        return {"min_agreement": agreement, "max_logprob_diff": max_diff,
                "exit_code": 0 if ok else 1}

    @torch.inference_mode()
    def _compare(self, model, request, device) -> tuple[int, int, float, float]:
        prompt, output = request.prompt_token_ids, request.output_token_ids
        full = torch.tensor([prompt + output], device=device)
        logits = model(full).logits[0, len(prompt) - 1:-1].float()  # predicts each output token
        logprobs = torch.log_softmax(logits, dim=-1)
        ours = torch.tensor(output, device=device)
        agree = (logits.argmax(-1) == ours).float().mean().item()
        theirs = logprobs.gather(1, ours[:, None]).squeeze(1).cpu()
        diff = (theirs - torch.tensor(request.logprobs)).abs().max().item()
        return len(prompt), len(output), agree, diff
