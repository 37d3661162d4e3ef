"""Healing by distillation: the step against a hand-written optax step, what trains, resume, bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grape_jax.healing.loop as heal_loop
import grape_jax.healing.step as heal_step
from conversion.checkpoint import restore_checkpoint, save_checkpoint
from grape_jax.calibration.stats import neutral_stats
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, init_model, param_view
from grape_jax.core.sharding import RunContext, make_mesh
from grape_jax.healing.distill import (
    batch_rows,
    distill_loss,
    healing_optimizer,
    merged_rows,
    trainable_masks,
    warmup_cosine,
)
from grape_jax.healing.heal import HealError, HealInterrupted, HealOptions, cache_teacher_logits, heal, model_logits
from grape_jax.healing.loop import budget_horizon
from grape_jax.healing.step import TrainStep
from grape_jax.merge.state import merge_model
from grape_jax.passes.resume import Progress, ResumeError
from grape_jax.planners import make_plan
from grape_jax.report.recipe import build_recipe, model_card

CFG = MoEConfig(
    family="mixtral",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    moe_intermediate_size=24,
    num_experts=(4, 4),
    top_k=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
)
CFG1 = MoEConfig(**{**CFG.to_dict(), "num_layers": 1, "num_experts": (4,)})  # one layer: less to compile
LOADED = ModelInfo.create(source="/models/T", provenance=[{"stage": "load", "fingerprint": "a" * 64}])
QUIET = dict(progress=False)


def _teacher(cfg=CFG, info=LOADED, ctx=RunContext(), seed=0):
    return init_model(cfg, seed=seed, scale=0.3, info=info, ctx=ctx)


def _pruned(teacher):
    """The teacher with one pair of experts merged per layer (grape's default operator averages them)."""
    return merge_model(teacher, make_plan(neutral_stats(teacher.cfg), method="grape", per_layer=1))


def _blocks(n=12, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def _leaves(model):
    return {k: np.asarray(v) for k, v in param_view(model).items()}


def _assert_same_training(a, b, *, lr: float, steps: int):
    """Two runs of the same training in different programs (cached vs live teacher, mesh vs one device):
    float differences are amplified by Adam only in entries whose gradient is at rounding level (its
    step is m / (sqrt(v) + 1e-8), anything up to lr), so: almost every entry equal to 1e-6, none off by
    more than lr per step."""
    a, b = _leaves(a), _leaves(b)
    for name in a:
        diff = np.abs(a[name] - b[name])
        assert diff.max() <= steps * lr, name
        assert np.mean(diff > 1e-6) < 0.01, name


def test_options_are_checked_with_one_line_errors():
    for kw, name in [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(learning_rate=-1), "learning_rate"),
        (dict(warmup=5, steps=5), "warmup"),
        (dict(clip_norm=0), "clip_norm"),
        (dict(train="heads"), "train"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(teacher_logits="disk"), "teacher_logits"),
        (dict(checkpoint_every=-1), "checkpoint_every"),
        (dict(max_minutes=0, steps=None), "max_minutes"),
        (dict(kl_weight=0.0, lm_weight=0.0), "kl_weight"),
    ]:
        with pytest.raises(ValueError, match=name) as e:
            HealOptions(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="steps or max_minutes"):
        HealOptions(steps=None)


def test_schedule_is_optax_warmup_cosine():
    for warmup, horizon in [(0, 5), (3, 10), (1, 2)]:
        want = optax.warmup_cosine_decay_schedule(0.0, 0.01, warmup, horizon)
        for count in range(horizon + 3):
            got = warmup_cosine(jnp.asarray(count), peak=0.01, warmup=warmup, horizon=jnp.asarray(horizon))
            np.testing.assert_allclose(float(got), float(want(count)), rtol=1e-6, atol=1e-9)


def test_data_order_is_a_function_of_seed_and_step():
    steps = [batch_rows(s, num_rows=10, batch_size=4, seed=3) for s in range(5)]
    assert all(np.array_equal(a, batch_rows(s, num_rows=10, batch_size=4, seed=3)) for s, a in enumerate(steps))
    stream = np.concatenate(steps)  # 20 positions = 2 epochs: each a permutation of the 10 rows
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    other_seed = np.concatenate([batch_rows(s, num_rows=10, batch_size=4, seed=4) for s in range(5)])
    assert not np.array_equal(stream, other_seed)


def _reference_loss(params, teacher_params, tokens, *, lm_weight, temperature):
    """KL(teacher || student) at temperature T (times T²) + lm_weight * next-token NLL, written out."""
    raw = transformer.forward(params, CFG1, tokens)[:, :-1]
    s = raw / temperature
    t = transformer.forward(teacher_params, CFG1, tokens)[:, :-1] / temperature
    p_t = jnp.exp(t - jax.scipy.special.logsumexp(t, axis=-1, keepdims=True))
    log_q = s - jax.scipy.special.logsumexp(s, axis=-1, keepdims=True)
    kl = jnp.mean(jnp.sum(p_t * (jnp.log(p_t) - log_q), axis=-1)) * temperature**2
    logp = raw - jax.scipy.special.logsumexp(raw, axis=-1, keepdims=True)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return kl + lm_weight * nll


HAND = HealOptions(
    steps=2,
    warmup=1,
    batch_size=4,
    learning_rate=0.02,
    weight_decay=0.1,
    clip_norm=0.05,
    lm_weight=0.5,
    temperature=2.0,
    val_blocks=0,
    train="all",
)


def test_two_steps_equal_a_hand_written_optax_adamw():
    """Every block in every batch (the batch is the data set), so each step sees the same rows; the heal
    steps equal optax's clip + AdamW with its warm-up cosine schedule on a loss written out here."""
    teacher, student = _teacher(cfg=CFG1), _teacher(cfg=CFG1, seed=1)
    blocks = _blocks(n=4)
    result = heal(student, teacher, blocks, options=HAND, **QUIET)

    params, t_params = param_view(student), param_view(teacher)
    tx = optax.chain(
        optax.clip_by_global_norm(0.05),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.02, 1, 2), weight_decay=0.1),
    )

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_reference_loss)(
            params, t_params, jnp.asarray(blocks), lm_weight=0.5, temperature=2.0
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for _ in range(2):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    healed = _leaves(result.model)
    moved = 0
    for name, value in params.items():
        # Adam divides by sqrt(v) + 1e-8: entries whose gradient is at rounding level take any step up to lr,
        # so float differences between the two programs show there; lr / 400 bounds them
        np.testing.assert_allclose(healed[name], np.asarray(value), rtol=0, atol=0.02 / 400, err_msg=name)
        assert np.median(np.abs(healed[name] - np.asarray(value))) < 1e-6, name
        moved += not np.array_equal(healed[name], np.asarray(param_view(student)[name]))
    assert moved == len(params)  # step 1 (full learning rate) moves every leaf
    assert result.steps == 2 and result.best_step == 2 and result.record["stage"] == "heal"


MERGED = HealOptions(steps=3, warmup=1, train="merged", weight_decay=0.5, val_blocks=0, batch_size=4)


def test_train_merged_changes_only_merged_rows_and_routers_and_not_the_student():
    teacher = _teacher()
    student = _pruned(teacher)
    rows = merged_rows(student.info, student.cfg)
    assert all(r.sum() == 1 for r in rows.values())  # one pair merged per layer
    before = _leaves(student)
    result = heal(student, teacher, _blocks(), options=MERGED, **QUIET)
    old, new = _leaves(student), _leaves(result.model)
    for name in old:
        np.testing.assert_array_equal(old[name], before[name])  # the student itself is untouched
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if name.endswith(".mlp.router"):
            assert not np.array_equal(old[name], new[name]), name
        elif layer is not None and name.rsplit(".", 1)[1] in ("w_gate", "w_up", "w_down") and ".mlp." in name:
            merged = rows[layer]
            assert not np.array_equal(old[name][merged], new[name][merged]), name
            np.testing.assert_array_equal(old[name][~merged], new[name][~merged], err_msg=name)  # decay masked too
        else:
            np.testing.assert_array_equal(old[name], new[name], err_msg=name)
    stages = [r["stage"] for r in result.model.info.provenance]
    assert stages == ["load", "merge", "heal"] and student.info.provenance[-1]["stage"] == "merge"
    assert result.model.info.fingerprint not in (student.info.fingerprint, "")
    assert result.record["teacher"]["fingerprint"] == teacher.info.fingerprint
    assert result.record["trained"] == "merged" and result.record["steps"] == 3


def test_train_routers_changes_only_router_leaves():
    teacher = _teacher()
    student = _pruned(teacher)
    result = heal(
        student,
        teacher,
        _blocks(),
        options=HealOptions(steps=3, warmup=1, train="routers", val_blocks=0, batch_size=4),
        **QUIET,
    )
    old, new = _leaves(student), _leaves(result.model)
    for name in old:
        if name.endswith(".mlp.router"):
            assert not np.array_equal(old[name], new[name]), name
        else:
            np.testing.assert_array_equal(old[name], new[name], err_msg=name)
    assert result.trained_params == sum(old[n].size for n in old if n.endswith(".mlp.router"))


def test_merged_needs_a_merge_record():
    with pytest.raises(HealError, match="train='merged' needs the student's merge record"):
        trainable_masks(CFG, LOADED, "merged")


def test_kl_of_the_teacher_itself_is_zero_and_nothing_moves():
    """Student = teacher: the KL and its gradient are 0 up to rounding (against a student that differs);
    Adam normalises even a rounding-level gradient, so the one step moves each entry by at most lr."""
    teacher = _teacher(cfg=CFG1)
    opts = HealOptions(steps=1, warmup=0, val_blocks=0, batch_size=4, learning_rate=1e-4, train="all")
    same = heal(teacher, teacher, _blocks(), options=opts, **QUIET)
    other = heal(_teacher(cfg=CFG1, seed=1), teacher, _blocks(), options=opts, **QUIET)
    assert abs(same.kl[0]) < 1e-6 and other.kl[0] > 0.1
    assert same.grad_norms[0] < 1e-5 * other.grad_norms[0]
    old, new = _leaves(teacher), _leaves(same.model)
    for name in old:
        np.testing.assert_allclose(new[name], old[name], atol=1.01e-4, rtol=0, err_msg=name)


@pytest.mark.slow
def test_cached_teacher_logits_give_the_live_result():
    teacher = _teacher()
    student = _pruned(teacher)
    blocks = _blocks()
    opts = HealOptions(steps=3, warmup=1, val_blocks=2, batch_size=4)
    live = heal(student, teacher, blocks, options=opts, **QUIET)
    cache = cache_teacher_logits(teacher, blocks)
    assert cache.logits.shape == (12, 16, CFG.vocab_size)
    cached = heal(
        student, cache, blocks, options=HealOptions(**{**opts.to_dict(), "teacher_logits": "cached"}), **QUIET
    )
    np.testing.assert_allclose(cached.losses, live.losses, rtol=1e-5)
    _assert_same_training(cached.model, live.model, lr=opts.learning_rate, steps=3)
    with pytest.raises(HealError, match="other token blocks"):
        heal(
            student,
            cache,
            blocks[:6],
            options=HealOptions(steps=2, warmup=0, teacher_logits="cached", val_blocks=0),
            **QUIET,
        )
    with pytest.raises(HealError, match="needs the teacher module"):
        heal(student, cache, blocks, options=opts, **QUIET)


@pytest.mark.slow
def test_on_a_mesh_equals_one_device():
    teacher = _teacher()
    blocks = _blocks()
    opts = HealOptions(steps=3, warmup=1, val_blocks=2, batch_size=3)  # 3 rows padded to the 2-way data axis
    single = heal(_pruned(teacher), teacher, blocks, options=opts, **QUIET)
    ctx = RunContext(make_mesh("data=2,expert=2,fsdp=2"))
    on_mesh = _teacher(ctx=ctx)
    sharded = heal(_pruned(on_mesh), on_mesh, blocks, options=opts, **QUIET)
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-5)
    _assert_same_training(sharded.model, single.model, lr=opts.learning_rate, steps=3)
    w = sharded.model.layers[0].mlp.w_gate.get_value()  # 3 experts do not divide the expert axis: replicated
    assert w.sharding.spec[0] is None and "fsdp" in str(w.sharding.spec[1])


def test_teacher_of_another_model_is_refused():
    teacher = _teacher()
    student = _pruned(teacher)
    blocks = _blocks()
    opts = HealOptions(steps=2, warmup=0, val_blocks=0)
    other_vocab = _teacher(cfg=MoEConfig(**{**CFG.to_dict(), "vocab_size": 80, "num_experts": (4, 4)}))
    with pytest.raises(HealError, match=r"differ in vocab_size \(teacher 80, student 64\)"):
        heal(student, other_vocab, blocks, options=opts, **QUIET)
    more_layers = _teacher(cfg=MoEConfig(**{**CFG.to_dict(), "num_layers": 3, "num_experts": (4, 4, 4)}))
    with pytest.raises(HealError, match="differ in num_layers"):
        heal(student, more_layers, blocks, options=opts, **QUIET)
    unrelated = _teacher(
        info=ModelInfo.create(source="/models/U", provenance=[{"stage": "load", "fingerprint": "b" * 64}])
    )
    with pytest.raises(HealError, match="not pruned from this teacher") as e:
        heal(student, unrelated, blocks, options=opts, **QUIET)
    assert "\n" not in str(e.value)
    with pytest.raises(HealError, match="more experts than the teacher"):
        heal(teacher, student, blocks, options=opts, **QUIET)
    with pytest.raises(HealError, match="data set is empty"):
        heal(student, teacher, blocks[:0], options=opts, **QUIET)
    with pytest.raises(HealError, match="leaves no training block"):
        heal(student, teacher, blocks[:2], options=HealOptions(steps=2, warmup=0, val_blocks=2), **QUIET)


def test_non_finite_loss_stops_and_keeps_nothing(tmp_path):
    teacher = _teacher()
    student = _pruned(teacher)
    embed = np.asarray(student.embed.get_value()).copy()
    embed[:] = np.nan
    student.embed.set_value(jnp.asarray(embed))
    with pytest.raises(HealError, match="non-finite loss at step 0.*no step succeeded, nothing was saved") as e:
        heal(student, teacher, _blocks(), options=MERGED, resume_dir=tmp_path / "r", **QUIET)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


def _fail_at(monkeypatch, call: int, error):
    """Make the step function raise `error(result)` at its `call`-th use (0-based)."""
    real = heal_step.TrainStep.compile
    count = {"n": 0}

    def compile(self, carry, batch, **kw):
        step = real(self, carry, batch, **kw)

        def wrapped(*args):
            out = step(*args)
            count["n"] += 1
            if count["n"] == call + 1:
                return error(out)
            return out

        return wrapped

    monkeypatch.setattr(heal_step.TrainStep, "compile", compile)


@pytest.mark.slow
def test_non_finite_loss_mid_run_keeps_the_last_good_state(tmp_path):
    """A teacher logit that is NaN in a block first used at step 3: that step keeps the state it was
    given, the run stops and the state after step 3 is what is saved."""
    teacher = _teacher()
    student = _pruned(teacher)
    blocks = _blocks(n=24)
    cache = cache_teacher_logits(teacher, blocks)
    opts = HealOptions(steps=8, warmup=1, val_blocks=0, batch_size=2, teacher_logits="cached")
    first_use = {}
    for step in range(8):
        for row in batch_rows(step, num_rows=24, batch_size=2, seed=0):
            first_use.setdefault(int(row), step)
    cache.logits[next(r for r, s in first_use.items() if s == 3), 5, 7] = np.nan
    with pytest.raises(HealError, match=r"non-finite loss at step 3 .* last good state \(after step 3\) is kept"):
        heal(student, cache, blocks, options=opts, resume_dir=tmp_path / "r", **QUIET)
    with Progress(tmp_path / "r" / "last", fingerprint="?") as saved:
        assert saved.latest == 3


def _saved(directory):
    """(carry, position) saved in a healing resume directory, restored as plain host arrays."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(str(directory / "last"), item_names=("state", "meta")) as m:
        step = m.latest_step()
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"]), step


@pytest.mark.parametrize("at", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_interrupt_and_resume_is_bit_identical(tmp_path, monkeypatch, at):
    """Ctrl-C inside step `at` (its result lost): saved every 2 steps, the rerun resumes from the last
    save and ends with the parameters and optimizer state of an uninterrupted run, bit for bit."""
    teacher = _teacher()
    student = _pruned(teacher)
    blocks = _blocks(n=14)
    opts = dataclasses.replace(MERGED, steps=7, val_blocks=3, val_every=2, checkpoint_every=2, checkpoint_seconds=0)
    full = heal(student, teacher, blocks, options=opts, resume_dir=tmp_path / "full", **QUIET)

    def interrupt(out):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        _fail_at(m, at, interrupt)
        with pytest.raises(HealInterrupted) as e:
            heal(student, teacher, blocks, options=opts, resume_dir=tmp_path / "cut", **QUIET)
    assert e.value.saved == at and e.value.directory == str(tmp_path / "cut")
    logs = []
    resumed = heal(student, teacher, blocks, options=opts, resume_dir=tmp_path / "cut", log=logs.append, **QUIET)
    assert f"resuming healing after step {at} of 7" in logs[1]
    (a, sa), (b, sb) = _saved(tmp_path / "full"), _saved(tmp_path / "cut")
    assert sa == sb == 7
    jax.tree.map(np.testing.assert_array_equal, a, b)
    for name, value in _leaves(full.model).items():
        np.testing.assert_array_equal(_leaves(resumed.model)[name], value, err_msg=name)
    assert resumed.losses == full.losses and resumed.val_losses == full.val_losses
    assert resumed.best_step == full.best_step and resumed.record["fingerprint"] == full.record["fingerprint"]


def test_progress_of_another_run_is_refused(tmp_path):
    teacher = _teacher()
    student = _pruned(teacher)
    heal(student, teacher, _blocks(), options=MERGED, resume_dir=tmp_path, **QUIET)
    with pytest.raises(ResumeError, match="different run"):
        heal(student, teacher, _blocks(), options=dataclasses.replace(MERGED, steps=4), resume_dir=tmp_path, **QUIET)


@pytest.mark.slow
def test_time_budget_fixes_a_horizon_and_stops(monkeypatch):
    teacher = _teacher()
    student = _pruned(teacher)
    result = heal(
        student,
        teacher,
        _blocks(),
        options=HealOptions(steps=None, max_minutes=0.02, warmup=1, val_blocks=0, batch_size=4),
        **QUIET,
    )
    assert result.horizon >= 2 and 1 <= result.steps <= result.horizon
    assert result.record["horizon"] == result.horizon and result.record["options"]["max_minutes"] == 0.02


def test_budget_horizon_by_hand():
    """Mean of the timed steps after the first, validation as a third of a step per batch, 95% of the
    time left, never inside the warm-up."""
    # steps 2..4 take 1 s: 95 s of 100 s fit 95 steps after the 4 done (+1: the step being counted)
    assert budget_horizon(4, [7.0, 1.0, 1.0, 1.0], seconds_left=100.0, val_batches=0, val_every=50, warmup=4) == (
        100,
        1.0,
    )
    # one timing only: it is used; 2 validation batches every 2 steps add 1/3 step: 4 s, 38 s fit 9 steps
    assert budget_horizon(1, [3.0], seconds_left=40.0, val_batches=2, val_every=2, warmup=1) == (1 + 1 + 9, 3.0)
    assert budget_horizon(2, [1.0, 9.0], seconds_left=1.0, val_batches=0, val_every=1, warmup=10) == (11, 9.0)


def test_time_budget_horizon_is_fixed_after_the_warm_up_steps_and_a_resume_times_again(tmp_path, monkeypatch):
    """The schedule's horizon is fixed once min(warmup, 5) steps are timed (their learning rate does not
    depend on it); a run interrupted before that saves no horizon and the resumed run times again."""
    teacher = _teacher()
    student = _pruned(teacher)
    calls = []

    def horizon(done, timings, **kw):
        calls.append((done, len(timings)))
        return done + 2, 0.0

    monkeypatch.setattr(heal_loop, "budget_horizon", horizon)
    opts = HealOptions(steps=None, max_minutes=10, warmup=4, val_blocks=0, batch_size=4, checkpoint_every=1)
    result = heal(student, teacher, _blocks(), options=opts, **QUIET)
    assert calls == [(4, 4)] and result.horizon == result.steps == 6

    def interrupt(out):
        raise KeyboardInterrupt

    calls.clear()
    with monkeypatch.context() as m:
        _fail_at(m, 2, interrupt)
        with pytest.raises(HealInterrupted) as e:
            heal(student, teacher, _blocks(), options=opts, resume_dir=tmp_path, **QUIET)
    assert e.value.saved == 2 and calls == []
    logs = []
    resumed = heal(student, teacher, _blocks(), options=opts, resume_dir=tmp_path, log=logs.append, **QUIET)
    assert any("after step 2 (its horizon not fixed yet" in line for line in logs)
    assert calls == [(4, 2)] and resumed.horizon == resumed.steps == 6


def test_gradients_through_routed_and_dense_forward_agree():
    """The routed dispatch (token-sorted grouped matmuls) must give the dense path's gradients."""
    teacher = _teacher()
    student = _pruned(teacher)
    tokens = jnp.asarray(_blocks(n=4))
    mask = jnp.ones(tokens.shape, bool)
    t_logits = teacher(tokens, mask)

    def grads(dispatch):
        def loss(model):
            return distill_loss(
                model(tokens, mask, dispatch=dispatch),
                t_logits,
                tokens,
                mask,
                kl_weight=1.0,
                lm_weight=0.5,
                temperature=1.0,
            )[0]

        return nnx.grad(loss)(student)

    dense, routed = grads("dense"), grads("routed")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6),
        nnx.as_pure(dense),
        nnx.as_pure(routed),
    )


def test_optimizer_state_is_sharded_like_the_parameters():
    """Adam's moments of an expert leaf sit on the expert and fsdp axes like the leaf; counters replicate."""
    ctx = RunContext(make_mesh("data=2,expert=2,fsdp=2"))
    student = teacher = _teacher(ctx=ctx)  # 4 experts: they divide the expert axis
    masks = trainable_masks(student.cfg, student.info, "all")
    step = TrainStep(
        student,
        teacher,
        masks,
        HealOptions(),
        loss=distill_loss,
        optimizer=healing_optimizer,
        schedule=warmup_cosine,
        forward=model_logits,
    )
    carry = step.init_carry()
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(carry)}
    want = student.layers[1].mlp.w_up.get_value().sharding
    assert "expert" in str(want.spec[0]) and "fsdp" in str(want.spec[1])
    for key, value in flat.items():
        if key.endswith("layers.1.mlp.w_up"):
            assert value.sharding.is_equivalent_to(want, 3), key  # the fp32 copy and both moments
        if key.endswith("step") or key.endswith("count"):
            assert value.sharding.is_fully_replicated and len(value.sharding.device_set) == 8, key
    assert sum(k.endswith("layers.1.mlp.w_up") for k in flat) == 3


def test_healed_model_exports_through_a_checkpoint_with_its_healing(tmp_path):
    """`grape export` route: checkpoint -> restore -> HF export; recipe.json and the card record the healing."""
    teacher = _teacher()
    result = heal(_pruned(teacher), teacher, _blocks(), options=MERGED, **QUIET)
    save_checkpoint(tmp_path / "ckpt", result.model)
    restored = restore_checkpoint(tmp_path / "ckpt")
    recipe = build_recipe(restored)
    (healing,) = recipe["healing"]
    assert healing == {k: v for k, v in result.record.items() if k != "stage"}
    assert recipe["model_fingerprint"] == result.model.info.fingerprint and recipe["method"] == "grape"
    assert json.loads(json.dumps(recipe, default=str))["healing"][0]["steps"] == 3
    card = model_card(recipe, uniform=restored.cfg.is_uniform)
    assert "Healed after pruning: 3 steps of distillation" in card and "training `merged`" in card
    for name, value in _leaves(result.model).items():
        np.testing.assert_array_equal(_leaves(restored)[name], value)
