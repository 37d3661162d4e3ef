"""Flat sharded parameters -> Hugging Face directory, one tensor at a time.

The shard plan (file names, header offsets) comes from shapes alone; each HF tensor is then assembled on
the host from the device shards that hold it (one expert of one layer at a time for stacked experts), so
host memory holds one HF tensor, never the model. Output goes to a work dir `.<name>.partial` renamed into
place at the end; an interrupted export resumes there: shards already complete are kept when the new run
exports the same parameters (`params_fingerprint`, a checksum of every parameter's row and column sums) with
the same shard plan, and only the missing shards are produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from conversion.distributed import finish_shard, follow_export, gather_shard
from conversion.families import export_family, family_by_name
from conversion.families.base import Binding, ConversionError, Family, HFTensor, bind, hf_tensors
from conversion.quant.bindings import read_bindings
from conversion.quant.fp8 import block_size, requantized_entries
from conversion.safetensors_io import CheckpointIndex
from conversion.safetensors_write import TensorEntry, completed_shards, plan_shards, write_checkpoint
from grape_jax.base import jsonio
from grape_jax.base.atomic import resumable_output_dir
from grape_jax.base.multihost import all_processes_bytes, barrier, broadcast_flags, gather_slice, is_writer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import MoEModel, param_view
from grape_jax.planners.plan import Plan

# Files copied verbatim from the source model dir when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
PRUNED_FIELDS = ("auto_map", "num_experts_per_layer", "base_model_type", "grape_remote_code_transformers_version")


DEVICE_SUM_MIN_BYTES = 4 << 20  # shards this big are summed on their device for the fingerprint


@jax.jit
def _row_sums(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).sum(axis=-1)


@jax.jit
def _column_sums(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).sum(axis=-2)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per axis of a shard's index into an array of `shape`."""
    return [sl.indices(d)[:2] for sl, d in zip(index, shape, strict=True)]


def params_fingerprint(params: Mapping[str, jax.Array]) -> str:
    """A digest of every parameter's name, shape, dtype, placement and values.

    Each addressable shard (one replica of each) is reduced to its float32 row and column sums: on its
    own device (single-device programs: no collectives, memory-bandwidth speed, nothing materialised),
    or on the host below `DEVICE_SUM_MIN_BYTES` (no compile per shape). The sums are hashed on the
    host; on several hosts the processes' digests are combined. Expert or neuron reorders, other merge
    plans or operators and any changed weight change it. It is a value checksum, not a cryptographic
    one (a change below float32 rounding of a row sum could go unseen), which is all resuming needs: it
    only decides whether shards written by an interrupted run may be kept. The same parameters on
    another mesh give another digest (the export then starts afresh)."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = params[name]
        h.update(json.dumps([name, list(arr.shape), str(arr.dtype)]).encode())
        shards = [sh for sh in arr.addressable_shards if sh.replica_id == 0]
        for shard in sorted(shards, key=lambda sh, shape=arr.shape: _bounds(sh.index, shape)):
            h.update(json.dumps(_bounds(shard.index, arr.shape)).encode())
            x = shard.data
            if x.nbytes < DEVICE_SUM_MIN_BYTES:  # small: on the host, no compile per shape
                v = np.asarray(x).astype(np.float32)
                sums = [v] if v.ndim == 0 else [v.sum(axis=-1)] + ([v.sum(axis=-2)] if v.ndim > 1 else [])
            else:
                sums = jax.device_get([_row_sums(x)] + ([_column_sums(x)] if x.ndim > 1 else []))
            for v in sums:
                h.update(np.ascontiguousarray(v).tobytes())
    digest = h.digest()
    if jax.process_count() > 1:
        digest = hashlib.sha256(all_processes_bytes(digest)).digest()
    return digest.hex()


def hf_entries(
    bindings: Mapping[str, Binding], params: Mapping[str, jax.Array]
) -> tuple[list[TensorEntry], dict[str, HFTensor]]:
    """Every HF tensor of the export with its shape/dtype, and the parameter slices it is made of."""
    entries, sources = [], {}
    for t in hf_tensors(bindings):
        entries.append(TensorEntry(t.key, t.shape, np.dtype(params[t.parts[0][0].name].dtype)))
        sources[t.key] = t
    return entries, sources


def auto_map_files(config: Mapping[str, Any]) -> list[str]:
    """The Python files a config's `auto_map` names (`module.Class` or `repo--module.Class`)."""
    names = set()
    for ref in (config.get("auto_map") or {}).values():
        for r in ref if isinstance(ref, list | tuple) else [ref]:
            if isinstance(r, str) and "." in r:
                names.add(r.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(names)


def needs_remote_code(cfg: MoEConfig, family: Family, config: Mapping[str, Any]) -> bool:
    """Per-layer counts always need our modeling file. Uniform counts keep the family's own config and
    code, except when transformers has no class for the family (DeepSeek-MoE) and the config names
    no code of its own (`auto_map`; e.g. a re-export of one of our pruned exports): then ours."""
    if not cfg.is_uniform:
        return True
    return not family.in_transformers and not config.get("auto_map")


def hf_config_for(
    cfg: MoEConfig, family: Family, base: Mapping[str, Any], *, quantize: str | None = None
) -> dict[str, Any]:
    """config.json of the export: the family's translation (remote code is added for uneven counts),
    without `quantization_config` (weights are written dequantised) unless `quantize` is "fp8", which
    keeps the source's FP8 `quantization_config` exactly.

    A base config from an earlier pruned export (model_type `grape_pruned_*`) is first turned back into
    the stock config, so re-exports start clean."""
    if "base_model_type" in base:
        base = {k: v for k, v in base.items() if k not in PRUNED_FIELDS}
        base["model_type"] = family.model_types[0]
        base["architectures"] = [family.architectures[0]]
    out = family.config_to_hf(cfg, base)
    out.pop("quantization_config", None)
    if quantize == "fp8":
        out["quantization_config"] = fp8_source_config(base)
    dtypes = {"float32", "bfloat16", "float16"}
    if out.get("dtype") not in dtypes and out.get("torch_dtype") not in dtypes:
        out["dtype"] = "float32"
    return out


def export_hf(
    model: MoEModel,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, str | bytes] | None = None,
    copy_side_files: bool = True,
    log: Callable[[str], None] | None = None,
    quantize: str | None = None,
    params: Mapping[str, jax.Array] | None = None,
    digest: str | None = None,
) -> str:
    """Write `model` as an HF checkpoint dir that `transformers` loads (see module docstring); returns
    its path. The family, the base config.json and the tokenizer files come from `model.info`
    (`copy_side_files=False` leaves the tokenizer and other side files out).

    `log` receives one line per shard written (and a line when resuming). `quantize` "fp8": the
    weights the FP8 source (`model.info.source`, its config.json) stored as FP8 are requantised with its
    block size and scale dtype (`conversion.quant.fp8`); an expert that is an unchanged copy of a source expert
    (`expert_origins` of the model's merges) keeps that expert's scales.

    `params` (default: the model's own) may be any mapping of the model's parameter names to arrays,
    read in the table's order (a layer-streamed merge: `grape_jax.stream.merge.MergedParams`; its
    `shapes` plan the files without reading, and `model` may then be abstract); `digest` replaces the
    checksum of the parameters that decides whether an interrupted export's shards are kept."""
    if not model.info.family:
        raise ConversionError(
            "export: the model has no family (info.family); load it with load_hf or "
            "restore_checkpoint, or build it with ModelInfo.create(family=...)"
        )
    source_family = family_by_name(model.info.family)
    family = export_family(source_family)
    cfg, base_config = model.cfg, model.info.hf_config
    params = param_view(model) if params is None else params
    source_dir = model.info.source if copy_side_files and os.path.isdir(model.info.source or "") else None
    bindings = bind(family, cfg)
    entries, sources = hf_entries(bindings, getattr(params, "shapes", params))
    if quantize is not None:
        entries, sources = _quantized(
            entries,
            sources,
            quantize=quantize,
            family=source_family,
            base_config=base_config,
            source_dir=model.info.source,
            expert_origins=expert_origins(model.info.provenance),
        )
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "params": digest or params_fingerprint(params),
                "shards": [[s.filename, [[e.name, list(e.shape), str(e.dtype)] for e in s.entries]] for s in shards],
            }
        ).encode()
    ).hexdigest()
    if not is_writer():  # multi-host: take part in the writer's gathers, write nothing
        status = broadcast_flags([False] * (1 + len(shards)))
        if not status[0]:
            raise ConversionError(
                f"export to {os.fspath(out_dir)} failed on the writer process (process 0) "
                f"before writing; its error says why"
            )
        follow_export(params, entries, sources, max_shard_bytes=max_shard_bytes, skip=status[1:])
        barrier("export_hf")
        return os.fspath(out_dir)

    # Where the writer is, so that on a failure it can bring the other processes to the end of the
    # shard they are gathering and tell them to stop (`follow_export`), instead of leaving them waiting.
    progress: dict[str, Any] = {"todo": None, "shard": 0, "gathers": 0}

    def gather(name: str, e: int | None) -> np.ndarray:
        out = gather_slice(params[name], () if e is None else (e,))
        progress["gathers"] += 1
        return out

    def produce(entry: TensorEntry) -> np.ndarray:
        return sources[entry.name].produce(gather)

    def shard_written(path: str) -> None:
        if log is not None:
            log(f"wrote {os.path.basename(path)}")
        _test_pause()
        finish_shard(True)
        progress.update(shard=progress["shard"] + 1, gathers=0)

    out_dir = os.fspath(out_dir)
    try:
        with contextlib.ExitStack() as stack:
            try:  # the other processes wait for this outcome: tell them about a failure too
                config = hf_config_for(cfg, family, base_config, quantize=quantize)
                work = stack.enter_context(resumable_output_dir(out_dir, fingerprint=fingerprint, overwrite=overwrite))
                done = completed_shards(work.path, shards) if work.resumed else [False] * len(shards)
            except BaseException:
                broadcast_flags([False] * (1 + len(shards)))
                raise
            done = broadcast_flags([True, *done])[1:]
            progress["todo"] = [shard for shard, skipped in zip(shards, done, strict=True) if not skipped]
            tmp = work.path
            if log is not None and any(done):
                log(f"resuming the export in {tmp}: {sum(done)} of {len(shards)} shards already written")
            remote = needs_remote_code(cfg, family, config)
            if source_dir is not None:  # the source's own modeling code goes along unless ours replaces it
                for fname in (*SIDE_FILES, *([] if remote else auto_map_files(config))):
                    src = os.path.join(source_dir, fname)
                    if os.path.isfile(src):
                        shutil.copyfile(src, os.path.join(tmp, fname))
            if remote:
                # deferred: the modeling file imports torch and transformers (~5 s), needed only here
                from conversion.remote_code_export import write_remote_code  # noqa: PLC0415

                config = write_remote_code(tmp, config, family=family.name, num_experts_per_layer=list(cfg.num_experts))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(jsonio.dumps(config, indent=2, sort_keys=True))
            write_checkpoint(tmp, entries, produce, max_shard_bytes=max_shard_bytes, skip=done, on_shard=shard_written)
            for fname, content in (extra_files or {}).items():
                with open(os.path.join(tmp, fname), "wb" if isinstance(content, bytes) else "w") as f:
                    f.write(content)
    except Exception:
        todo = progress["todo"]
        if todo is not None and jax.process_count() > 1:
            if progress["shard"] < len(todo):
                gather_shard(params, todo[progress["shard"]], sources, start=progress["gathers"])
            finish_shard(False)
        raise
    finish_shard(True)  # the output is in place
    barrier("export_hf")
    return out_dir


def expert_origins(provenance: Sequence[Mapping[str, Any]]) -> dict[int, list[int | None]] | None:
    """Per MoE layer, for each expert the source expert it is an unchanged copy of (None: merged), through
    every merge in the provenance; None when nothing was merged."""
    origins: dict[int, list[int | None]] | None = None
    for record in provenance:
        if record.get("stage") != "merge":
            continue
        step = Plan.from_dict(record["plan"], source="provenance").expert_origins()
        if origins is None:
            origins = step
        else:
            origins = {layer: [None if o is None else origins[layer][o] for o in row] for layer, row in step.items()}
    return origins


def fp8_source_config(base: Mapping[str, Any]) -> dict[str, Any]:
    """The FP8 `quantization_config` an fp8 export copies (the source's), or a one-line error."""
    quant = base.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        raise ConversionError(
            f"--quantize fp8 requantises like the source checkpoint, but its config.json has quantization_config "
            f"{quant.get('quant_method')!r}, not 'fp8' (export bf16, the default, instead)"
        )
    return dict(quant)


def _quantized(
    entries,
    sources,
    *,
    quantize: str,
    family: Family,
    base_config: Mapping[str, Any],
    source_dir: str | os.PathLike | None,
    expert_origins,
):
    """`entries`/`sources` with the source's FP8 weights requantised (see `export_hf`)."""
    if quantize != "fp8":
        raise ConversionError(f"--quantize {quantize!r} is not supported (supported: fp8)")
    quant = fp8_source_config(base_config)
    block = block_size(quant)
    if source_dir is None or not os.path.isdir(source_dir):
        raise ConversionError(
            f"--quantize fp8 reads the scales of the source FP8 checkpoint, which is not at {source_dir!r}"
        )
    source = CheckpointIndex.open(os.fspath(source_dir))
    source_bindings = read_bindings(family, family.config_from_hf(base_config), base_config, source)
    return requantized_entries(
        entries, sources, source_bindings=source_bindings, source=source, block=block, expert_origins=expert_origins
    )


def _test_pause() -> None:
    """`GRAPE_EXPORT_SHARD_DELAY_S` (tests) pauses after each shard so a kill can land mid-export
    deterministically."""
    delay = os.environ.get("GRAPE_EXPORT_SHARD_DELAY_S")
    if delay:
        time.sleep(float(delay))
