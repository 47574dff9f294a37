"""The fused train step's reductions over the batch's devices: the LM head gradient summed per row group and
reduced once per micro-batch (``batch_axes``, what the trainer runs) against once per chunk of the chunked
loss (the step before; ``--per-chunk``: the loss is called without ``batch_axes``). Compiles the step of
``fusejax plan`` (``fusejax.plan.plan_training``) on N CPU devices (fsdp=N) without allocating it and prints,
from the compiled HLO, the all-reduces inside while-loop bodies (run once per iteration: the layers' scan and
the chunks' scan) and outside them, with their bytes, and XLA's memory analysis per device.

    .venv/bin/python benchmarks/bench_head_reduce.py [--devices 4 --vocab 32000 --hidden 512 --seq 2048
                                                      --batch 8 --loss-chunk 256] [--per-chunk]
"""

import argparse
import math
import os
import re


def nbytes(shape_text: str) -> int:
    """Bytes of the arrays named in an HLO result shape such as ``(f32[], f32[32000,512]{1,0})``."""
    size = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1}
    return sum(size[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"(f32|bf16|s32|pred)\[([\d,]*)\]", shape_text))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--per-chunk", action="store_true", help="the step before: no batch_axes")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={a.devices}")
    from fusejax import plan, step
    from fusejax.config import TrainConfig
    from fusejax.models import ModelConfig
    from fusejax.sharding import make_mesh

    if a.per_chunk:
        loss = step.chunked_fusion_loss
        step.chunked_fusion_loss = lambda *args, batch_axes, **kw: loss(*args, **kw)
    compiled = {}
    compile_step = plan.compile_step
    plan.compile_step = lambda *args, **kw: compiled.setdefault("step", compile_step(*args, **kw))
    mc = ModelConfig(arch="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                     num_layers=a.layers, num_heads=8)
    tc = TrainConfig(batch_size=a.batch, seq_len=a.seq, loss_chunk=a.loss_chunk, steps=1)
    memory = plan.plan_training(mc, tc, make_mesh(1, a.devices, 1), num_sources=3, k=10)["memory"]
    text = compiled["step"].as_text()
    parts = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(?:ENTRY )?(%\S+) .*?^}", text)}
    bodies = set(re.findall(r"body=(%[\w.\-]+)", text))
    print(f"{a.devices} CPU devices (fsdp), llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, batch "
          f"{a.batch} x {a.seq}, loss chunk {a.loss_chunk} ({a.seq // a.loss_chunk} chunks), "
          f"{'per chunk' if a.per_chunk else 'batch_axes'}")
    for where, names in (("in loop bodies (per iteration)", bodies), ("outside loops", set(parts) - bodies)):
        ops = [line.split(" all-reduce(")[0].split("=", 1)[1].strip() for name in names
               for line in parts[name].splitlines() if " all-reduce(" in line]
        big = sorted({op[:70] for op in ops if nbytes(op) > 2**20})
        print(f"all-reduces {where}: {len(ops)}, {sum(map(nbytes, ops)) / 2**20:.1f} MiB; over 1 MiB: {big}")
    print(f"temporaries {memory['temp_bytes'] / 2**20:.1f} MiB, peak {memory['peak_bytes'] / 2**20:.1f} MiB "
          "per device")


if __name__ == "__main__":
    main()
