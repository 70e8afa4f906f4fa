"""Turn questions into token ids with the model's chat template, enforcing a length limit."""

from __future__ import annotations

from collections.abc import Sequence

from .data import Example, build_messages, limit_prompt_length


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready to generate.

    Rendered to text first and tokenised without extra special tokens, because the template
    already holds them (and ``apply_chat_template(tokenize=True)`` changed its return type
    across transformers versions). Tokenizers without a template get the plain user text.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text)["input_ids"])


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    task: str,
    *,
    max_prompt_tokens: int | None,
    long_prompts: str = "skip",
    system_prompt: str = "",
) -> tuple[list[Example], list[list[int]], str]:
    """Encode every example; prompts over ``max_prompt_tokens`` are skipped, truncated or refused.

    The decision is :func:`spine_ttrl.data.limit_prompt_length`'s; ``truncate`` keeps the
    *last* ``max_prompt_tokens`` tokens, so the end of the question, the answer-format
    instruction and the assistant header survive.

    Returns:
        (kept examples, their prompt ids, a one-line report for the log).

    ``tokenizer`` may be a vision-language processor: then the prompts carry their images
    (:func:`spine_ttrl.vision.encode_image_examples`). Questions with images and a text-only
    tokenizer are refused.
    """
    if getattr(tokenizer, "image_processor", None) is not None:
        from .vision import encode_image_examples

        return encode_image_examples(tokenizer, examples, task, max_prompt_tokens=max_prompt_tokens,
                                     long_prompts=long_prompts, system_prompt=system_prompt)
    if any(ex.images for ex in examples):
        from .vision import check_text_model_data

        check_text_model_data(examples)
    ids = [encode_prompt(tokenizer, build_messages(ex, task, system_prompt=system_prompt or None)) for ex in examples]
    decision = limit_prompt_length(examples, [len(p) for p in ids], max_prompt_tokens, long_prompts)
    cut = set(decision.truncated)
    kept_ids = [ids[i][-max_prompt_tokens:] if i in cut else ids[i] for i in decision.kept]
    return decision.examples, kept_ids, decision.report
