"""Runs inside the vLLM environment (not grape-jax's): serve exports, write greedy tokens as JSON.

    python tests/serve_worker.py REQUEST.json RESULTS.json

REQUEST: {"jobs": {name: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "logprobs": k,
          "mode": "offline" | "server", "port": p (server mode), "timeout_s": s, "log": path}}}
RESULTS: {name: {"outputs": [{"tokens": [...], "logprobs": [{token: logprob}, ...]}, ...]}
          or {"error": one line}}, one job after the other in this process (a refused model is an
          "error" entry: the tests read that line).
Offline mode uses vLLM's `LLM` API; server mode starts `python -m vllm.entrypoints.openai.api_server`
on 127.0.0.1, sends `/v1/completions` requests (bounded count and time), and stops the server.

Only the standard library and vLLM are imported: this file must not need grape-jax, jax or numpy.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

COMMON = dict(dtype="float32", enforce_eager=True, max_model_len=128, seed=0)


def _one_line(error: BaseException) -> str:
    """The last meaningful line of an error (vLLM wraps the root cause in several layers)."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "grape_vllm" in line or "num_experts_per_layer" in line or "not supported" in line:
            return line
    return lines[0] if lines else type(error).__name__


def run_offline(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy generation through vLLM's offline `LLM` API with `skip_tokenizer_init` (token ids in/out)."""
    from vllm import LLM, SamplingParams  # noqa: PLC0415 - after the environment is set
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    # engine and model in this process (no spawned engine or worker per job: the server job covers that)
    llm = LLM(model=request["model"], skip_tokenizer_init=True, distributed_executor_backend="uni", **COMMON)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=request["max_tokens"],
        logprobs=request["logprobs"],
        detokenize=False,
        ignore_eos=True,
    )
    try:
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    finally:
        llm.llm_engine.engine_core.shutdown()  # stop this engine's processes before the next job
        del llm
        gc.collect()
    outputs = []
    for result in results:
        completion = result.outputs[0]
        logprobs = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in completion.logprobs]
        outputs.append({"tokens": [int(t) for t in completion.token_ids], "logprobs": logprobs})
    return outputs


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def run_server(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Greedy completions through the OpenAI-compatible server on 127.0.0.1 (started and stopped here)."""
    port = int(request["port"])
    deadline = time.monotonic() + float(request.get("timeout_s", 300))
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", request["model"]]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "grape"]
    command += ["--dtype", COMMON["dtype"], "--max-model-len", str(COMMON["max_model_len"]), "--enforce-eager"]
    command += ["--seed", "0", "--max-logprobs", str(request["logprobs"])]
    log_path = request.get("log", os.devnull)
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:  # bounded by the deadline
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {server.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError("the vLLM server was not ready before the deadline")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        outputs = []
        for prompt in request["prompts"]:
            body = {
                "model": "grape",
                "prompt": prompt,
                "max_tokens": request["max_tokens"],
                "temperature": 0.0,
                "ignore_eos": True,
                "logprobs": request["logprobs"],
                "return_tokens_as_token_ids": True,
            }
            remaining = max(5.0, deadline - time.monotonic())
            choice = _post(base + "/v1/completions", body, timeout=remaining)["choices"][0]
            lp = choice["logprobs"]
            # tokens come back as "token_id:<id>" with return_tokens_as_token_ids
            tokens = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
            steps = [{int(t.split(":", 1)[1]): float(v) for t, v in top.items()} for top in lp["top_logprobs"]]
            outputs.append({"tokens": tokens, "logprobs": steps})
        return outputs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main() -> int:
    jobs = json.load(open(sys.argv[1]))["jobs"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results: dict[str, Any] = {}
    for name, request in jobs.items():
        start = time.monotonic()
        try:
            run = run_server if request.get("mode") == "server" else run_offline
            results[name] = {"outputs": run(request)}
        except Exception as error:  # report vLLM's refusal as one line for the test to read
            results[name] = {"error": _one_line(error)}
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(f"serve_worker: {name}: {results[name].get('error', 'ok')} ({results[name]['seconds']} s)", flush=True)
        with open(sys.argv[2], "w") as f:  # after every job, so a killed run keeps what it finished
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
