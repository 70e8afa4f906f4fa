"""Checkpoint helpers: what is saved, how many are kept, and that a save round-trips."""

import pytest
import torch

from spine_ttrl.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen, like a base model under LoRA
    return model


def test_trainable_state_is_the_trainable_parameters_without_copies():
    model = _model()
    state = trainable_state(model)
    assert sorted(state) == ["1.bias", "1.weight"]
    # views of the parameters, not copies (a copy doubles the peak memory of a full fine-tuning save)
    assert state["1.weight"].data_ptr() == model[1].weight.data_ptr()
    assert not state["1.weight"].requires_grad


def test_save_load_round_trip_and_keep(tmp_path):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = {n: t.clone() for n, t in trainable_state(model).items()}
    for step in (1, 2, 3):
        torch.manual_seed(step)
        rng_at_save = torch.get_rng_state()
        save_checkpoint(tmp_path, step, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                         "step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]

    # the saved tensors are the values at save time, not whatever the parameters become later
    with torch.no_grad():
        model[1].weight.add_(1.0)
    torch.manual_seed(99)
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["step"] == 3
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # the global RNG is restored
    fresh = _model()
    load_trainable_state(fresh, state["model"])
    for n, t in saved.items():
        assert torch.equal(dict(fresh.named_parameters())[n], t)
    assert state["optimizer"]["state"][0]["step"] == 1


def test_load_trainable_state_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        load_trainable_state(_model(), {"nope": torch.zeros(1)})
