"""Convert Natural Earth's 1:110m country outlines into data/geo/countries_110m.json (run once, by hand; the
package does not import this script).

    python3 -m pip download --no-deps geopandas==0.14.4 pyshp -d /tmp/gp
    unzip /tmp/gp/geopandas-0.14.4-py3-none-any.whl 'geopandas/datasets/naturalearth_lowres/*' -d /tmp/gp/x
    python3 -m pip install --no-deps --target /tmp/gp/lib /tmp/gp/pyshp-*.whl
    PYTHONPATH=/tmp/gp/lib python3 data/geo/make_outlines.py \
        /tmp/gp/x/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp data/geo/countries_110m.json

Each polygon ring becomes a polyline of [longitude, latitude] pairs rounded to 0.01 degree (consecutive duplicates
after rounding dropped), grouped by country name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import shapefile  # pyshp

SOURCE = ("Natural Earth 1:110m Cultural Vectors, Admin 0 - Countries (public domain), as shipped in "
          "geopandas 0.14.4 (geopandas/datasets/naturalearth_lowres)")


def rings(shape) -> list[list[list[float]]]:
    """The shape's rings (parts) as rounded [lon, lat] polylines."""
    starts = [*shape.parts, len(shape.points)]
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        line: list[list[float]] = []
        for lon, lat in shape.points[a:b]:
            point = [round(lon, 2), round(lat, 2)]
            if not line or point != line[-1]:
                line.append(point)
        if len(line) > 1:
            out.append(line)
    return out


def convert(shp: Path) -> dict:
    """{"source": ..., "countries": {name: [ring, ...]}} from the shapefile at ``shp``."""
    reader = shapefile.Reader(str(shp))
    countries: dict[str, list] = {}
    for record, shape in zip(reader.records(), reader.shapes(), strict=True):
        countries.setdefault(record["name"], []).extend(rings(shape))
    return {"source": SOURCE, "licence": "public domain", "countries": dict(sorted(countries.items()))}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(convert(Path(sys.argv[1])), separators=(",", ":")) + "\n")
