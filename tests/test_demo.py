"""The README's main job (`fusejax demo`) runs end to end and scores held-out text sensibly."""

import json
import math

from fusejax.cli import main


def test_demo_writes_results(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "tokenizer").is_dir()
    assert results["heldout_tokens"] > 500
    # a random model is close to uniform over the vocabulary: far from 0 and from a broken (huge) score
    assert abs(results["ce_per_token"] - results["uniform_ce_per_token"]) < 0.5
    assert results["bits_per_byte"] > 0 and math.isfinite(results["bits_per_byte"])
    assert "results.json" in capsys.readouterr().out
