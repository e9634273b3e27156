"""The recommender: cached prefix vs a fresh encoder pass, state round trips, per-example
independence, and that it learns."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from shared_model.encoder import load_encoder, mean_pool
from shared_model.metrics import evaluate_scores
from shared_model.recommender import (Ranker, RecommenderConfig, build_recommender, example_loss, masked_sequence_loss,
                                      score_catalog, sequence_loss, sequence_states)
from shared_model.splits import leave_one_out
from shared_model.state import load_state, save_state
from shared_model.synthetic import SyntheticConfig, generate
from shared_model.training import (TrainConfig, add_profiles, make_examples, make_optimizer, sequence_batches,
                                   sequence_chunks, train_sequences)
from simulations.baselines import popularity_scores

TEXTS = ["Toy Story (1995). Genres: Animation, Children's, Comedy", "A dark film about a haunted house.",
         "Heat (1995). Genres: Action, Crime, Thriller", "A gentle story about first love and a wedding."]


@pytest.fixture(scope="module")
def small():
    return generate(SyntheticConfig(n_users=300, n_items=150, seed=1))


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def randomise_lora(model) -> None:
    """LoRA's B starts at zero; give every adapter weight a random value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)


def fresh_forward(encoder, texts, lora_layers, adapted_model):
    """The whole encoder with the same LoRA weights, run on raw text (no cache)."""
    tokenizer, _ = encoder
    _, bert = load_encoder()
    n = len(bert.encoder.layer)
    targets = "|".join(str(i) for i in range(n - lora_layers, n))
    peft = get_peft_model(bert, LoraConfig(r=adapted_model.config.lora_rank, lora_alpha=adapted_model.config.lora_alpha,
                                           target_modules=rf"encoder\.layer\.({targets})\.output\.dense"))
    ours = {n: p for n, p in adapted_model.named_parameters() if "lora_" in n}
    theirs = sorted(n for n, _ in peft.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for mine, their in zip(sorted(ours), theirs):
            peft.get_parameter(their).copy_(ours[mine])
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return mean_pool(peft.eval()(**enc).last_hidden_state, enc["attention_mask"].bool())


@pytest.mark.parametrize("lora_layers", [1, 2])
def test_cached_prefix_with_lora_equals_a_fresh_forward(encoder, lora_layers):
    model = build_recommender(TEXTS, RecommenderConfig(lora_layers=lora_layers), progress=False)
    randomise_lora(model)
    expected = fresh_forward(encoder, TEXTS, lora_layers, model)
    with torch.no_grad():
        assert torch.allclose(model.text.catalog(), expected, atol=2e-3)
        ids = torch.tensor([[2, 0], [3, 3]])  # per-example requests read the same rows
        assert torch.allclose(model.text(ids), expected[ids], atol=2e-3)


@pytest.mark.parametrize("lora_layers", [1, 2])
def test_saving_memory_keeps_the_values_and_gradients_of_one_pass(lora_layers):
    model = build_recommender(TEXTS, RecommenderConfig(lora_layers=lora_layers), progress=False)
    randomise_lora(model)
    weights = torch.randn(len(TEXTS), model.text.hidden_size)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    def vectors_and_gradients():
        vectors = model.text.catalog()
        return vectors.detach(), torch.autograd.grad((vectors * weights).sum(), lora)

    whole, whole_grads = vectors_and_gradients()
    model.text.save_memory()
    model.text.slice_tokens = 5  # several slices, some holding one text
    sliced, sliced_grads = vectors_and_gradients()
    assert model.text._inputs.dtype == torch.float16
    assert torch.allclose(sliced, whole, atol=1e-5)
    for a, b in zip(sliced_grads, whole_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_lora_sits_only_on_the_top_layers(encoder):
    model = build_recommender(TEXTS, RecommenderConfig(lora_layers=1), progress=False)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all("layer.0.output.dense" in n for n in lora)  # index 0 of the kept top layers
    assert len(model.text.top.base_model.model.layer) == 1  # lower layers are not even held
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("text.top") for n in frozen)
    without = build_recommender(TEXTS, RecommenderConfig(lora_layers=0), progress=False)
    assert not any("lora_" in n for n, _ in without.named_parameters())
    expected = mean_pool(*_plain(encoder, TEXTS))
    assert torch.allclose(without.text.catalog(), expected, atol=1e-5)


def _plain(encoder, texts):
    tokenizer, bert = encoder
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return bert(**enc).last_hidden_state, enc["attention_mask"].bool()


def test_trainable_state_round_trips_through_safetensors(small, tmp_path):
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(), progress=False)
    randomise_lora(model)
    with torch.no_grad():
        model.item_ids.weight.normal_()
    before = score_catalog(model, split.train[:20])
    save_state(tmp_path / "a.safetensors", model.trainable_state(), {"model_config": model.config.to_dict()})
    fresh = build_recommender(small.catalog.texts, RecommenderConfig(), progress=False)
    state, meta = load_state(tmp_path / "a.safetensors")
    assert meta["model_config"] == model.config.to_dict()
    fresh.load_trainable_state(state)
    assert torch.equal(score_catalog(fresh, split.train[:20]), before)
    assert model.trainable_bytes() == sum(t.numel() * 4 for t in state.values())


def test_the_optimizer_trains_exactly_the_federated_parameters(small):
    model = build_recommender(small.catalog.texts, RecommenderConfig(), progress=False)
    trainable = model.trainable_parameters()
    optimized = [p for group in make_optimizer(model, TrainConfig()).param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in trainable.values()}
    assert trainable.keys() == model.trainable_state().keys()
    frozen = [n for n, p in model.named_parameters() if n not in trainable]
    assert frozen and not any(model.get_parameter(n).requires_grad for n in frozen)  # the encoder stays frozen


def test_default_federated_state_is_small_on_ml100k_scale():
    texts = [f"Movie {i}. Genres: Drama" for i in range(1682)]
    model = build_recommender(texts, RecommenderConfig(), progress=False)
    assert model.trainable_bytes() <= 256 * 1024


def test_a_low_rank_id_table_uploads_rank_columns_not_dim(small):
    texts = small.catalog.texts
    full, low = (build_recommender(texts, RecommenderConfig(dim=48, id_rank=rank), progress=False) for rank in (0, 8))
    state = low.trainable_state()
    assert state["item_ids.weight"].shape == (len(texts), 8) and state["id_map.weight"].shape == (48, 8)
    assert full.trainable_bytes() - low.trainable_bytes() == 4 * (len(texts) * 40 - 48 * 8)
    with torch.no_grad():
        low.item_ids.weight.normal_()
    assert low.catalog_vectors().shape == (len(texts), 48)
    assert torch.allclose(low.catalog_vectors() - low.project(low.text.catalog(len(texts))),
                          low.item_ids.weight @ low.id_map.weight.T, atol=1e-5)
    with pytest.raises(ValueError, match="id_rank must be below dim"):
        RecommenderConfig(dim=24, id_rank=24)


@pytest.mark.parametrize("negatives", [0, 8])
def test_an_examples_gradient_ignores_the_rest_of_the_batch(small, negatives):
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(), progress=False).eval()
    randomise_lora(model)
    examples = make_examples(model, split.train[:40])
    g = torch.Generator().manual_seed(0)
    all_negatives = torch.randint(small.n_items, (len(examples), max(negatives, 1)), generator=g)

    def summed_grad(idx):
        model.zero_grad()
        neg = all_negatives[idx] if negatives else None
        loss = example_loss(model, examples.history_ids[idx], examples.mask[idx], examples.targets[idx], neg)
        (loss * len(idx)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    alone = summed_grad(torch.tensor([5]))
    for others in (torch.tensor([1, 2, 3]), torch.tensor([30, 9, 17, 22])):
        with_others = summed_grad(torch.cat([torch.tensor([5]), others])) - summed_grad(others)
        assert torch.allclose(with_others, alone, atol=1e-5)


def test_hiding_seen_items_leaves_each_positions_earlier_items_out_of_its_softmax(small):
    """With hide-seen, position t's softmax runs over the catalog less the items input at or
    before t (never t's target): computed here one position at a time, by hand."""
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(hide_seen=True, lora_layers=0, dropout=0.0),
                              progress=False).eval()
    with torch.no_grad():
        model.item_ids.weight.normal_(0, 0.3)  # starts at zero: make scores differ between items
    chunks = sequence_chunks(model, split.train[:12])
    inputs, targets, mask, _ = next(sequence_batches(chunks, 12, np.random.default_rng(0)))
    with torch.no_grad():
        catalog = model.catalog_vectors()
        logits = sequence_states(model, catalog, inputs, mask) @ catalog.T
        losses = []
        for b, t in mask.nonzero().tolist():
            earlier = {i for i, real in zip(inputs[b, : t + 1].tolist(), mask[b, : t + 1].tolist()) if real and i >= 0}
            earlier -= {targets[b, t].item()}
            kept = [i for i in range(small.n_items) if i not in earlier]
            losses.append(-torch.log_softmax(logits[b, t, kept], 0)[kept.index(targets[b, t].item())])
        by_hand = torch.stack(losses).mean()
        hiding = sequence_loss(model, inputs, targets, mask)
        assert torch.allclose(hiding, by_hand, atol=1e-5)
        assert torch.allclose(masked_sequence_loss(model, inputs, targets, mask), by_hand, atol=1e-5)
        model.config = RecommenderConfig(hide_seen=False, lora_layers=0, dropout=0.0)
        assert sequence_loss(model, inputs, targets, mask) > hiding + 0.01  # the seen items did count


@pytest.mark.parametrize("negatives", [0, 8])
def test_hiding_seen_items_leaves_an_examples_history_out_of_its_softmax(small, negatives):
    """An example's history items are no negatives with hide-seen: a sampled negative from
    the history counts as little as one equal to the target (none), and over the whole
    catalog the history's scores do not move the loss."""
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(hide_seen=True, lora_layers=0, dropout=0.0),
                              progress=False).eval()
    with torch.no_grad():
        model.item_ids.weight.normal_(0, 0.3)
    examples = make_examples(model, split.train[:3])
    keep = examples.mask.sum(1) >= 4
    history, mask, targets = examples.history_ids[keep], examples.mask[keep], examples.targets[keep]
    with torch.no_grad():
        if negatives:
            drawn = torch.randint(small.n_items, (len(targets), negatives), generator=torch.Generator().manual_seed(0))
            with_history = drawn.clone()
            with_history[:, :3] = history[:, -3:]  # three of each example's negatives it has seen
            as_target = drawn.clone()
            as_target[:, :3] = targets[:, None]  # ... or no negatives there at all
            loss = example_loss(model, history, mask, targets, with_history)
            assert torch.allclose(loss, example_loss(model, history, mask, targets, as_target), atol=1e-6)
        else:
            loss = example_loss(model, history, mask, targets, None)
            model.item_ids.weight[history[:, -1]] += 5.0  # the seen items score higher: nothing changes
            assert torch.allclose(loss, example_loss(model, history, mask, targets, None), atol=1e-6)
        model.config = RecommenderConfig(hide_seen=False, lora_layers=0, dropout=0.0)
        seen_counted = example_loss(model, history, mask, targets, with_history if negatives else None)
        assert seen_counted > loss + 0.01


def test_learns_and_beats_popularity_on_synthetic(small):
    torch.manual_seed(0)
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(dropout=0.1), progress=False)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    chunks, rng = sequence_chunks(model, split.train), np.random.default_rng(0)
    losses = [train_sequences(model, optimizer, chunks, 64, rng)[0] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.3
    test = split.cases("test")
    ours = evaluate_scores(score_catalog(model, test.histories), test)["NDCG@10"]
    histories = [split.prefix(u, "test") for u in range(split.n_users)]
    popular = evaluate_scores(popularity_scores(histories, small.n_items, test), test)["NDCG@10"]
    assert ours > 1.3 * popular, (ours, popular)


def test_an_empty_history_learns_what_users_start_with(small):
    """Every user's first item is a target from the empty history (a prior for cold users)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sequences = [np.concatenate([[7], rng.choice(np.arange(8, small.n_items), size=12, replace=False)])
                 for _ in range(200)]
    model = build_recommender(small.catalog.texts, RecommenderConfig(dropout=0.0), progress=False)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    for _ in range(4):
        train_sequences(model, optimizer, sequence_chunks(model, sequences), 64, rng)
    ids, _ = Ranker(model).top_k(np.array([], dtype=np.int64), k=1)
    assert int(ids[0]) == 7


def test_a_profile_learns_what_its_users_start_with(small):
    """Profiles are read in training (as they are when serving): with no history, the
    user's own words decide the first recommendation."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    profiles = ["I like astronauts and alien worlds.", "I like a haunted house and a vampire."] * 100
    sequences = [np.concatenate([[7 if u % 2 == 0 else 9], rng.choice(np.arange(10, small.n_items), 12, replace=False)])
                 for u in range(200)]
    model = build_recommender(small.catalog.texts, RecommenderConfig(dropout=0.0), progress=False)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    chunks = sequence_chunks(model, sequences, add_profiles(model, profiles))
    for _ in range(10):
        train_sequences(model, optimizer, chunks, 64, rng)
    model.eval()
    with torch.no_grad():
        catalog = model.catalog_vectors()
        users = model.user_vectors(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.bool), catalog,
                                   model.encode_texts(profiles[:2]), torch.ones(2, dtype=torch.bool))
    assert (users @ catalog.T).argmax(dim=1).tolist() == [7, 9]


def test_ranker_agrees_with_batch_scoring(small):
    split = leave_one_out(small)
    model = build_recommender(small.catalog.texts, RecommenderConfig(), progress=False)
    randomise_lora(model)
    ranker = Ranker(model)
    histories = [split.prefix(u, "test") for u in range(5)] + [np.array([], dtype=np.int64)]
    scores = score_catalog(model, histories)
    for row, history in enumerate(histories):
        ids, values = ranker.top_k(history, k=10)
        expected = scores[row].clone()
        expected[torch.from_numpy(history)] = float("-inf")
        assert torch.allclose(values, torch.topk(expected, 10).values, atol=1e-5)
        assert not np.isin(ids.numpy(), history).any()


def test_the_model_trims_whole_histories_to_its_own_window(small):
    from shared_model.dp_training import private_data

    model = build_recommender(small.catalog.texts, RecommenderConfig(history=3, lora_layers=0), progress=False)
    ids, mask = model.windows([np.arange(1, 11), np.array([4])])
    assert ids.tolist() == [[8, 9, 10], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert make_examples(model, [np.arange(1, 7)]).history_ids.shape == (6, 3)
    assert make_examples(model, [np.arange(1, 7)]).history_ids[-1].tolist() == [3, 4, 5]
    inputs, _, targets = private_data(model, [np.arange(1, 11)], "user").tensors.tensors
    assert (inputs.tolist(), targets.tolist()) == ([[7, 8, 9]], [[8, 9, 10]])
    assert max(len(c) for c in sequence_chunks(model, [np.arange(1, 11)]).items) == 4  # W + 1
    whole = [np.arange(1, 40), np.arange(5, 9)]
    assert torch.equal(score_catalog(model, whole), score_catalog(model, [h[-3:] for h in whole]))


def test_the_last_state_is_the_last_of_all_states_and_padding_keeps_each_tail(small):
    """`last_state` (the top block at the last position only: what user vectors and serving
    use) equals the full pass's last state, in values and in gradients."""
    model = build_recommender(small.catalog.texts, RecommenderConfig(dropout=0.0), progress=False)
    randomise_lora(model)
    histories = [[], [4], [1, 2, 3], list(range(60)), list(range(50, 100))]
    ids, mask = model.windows(histories)
    assert mask.sum(1).tolist() == [0, 1, 3, model.window, model.window]
    assert ids[2, -3:].tolist() == [1, 2, 3] and ids[3, -1].item() == 59 and ids[0].tolist() == [0] * model.window
    vectors = model.item_vectors(torch.where(mask, ids, 0))
    full = model.user_states(vectors, mask)[:, -1]
    last = model.last_state(vectors, mask)
    assert torch.allclose(full, last, atol=1e-5)
    grads = []
    for out in (full, last):
        model.zero_grad()
        out.pow(2).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters().values() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
