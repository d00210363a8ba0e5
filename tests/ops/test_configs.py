"""Launch settings (openmsa/ops/utils/configs.py): tables, overrides, the one env variable."""

import pytest

from openmsa.ops.utils import configs


def test_override_applies_inside_the_block_only():
    base = configs.launch_config("attention_fwd")
    with configs.override("attention_fwd", segment_tiles=3):
        assert configs.launch_config("attention_fwd").segment_tiles == 3
        with configs.override("attention_fwd", num_stages=1):
            got = configs.launch_config("attention_fwd")
            assert (got.segment_tiles, got.num_stages) == (3, 1)
        assert configs.launch_config("attention_fwd").num_stages == base.num_stages
    assert configs.launch_config("attention_fwd") == base


def test_unknown_names_and_bad_values_raise():
    with pytest.raises(ValueError, match="unknown launch setting entry"):
        with configs.override("attention", tile_rows=1):
            pass
    with pytest.raises(TypeError):
        with configs.override("attention_fwd", tiles=1):
            pass
    with pytest.raises(ValueError, match="launch"):
        with configs.override("attention_bwd", launch="fused"):
            pass
    with pytest.raises(ValueError, match="lse_mode"):
        with configs.override("indexer", lse_mode="both"):
            pass


def test_env_syntax():
    got = configs._parse_env("attention_fwd.segment_tiles=64, attention_bwd.split=0,"
                             "kl_teacher.tile_rows=None,attention_bwd.launch=separate")
    assert got == {"attention_fwd": {"segment_tiles": 64},
                   "attention_bwd": {"split": False, "launch": "separate"},
                   "kl_teacher": {"tile_rows": None}}
    for bad in ("attention_fwd.segment_tiles", "attention_fwd=3", "nope.x=1",
                "attention_fwd.nope=1"):
        with pytest.raises(ValueError, match="OPENMSA_LAUNCH"):
            configs._parse_env(bad)


def test_every_entry_has_a_hopper_default():
    for name in configs._DEFAULTS:
        assert configs.launch_config(name) == configs.TABLES[configs.HOPPER][name]
