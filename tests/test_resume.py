"""Resume: a run interrupted or killed at any layer continues to weights byte-identical to an
uninterrupted run's, and a partial folder is never resumed by another recipe or model."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ByteTokenizer, tiny_config, tiny_recipe

from lowrank_kit.api import compress
from lowrank_kit.persistence.checkpoint import STATE, partial_dir
from lowrank_kit.pipeline.callbacks import Callback
from lowrank_kit.recipe.schema import RecipeError

LAYERS = 6
RECIPES: dict[str, dict[str, Any]] = {
    # sequential statistics, scores and per-layer notes (FLAT-LLM's shape)
    "flat": {"score": "angular_importance", "allocate": "iprs",
             "transform": [{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                           {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}]},
    # statistics of the scoring pass read by the transforms (an output Fisher): the pass runs again on
    # resume for them, and the plan still comes from the stored scores
    "kfac": {"score": "output_gradient", "allocate": "error_budget",
             "transform": [{"plugin": "svd_llm", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                            "output_fisher": 0.1},
                           {"plugin": "nystrom", "selection": "greedy", "output_fisher": 0.1}]},
    # the dense model's statistics (SVD-LLM's whitening)
    "svd_llm": {"calibration": {"dataset": "austen-emma", "samples": 8, "seq_len": 64, "seed": 0, "batch_size": 4,
                                "pipeline": "dense_input"},
                "transform": [{"plugin": "svd_llm"}]},
}


def deep_model(seed: int = 0) -> Any:
    """The tiny Llama with enough layers to stop in the middle of."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def recipe(tmp_path: Path, kind: str, out: str, ratio: float = 0.3) -> dict[str, Any]:
    raw = tiny_recipe(tmp_path, ratio=ratio, **RECIPES[kind])
    raw["output"]["dir"] = str(tmp_path / out)
    return raw


def weights_sha(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


class StopAt(Callback):
    """Ctrl-C at the start of a layer (or of a phase)."""

    def __init__(self, layer: int | None = None, phase: str | None = None, batches: str | None = None):
        self.layer, self.phase, self.batches = layer, phase, batches

    def on_batches_start(self, run: Any, label: str, total: int) -> None:
        if self.batches is not None and label.startswith(self.batches):
            raise AssertionError(f"a '{label}' pass ran")

    def on_layer_start(self, run: Any, layer: int) -> None:
        if layer == self.layer:
            raise KeyboardInterrupt

    def on_phase_start(self, run: Any, phase: str) -> None:
        if phase == self.phase:
            raise KeyboardInterrupt


def run(raw: dict[str, Any], **options: Any) -> Any:
    return compress(raw, model=options.pop("model", None) or deep_model(), tokenizer=ByteTokenizer(),
                    progress=False, **options)


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path, kind: str) -> None:
    reference = run(recipe(tmp_path, kind, "reference"))
    raw = recipe(tmp_path, kind, "resumed")
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(raw, callbacks=[StopAt(layer=4)])
    partial = partial_dir(Path(raw["output"]["dir"]))
    assert stopped.value.lowrank_summary == "interrupted during compress at decoder layer 4"
    assert stopped.value.lowrank_hint == f"4 finished decoder layers are kept in '{partial}'; rerun with --resume " \
                                         "to continue"
    assert json.loads((partial / STATE).read_text())["done"] == 4
    resumed = run(raw, resume=True)
    assert weights_sha(resumed.output_dir) == weights_sha(reference.output_dir)
    assert resumed.report["notes"]["resumed"] == {"from_layer": 4}
    run_only = ("resumed", "scores", "error_curves", "checkpoint_s")  # what this run found cached or resumed
    notes = {k: v for k, v in resumed.report["notes"].items() if k not in run_only}
    assert notes == {k: v for k, v in reference.report["notes"].items() if k not in run_only}
    assert "Resumed an interrupted run from decoder layer 4" in (resumed.output_dir / "report.md").read_text()
    assert not partial.exists() and not (resumed.output_dir / "layers").exists()
    assert not (resumed.output_dir / STATE).exists()


def test_scores_come_back_from_the_partial_folder_without_a_cache(tmp_path: Path) -> None:
    """With output.cache_dir null the only copy of the scores is the checkpoint's scores.json."""
    reference = recipe(tmp_path, "flat", "reference")
    reference["output"]["cache_dir"] = None
    expected = weights_sha(run(reference).output_dir)
    raw = recipe(tmp_path, "flat", "resumed")
    raw["output"]["cache_dir"] = None
    with pytest.raises(KeyboardInterrupt):
        run(raw, callbacks=[StopAt(layer=2)])
    resumed = run(raw, resume=True, callbacks=[StopAt(batches="score")])  # a scoring pass would stop it
    assert resumed.report["notes"]["scores"] == {"cached": True}
    assert weights_sha(resumed.output_dir) == expected


def test_a_run_killed_during_save_resumes(tmp_path: Path) -> None:
    reference = run(recipe(tmp_path, "svd_llm", "reference"))
    raw = recipe(tmp_path, "svd_llm", "resumed")
    with pytest.raises(KeyboardInterrupt):
        run(raw, callbacks=[StopAt(phase="save")])
    resumed = run(raw, resume=True)
    assert resumed.report["notes"]["resumed"] == {"from_layer": LAYERS}
    assert weights_sha(resumed.output_dir) == weights_sha(reference.output_dir)


def test_another_recipe_or_model_is_never_resumed(tmp_path: Path) -> None:
    raw = recipe(tmp_path, "flat", "out")
    with pytest.raises(KeyboardInterrupt):
        run(raw, callbacks=[StopAt(layer=2)])
    other = recipe(tmp_path, "flat", "out", ratio=0.4)
    with pytest.raises(RecipeError, match=r"target\.ratio: cannot resume .* target\.ratio=0\.3, this recipe has 0\.4"):
        run(other, resume=True)
    with pytest.raises(RecipeError, match=r"model\.path: cannot resume .* from a different model"):
        run(raw, resume=True, model=deep_model(seed=1))
    # the folder survived both refusals; without --resume it is discarded, with a warning
    assert json.loads((partial_dir(Path(raw["output"]["dir"])) / STATE).read_text())["done"] == 2
    with pytest.warns(UserWarning, match=r"discarding the unfinished run .* \(2 decoder layers finished\)"):
        result = run(raw)
    assert "resumed" not in result.report["notes"]


def test_a_partial_folder_owned_by_a_live_process_is_refused(tmp_path: Path) -> None:
    raw = recipe(tmp_path, "svd_llm", "out")
    partial = partial_dir(Path(raw["output"]["dir"]))
    partial.mkdir()
    (partial / STATE).write_text(json.dumps({"pid": os.getppid(), "done": 0}))
    with pytest.raises(RecipeError, match=f"another lowrank-kit run \\(process {os.getppid()}\\) is writing"):
        run(raw)


def test_a_failure_before_any_layer_leaves_no_partial_folder(tmp_path: Path) -> None:
    raw = recipe(tmp_path, "svd_llm", "out")
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(raw, callbacks=[StopAt(phase="evaluate dense")])
    assert stopped.value.lowrank_hint is None
    assert not partial_dir(Path(raw["output"]["dir"])).exists()


CHILD = textwrap.dedent("""
    import os
    import signal
    import sys
    import time
    # A shell starting the test run in the background (``make test &``) hands its children SIGINT
    # ignored; a user's terminal does not, so the child gets Python's own handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from conftest import ByteTokenizer
    from test_resume import deep_model
    from lowrank_kit import cli
    from lowrank_kit.pipeline import engine
    from lowrank_kit.pipeline.callbacks import Callback

    STALL = float(os.environ.get("STALL_S", "0"))  # time for a signal to land before the work goes on
    HOLD = os.environ.get("HOLD_AT", "")  # the announcement after which to wait for the parent's signal

    def announce(line):
        print(line, flush=True)
        if line == HOLD:  # however loaded the machine, the signal lands here, not after the run
            time.sleep(120)
        time.sleep(STALL)

    class Announce(Callback):
        def on_layer_start(self, run, layer):
            announce(f"layer {{layer}}")
        def on_phase_start(self, run, phase):
            announce(f"phase {{phase}}")

    engine.load_model = lambda *args: (deep_model(), ByteTokenizer())  # the tiny model stands in for model.path
    start = engine.Engine.__init__
    def init(self, *args, **kwargs):
        start(self, *args, **kwargs)
        self.callbacks.append(Announce())
    engine.Engine.__init__ = init
    sys.exit(cli.main(sys.argv[1:]))
""")


def child(tmp_path: Path, raw: dict[str, Any], *flags: str, stall_s: float = 0.0,
          hold: str = "") -> subprocess.Popen[str]:
    path = tmp_path / f"{Path(raw['output']['dir']).name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    return subprocess.Popen([sys.executable, str(script), "compress", str(path), "--quiet", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "STALL_S": str(stall_s),
                                 "HOLD_AT": hold})


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def stop_child(process: subprocess.Popen[str], stop: str, sig: int) -> None:
    """Send ``sig`` the moment the child announces ``stop``."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == stop:
            process.send_signal(sig)
            return
    raise AssertionError(f"the run ended before '{stop}'")


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The uninterrupted run's weights, from the same child process."""
    tmp_path = tmp_path_factory.mktemp("reference")
    raw = recipe(tmp_path, "flat", "reference")
    finish(child(tmp_path, raw))
    return weights_sha(Path(raw["output"]["dir"]))


@pytest.mark.parametrize("where", ["a random layer", "save"])
def test_kill_9_then_resume_gives_the_same_weights(tmp_path: Path, where: str, reference_weights: str) -> None:
    layer = random.randrange(LAYERS)
    stop = "phase save" if where == "save" else f"layer {layer}"
    raw = recipe(tmp_path, "flat", "killed")
    process = child(tmp_path, raw, hold=stop)
    stop_child(process, stop, signal.SIGKILL)
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL
    out = Path(raw["output"]["dir"])
    assert not out.exists() and partial_dir(out).is_dir()
    finish(child(tmp_path, raw, "--resume"))
    report = json.loads((out / "report.json").read_text())
    expected = LAYERS if where == "save" else layer
    assert report["notes"]["resumed"]["from_layer"] >= expected, f"killed at '{stop}'"
    assert weights_sha(out) == reference_weights, f"killed at '{stop}'"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_says_where_and_what_is_kept(tmp_path: Path, sig: int) -> None:
    raw = recipe(tmp_path, "flat", "out")
    process = child(tmp_path, raw, hold="layer 3")
    stop_child(process, "layer 3", sig)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130
    last = err.strip().splitlines()[-1]
    partial = partial_dir(Path(raw["output"]["dir"]))
    assert re.fullmatch(rf"interrupted during compress at decoder layer (\d): \1 finished decoder layers are kept "
                        rf"in '{re.escape(str(partial))}'; rerun with --resume to continue", last), err[-2000:]
    assert "Traceback" not in err


def test_a_disk_offloaded_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    """Killed under ``runtime.offload: disk``: the finished layers come back from the checkpoints
    into the meta layers, and the result equals an uninterrupted in-memory run's."""
    import torch

    from lowrank_kit.persistence.saving import load_pretrained

    reference = run(recipe(tmp_path, "flat", "reference"))
    raw = recipe(tmp_path, "flat", "resumed")
    raw["runtime"]["offload"] = "disk"
    with pytest.raises(KeyboardInterrupt):
        run(raw, callbacks=[StopAt(layer=3)])
    assert not any(".offload-" in p.name for p in tmp_path.iterdir())  # the working folder went with the failure
    resumed = run(raw, resume=True)
    assert resumed.report["notes"]["resumed"] == {"from_layer": 3}
    ids = torch.arange(10, 58)[None]
    with torch.no_grad():
        assert torch.equal(load_pretrained(resumed.output_dir)(ids).logits,
                           load_pretrained(reference.output_dir)(ids).logits)
