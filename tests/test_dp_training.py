"""Opacus on this model, PEFT LoRA included: per-sample gradients are exact, and a DP step
without noise or clipping is a plain step (the traps of DESIGN.md's privacy rule 7)."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from shared_model.dp_training import private_data, private_optimizer, sample_loss, train_private, user_loss
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.splits import leave_one_out
from shared_model.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def world():
    data = generate(SyntheticConfig(n_users=40, n_items=80, seed=3))
    return data, leave_one_out(data)


def fresh_model(world, lora_layers=1, id_rank=0, hide_seen=False):
    data, _ = world
    torch.manual_seed(0)
    model = build_recommender(data.catalog.texts, RecommenderConfig(lora_layers=lora_layers, dropout=0.0,
                                                                    id_rank=id_rank, hide_seen=hide_seen),
                              progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_" in name or "item_ids" in name):
                p.normal_(0, 0.1)  # LoRA's B and the id table start at zero: make every path count
    return model


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("unit, id_rank", [("example", 0), ("user", 0), ("example", 8)])  # 8: a low-rank id table
def test_per_sample_gradients_equal_per_example_autograd(world, unit, id_rank):
    _, split = world
    model = fresh_model(world, id_rank=id_rank)
    data = private_data(model, split.train[:12], unit)
    batch = [t[:6] for t in data.tensors.tensors]
    gsm = GradSampleModule(model, loss_reduction="sum")
    negatives = torch.randint(model.n_items, (len(batch[0]), 8), generator=torch.Generator().manual_seed(1))
    loss = sample_loss(model, data, batch, negatives) * len(batch[0])
    loss.backward()
    per_sample = {n: p.grad_sample.clone() for n, p in trainable(model)}
    gsm.to_standard_module()
    for i in range(len(batch[0])):
        model.zero_grad()
        one = [t[i:i + 1] for t in batch]
        loss_i = sample_loss(model, data, one, negatives[i:i + 1])  # the negatives sample i had in the batch
        loss_i.backward()
        for name, p in trainable(model):
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), (unit, name)


def test_dp_step_without_noise_or_clipping_is_a_plain_step(world):
    _, split = world
    plain, private = fresh_model(world), fresh_model(world)
    data = private_data(plain, split.train[:10], "example")
    batch = list(data.tensors.tensors)
    lr = 0.5

    negatives = torch.randint(plain.n_items, (len(data), 8), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD([p for _, p in trainable(plain)], lr=lr)
    sample_loss(plain, data, batch, negatives).backward()
    optimizer.step()

    wrapped = GradSampleModule(private, loss_reduction="mean")
    optimizer = private_optimizer(torch.optim.SGD([p for _, p in trainable(private)], lr=lr), 0.0, 1e9,
                                  len(data), np.random.default_rng(0), secure_noise=True)
    sample_loss(private, data, batch, negatives).backward()
    optimizer.step()
    wrapped.to_standard_module()
    for (name, a), (_, b) in zip(trainable(plain), trainable(private)):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any("lora_A" in n for n, _ in trainable(private))


def test_private_training_steps_and_leaves_no_hooks(world):
    _, split = world
    model = fresh_model(world)
    before = {n: p.detach().clone() for n, p in trainable(model)}
    data = private_data(model, split.train, "example")
    result = train_private(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps=3,
                           expected_batch=32, lr=0.1, negatives=16)
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
    data = private_data(model, split.train[:10], "example")
    train_private(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2, expected_batch=16,
                  lr=0.1, negatives=8)
    assert seen and not any(seen)
    model.train()
    assert model.blocks[0].dropout.training and model.blocks[0].attention.dropout.training


def test_a_second_lora_layer_is_refused_under_dp(world):
    _, split = world
    model = fresh_model(world, lora_layers=2)
    data = private_data(model, split.train[:4], "example")
    with pytest.raises(ValueError, match="lora-layers 0 or 1"):
        train_private(model, data, 1.0, 1.0, 0.5, 1, 8, 0.1, 8)


def test_an_empty_poisson_batch_still_adds_noise(world):
    _, split = world
    model = fresh_model(world)
    before = {n: p.detach().clone() for n, p in trainable(model)}
    data = private_data(model, split.train[:2], "user")
    result = train_private(model, data, 1.0, 1.0, sample_rate=1e-9, steps=1, expected_batch=1, lr=0.1, negatives=8)
    assert result["train-loss"] == 0.0  # nobody was sampled
    assert all(not torch.equal(before[n], p) for n, p in trainable(model))  # yet the step moved every weight


def test_no_data_at_all_still_steps_with_noise(world):
    """A client without data sends a noise-only update like any other (declining would
    release that it has none)."""
    model = fresh_model(world)
    before = {n: p.detach().clone() for n, p in trainable(model)}
    result = train_private(model, private_data(model, [], "user"), 1.0, 1.0, sample_rate=1.0,
                           steps=2, expected_batch=10, lr=0.1, negatives=8)
    assert result["steps"] == 2 and all(not torch.equal(before[n], p) for n, p in trainable(model))


def test_the_noise_has_std_z_c_over_the_expected_batch_and_is_fresh(world):
    """One noise-only step (nobody sampled): each coordinate moved by lr x N(0, (z C / B)^2),
    drawn from 128 bits of OS entropy (two runs differ)."""
    def moved():
        model = fresh_model(world)
        before = torch.cat([p.detach().flatten().clone() for _, p in trainable(model)])
        train_private(model, private_data(model, [], "user"), 2.0, 0.5, sample_rate=1.0, steps=1,
                      expected_batch=4, lr=0.1, negatives=8)
        return torch.cat([p.detach().flatten() for _, p in trainable(model)]) - before

    first, second = moved(), moved()
    assert first.std().item() == pytest.approx(0.1 * 2.0 * 0.5 / 4, rel=0.05)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("hide_seen", [True, False])
def test_hiding_seen_items_drops_a_users_own_items_from_its_negatives(world, hide_seen):
    """A user's first item, drawn as a negative, is seen at every position: with hide-seen the
    loss is that of the other negatives alone; without, it is one more negative (higher)."""
    _, split = world
    model = fresh_model(world, lora_layers=0, hide_seen=hide_seen)
    inputs, mask, targets = private_data(model, split.train[:6], "user").tensors.tensors
    first = inputs.gather(1, (~mask).sum(1, keepdim=True))  # each user's oldest item in the window
    drawn = torch.randint(model.n_items, (len(inputs), 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        without = user_loss(model, inputs, mask, targets, drawn)
        with_first = user_loss(model, inputs, mask, targets, torch.cat([first, drawn], 1))
    if hide_seen:
        assert torch.allclose(with_first, without, atol=1e-6)
    else:
        assert with_first > without + 1e-3
