"""An lm-evaluation-harness model backed by a grape-jax model (original or pruned HF directory).

`GrapeJaxLM` implements the harness's LM interface by duck typing (`loglikelihood`,
`loglikelihood_rolling`; generation is not supported), so it is usable and testable without the
harness installed. `register()` registers it as model type `grape_jax` when `lm_eval` is importable:

    from grape_jax.lm_eval_adapter import register; register()
    lm_eval.simple_evaluate(model="grape_jax", model_args="pretrained=OUT,mesh=expert=8", tasks=[...])

The harness reads its task data from its own cache/local files; nothing here downloads anything.
"""

from __future__ import annotations

import numpy as np

from grape_jax.core.sharding import make_mesh
from grape_jax.data.text import load_tokenizer
from grape_jax.evaluation.scoring import perplexity, score_requests
from grape_jax.pipeline import load_model
from grape_jax.source import ModelSource


class GrapeJaxLM:
    """The harness's LM interface over a grape-jax model (HF directory or grape checkpoint)."""

    def __init__(
        self,
        pretrained: str,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        mesh: str | None = None,
        dtype: str | None = None,
    ):
        self.model = load_model(pretrained, mesh=make_mesh(mesh) if mesh else None, dtype=dtype)
        self.tokenizer = load_tokenizer(ModelSource.open(pretrained).tokenizer_dir)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.cfg.max_position_embeddings)
        self._logits = self.model

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return score_requests(
            self._logits,
            self.tokenizer,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            with_greedy=True,
        )

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Σ log p of each whole text (first token conditioned on BOS), in non-overlapping windows."""
        out = []
        for r in requests:
            ids = self.tokenizer(r.args[0], add_special_tokens=False, verbose=False)["input_ids"]
            bos = (
                self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            )
            total, prev = 0.0, [bos]
            for start in range(0, len(ids), self.max_length - 1):
                window = prev[-1:] + ids[start : start + self.max_length - 1]
                res = perplexity(self._logits, np.asarray([window], np.int32), batch_size=1)
                total -= res.nll_sum
                prev = window
            out.append(total)
        return out

    def generate_until(self, requests):
        raise NotImplementedError("grape_jax LM scores log-likelihoods only; generation tasks are not supported")


def register() -> type:
    """Register `grape_jax` with lm-evaluation-harness (needs `pip install lm-eval`)."""
    try:
        from lm_eval.api.model import LM  # noqa: PLC0415  (deferred: optional dependency)
        from lm_eval.api.registry import register_model  # noqa: PLC0415  (deferred: optional dependency)
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install lm-eval") from None

    @register_model("grape_jax")
    class HarnessGrapeJaxLM(GrapeJaxLM, LM):  # noqa: D401
        def __init__(self, pretrained: str, **kwargs):
            LM.__init__(self)
            GrapeJaxLM.__init__(self, pretrained, **kwargs)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config=None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv) if arg_string else {}
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
            return cls(**args)

    return HarnessGrapeJaxLM
