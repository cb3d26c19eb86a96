"""Notebook 06 on the refusal organism: the steering panel with the refusal direction, then the patching heatmap."""

from tests.notebook_runner import figures, run_notebook

SMALL = {"N_INSTRUCTIONS": 4, "MAX_NEW_TOKENS": 8, "PATCH_LAYER_STEP": 15}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widget_state(nb) -> list[dict]:
    """Every widget model of the executed notebook (nbclient saves their state in its metadata)."""
    return list(nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values())


def test_notebook_06_shows_the_steering_panel_and_the_patching_heatmap():
    nb = run_notebook("06_steering_panel.ipynb", SMALL)
    panel_cell = next(c for c in nb.cells if c.source.rstrip().endswith("\npanel"))
    assert any(WIDGET_VIEW in o.get("data", {}) for o in panel_cell.outputs)  # the panel is displayed
    steered = [m["state"]["value"] for m in widget_state(nb)
               if m["model_name"] == "HTMLModel" and "steering-steered" in m["state"].get("value", "")]
    assert len(steered) == 1 and "refusal added at layer 20" in steered[0]  # its Generate, shown in the panel
    labels = [m["state"]["_options_labels"] for m in widget_state(nb) if m["model_name"] == "DropdownModel"][0]
    assert [label.split(" ")[0] for label in labels] == ["refusal", "latent", "random"]  # the picker's directions
    heatmaps = [f for f in figures(nb) if f["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == 1 and heatmaps[0]["layout"]["title"]["text"].startswith("Which layers and positions")
    assert heatmaps[0]["data"][0]["y"] == ["L0", "L15"]
    assert "patching_plots.patching_figure(" in nb.cells[-1].source  # the last cell
