"""Runs a real offline vLLM engine (engine core in this process) with the plugin and prints, as JSON,
what the tests compare: vLLM's request outputs, the plugin's metrics and its per-request records.

Run as a script in its own process by tests/test_vllm_offline.py: vLLM's CPU kernel registration walks every
loaded module, and torch-geometric objects (imported by other tests) break that walk.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process


def main(model_dir: str, max_batched_tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from llmco2_vllm.plugin.entry_points import engine_forwarders

    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        max_num_batched_tokens=max_batched_tokens,
        max_num_seqs=8,
        enable_prefix_caching=True,
        block_size=32,
        seed=0,
    )
    long_prompt = [(7 * i) % 500 + 3 for i in range(70)]
    prompts = [[5, 6, 7, 8, 9], list(range(10, 30)), long_prompt]
    max_tokens = [3, 8, 5]
    first = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0) for m in max_tokens],
    )
    # The same long prompt again: its full blocks come from the prefix cache.
    second = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], SamplingParams(max_tokens=4, ignore_eos=True))
    forwarder = engine_forwarders()[-1]
    report = forwarder.report(timeout=30)
    result = {
        "idle": report is not None,
        "worker": forwarder.mode,
        "outputs": [
            {
                "request_id": o.request_id,
                "prompt_tokens": len(o.prompt_token_ids),
                "cached_tokens": o.num_cached_tokens or 0,
                "generated_tokens": len(o.outputs[0].token_ids),
            }
            for o in first + second
        ],
        **(report or {}),
    }
    print("LLMCO2_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
