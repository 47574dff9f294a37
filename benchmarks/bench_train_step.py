"""One train step four ways on the same model and batch: plain CLM (train.lm_weight=1, no tables) and sparse
fusion (S sources, top-k tables), both with the chunked loss of the trainer (logits for train.loss_chunk
positions at a time); sparse fusion on the model's whole [B,T,V] logits (``fusion_loss``, the step before the
chunked loss); and a dense-teacher fusion step (defined here: the fused teacher scattered into a [B,T,V]
array, then a full cross-entropy against log_softmax). Prints time per step and the compiled per-device memory
(peak = arguments + outputs + temporaries - donated), with ratios against CLM measured in this run, the
ratios of the chunked fusion step against the whole-logits one, and the first-step losses (they must agree).
The memory comes from the step compiled on abstract arrays (``fusejax.plan.plan_training``): exact, repeatable
and allocation-free; ``--steps 0`` prints only that. Timing runs one state through the variants in turn.

Usage: .venv/bin/python benchmarks/bench_train_step.py [--vocab 32000 --hidden 256 --layers 4 --seq 256
       --batch 4 --sources 3 --k 10 --steps 5 --dtype float32 --loss-chunk 256 --remat none --no-dense-teacher]
"""

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.config import TrainConfig
from fusejax.fusion import fusion_loss
from fusejax.models import ModelConfig
from fusejax.plan import plan_training
from fusejax.sharding import make_mesh
from fusejax.schema import STEP_AXES, TEXT_FIELDS
from fusejax.step import StepOptions, abstract, batch_shardings, compile_step, make_optimizer
from fusejax.testing import SyntheticTables
from fusejax.train import build_target


def dense_fusion_loss(student_logits, labels, loss_mask, table_ids, table_logits, source_ce, *, lm_weight,
                      temperature=1.0, **_):
    """MinCE fusion (sequence-level CE) through a dense [B,T,V] teacher, as a dense implementation does it."""
    f32 = jnp.float32
    b, t, v = student_logits.shape
    mask = loss_mask != 0
    logq = jax.nn.log_softmax(student_logits.astype(f32), axis=-1)  # [B,T,V]
    clm = -jnp.take_along_axis(logq, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    valid = table_ids >= 0
    present = valid.any(-1)  # [B,T,S]
    best = jnp.argmin(jnp.where(present, source_ce[:, None, :], jnp.inf), axis=-1)  # [B,T]
    ids = jnp.take_along_axis(table_ids, best[..., None, None], axis=2)[:, :, 0]  # [B,T,k]
    logits = jnp.take_along_axis(table_logits, best[..., None, None], axis=2)[:, :, 0] / temperature
    ok = ids >= 0
    probs = jax.nn.softmax(jnp.where(ok, logits.astype(f32), -jnp.inf), axis=-1)
    probs = jnp.where(ok, probs, 0.0)
    bi, ti = jnp.meshgrid(jnp.arange(b), jnp.arange(t), indexing="ij")
    teacher = jnp.zeros((b, t, v), f32).at[bi[..., None], ti[..., None], jnp.where(ok, ids, 0)].add(probs)
    fus = -jnp.sum(jnp.where(teacher > 0, teacher * logq, 0.0), axis=-1)
    fused = mask & present.any(-1)
    n, nf = jnp.maximum(mask.sum(), 1), jnp.maximum(fused.sum(), 1)
    clm_loss, fusion = jnp.sum(jnp.where(mask, clm, 0.0)) / n, jnp.sum(jnp.where(fused, fus, 0.0)) / nf
    loss = lm_weight * clm_loss + (1 - lm_weight) * fusion
    return loss, {"loss": loss, "clm_loss": clm_loss, "fusion_loss": fusion}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    dev = jax.devices()[0]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{jax.device_count()} x {dev.platform}:{dev.device_kind}; host {cpu}, {os.cpu_count()} CPUs, "
            f"load average {load}; jax {jax.__version__}, python {platform.python_version()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab", 32000), ("hidden", 256), ("layers", 4), ("seq", 256), ("batch", 4),
                          ("sources", 3), ("k", 10), ("steps", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--no-dense-teacher", action="store_true", help="leave out the dense-teacher step (large V)")
    p.add_argument("--attention", default=TrainConfig.attention_impl, choices=("auto", "xla", "chunked", "explicit"),
                   help="train.attention_impl of every step but the one before issues 12-13 (explicit attention)")
    a = p.parse_args()
    print("machine:", machine())
    mc = ModelConfig(arch="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                     num_layers=a.layers, num_heads=max(1, a.hidden // 64))
    tc = TrainConfig(steps=1000, batch_size=a.batch, seq_len=a.seq, compute_dtype=a.dtype, loss_chunk=a.loss_chunk,
                     remat=a.remat, attention_impl=a.attention)
    print(f"model: llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch} x {a.seq} tokens; "
          f"S={a.sources}, k={a.k}; compute {a.dtype}; remat {a.remat}; loss chunk {min(a.loss_chunk, a.seq)} "
          "positions")
    mesh = make_mesh(fsdp=-1)
    variants = {
        "clm": (dataclasses.replace(tc, lm_weight=1.0), 0, None),
        "fusion (chunked)": (tc, a.sources, None),
        "fusion (whole logits)": (tc, a.sources, fusion_loss),
        # the fused step before issues 12-13: whole logits and explicit [B, H, T, T] attention scores
        "fusion (before)": (dataclasses.replace(tc, attention_impl="explicit"), a.sources, fusion_loss),
    }
    if not a.no_dense_teacher:
        variants["fusion (dense teacher)"] = (tc, a.sources, dense_fusion_loss)
    # memory from abstract arrays: nothing is allocated
    runs = {name: {"mem": plan_training(mc, vtc, mesh, num_sources=s, k=a.k, loss_impl=impl)["memory"],
                   "loss": float("nan"), "times": []} for name, (vtc, s, impl) in variants.items()}
    if a.steps:
        model = build_target(tc, mesh, config=mc)
        graphdef, params = nnx.split(model)
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(params))  # one host copy; each variant starts from it
        rules = dict(model.rules)
        del model
        tx, _ = make_optimizer(tc, tc.steps)
        rows = SyntheticTables(a.batch, a.seq, a.vocab, num_sources=a.sources, k=a.k).rows(np.arange(a.batch))
        host = {k: v[None] for k, v in rows.items() if k in STEP_AXES}
        shardings = batch_shardings(mesh, {k: v.shape for k, v in host.items()}, rules)
        state = None
        for name, (vtc, s, impl) in variants.items():
            opts = StepOptions.from_config(vtc, tc.steps)
            fields = [k for k in host if s or k in TEXT_FIELDS]
            batch = {k: jax.device_put(host[k], shardings[k]) for k in fields}
            del state  # one state on the device at a time
            with jax.set_mesh(mesh):
                state = {"params": jax.tree.map(jnp.asarray, params), "opt_state": jax.jit(tx.init)(params),
                         "step": jnp.zeros((), jnp.int32)}
            compiled = compile_step(graphdef, tx, opts, abstract(state), abstract(batch), mesh, impl)
            state, metrics = compiled(state, batch)  # warm-up; its loss is of the shared initial parameters
            runs[name].update(fn=compiled, batch=batch, loss=float(metrics["loss"]))
        # round-robin timing of one state passed through every variant, so that the variants share whatever else
        # runs on the machine
        for _ in range(a.steps):
            for run in runs.values():
                t0 = time.perf_counter()
                state, metrics = run["fn"](state, run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - t0)
    results = {name: (statistics.median(r["times"]) if r["times"] else float("nan"), r["mem"].get("peak_bytes", 0),
                      r["mem"].get("temp_bytes", 0), r["loss"]) for name, r in runs.items()}
    clm_t, clm_m, clm_temp = results["clm"][:3]
    header = ("step", "ms/step", "x CLM", "peak MiB/dev", "x CLM", "temp MiB", "x CLM", "loss@1")
    print(f"{header[0]:24s}" + "".join(f" {h:>{w}s}" for h, w in zip(header[1:], (9, 6, 13, 6, 9, 6, 9))))
    for name, (t, peak, temp, loss) in results.items():
        print(f"{name:24s} {t * 1e3:9.1f} {t / clm_t:6.2f} {peak / 2**20:13.1f} {peak / clm_m:6.2f} "
              f"{temp / 2**20:9.1f} {temp / clm_temp:6.2f} {loss:9.5f}")
    chunked = results["fusion (chunked)"]
    for name in ("fusion (whole logits)", "fusion (before)"):
        other = results[name]
        print(f"chunked vs {name} step: temporaries x{chunked[2] / other[2]:.3f}, peak x{chunked[1] / other[1]:.3f}, "
              f"speed x{other[0] / chunked[0]:.3f} (its ms / chunked ms)")
    if a.steps:
        losses = [r[3] for name, r in results.items() if name != "clm"]
        print(f"first-step losses of the fusion steps: max |diff| = {max(losses) - min(losses):.2e}")


if __name__ == "__main__":
    main()
