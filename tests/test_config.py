import pytest

from moecl.config import Params, ParamsError, apply_overrides, load_params


def test_params_yaml_states_every_default_of_params():
    """params.yaml is where users read the defaults: it must say exactly what Params() defaults to, key by key."""
    import yaml

    raw = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    defaults = Params().to_dict()
    assert {s: sorted(v) for s, v in raw.items()} == {s: sorted(v) for s, v in defaults.items()}
    assert load_params("params.yaml") == Params()


def test_typo_in_params_names_file_and_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: train.learning_rate is not a known key"):
        load_params(f)
    f.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ParamsError, match="unknown section 'trian'"):
        load_params(f)


def test_bad_values_are_rejected(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epochs: three\n")
    with pytest.raises(ParamsError, match="train.epochs: expected an integer"):
        load_params(f)
    with pytest.raises(ParamsError, match="method.name"):
        apply_overrides(Params(), ["method.name=magic"])


def test_overrides():
    p = apply_overrides(Params(), ["train.lr=0.001", "lora.targets=up_proj,down_proj", "evaluate.fwt=false"])
    assert p.train.lr == 0.001 and p.lora.targets == ["up_proj", "down_proj"] and p.evaluate.fwt is False


def test_a_retired_key_loads_with_a_warning_and_changes_nothing(tmp_path):
    """A params.yaml written for an earlier version (with drift.text_length_p, which nothing reads) still loads;
    the warning names the file and the key. A key that was never known stays an error."""
    f = tmp_path / "params.yaml"
    f.write_text("drift:\n  text_length_p: 0.01\n  max_drift_share: 0.4\n")
    with pytest.warns(UserWarning, match=r"params.yaml: drift.text_length_p has no effect"):
        params = load_params(f)
    assert params.drift.max_drift_share == 0.4
    assert not hasattr(params.drift, "text_length_p")
    f.write_text("drift:\n  text_length_q: 0.01\n")
    with pytest.raises(ParamsError, match="drift.text_length_q is not a known key"):
        load_params(f)
