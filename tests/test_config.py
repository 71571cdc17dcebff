import pytest

from training.config import ConfigError, load_config, to_yaml
from training.segment.config import SegmentJobConfig


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: mine\ncompute:\n  epochs: 3\nsource:\n  count: 10\n")
    cfg = load_config(SegmentJobConfig, path, ["compute.epochs=5", "model.base_width=8", "source.sequences=[a, b]"])
    assert cfg.name == "mine" and cfg.compute.epochs == 5 and cfg.model.base_width == 8
    assert cfg.source.count == 10 and cfg.source.sequences == ["a", "b"]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(SegmentJobConfig, None, ["style.method=fda", "target.style=real-like", "target.labelled=false"])
    path = tmp_path / "dump.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(SegmentJobConfig, path) == cfg


@pytest.mark.parametrize(
    ("override", "field"),
    [("compute.epochs=zero", "compute.epochs"), ("compute.epoch=3", "compute.epoch"), ("model.block=resnet", "block")],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(SegmentJobConfig, None, [override])


def test_style_without_target_is_rejected():
    with pytest.raises(ConfigError, match="target"):
        load_config(SegmentJobConfig, None, ["style.method=fda"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SegmentJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SegmentJobConfig, bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(SegmentJobConfig, None, ["no-equals-sign"])
