from __future__ import annotations

import torch

from firstskip.config import FirstSkipConfig
from firstskip.routers import RouterBank, decide, inner_mask, last_index, masked_mean


def test_untrained_router_says_keep_for_any_input():
    bank = RouterBank(FirstSkipConfig(num_layers=4, hidden_size=16))
    p = bank.keep_probability(1, torch.randn(3, 5, 16) * 10, torch.ones(3, 5, dtype=torch.bool))
    torch.testing.assert_close(p, torch.full((3,), 0.95))


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([2.0, 2.0]))


def test_last_pooling_reads_only_the_last_prompt_token():
    bank = RouterBank(FirstSkipConfig(num_layers=4, hidden_size=16, router_pooling="last"))
    torch.nn.init.normal_(bank.routers[1].down.weight)
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [False, False, True, True, True]])  # right, left pad
    assert last_index(mask).tolist() == [2, 4]
    expected = torch.sigmoid(bank.routers[1](hidden[[0, 1], [2, 4]]))
    torch.testing.assert_close(bank.keep_probability(1, hidden, mask), expected)
    hidden[0, :2], hidden[1, 3] = 0.0, 5.0  # other prompt tokens do not count
    torch.testing.assert_close(bank.keep_probability(1, hidden, mask), expected)


def test_mean_pooling_leaves_out_the_template_tokens():
    mask = torch.tensor([[True] * 6 + [False] * 2, [False] * 2 + [True] * 6, [False] * 5 + [True] * 3])
    inner = inner_mask(mask, 2, 1)  # right and left padding; the third row is too short: all of it counts
    assert inner.tolist() == [[False, False, True, True, True, False, False, False],
                              [False, False, False, False, True, True, True, False], mask[2].tolist()]
    bank = RouterBank(FirstSkipConfig(num_layers=4, hidden_size=16, template_tokens=[2, 1]))
    torch.nn.init.normal_(bank.routers[1].down.weight)
    hidden = torch.randn(3, 8, 16)
    p = bank.keep_probability(1, hidden, mask)
    hidden[0, :2], hidden[0, 5], hidden[1, 2:4], hidden[1, 7] = 3.0, -3.0, 3.0, -3.0  # template positions
    torch.testing.assert_close(bank.keep_probability(1, hidden, mask), p)
    hidden[0, 3] = 3.0
    assert not torch.allclose(bank.keep_probability(1, hidden, mask)[0], p[0])
    every = RouterBank(FirstSkipConfig(num_layers=4, hidden_size=16, template_tokens=[2, 1], router_pooling="mean-all"))
    every.load_state_dict(bank.state_dict())
    torch.testing.assert_close(every.keep_probability(1, hidden, mask),
                               masked_mean(torch.sigmoid(bank.routers[1](hidden)), mask))


def test_decisions_never_skip_protected_layers():
    cfg = FirstSkipConfig(num_layers=6, hidden_size=8)
    probs = torch.tensor([[0.1, 0.9, 0.2, 0.6, 0.4, 0.0]])
    assert decide(probs, cfg).nonzero()[:, 1].tolist() == [2, 4]
    budget = cfg.replace(decision="budget", skip_ratio=0.5)  # k = 3 of the 4 skippable
    assert decide(probs, budget).nonzero()[:, 1].tolist() == [2, 3, 4]
