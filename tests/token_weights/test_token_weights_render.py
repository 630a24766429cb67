"""tools/render_token_weights.py: colours, the HTML page, and the model path on a tiny model."""
import json

import pytest

from tools.render_token_weights import colour, main, render_html, vgr_sample


def test_colour_is_white_at_one_blue_below_red_above():
    assert colour(1.0) == "rgb(255,255,255)"
    assert colour(0.2) == "rgb(0,0,255)"
    assert colour(3.0) == "rgb(255,0,0)"


def test_page_has_one_span_per_token_with_its_weight():
    page = render_html(["a", "<b>"], [0.5, 2.0], prompt="q")
    assert page.count('<span title="') == 2
    assert 'title="0.500"' in page and "&lt;b&gt;" in page and "mean weight 1.250" in page
    with pytest.raises(ValueError, match="2 tokens but 1 weights"):
        render_html(["a", "b"], [1.0])


def test_json_input_writes_html(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"tokens": ["x", "y"], "weights": [0.3, 1.7], "prompt": "p"}))
    main(["--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "w.html")])
    assert (tmp_path / "w.html").read_text().count("<span title=") == 2


def test_model_path_gives_vgr_weights_of_a_response(tiny_vgr_run):
    overrides, _ = tiny_vgr_run
    sample = vgr_sample(None, 0, "rome rome oslo", overrides)
    assert sample["tokens"] == ["rome", "rome", "oslo"]
    assert len(sample["weights"]) == 3 and all(0.2 <= w <= 3.0 for w in sample["weights"])
    assert sum(sample["context"]) == 8       # "anna lives in rome ben lives in oslo"
