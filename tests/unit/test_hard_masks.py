"""Hard masks (logit_bias −100 bans) win over every soft stage; what margin guarantees.

Regression for issue 15 item 5: margin used to restore a token that ``logit_bias``
banned whenever the frozen model was confident in it.
"""

from __future__ import annotations

import pytest
import torch

from processors.base import ParamError, ProcessorEnv, StepContext
from processors.stack import ProcessorStack, parse_stack
from server.engine.sampler import Sampler, SamplerRow
from server.engine.types import SamplingParams

V = 8
CPU = torch.device("cpu")
ENV = ProcessorEnv(vocab_size=V)


def step(stacks, base, params, seen=None):
    stack = ProcessorStack(CPU, V)
    stack.update_state([parse_stack(s, ENV, max_len=8) for s in stacks])
    ctx = StepContext(base_logits=base, last_tokens=torch.full((len(stacks), 2), -1))
    steered = stack.apply(ctx, base)
    sampler = Sampler(CPU, V, (7,))
    sampler.update_state([SamplerRow(p, None, 0) for p in params])
    return steered, sampler.sample(steered, seen, stack.bans)


def test_margin_cannot_undo_a_ban_in_any_order():
    base = torch.tensor([[0.0, 9.0, 1.0, 0, 0, 0, 0, 0]] * 2)  # confident in token 1
    ban = {"type": "logit_bias", "bias": {"1": -100}}
    margin = {"type": "margin", "tau": 0.5, "gamma": 1.0}
    greedy = [SamplingParams(temperature=0)] * 2
    steered, tokens = step([[ban, margin], [margin, ban]], base, greedy)
    # Row 0: margin restored token 1 in the steered logits (soft) ...
    assert int(steered[0].argmax()) == 1
    # ... but the ban is hard: neither row emits it, and the logits stay finite.
    assert tokens.tolist() == [2, 2]
    assert torch.isfinite(steered).all()


def test_plus_100_stays_soft_and_margin_guards_it():
    base = torch.tensor([[0.0, 9.0, 1.0, 0, 0, 0, 0, 0]])
    force = {"type": "logit_bias", "bias": {"3": 100}}
    margin = {"type": "margin", "tau": 0.5, "gamma": 1.0}
    _, tokens = step([[force, margin]], base, [SamplingParams(temperature=0)])
    assert tokens.tolist() == [1]


def test_decoding_penalties_and_eos_blocking_win_over_margin():
    """Documented order: margin guards the steered distribution; the sampler's
    repetition penalty and EOS blocking are applied after it and may move the token."""
    base = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0, 0, 0, 9.0], [0.0, 5.0, 4.0, 0, 0, 0, 0, 0]])
    steer = {"type": "logit_bias", "bias": {"2": 3}}
    margin = {"type": "margin", "tau": 0.5, "gamma": 1.0}
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[1, 1] = True
    params = [SamplingParams(temperature=0, min_tokens=4),  # EOS (7) blocked
              SamplingParams(temperature=0, repetition_penalty=5.0)]
    steered, tokens = step([[steer, margin], [steer, margin]], base, params, seen)
    assert steered.argmax(-1).tolist() == [7, 1]  # margin kept the frozen choices
    assert tokens.tolist() == [2, 2]  # the decoding settings then moved both


def test_a_stack_that_bans_the_whole_vocabulary_is_refused():
    with pytest.raises(ParamError, match="every token"):
        parse_stack([{"type": "logit_bias", "bias": {str(i): -100 for i in range(V)}}], ENV,
                    max_len=8)
