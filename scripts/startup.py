"""Start-up time of a compiled model: from a fresh process's start to its first N generated tokens.

    python scripts/startup.py [--model SmolLM2-135M-Instruct] [--num-device 2] [--new-tokens 8] [--runs 3]

Compile the model first (`hdex compile MODEL --num-device N`); the first run after a compile also compiles the
programs it uses and stores their executables beside the model, unless the compile was a full one
(fast_compile=False), which did it already. Each run is a new Python process
(`python -c`), so import time counts; it prints the time at the end of each phase, measured from the moment
the process was spawned (the interpreter's own start-up is the wall-clock time from spawning it to its first
line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_CHILD = """
import time
started_at = time.time()
t0 = time.perf_counter()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - t0))
import json, sys
model_id, num_device, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from hdex_jax.transformers import AutoModelForCausalLM
mark("import hdex_jax.transformers")
model = AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": num_device})
mark("from_pretrained (weights, programs, tokenizer)")
ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
mark("chat template + tokenize")
out = model.generate(list(ids), max_new_tokens=new_tokens, do_sample=False, stop=[])
mark(f"generate {new_tokens} tokens")
text = model.tokenizer.decode(out[len(ids):])
mark("decode")
print(json.dumps({"marks": marks, "text": text, "programs": model.decode.programs is not None,
                  "started_at": started_at}))
"""


def run_once(model: str, num_device: int, new_tokens: int) -> dict:
    spawned_at, spawned = time.time(), time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, model, str(num_device), str(new_tokens)],
                            capture_output=True, text=True, env=os.environ)
    total = time.perf_counter() - spawned
    if result.returncode != 0:
        raise SystemExit(f"the child process failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["total"] = total
    report["interpreter"] = report["started_at"] - spawned_at
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-device", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for run in range(args.runs):
        report = run_once(args.model, args.num_device, args.new_tokens)
        generated = report["interpreter"] + report["marks"][-2][1]
        print(f"run {run + 1}: {generated:.2f}s from spawning the process to its {args.new_tokens} tokens, "
              f"{report['total']:.2f}s to its exit (inst programs: {report['programs']}); {report['text']!r}")
        previous = report["interpreter"]
        print(f"  {previous:6.2f}s  (+{previous:5.2f}s)  interpreter start-up")
        for name, at in report["marks"]:
            at += report["interpreter"]
            print(f"  {at:6.2f}s  (+{at - previous:5.2f}s)  {name}")
            previous = at


if __name__ == "__main__":
    main()
