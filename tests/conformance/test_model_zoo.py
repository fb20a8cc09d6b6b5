"""Every stage of wpk on models nobody here wrote: the onnx wheel's test topologies, the
pretrained models inside pip packages, and the variants real files have (no names, external
data, fp16, QDQ int8, newer opsets). Each stage ends `ok` or with a one-line refusal a user
can act on; never a traceback or a wrong answer. Speed is the benchmark's verdict, not
these tests': `benchmarks/model_zoo.py` (with `--torch` for the exports too heavy for CI)
times the optimizer against ONNX Runtime's defaults (docs/model-zoo.md)."""
from __future__ import annotations

import os
import pytest

from benchmarks import model_zoo
from benchmarks.zoo_corpus import MissingModel, corpus

# Refusals that are expected, each with the reason it is right (the rest must pass).
EXPECTED_REFUSALS = {
    # Its If picks the 8 kHz or the 16 kHz branch by the *value* of the `sr` input: with a
    # random value the branch cannot run, so the cut tensors have no measurable shape; and
    # with the input shape fixed, ONNX Runtime's own inference rejects the other branch.
    "silero_vad": ("could not run the model on random inputs", "ONNX Runtime cannot load it"),
}

MODELS = {model.name: model for model in corpus()}


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPK_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_on_a_model_nobody_here_wrote(name, tmp_path, monkeypatch):
    monkeypatch.setattr(model_zoo, "OPTIMIZE_TRIALS", 4)
    monkeypatch.setattr(model_zoo, "OPTIMIZE_SECONDS", 20)
    monkeypatch.setattr(model_zoo, "CHECK_SPEED", False)
    try:
        MODELS[name].make(tmp_path / "probe")
    except MissingModel as missing:
        if os.environ.get("CI"):                       # .ci/run installs them: never skip there
            raise
        pytest.skip(str(missing))
    row = model_zoo.run_model(MODELS[name], tmp_path)
    report = {stage: outcome.cell() for stage, outcome in row.outcomes.items()}
    expected = EXPECTED_REFUSALS.get(name)
    for stage, outcome in row.outcomes.items():
        assert outcome.status != "FAILED", f"{stage}: {outcome.detail}"
        assert outcome.status != "skipped" or stage == "deploy", report
        if outcome.status == "refused":
            assert expected and any(reason in outcome.detail for reason in expected), \
                f"{stage}: {outcome.detail}"
            assert "\n" not in outcome.detail and "Traceback" not in outcome.detail
    if expected is None:
        assert all(o.status == "ok" for o in row.outcomes.values()), report
