"""Peak resident memory and time of one update, per C-allocator setting (``run.mmap_threshold_mb``).

Each setting runs in a fresh process (the allocator's state is per process): load the model with
LoRA, build a batch of ``--rows`` random completions of ``--length`` tokens after two 90-token
prompts, and time :func:`spine_ttrl.update.update_on_batch` (with the update-size diagnostics);
report the peak resident memory of the update, the memory the process still holds after it, and
the seconds. Numbers in ``docs/metrics.md`` and ``spine_ttrl/engine/memory.py`` came from::

    M=~/.cache/spine-ttrl/bench/qwen2.5-coder-0.5b-instruct.gguf
    python bench/memory.py --model $M --thresholds 0 8 1 --micro-batch-size 4 --length 380
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from spine_ttrl.config import make_config
from spine_ttrl.engine.builtin import load_builtin_engine
from spine_ttrl.engine.memory import fix_mmap_threshold, peak_memory_metrics, reset_peak_memory
from spine_ttrl.engine.scoring import build_training_batch
from spine_ttrl.update import make_optimizer, update_on_batch

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
if a["threshold"]:
    fix_mmap_threshold(a["threshold"] << 20)
over = {"model": {"lora_r": 16}, "optim": {"diagnostics": True, "micro_batch_size": a["micro_batch_size"]}}
if a["model"]:
    over["model"]["model"] = a["model"]
cfg = make_config("ttrl", overrides=over)
eng = load_builtin_engine(cfg.model, need_reference=False)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(100, 5000, (90,), generator=g).tolist() for _ in range(2)]
comps = [torch.randint(100, 5000, (a["length"],), generator=g).tolist() for _ in range(a["rows"])]
batch = build_training_batch([prompts[i * 2 // a["rows"]] for i in range(a["rows"])], comps, eng.sampler.pad_token_id)
opt = make_optimizer([p for p in eng.model.parameters() if p.requires_grad], cfg.optim)
cpu = torch.device("cpu")
reset_peak_memory(cpu)
t = time.perf_counter()
update_on_batch(eng.model, opt, batch, torch.randn(a["rows"], generator=g), cfg.spine, cfg.optim, temperature=0.8,
                group_size=a["rows"] // 2, amp=eng.autocast_dtype,
                behaviour_entropy=torch.rand(a["rows"], batch[4].shape[1], generator=g))
seconds = time.perf_counter() - t
kept = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
print(json.dumps({"threshold_mb": a["threshold"], "peak_rss_gb": peak_memory_metrics(cpu)["memory/peak_rss_gb"],
                  "kept_rss_gb": kept, "update_s": seconds}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--thresholds", nargs="+", type=int, default=[0, 8, 1], help="MiB; 0 = glibc's default")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=380)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        p.error("needs Linux (/proc and glibc)")
    print("| mmap threshold (MiB) | update peak RSS (GiB) | kept after (GiB) | update s |\n|---|---|---|---|")
    for threshold in args.thresholds:
        a = {"model": args.model, "threshold": threshold, "micro_batch_size": args.micro_batch_size,
             "rows": args.rows, "length": args.length, "threads": args.threads}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {threshold or 'glibc default'} | {r['peak_rss_gb']:.2f} | {r['kept_rss_gb']:.2f} | {r['update_s']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
