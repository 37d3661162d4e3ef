"""The lm-evaluation-harness adapter scores like transformers does."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from grape_jax.lm_eval_adapter import GrapeJaxLM


@dataclasses.dataclass
class Request:
    args: tuple


def test_loglikelihood_and_rolling_match_transformers(tiny_mixtral_tok):
    lm = GrapeJaxLM(tiny_mixtral_tok.path, batch_size=2, max_length=64)
    tok, model = lm.tokenizer, tiny_mixtral_tok.model
    reqs = [Request(("In the beginning God", " created")), Request(("And the earth", " was without form"))]
    got = lm.loglikelihood(reqs)
    for (score, greedy), r in zip(got, reqs):
        ctx = [tok.bos_token_id] + tok(r.args[0], add_special_tokens=False)["input_ids"]
        cont = tok(r.args[1], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        positions = range(len(ctx), len(ctx) + len(cont))
        ref = sum(logp[p - 1, (ctx + cont)[p]].item() for p in positions)
        np.testing.assert_allclose(score, ref, rtol=1e-4)
        assert greedy == all(int(logits[p - 1].argmax()) == (ctx + cont)[p] for p in positions)
    lm.max_length = 16  # several rolling windows
    text = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    rolling = lm.loglikelihood_rolling([Request((text,))])[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 16  # several windows
    ref, prev = 0.0, [tok.bos_token_id]
    for start in range(0, len(ids), 15):
        window = prev[-1:] + ids[start : start + 15]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), -1)
        ref += sum(logp[p - 1, window[p]].item() for p in range(1, len(window)))
        prev = window
    np.testing.assert_allclose(rolling, ref, rtol=1e-4)
