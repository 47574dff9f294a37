"""`fusejax plan`: per-device bytes of parameters, AdamW state and batch against a hand computation from the
sharding rules, the compiled step's memory, the fit warning, and a 7B Llama on a v4-8 slice (4 CPU devices
standing in for the chips) in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusejax import cli
from fusejax.config import load_config
from fusejax.plan import PlanError, plan_devices, run

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3

# a tiny Llama as Hugging Face writes it (config.json only: plan reads no weights)
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 200, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# Llama-2-7B's config.json (the fields fusejax reads)
LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def model_folder(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_config(tmp_path, *overrides):
    folder = model_folder(tmp_path, TINY)
    return load_config(overrides=[
        f"target.path={folder}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8",
        "train.grad_accum=2", "train.seq_len=16", "represent.k=3", f"sources=[{{name: a, path: {folder}}}, "
        "{name: b, path: elsewhere}]", *overrides])


def test_sizes_no_step_holds_refused_before_compiling(tmp_path, capsys):
    folder = model_folder(tmp_path, TINY)
    for override, fragment in [("train.seq_len=1000000000", "more than the target's context (max_position_embeddings "
                                "= 64)"), ("train.batch_size=1000000000000", "more than int32 counts")]:
        assert cli.main(["plan", f"target.path={folder}", override]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("fusejax: error: ") and "\n" not in line and override in line and fragment in line


def test_tiny_plan_equals_a_hand_computation(tmp_path, capsys):
    result = run(tiny_config(tmp_path, "mesh.device_memory_gib=64", "train.loss_chunk=4"))
    report = capsys.readouterr().out
    # float32 elements per device on data=2, fsdp=2, tensor=2 (vocab 200 padded to 256; embed -> fsdp, vocab,
    # heads, kv_heads, mlp -> tensor; norms and the data axis replicated; L=2, D=32, H=4, K=2, E=8, F=64)
    elements = {
        "embed [256, 32]": 256 * 32 // 4,
        "lm_head [32, 256]": 32 * 256 // 4,
        "final_norm_scale [32]": 32,
        "layers.attn_norm_scale, mlp_norm_scale [2, 32]": 2 * (2 * 32),
        "layers.wq, wo [2, 32, 4, 8]": 2 * (2 * 32 * 4 * 8 // 4),
        "layers.wk, wv [2, 32, 2, 8]": 2 * (2 * 32 * 2 * 8 // 4),
        "layers.w_gate, w_up, w_down [2, 32, 64]": 3 * (2 * 32 * 64 // 4),
    }
    params = 4 * sum(elements.values())
    assert params == 35456
    assert result["params_bytes"] == params
    assert result["num_params"] == 2 * 256 * 32 + 32 + 2 * (2 * 32 + 2 * 32 * 4 * 8 + 2 * 32 * 2 * 8 + 3 * 32 * 64)
    # AdamW: two moments sharded like the parameters, plus two int32 step counters (adam, lr schedule)
    assert result["opt_state_bytes"] == 2 * params + 2 * 4
    # one of the 4 rows of each of the 2 micro-batches per device (batch over data x fsdp), T=16, S=2, k=3
    text = 4 * (2 * 1 * 16) * 4
    tables = 2 * (2 * 1 * 16 * 2 * 3) * 4
    source_ce = (2 * 1 * 2) * 4
    assert result["batch_bytes"] == text + tables + source_ce
    # float32 logits of one micro-batch's row per device (vocab 256 over tensor=2): whole, and 4 of 16 positions
    assert (result["logits_bytes"], result["logits_chunk_bytes"]) == (1 * 16 * 128 * 4, 1 * 4 * 128 * 4)
    assert "one chunk of 4 positions (train.loss_chunk)" in report
    # XLA's view of the compiled step: its arguments are the state (+ the step counter) and the batch
    memory = result["memory"]
    assert memory["argument_bytes"] == params + result["opt_state_bytes"] + 4 + result["batch_bytes"]
    assert memory["peak_bytes"] == memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"] - \
        memory["alias_bytes"]
    assert memory["temp_bytes"] > 0
    assert result["device_memory"] == 64 * GIB and result["fits"] is True
    assert "compiled for 8 CPU devices" in report and "data=2, fsdp=2, tensor=2 (8 devices)" in report
    assert "[256, 32] -> [128, 16]" in report and "P('tensor', 'fsdp')" in report
    assert "fit: ok" in report and "WARNING" not in report


def test_warns_when_the_step_does_not_fit(tmp_path, capsys):
    result = run(tiny_config(tmp_path, "mesh.device_memory_gib=1e-6"))
    report = capsys.readouterr().out
    assert result["fits"] is False
    warning = [line for line in report.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "will not fit" in warning[0]
    assert "train.param_dtype=bfloat16" in warning[0] and "train.remat=full" in warning[0]
    assert "grad_accum" not in warning[0]  # micro-batches of one row per device cannot shrink further


def test_unknown_device_memory_and_missing_target(tmp_path, capsys):
    result = run(tiny_config(tmp_path, "align.on_the_fly=true", "align.workers=3"))
    assert result["fits"] is None and result["device_memory"] is None
    report = capsys.readouterr().out
    assert "set mesh.device_memory_gib" in report
    assert report.splitlines()[-1].startswith("host: align.on_the_fly:") and "(align.workers: 3)" in report
    with pytest.raises(PlanError, match="target.path is not set"):
        run(load_config())


def test_too_few_devices_says_how_to_plan_without_the_hardware():
    with pytest.raises(PlanError, match="needs 16 devices.*xla_force_host_platform_device_count=16"):
        plan_devices(2, 8, 1)


@pytest.mark.slow
def test_7b_llama_on_a_v4_8_slice_without_the_hardware(tmp_path):
    """The documented command (docs/scale-out.md) on a plain CPU machine: `fusejax plan` creates the 4 CPU
    devices itself (no XLA_FLAGS), and the scanned layers keep the compile short."""
    folder = model_folder(tmp_path, LLAMA2_7B)
    config = tmp_path / "7b-v4-8.yaml"
    config.write_text(f"base: [{REPO / 'configs/example.yaml'}, {REPO / 'configs/mesh/v4-8.yaml'}]\n"
                      f"target: {{path: {folder}}}\nmesh: {{device_memory_gib: 32}}\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-m", "fusejax.cli", "plan", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report, _, summary = result.stdout.partition("\n{")
    summary = json.loads("{" + summary)
    V, D, F, L = 32000, 4096, 11008, 32
    assert summary["num_params"] == 2 * V * D + D + L * (2 * D + 4 * D * D + 3 * D * F) == 6_738_415_616
    # float32, everything but the norms split 4 ways over fsdp
    params = 4 * ((2 * V * D + L * (4 * D * D + 3 * D * F)) // 4 + D + 2 * L * D)
    assert summary["params_bytes"] == params
    assert summary["opt_state_bytes"] == 2 * params + 8
    assert summary["fits"] is False  # example.yaml trains float32 master weights: ~19 GiB of state per chip
    assert "data=1, fsdp=4, tensor=1 (4 devices)" in report and "compiled for 4 CPU devices" in report
    assert f"{params / GIB:9.2f} GiB" in report and "32.00 GiB" in report
    assert "layers.w_gate" in report and "[32, 4096, 11008] -> [32, 1024, 11008]" in report
    warning = [line for line in report.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "train.param_dtype=bfloat16" in warning[0]


# today's 7-9B targets (their published config.json, ../shared/data/model-configs): (model_type, mesh preset,
# parameters as their model cards count them, parameters no mesh axis splits: norms, Qwen2's q/k/v biases)
TODAYS_TARGETS = {
    "llama-3.1-8b": ("llama", "h100x8", 8_030_261_248, 4096 + 2 * 32 * 4096),
    "qwen2.5-7b": ("qwen2", "v4-8", 7_615_616_512, 3584 + 2 * 28 * 3584 + 28 * (28 + 2 * 4) * 128),
    # tied 256k embedding; four norms per layer (pre- and post-norms around attention and MLP)
    "gemma-2-9b": ("gemma2", "h100x8", 9_241_705_984, 3584 + 4 * 42 * 3584),
}


@pytest.mark.parametrize("name", list(TODAYS_TARGETS))
def test_todays_targets_on_mesh_presets(shared_data, tmp_path, capsys, name):
    """`fusejax plan` of the paper's step (configs/example.yaml) for a 7-9B target (GQA, Llama 3.1 RoPE scaling,
    a 128k-256k vocabulary, Qwen2 q/k/v biases, Gemma 2's soft-capping and sliding layers) on a mesh preset, as
    docs/scale-out.md shows it."""
    model_type, preset, num_params, unsplit = TODAYS_TARGETS[name]
    config = tmp_path / "run.yaml"
    config.write_text(f"base: [{REPO / 'configs/example.yaml'}, {REPO / 'configs/mesh' / preset}.yaml]\n"
                      f"target: {{path: {shared_data / 'model-configs' / name}}}\n")
    result = run(load_config(config))
    report = capsys.readouterr().out
    fsdp = load_config(config).mesh.fsdp
    assert result["num_params"] == num_params
    params = 4 * ((num_params - unsplit) // fsdp + unsplit)  # float32
    assert result["params_bytes"] == params and result["opt_state_bytes"] == 2 * params + 8
    assert f"model: {model_type}, {num_params / 1e9:.2f}B parameters" in report
    assert f"fsdp={fsdp}" in report and "2048 tokens" in report and "attention chunked" in report
    assert result["memory"]["temp_bytes"] > 0 and result["fits"] is not None
