"""Interrupted exports resume from their last completed shard, and only for the same parameters."""

from __future__ import annotations

import fcntl
import os

import jax
import numpy as np
import pytest

from conversion.export import export_hf, params_fingerprint
from conversion.load import load_hf
from grape_jax.base.atomic import OutputExistsError
from grape_jax.core.model import model_from_arrays, param_view
from grape_jax.core.sharding import make_mesh

SHARD = 60_000  # bytes: the tiny model splits into several files


@pytest.fixture(scope="module")
def loaded(tiny_mixtral):
    return load_hf(tiny_mixtral.path)


@pytest.fixture(scope="module")
def clean_export(loaded, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "hf")
    export_hf(loaded, out, max_shard_bytes=SHARD)
    return out


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


class Stop(KeyboardInterrupt):
    pass


def _interrupt_after(n):
    """A `log` that interrupts the export (like Ctrl-C) once `n` shards are written."""
    seen = []

    def log(line):
        seen.append(line)
        if sum(s.startswith("wrote ") for s in seen) == n:
            raise Stop

    return log


def test_interrupted_export_resumes_and_equals_a_clean_one(loaded, clean_export, tmp_path):
    assert len([f for f in os.listdir(clean_export) if f.endswith(".safetensors")]) >= 4
    out = str(tmp_path / "hf")
    kw = dict(max_shard_bytes=SHARD)
    with pytest.raises(Stop):
        export_hf(loaded, out, log=_interrupt_after(2), **kw)
    partial = str(tmp_path / ".hf.partial")
    assert not os.path.exists(out) and os.path.isdir(partial)
    kept = sorted(f for f in os.listdir(partial) if f.endswith(".safetensors"))
    assert len(kept) == 2
    inodes = {f: os.stat(os.path.join(partial, f)).st_ino for f in kept}
    lines = []
    export_hf(loaded, out, log=lines.append, **kw)
    assert lines[0].startswith("resuming the export") and "2 of" in lines[0], lines
    assert sorted(line[len("wrote ") :] for line in lines[1:]) == sorted(
        f for f in _files(clean_export) if f.endswith(".safetensors") and f not in kept
    )
    assert {f: os.stat(os.path.join(out, f)).st_ino for f in kept} == inodes  # not rewritten
    assert _files(out) == _files(clean_export)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no work dir or lock left


def test_changed_parameters_start_afresh(loaded, clean_export, tmp_path):
    out = str(tmp_path / "hf")
    kw = dict(max_shard_bytes=SHARD)
    with pytest.raises(Stop):
        export_hf(loaded, out, log=_interrupt_after(2), **kw)
    arrays = {k: np.asarray(v) for k, v in param_view(loaded).items()}
    arrays["layers.0.mlp.w_up"] = arrays["layers.0.mlp.w_up"][::-1]  # experts reordered
    changed = model_from_arrays(loaded.cfg, arrays, info=loaded.info)
    lines = []
    export_hf(changed, out, log=lines.append, **kw)
    assert not any(line.startswith("resuming") for line in lines)
    fresh = str(tmp_path / "fresh")
    export_hf(changed, fresh, **kw)
    assert _files(out) == _files(fresh) != _files(clean_export)


def test_failed_export_leaves_nothing_and_concurrent_export_is_refused(loaded, tmp_path):
    out = str(tmp_path / "hf")
    kw = dict(max_shard_bytes=SHARD)

    def fail(line):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        export_hf(loaded, out, log=fail, **kw)
    assert os.listdir(tmp_path) == []
    with open(str(tmp_path / ".hf.partial.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OutputExistsError, match=r"hf is being written by another running process"):
            export_hf(loaded, out, **kw)
    assert not os.path.exists(out)


def test_fingerprint_sees_values_and_order(loaded, tiny_mixtral):
    params = param_view(loaded)
    base = params_fingerprint(params)
    assert params_fingerprint(param_view(load_hf(tiny_mixtral.path))) == base  # deterministic
    mesh = make_mesh("fsdp=2,expert=4")
    sharded = param_view(load_hf(tiny_mixtral.path, mesh=mesh))
    assert sharded["layers.0.mlp.w_up"].sharding.spec[0] == "expert"
    assert params_fingerprint(sharded) == params_fingerprint(param_view(load_hf(tiny_mixtral.path, mesh=mesh)))
    w = np.asarray(param_view(loaded)["layers.1.mlp.w_down"]).copy()
    w.view(np.uint32)[0, 0, 0] ^= 1 << 10  # one weight changed by ~1e-4 of itself
    assert params_fingerprint({**params, "layers.1.mlp.w_down": jax.numpy.asarray(w)}) != base
    swapped = np.asarray(param_view(loaded)["layers.1.mlp.w_down"])[[1, 0, *range(2, w.shape[0])]]
    assert params_fingerprint({**params, "layers.1.mlp.w_down": jax.numpy.asarray(swapped)}) != base
    neurons = np.asarray(param_view(loaded)["layers.1.mlp.w_down"])[:, ::-1]  # permuted hidden neurons
    assert params_fingerprint({**params, "layers.1.mlp.w_down": jax.numpy.asarray(neurons)}) != base
