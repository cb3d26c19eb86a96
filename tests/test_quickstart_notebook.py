"""The quick-start notebook runs top to bottom with small parameters: a probe with a finite R², its scatter plot,
completions side by side, and an edited checkpoint that reloads with the same logits."""

import math
import re

from tests.notebook_runner import figures, run_notebook
from tests.numerics import FLOAT32_REL

SMALL = {"MODEL": "embedded-refuser", "PROMPTS": ["The Eiffel Tower is in", "Tokyo is the capital of"],
         "PROBE_LAYER": 4, "N_PLACES": 100, "DIRECTION_LAYER": 21, "N_INSTRUCTIONS": 8, "N_SHOW": 1,
         "MAX_NEW_TOKENS": 4}


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")


def test_quickstart_notebook_probes_steers_saves_and_reloads(tmp_path):
    nb = run_notebook("00_quickstart.ipynb", SMALL | {"OUT": str(tmp_path / "quickstart")})
    text = printed(nb)
    assert math.isfinite(float(re.search(r"test R² at layer 4: (\S+)", text).group(1)))
    assert [sorted({t["type"] for t in f["data"]}) for f in figures(nb)] == [["scatter"]]
    tables = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
              if "text/html" in o.get("data", {})]
    assert any(all(k in t for k in ("baseline", "ablated", "added")) for t in tables)
    assert float(re.search(r"reloaded vs edited: relative difference (\S+)", text).group(1)) < FLOAT32_REL
    assert (tmp_path / "quickstart" / "checkpoint" / "config.json").is_file()
