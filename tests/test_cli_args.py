"""Layer lists on the command line: ranges and comma lists, clear error otherwise."""

import pytest

from probes.cli_args import format_layers, parse_layers


def test_parse_layers_reads_ranges_and_lists():
    assert parse_layers("0-3,8") == [0, 1, 2, 3, 8] and parse_layers(None) is None
    assert parse_layers("15,20") == [15, 20]
    with pytest.raises(ValueError, match="0-11"):
        parse_layers("first few")


def test_format_layers_inverts_parse_layers():
    assert format_layers([0, 1, 2, 3, 8]) == "0-3,8" and format_layers(None) == "all"
    assert parse_layers(format_layers([13, 2, 4, 5, 6])) == [2, 4, 5, 6, 13]
