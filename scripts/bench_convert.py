"""Conversion throughput and host memory at a real tensor size.

Builds a synthetic Mixtral-shaped bf16 checkpoint (default ~4.2 GB: vocab 32000, d 4096, f 9216,
8 experts, 2 layers) with our streaming `write_checkpoint`, then measures, each in its own child process
so that its peak RSS is its own:

  raw       every tensor read fully with plain `readinto` file reads (the ceiling),
  convert   `load_hf` onto a mesh of CPU devices + `block_until_ready` (HF -> sharded jax arrays),
  export    `export_hf` of those arrays back to safetensors (the load before it is not counted:
            the child resets its peak RSS with /proc/self/clear_refs before exporting),
  fill      no file: copy into one new buffer per tensor, kept (what materialising the converted bytes
            in fresh host memory costs on this machine; `raw` reuses one buffer and never pays it).

On the CPU backend the "devices" are host memory, so converted parameters are resident in the child:
"host overhead" is peak RSS minus the bytes of the distinct buffers holding its parameter shards
(replicas of a slice share one), compared with the goal
1.5 x largest single tensor + 1 GB. Reads are measured cold (file pages evicted with
posix_fadvise(DONTNEED) after fsync, no root needed) and warm (in page cache), unless --cache says one.

    python scripts/bench_convert.py            # ~4.2 GB in a temp dir under /tmp, removed at the end
    python scripts/bench_convert.py --keep --layers 1
    python scripts/bench_convert.py --device gpu   # load to one GPU vs safetensors.torch (see below)

GPU mode (`--device gpu`; default checkpoint: Mixtral-8x7B layer dims, 3 layers, 9.2 GB bf16; page cache
warm): each in its own child process, with its runtime initialised before the clock starts,
  raw        as above (the ceiling),
  torch      `safetensors.torch.load_file(file, device="cuda")` for every file + synchronize,
  load_hf    `load_hf(dir)` onto the default JAX GPU device + block_until_ready,
the first and second call of the last two in one process; goal: load_hf >= 80% of torch, first call.
    python scripts/bench_convert.py --fp8      # attention + expert weights FP8 (128 x 128 blocks), as
                                               # DeepSeek-V3 ships them: dequantised to bf16 on load,
                                               # export --quantize fp8 (must give the input's bytes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GB = 1e9


# ----------------------------------------------------------------------------- helpers


def proc_status() -> dict[str, int]:
    """VmRSS/VmHWM/RssAnon/RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def checkpoint_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def evict(files: list[str]) -> None:
    """Drop these files' (clean) pages from the page cache."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[str]) -> float | None:
    """Fraction of the files' pages in the page cache (mmap + mincore via libc), or None if unknown."""
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        total = resident = 0
        for path in files:
            size = os.path.getsize(path)
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                vec = (ctypes.c_ubyte * n)()
                rc = libc.mincore(addr, size, vec)
                libc.munmap(addr, size)
            finally:
                os.close(fd)
            if rc != 0:
                return None
            resident += int(np.frombuffer(bytes(vec), np.uint8).__and__(1).sum())
            total += n
        return resident / total if total else None
    except Exception:  # noqa: BLE001 - diagnostic only
        return None


# ----------------------------------------------------------------------------- checkpoint


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite bf16 values (|x| in ~[2^-9, 2^-1]) from random bits, cheaply."""
    import ml_dtypes

    n = int(np.prod(shape))
    bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
    exponent = 118 + ((bits >> 7) & 7)  # 8 exponents, never all-ones (no inf/NaN)
    bits &= 0x807F  # keep sign and mantissa
    bits |= (exponent << 7).astype(np.uint16)
    return bits.view(ml_dtypes.bfloat16).reshape(shape)


def random_fp8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random e4m3 codes, never one of the two NaN codes."""
    import ml_dtypes

    bits = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).copy()
    bits[(bits & 0x7F) == 0x7F] ^= 1
    return bits.view(ml_dtypes.float8_e4m3fn).reshape(shape)


def random_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (2.0 ** rng.uniform(-14, -8, size=shape)).astype(np.float32)


FP8_BLOCK = 128
FP8_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}


def build_checkpoint(directory: str, args) -> dict:
    """A Mixtral-shaped bf16 checkpoint written with `write_checkpoint`, one tensor at a time."""
    import ml_dtypes

    from conversion.safetensors_write import TensorEntry, write_checkpoint

    v, d, f, e, layers = args.vocab, args.hidden, args.ffn, args.experts, args.layers
    heads, kv = args.heads, args.kv_heads
    hd = d // heads
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for l in range(layers):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, heads * hd)
        shapes[p + "block_sparse_moe.gate.weight"] = (e, d)
        for x in range(e):
            q = p + f"block_sparse_moe.experts.{x}."
            shapes[q + "w1.weight"] = (f, d)
            shapes[q + "w3.weight"] = (f, d)
            shapes[q + "w2.weight"] = (d, f)
    bf16, fp8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
    entries = []
    for k, shape in shapes.items():
        if args.fp8 and (".self_attn." in k or ".experts." in k):
            grid = tuple(-(-n // FP8_BLOCK) for n in shape)
            entries += [TensorEntry(k, shape, fp8), TensorEntry(k + "_scale_inv", grid, np.dtype(np.float32))]
        else:
            entries.append(TensorEntry(k, shape, bf16))
    rng = np.random.default_rng(args.seed)
    makers = {bf16: random_bf16, fp8: random_fp8, np.dtype(np.float32): random_scales}
    t0 = time.perf_counter()
    write_checkpoint(
        directory, entries, lambda en: makers[en.dtype](rng, en.shape), max_shard_bytes=int(args.shard_gb * GB)
    )
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_local_experts": e,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if args.fp8:
        config["quantization_config"] = dict(FP8_QUANT)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    files = checkpoint_files(directory)
    for path in files:  # make the pages clean so they can be evicted for cold reads
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    total = sum(e.nbytes for e in entries)
    value = {e.name: e.nbytes * (2 if e.dtype == fp8 else 1) for e in entries}
    return {
        "bytes": total,
        "largest": max(value.values()),
        "largest_name": max(value, key=value.get),
        "tensors": len(entries),
        "files": len(files),
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- children


def child_raw(directory: str) -> dict:
    from conversion.safetensors_io import CheckpointIndex

    ckpt = CheckpointIndex.open(directory)
    infos = [ckpt.info(k) for k in ckpt.keys()]
    infos.sort(key=lambda i: (i.file, i.offset))
    buf = bytearray(max(i.nbytes for i in infos))
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    handles: dict[str, object] = {}
    for info in infos:
        fh = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb", buffering=0))
        fh.seek(info.offset)
        got, want = 0, info.nbytes
        while got < want:
            n = fh.readinto(view[got:want])
            if not n:
                raise OSError(f"{info.file}: short read")
            got += n
        total += want
    seconds = time.perf_counter() - t0
    for fh in handles.values():
        fh.close()
    return {"bytes": total, "seconds": seconds, "peak_rss": proc_status()["VmHWM"]}


def child_fill(directory: str) -> dict:
    """Copy into fresh memory, one new buffer per tensor (kept, as converted parameters are): the cost
    of materialising the model's bytes in new host memory, which conversion pays and `raw` does not."""
    from conversion.safetensors_io import CheckpointIndex

    ckpt = CheckpointIndex.open(directory)
    sizes = [ckpt.info(k).nbytes for k in ckpt.keys()]
    source = np.ones(min(max(sizes), 64 << 20), np.uint8)
    kept = []
    t0 = time.perf_counter()
    for n in sizes:
        out = np.empty(n, np.uint8)
        for start in range(0, n, source.size):
            out[start : start + source.size] = source[: min(source.size, n - start)]
        kept.append(out)
    seconds = time.perf_counter() - t0
    return {"bytes": sum(sizes), "seconds": seconds, "peak_rss": proc_status()["VmHWM"]}


def _init_jax(devices: int):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    jax.devices()
    return jax


def _mesh(jax, spec: str):
    from grape_jax.core.sharding import make_mesh

    if spec == "auto":
        n = len(jax.devices())
        spec = "expert=4,fsdp=2" if n == 8 else f"expert={n}"
    return make_mesh(spec), spec


def _resident(jax, params) -> int:
    """Bytes of the distinct host buffers behind this process's parameter shards (on the CPU backend
    replicas of a slice read once share one buffer, so they are counted once)."""
    seen: dict[int, int] = {}
    for a in params.values():
        for s in a.addressable_shards:
            seen[s.data.unsafe_buffer_pointer()] = s.data.nbytes
    return sum(seen.values())


def child_convert(directory: str, devices: int, mesh_spec: str) -> dict:
    jax = _init_jax(devices)
    from conversion.load import load_hf
    from grape_jax.core.model import param_view

    mesh, spec = _mesh(jax, mesh_spec)
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    params = param_view(load_hf(directory, mesh=mesh))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    status = proc_status()
    resident = _resident(jax, params)
    logical = sum(a.nbytes for a in params.values())
    return {
        "seconds": seconds,
        "bytes": logical,
        "resident": resident,
        "base_rss": base,
        "peak_rss": status["VmHWM"],
        "end_rss": status["VmRSS"],
        "end_rss_file": status.get("RssFile", 0),
        "mesh": spec,
        "devices": len(jax.devices()),
    }


def child_export(directory: str, devices: int, mesh_spec: str, out: str) -> dict:
    jax = _init_jax(devices)
    from conversion.export import export_hf
    from conversion.load import load_hf
    from grape_jax.core.model import param_view

    mesh, spec = _mesh(jax, mesh_spec)
    loaded = load_hf(directory, mesh=mesh)
    params = param_view(loaded)
    jax.block_until_ready(params)
    resident = _resident(jax, params)
    reset = reset_peak_rss()
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    fp8 = (loaded.info.hf_config.get("quantization_config") or {}).get("quant_method") == "fp8"
    export_hf(loaded, out, copy_side_files=False, quantize="fp8" if fp8 else None)
    seconds = time.perf_counter() - t0
    status = proc_status()
    files = checkpoint_files(out)
    t1 = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    sync = time.perf_counter() - t1
    return {
        "seconds": seconds,
        "fsync_seconds": sync,
        "bytes": sum(a.nbytes for a in params.values()),
        "resident": resident,
        "base_rss": base,
        "peak_rss": status["VmHWM"],
        "peak_reset": reset,
        "mesh": spec,
    }


def child_torch_gpu(directory: str) -> dict:
    """`safetensors.torch.load_file(device="cuda")` of every file, twice in this process."""
    import torch
    from safetensors.torch import load_file

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    files, seconds, nbytes = checkpoint_files(directory), [], 0
    for _ in range(2):
        t0 = time.perf_counter()
        state = {}
        for path in files:
            state.update(load_file(path, device="cuda"))
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        del state
        torch.cuda.empty_cache()
    return {"seconds": seconds[0], "seconds_second": seconds[1], "bytes": nbytes}


def child_convert_gpu(directory: str) -> dict:
    """`load_hf` onto the default JAX GPU device, twice in this process."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from conversion.load import load_hf
    from grape_jax.core.model import param_view

    device = jax.devices()[0]
    jax.block_until_ready(jax.device_put(np.zeros(1, np.float32), device))
    seconds, nbytes = [], 0
    for _ in range(2):
        t0 = time.perf_counter()
        params = param_view(load_hf(directory))
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t0)
        nbytes = sum(a.nbytes for a in params.values())
        del params
    return {"seconds": seconds[0], "seconds_second": seconds[1], "bytes": nbytes, "device": str(device)}


def run_child(kind: str, args, *extra: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        kind,
        "--dir",
        args.dir,
        "--devices",
        str(args.devices),
        "--mesh",
        args.mesh,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {kind} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- report


def same_tensors(a: str, b: str) -> bool:
    """Every tensor of checkpoint `a` is byte-identical in checkpoint `b`."""
    from conversion.safetensors_io import CheckpointIndex

    ca, cb = CheckpointIndex.open(a), CheckpointIndex.open(b)
    if sorted(ca.keys()) != sorted(cb.keys()):
        return False
    for key in ca.keys():
        x, y = ca.read(key), cb.read(key)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def warm_cache(files: list[str]) -> None:
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(1 << 26):
                pass


def gpu_report(args, files: list[str], info: dict) -> int:
    """GPU mode: raw read, safetensors.torch to CUDA and load_hf to the GPU, each in a child process."""
    rows = {}
    for kind in ("raw", "torch_gpu", "convert_gpu"):
        if args.cache == "cold":
            evict(files)
        else:
            warm_cache(files)
        rows[kind] = run_child(kind, args)
        print(f"  {kind:12s} {rows[kind]['bytes'] / GB / rows[kind]['seconds']:.2f} GB/s", flush=True)
    print()
    print(
        f"checkpoint: {info['bytes'] / GB:.2f} GB bf16 in {len(files)} files; page cache {args.cache}; "
        f"{rows['convert_gpu']['device']}; {os.cpu_count()} CPU cores"
    )
    print("| load | GB/s first call | GB/s second call | first call vs torch |")
    print("|---|---|---|---|")
    torch_first = rows["torch_gpu"]["bytes"] / rows["torch_gpu"]["seconds"]
    for kind, label in (
        ("raw", "raw read (ceiling)"),
        ("torch_gpu", "safetensors.torch.load_file(device='cuda')"),
        ("convert_gpu", "grape load_hf -> GPU"),
    ):
        r = rows[kind]
        first = r["bytes"] / r["seconds"]
        second = f"{r['bytes'] / r['seconds_second'] / GB:.2f}" if "seconds_second" in r else "-"
        ratio = f"{first / torch_first:.0%}" if kind != "raw" else "-"
        print(f"| {label} | {first / GB:.2f} | {second} | {ratio} |")
    print("goal: load_hf >= 80% of torch, first call (runtimes initialised before timing, in both children)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=None, help="default: 9216 on CPU, 14336 on GPU")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="default: 2 on CPU, 3 on GPU")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="max safetensors file size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices in the children")
    ap.add_argument("--mesh", default="auto", help="mesh spec; auto: expert=4,fsdp=2 on 8 devices")
    ap.add_argument("--cache", choices=("both", "cold", "warm"), default=None, help="default: both on CPU, warm on GPU")
    ap.add_argument("--dir", default=None, help="use (and keep) this existing checkpoint dir")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-verify", action="store_true", help="skip the export == input byte check")
    ap.add_argument("--fp8", action="store_true", help="FP8 block-quantised attention and expert weights")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device == "gpu"
    args.ffn = args.ffn or (14336 if gpu else 9216)
    args.layers = args.layers or (3 if gpu else 2)
    args.cache = args.cache or ("warm" if gpu else "both")

    if args._child:
        fn = {
            "raw": lambda: child_raw(args.dir),
            "torch_gpu": lambda: child_torch_gpu(args.dir),
            "convert_gpu": lambda: child_convert_gpu(args.dir),
            "fill": lambda: child_fill(args.dir),
            "convert": lambda: child_convert(args.dir, args.devices, args.mesh),
            "export": lambda: child_export(args.dir, args.devices, args.mesh, args._out),
        }[args._child]
        print(json.dumps(fn()))
        return 0

    root = None
    if args.dir is None:
        root = tempfile.mkdtemp(prefix="grape-bench-convert-", dir="/tmp")
        args.dir = os.path.join(root, "hf")
        os.makedirs(args.dir)
        need = 2.2 * (2 * args.vocab * args.hidden + args.layers * 3 * args.experts * args.hidden * args.ffn)
        free = shutil.disk_usage(root).free
        if free < need * 1.1:
            raise SystemExit(f"/tmp has {free / GB:.1f} GB free; need ~{need / GB:.1f} GB")
    try:
        if root is not None:
            info = build_checkpoint(args.dir, args)
            print(
                f"built {info['bytes'] / GB:.2f} GB checkpoint ({info['tensors']} tensors, {info['files']} files) "
                f"in {info['seconds']:.1f} s ({info['bytes'] / GB / info['seconds']:.2f} GB/s incl. random bits); "
                f"largest tensor {info['largest_name']} {info['largest'] / GB:.3f} GB",
                flush=True,
            )
        else:
            from conversion.safetensors_io import CheckpointIndex

            ck = CheckpointIndex.open(args.dir)
            from conversion.safetensors_dtypes import numpy_to_dtype

            sizes = {k: ck.info(k).nbytes for k in ck.keys()}
            value = {k: n * (2 if numpy_to_dtype(ck.info(k).dtype) == "F8_E4M3" else 1) for k, n in sizes.items()}
            big = max(value, key=value.get)
            info = {"bytes": sum(sizes.values()), "largest": value[big], "largest_name": big}
        files = checkpoint_files(args.dir)
        if gpu:
            return gpu_report(args, files, info)
        goal = 1.5 * info["largest"] + 1 * GB
        rows = []
        modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
        for mode in modes:
            for kind in ("raw", "convert"):
                if mode == "cold":
                    evict(files)
                else:
                    for path in files:  # make sure the whole file is cached
                        with open(path, "rb", buffering=0) as fh:
                            while fh.read(1 << 26):
                                pass
                cached = cached_fraction(files)
                r = run_child(kind, args)
                r.update(kind=kind, mode=mode, cached=cached)
                rows.append(r)
                print(
                    f"  {kind:8s} {mode}: {r['bytes'] / GB / r['seconds']:.2f} GB/s "
                    f"(page cache before: {'?' if cached is None else f'{cached:.0%}'})",
                    flush=True,
                )
        r = run_child("fill", args)
        r.update(kind="fill", mode="memory", cached=None)
        rows.append(r)
        print(f"  fill     fresh memory: {r['bytes'] / GB / r['seconds']:.2f} GB/s", flush=True)
        out = os.path.join(root or tempfile.mkdtemp(prefix="grape-bench-export-", dir="/tmp"), "export")
        r = run_child("export", args, "--_out", out)
        r.update(kind="export", mode="write", cached=None)
        rows.append(r)
        verified = None
        if not args.no_verify:
            verified = same_tensors(args.dir, out)
        if root is None:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)

        raw = {r["mode"]: r["bytes"] / r["seconds"] for r in rows if r["kind"] == "raw"}
        print()
        kind = "bf16 + fp8 (dequantised to bf16 on load)" if args.fp8 else "bf16"
        print(
            f"checkpoint: {info['bytes'] / GB:.2f} GB {kind}, largest tensor loaded {info['largest'] / GB:.3f} GB "
            f"({info['largest_name']}); host-overhead goal 1.5 x largest + 1 GB = {goal / GB:.2f} GB"
        )
        mesh = next((r["mesh"] for r in rows if "mesh" in r), "-")
        print(f"mesh: {mesh} over {args.devices} simulated CPU devices; {os.cpu_count()} CPU cores")
        head = ("step", "cache", "GB/s", "vs raw", "peak RSS", "params", "overhead", "goal met")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            speed = r["bytes"] / r["seconds"]
            ref = raw.get(r["mode"])
            vs = f"{speed / ref:.0%}" if r["kind"] == "convert" and ref else "-"
            resident = r.get("resident", 0)
            over = r["peak_rss"] - resident
            met = ("yes" if over <= goal else "NO") if r["kind"] in ("convert", "export") else "-"
            cache = {"write": "n/a (writes)", "memory": "n/a (no file)"}.get(r["mode"], r["mode"])
            label = {"raw": "raw read", "convert": "HF -> jax", "export": "jax -> HF", "fill": "fill fresh memory"}[
                r["kind"]
            ]
            print(
                f"| {label} | {cache} | {speed / GB:.2f} | {vs} | {r['peak_rss'] / GB:.2f} GB | "
                f"{resident / GB:.2f} GB | {over / GB:.2f} GB | {met} |"
            )
        print()
        for r in rows:
            if r["kind"] == "convert":
                print(
                    f"convert ({r['mode']}): runtime RSS before load {r['base_rss'] / GB:.2f} GB, "
                    f"RSS at end {r['end_rss'] / GB:.2f} GB (file-backed {r['end_rss_file'] / GB:.2f} GB), "
                    f"{r['seconds']:.1f} s"
                )
            if r["kind"] == "export":
                print(
                    f"export: RSS before export (params loaded) {r['base_rss'] / GB:.2f} GB, peak reset "
                    f"{'ok' if r['peak_reset'] else 'FAILED (peak includes the load)'}; "
                    f"{r['seconds']:.1f} s to page cache, +{r['fsync_seconds']:.1f} s fsync "
                    f"({r['bytes'] / GB / (r['seconds'] + r['fsync_seconds']):.2f} GB/s incl. fsync); "
                    f"output == input bit for bit: {verified}"
                )
        print(
            "cold: file pages evicted with fsync + posix_fadvise(DONTNEED) before the child starts; "
            "warm: files read once just before. 'overhead' = peak RSS - bytes of the distinct buffers of "
            "the parameter shards (on CPU the devices are host memory); it includes the Python/JAX runtime. "
            "'fill fresh memory': a copy into new buffers of the checkpoint's tensor sizes, kept; "
            "conversion writes its output into new memory too, the raw read reuses one buffer."
        )
        if verified is False:
            return 1
        return 0
    finally:
        if root is not None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif root is not None:
            print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())
