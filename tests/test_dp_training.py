"""Opacus on this model, PEFT LoRA included: per-sample gradients are exact, and a DP step
without noise or clipping is a plain step (the traps of DESIGN.md's privacy rule 7)."""

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader

from shared_model.dp_training import private_data, sample_loss, train_private
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.splits import leave_one_out
from shared_model.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def world():
    data = generate(SyntheticConfig(n_users=40, n_items=80, seed=3))
    return data, leave_one_out(data)


def fresh_model(world, lora_layers=1):
    data, _ = world
    torch.manual_seed(0)
    model = build_recommender(data.catalog.texts, RecommenderConfig(lora_layers=lora_layers, dropout=0.0),
                              progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_" in name or "item_ids" in name):
                p.normal_(0, 0.1)  # LoRA's B and the id table start at zero: make every path count
    return model


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("unit", ["example", "user"])
def test_per_sample_gradients_equal_per_example_autograd(world, unit):
    _, split = world
    model = fresh_model(world)
    data = private_data(split.train[:12], model.config.history, unit)
    batch = [t[:6] for t in data.tensors.tensors]
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = sample_loss(model, data, batch, 8, torch.Generator().manual_seed(1)) * len(batch[0])
    loss.backward()
    per_sample = {n: p.grad_sample.clone() for n, p in trainable(model)}
    gsm.to_standard_module()
    for i in range(len(batch[0])):
        model.zero_grad()
        generator = torch.Generator().manual_seed(1)
        negatives = torch.randint(model.n_items, (len(batch[0]), 8), generator=generator)[i:i + 1]
        one = [t[i:i + 1] for t in batch]
        loss_i = sample_loss_with(model, data, one, negatives)  # the negatives sample i had in the batch
        loss_i.backward()
        for name, p in trainable(model):
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), (unit, name)


def sample_loss_with(model, data, batch, negatives):
    from shared_model.dp_training import user_loss
    from shared_model.recommender import example_loss

    first, mask, last = batch
    if data.unit == "example":
        return example_loss(model, first, mask, last, negatives)
    return user_loss(model, first, mask, last, negatives)


def test_dp_step_without_noise_or_clipping_is_a_plain_step(world):
    _, split = world
    plain, private = fresh_model(world), fresh_model(world)
    data = private_data(split.train[:10], plain.config.history, "example")
    batch = list(data.tensors.tensors)
    lr = 0.5

    optimizer = torch.optim.SGD([p for _, p in trainable(plain)], lr=lr)
    sample_loss(plain, data, batch, 8, torch.Generator().manual_seed(5)).backward()
    optimizer.step()

    engine = PrivacyEngine()
    loader = DataLoader(data.tensors, batch_size=len(data))
    optimizer = torch.optim.SGD([p for _, p in trainable(private)], lr=lr)
    wrapped, optimizer, loader = engine.make_private(module=private, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=0.0, max_grad_norm=1e9,
                                                     poisson_sampling=False)
    (full,) = list(loader)
    sample_loss(private, data, full, 8, torch.Generator().manual_seed(5)).backward()
    optimizer.step()
    wrapped.to_standard_module()
    for (name, a), (_, b) in zip(trainable(plain), trainable(private)):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any("lora_A" in n for n, _ in trainable(private))


def test_private_training_steps_and_leaves_no_hooks(world):
    _, split = world
    model = fresh_model(world)
    before = {n: p.detach().clone() for n, p in trainable(model)}
    data = private_data(split.train, model.config.history, "example")
    result = train_private(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=3,
                           expected_batch=32, lr=0.1, negatives=16, seed=0)
    assert result["steps"] == 3 and result["sample-rate"] == 0.2  # the rate and steps that ran: public settings
    assert all(not torch.equal(before[n], p) for n, p in trainable(model))
    assert not any(m._forward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for _, p in trainable(model))


def test_private_training_runs_without_dropout(world):
    """Dropout's random masks would lower how well a batch's clipped gradients agree."""
    _, split = world
    model = fresh_model(world)
    model.blocks[0].dropout.p = 0.9
    seen = []
    model.blocks[0].dropout.register_forward_hook(lambda module, args, out: seen.append(module.training))
    data = private_data(split.train[:10], model.config.history, "example")
    train_private(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2, expected_batch=16,
                  lr=0.1, negatives=8, seed=0)
    assert seen and not any(seen)
    model.train()
    assert model.blocks[0].dropout.training and model.blocks[0].attention.dropout.training


def test_a_second_lora_layer_is_refused_under_dp(world):
    _, split = world
    model = fresh_model(world, lora_layers=2)
    data = private_data(split.train[:4], model.config.history, "example")
    with pytest.raises(ValueError, match="lora-layers 0 or 1"):
        train_private(model, data, 1.0, 1.0, 0.5, 1, 8, 0.1, 8, 0)


def test_an_empty_poisson_batch_still_adds_noise(world):
    _, split = world
    model = fresh_model(world)
    before = {n: p.detach().clone() for n, p in trainable(model)}
    data = private_data(split.train[:2], model.config.history, "user")
    result = train_private(model, data, 1.0, 1.0, sample_rate=1e-9, steps=1, expected_batch=1, lr=0.1, negatives=8,
                           seed=0)
    assert result["train-loss"] == 0.0  # nobody was sampled
    assert all(not torch.equal(before[n], p) for n, p in trainable(model))  # yet the step moved every weight
