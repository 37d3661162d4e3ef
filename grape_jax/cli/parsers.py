"""The `grape` sub-commands' arguments: every `configure_*` function and the argument groups they share.

This module imports nothing heavy (no JAX, transformers or Orbax: the planner registry and the healing
options are plain Python and NumPy), so `grape --help` and `grape COMMAND --help` answer at once; the
commands' `run_*` functions, in the other `grape_jax.cli` modules, are imported only when a command
runs. Values that need the heavy modules to check (compute dtypes, dispatch kinds) are checked by those
modules before any work. Help says each default once (`HelpFormatter`).
"""

from __future__ import annotations

import argparse

from grape_jax.healing.options import TEACHER_LOGITS, TRAIN_MODES, HealOptions
from grape_jax.planners import DEFAULT_METHOD, PLANNERS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" once: only to options that take a value, are not required, have a default
    that says something (not None or []), and whose help does not state its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0
            or action.required
            or action.default in (None, [], argparse.SUPPRESS)
            or "default" in text
        ):
            return text
        return text + " (default: %(default)s)"


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default=None,
        help="mesh axes data, fsdp, expert, tensor, e.g. 'expert=4,fsdp=2'; data takes the devices the "
        "others leave (default: every device on data)",
    )


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (else the environment jax.distributed.initialize reads on TPU pods/SLURM)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def add_data_args(p: argparse.ArgumentParser, *, num_samples: int = 64) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="text files (.txt), JSONL (with --text-field) or a saved datasets dir (default: the "
        "shipped public-domain sample)",
    )
    g.add_argument("--text-field", default=None, help="the JSONL/dataset field holding the text")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    g.add_argument("--num-samples", type=int, default=num_samples, help="blocks drawn from the text")
    g.add_argument("--seed", type=int, default=0, help="seed that draws the blocks")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--batch-size", type=int, default=4, help="blocks per calibration step")
    g.add_argument("--token-chunk", type=int, default=512, help="tokens per expert chunk (bounds memory)")
    g.add_argument("--cka", default="auto", choices=["auto", "exact", "minibatch"], help="CKA estimator")
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        help="save the calibration accumulators for resuming at most this often (0: never by time)",
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save every this many batches (0: never by count)"
    )
    g.add_argument(
        "--compute-dtype",
        default=None,
        metavar="DTYPE",
        help="float32, bfloat16 or float16: dtype of the experts' and statistics' matmuls (default: the "
        "checkpoint's on accelerators, float32 on CPU); statistics are fp32 sums either way",
    )
    g.add_argument(
        "--no-gradients",
        dest="gradients",
        action="store_false",
        help="skip the gradient sensitivities, which are computed by default (one backward pass per batch); "
        "the grape-l planner needs them",
    )


def add_planner_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(PLANNERS)}")
    b = g.add_mutually_exclusive_group(required=required)
    b.add_argument("--per-layer", type=int, help="experts removed per MoE layer on average, >= 1 (budget = r x layers)")
    b.add_argument("--budget", type=int, help="experts removed in total over all MoE layers, >= 1")
    b.add_argument(
        "--fraction",
        type=float,
        help="fraction of the routed experts removed, 0 < F < 1 (as REAP/REAM state budgets; budget = the "
        "nearest whole number of experts, whole groups under group-limited routers)",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="planner option, e.g. gamma=0.01, metric=cka, operator=dominant, global_rank=true",
    )


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="fp8: requantise the weights an FP8 source stored as FP8, with its block size and "
        "quantization_config (unmerged experts keep their scales); default: bf16",
    )


def configure_families(p: argparse.ArgumentParser) -> None:
    del p


def configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output grape checkpoint directory (Orbax, sharded)")
    p.add_argument("--dtype", default=None, help="cast parameters, e.g. float32 (default: keep stored dtypes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_mesh_args(p)


def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape checkpoint (from convert or merge)")
    p.add_argument("out", help="output Hugging Face directory (with recipe.json and a model card)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GB")
    add_quantize_arg(p)
    add_mesh_args(p)


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory or grape checkpoint")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="multiple-choice task file (JSONL), e.g. piqa=piqa.jsonl; see grape_jax/assets/tasks/",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dtype", default=None, help="cast an HF model's parameters, e.g. float32")
    p.add_argument(
        "--dispatch",
        default="auto",
        help="MoE forward: auto, routed (each expert on its own tokens), dense (every expert on every "
        "token) or a grouped-matmul kind of grape_jax.core.dispatch (an unknown name is refused first)",
    )
    add_data_args(p, num_samples=64)
    add_mesh_args(p)


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory or grape checkpoint (its tokenizer is used)")
    p.add_argument("--out", required=True, help="stats file (.npz; a .json summary is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_data_args(p)
    add_calibration_args(p)
    add_mesh_args(p)


def configure_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats", help="stats file from `grape calibrate`")
    p.add_argument("--plot", default=None, help="directory for PNG similarity heatmaps and routing-share bars")


def configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats", help="stats file from `grape calibrate`")
    p.add_argument("--out", default=None, help="plan JSON (the recipe); without it the allocation is printed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--show", action="store_true", help="print the per-layer allocation")
    p.add_argument("--plot", default=None, help="PNG bar chart of the allocation")
    add_planner_args(p)


def configure_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape checkpoint (from `grape convert`)")
    p.add_argument("plan", help="plan JSON (from `grape plan`)")
    p.add_argument("--out", required=True, help="merged checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    # operator 'fit' refits on the calibration blocks: the data given to `grape calibrate` (checked)
    add_data_args(p)
    add_mesh_args(p)


def configure_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (with its tokenizer)")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--work-dir", default=None, help="stage outputs for resuming (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (statistics, plan) after success")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--stream-layers",
        default="auto",
        choices=["auto", "on", "off"],
        help="hold one decoder layer on the mesh at a time (calibration, gradients, fit, merge, export); "
        "auto streams when the model does not fit the devices' memory",
    )
    add_quantize_arg(p)
    add_planner_args(p)
    add_data_args(p)
    add_calibration_args(p)
    add_mesh_args(p)


def configure_heal(p: argparse.ArgumentParser) -> None:
    p.add_argument("pruned", help="the pruned model: Hugging Face directory (a grape-jax export) or grape checkpoint")
    p.add_argument(
        "--teacher", required=True, help="the original model it was pruned from (HF directory or grape checkpoint)"
    )
    p.add_argument("--out", required=True, help="output Hugging Face directory (with heal.json and loss.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--work-dir", default=None, help="checkpoints for resuming (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    d = HealOptions()
    g = p.add_argument_group("healing")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {d.steps})")
    length.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="train as many steps as fit in this many minutes (estimated from the first warm-up steps)",
    )
    g.add_argument(
        "--train",
        default=d.train,
        choices=TRAIN_MODES,
        help="what trains: routers, routers + experts merged from several, or every parameter",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="blocks per step")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (then cosine decay to 0)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="clip the gradient's global norm")
    g.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL to the teacher")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the next-token NLL")
    g.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL")
    g.add_argument(
        "--teacher-logits",
        default=d.teacher_logits,
        choices=TEACHER_LOGITS,
        help="live: the teacher runs in each step; cached: one pass first, then the teacher is dropped",
    )
    g.add_argument(
        "--val-blocks",
        type=int,
        default=d.val_blocks,
        help="training blocks held out to pick the best step (0: keep the last)",
    )
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every this many steps")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="save for resuming every this many steps (0: never by count)",
    )
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=d.checkpoint_seconds,
        help="save for resuming at most this often (0: never by time)",
    )
    add_data_args(p, num_samples=256)
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-data",
        nargs="*",
        default=None,
        help="held-out text for perplexity before/after (default: the shipped held-out text)",
    )
    e.add_argument("--eval-samples", type=int, default=64, help="held-out blocks")
    add_mesh_args(p)


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="grape-demo", help="report directory (report.md, results.csv, PNGs; a re-run replaces them)"
    )
    p.add_argument("--per-layer", default="2,4", help="experts removed per layer, comma-separated")
    p.add_argument(
        "--methods", default=None, help="planners to compare, comma-separated (default: the demo's own rows)"
    )
    p.add_argument("--operators", default="fit,dominant", help="merge operators for merging planners (with --methods)")
    p.add_argument("--quick", action="store_true", help="fewer calibration/evaluation tokens (for CI)")
    p.add_argument(
        "--heal-steps",
        type=int,
        default=30,
        help="heal the best variant at the largest budget for this many steps (0: no healed row)",
    )


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory or grape checkpoint")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results directory")
    p.add_argument("--per-layer", default="1,2,4", help="experts removed per layer, comma-separated")
    p.add_argument(
        "--fraction",
        default=None,
        help="fractions of the routed experts removed, comma-separated, e.g. 0.25,0.5,0.75 (instead of --per-layer)",
    )
    p.add_argument(
        "--methods",
        default="grape-l,grape,grape-r,local,frequency,reap,hc-smoe,m-smoe",
        help="planners to compare, comma-separated",
    )
    p.add_argument(
        "--operators",
        default="fit,dominant,freq",
        help="merge operators for merging planners ('fit' also folds and refits the pruning planners' rows)",
    )
    p.add_argument("--eval-data", nargs="*", default=None, help="held-out text (default: shipped held-out text)")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out blocks")
    p.add_argument("--stats", default=None, help="reuse a stats file of this model instead of calibrating")
    add_data_args(p)
    add_calibration_args(p)
    add_mesh_args(p)
