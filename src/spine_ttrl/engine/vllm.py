"""vLLM rollouts for the built-in engine (``--sampler vllm``): the votes come from vLLM.

vLLM runs colocated with the trained model on the same GPU (``gpu_memory_utilization`` sets its
share); after every update the trained weights are pushed into it (:meth:`VLLMSampler.sync_weights`,
LoRA merged first), so the votes of step t+1 come from the policy after update t.

vLLM returns the sampled tokens but not the entropy of the full next-token distribution, which
forking-token selection needs: the rollout carries ``entropies=None`` and the update computes the
behaviour entropies and log-probs with one no-grad pass of the trained model over the *kept*
completions (``update_on_batch`` without ``behaviour_entropy``; skipped when one micro-batch and
one update let the gradient pass provide them). That pass costs about a third of a training
forward+backward over the kept rows; dropped votes are never scored.

Untested without a GPU: the real ``vllm.LLM`` construction, generation and the weight push
(``llm_engine.model_executor.driver_worker.model_runner.model.load_weights``, the path TRL's
colocate mode uses with vLLM 0.10–0.11). The adapter's own logic — prompt and parameter
translation, the rollout's shapes, EOS handling, seeding, LoRA name mapping — is unit-tested
on CPU against a fake engine with the same calls (``tests/unit/test_vllm_sampler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import SamplingParams
from .sampling import Rollout, _left_pad

VLLM_MISSING = "--sampler vllm needs vLLM: pip install 'spine-ttrl[vllm]' (on a machine with an NVIDIA GPU)"


@dataclass
class VLLMSampler:
    """A :class:`~spine_ttrl.engine.Sampler` backed by a ``vllm.LLM`` (or anything with its calls).

    ``llm``: the engine (``generate(prompts, sampling_params, use_tqdm=False)``); ``model``: the
    trained transformers model whose weights :meth:`sync_weights` pushes; ``params_factory``:
    ``vllm.SamplingParams`` (injectable for tests).
    """

    llm: object
    model: object
    tokenizer: object
    eos_token_ids: set[int]
    pad_token_id: int
    params_factory: object

    @property
    def device(self) -> torch.device:
        from .precision import device_of

        return device_of(self.model)

    def generate(self, prompt_ids, params: SamplingParams, *, generator=None, progress=None) -> Rollout:
        prompts = [list(map(int, p)) for p in prompt_ids]
        # One seed per call, drawn from the loop's generator: reproducible given the generator's state.
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        sp = self.params_factory(n=params.num_samples, temperature=params.temperature,
                                 top_p=params.top_p if params.temperature > 0 else 1.0,
                                 max_tokens=params.max_new_tokens, seed=seed,
                                 stop_token_ids=sorted(self.eos_token_ids), skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        rows, finished = [], []
        for out in outputs:
            if len(out.outputs) != params.num_samples:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} completions, expected {params.num_samples}")
            for o in out.outputs:
                ids = list(o.token_ids)
                done = o.finish_reason == "stop"
                # vLLM leaves a stop token out of token_ids; the built-in sampler keeps the EOS
                # (trained on, masked True), so put it back.
                if done and (not ids or ids[-1] not in self.eos_token_ids):
                    stop = getattr(o, "stop_reason", None)
                    ids.append(int(stop) if isinstance(stop, int) else min(self.eos_token_ids))
                rows.append(ids[:params.max_new_tokens])
                finished.append(done)
            if progress is not None:
                progress(sum(len(o.token_ids) for o in out.outputs))
        return self._rollout(prompts, rows, finished, params.num_samples)

    def _rollout(self, prompts, rows, finished, G) -> Rollout:
        prompt_ids, prompt_mask = _left_pad([p for p in prompts for _ in range(G)], self.pad_token_id)
        T = max(max((len(r) for r in rows), default=1), 1)
        completion = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, r in enumerate(rows):
            completion[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion,
                       completion_mask=mask, truncated=~torch.tensor(finished, dtype=torch.bool), texts=texts,
                       group_size=G, entropies=None)

    def sync_weights(self) -> None:
        """Push the trained weights into vLLM (a LoRA adapter is merged for the push, then unmerged)."""
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        peft = hasattr(self.model, "merge_adapter")
        if peft:
            self.model.merge_adapter()
        try:
            with torch.no_grad():
                target.load_weights(list(vllm_weights(self.model.state_dict(), peft)))
        finally:
            if peft:
                self.model.unmerge_adapter()


def vllm_weights(state_dict: dict, peft: bool):
    """(name, tensor) pairs in the base model's naming: PEFT's ``base_model.model.`` prefix and
    ``.base_layer`` infix removed, adapter tensors (``lora_``) and saved-module originals dropped."""
    for name, tensor in state_dict.items():
        if peft:
            if "lora_" in name or "original_module" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            name = name.replace("modules_to_save.default.", "")
        yield name, tensor


def load_vllm_sampler(engine, model_path: str, *, gpu_memory_utilization: float, max_model_len: int | None,
                      seed: int) -> VLLMSampler:
    """A colocated ``vllm.LLM`` for the built-in engine's model (``model_path``: the resolved HF
    directory or id), sharing its GPU."""
    try:
        import vllm
    except ImportError:
        raise ImportError(VLLM_MISSING) from None
    dtype = "bfloat16" if engine.autocast_dtype is torch.bfloat16 else "float32"
    llm = vllm.LLM(model=model_path, tokenizer=model_path, gpu_memory_utilization=gpu_memory_utilization,
                   max_model_len=max_model_len, dtype=dtype, seed=seed, enable_prefix_caching=True)
    s = engine.sampler
    return VLLMSampler(llm, engine.model, engine.tokenizer, s.eos_token_ids, s.pad_token_id, vllm.SamplingParams)
