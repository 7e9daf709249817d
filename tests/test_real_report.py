"""The demo's real-model page renders from real.json alone, escapes what the model said, draws the trace."""

from __future__ import annotations

import json


def test_real_report_renders_from_saved_file(tmp_path):
    from superedit.report.real_report import write_report

    data = {"model": "pretrained:smollm2-135m", "profile": "smollm2-135m", "rome_layer": 4, "corpus_docs": 32,
            "provenance": {"quantisation": "Q4_1", "gguf_sha256": "ab" * 32, "licence": "Apache-2.0",
                           "note": "dequantised to float32 from a 4-bit GGUF file"},
            "edits": [{"case_id": 0, "edit": "Danielle Darrieux: French → English",
                       "continuations": [{"kind": "rewrite", "prompt": "The mother tongue of Danielle Darrieux is",
                                          "before": " French.", "after": " <script>alert(1)</script> English",
                                          "as_intended": True}],
                       "pre": {"efficacy_score": 0.0}, "post": {"efficacy_score": 1.0, "gen_efficacy": 1.0}}],
            "trace": {"fact": "The mother tongue of Danielle Darrieux is", "target": "French", "p_clean": 0.6,
                      "p_corrupt": 0.1, "window": 6, "tokens": ["The", " mother", " Dan", "ielle", " is"],
                      "subject_span": [2, 3], "scores": [[0.1, 0.2, 0.3, 0.4, 0.1]] * 30}}
    (tmp_path / "real.json").write_text(json.dumps(data))
    html = write_report(tmp_path).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "dequantised" in html and "Q4_1" in html and "Danielle Darrieux: French → English" in html
    assert (tmp_path / "plots" / "trace_mlp.png").stat().st_size > 0 and 'src="plots/trace_mlp.png"' in html
