"""Job config precedence: defaults < YAML < DOWNPOUR_* environment < flags."""

import pytest

from downpour import config


def test_precedence(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("preset: tiny\nreplicas: 3\nsteps: 50\noptimizer: {lr: 0.5}\n")
    cfg = config.load(
        str(p),
        env={"DOWNPOUR_STEPS": "70", "DOWNPOUR_OPTIMIZER__EPS": "0.001"},
        overrides={"steps": 90, "shards": None},
    )
    assert cfg.preset == "tiny" and cfg.replicas == 3  # from YAML
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.eps == 0.001  # YAML and env merge per field
    assert cfg.steps == 90  # the flag wins over env and YAML
    assert cfg.shards == config.JobConfig().shards  # a flag left unset changes nothing


def test_yaml_round_trip_and_custom_model():
    cfg = config.load(
        env={}, overrides={"model": {"input": [1, 12, 12], "stages": [{"filter": {"maps": 2, "field": 3}}]}}
    )
    again = config.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.network_spec().input == (1, 12, 12)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"DOWNPOUR_REPLICAZ": "2"}, "replicaz"),
        ({"DOWNPOUR_REPLICAS": "two"}, "replicas"),
        ({"DOWNPOUR_OPTIMIZER__MOMENTUM": "0.9"}, "optimizer.momentum"),
        ({"DOWNPOUR_SUPERVISED": "true"}, "classes"),
    ],
)
def test_bad_environment_is_rejected(env, needle):
    with pytest.raises(ValueError, match=needle):
        config.load(env=env)


def test_unknown_yaml_key_is_rejected(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("preset: tiny\nmodel: {input: [1, 8, 8], stages: [{filter: {maps: 2, field: 3, strid: 1}}]}\n")
    with pytest.raises(ValueError, match="strid"):
        config.load(str(p), env={})


def test_grid_parsing():
    assert config.parse_grid("2x3") == (2, 3)
    with pytest.raises(ValueError, match="RxC"):
        config.parse_grid("0x2")


def test_security_and_deployment_variables_are_not_job_settings():
    env = {
        "DOWNPOUR_TLS_CERT": "/x.pem",
        "DOWNPOUR_TOKEN_FILE": "/t",
        "DOWNPOUR_JOB": "/job.yaml",
        "DOWNPOUR_STEPS": "7",
    }
    assert config.load(env=env).steps == 7


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-7 as a string; from a file, the environment or a flag it is the number
    p = tmp_path / "job.yaml"
    p.write_text("optimizer: {lr: 1e-7}\n")
    assert config.load(str(p), env={}).optimizer.lr == 1e-7
    assert config.load(env={"DOWNPOUR_OPTIMIZER__EPS": "1e-9"}).optimizer.eps == 1e-9
    with pytest.raises(ValueError, match="optimizer.lr must be a number"):
        config.load(env={"DOWNPOUR_OPTIMIZER__LR": "fast"})


def test_init_from_is_a_setting():
    assert config.load(env={"DOWNPOUR_INIT_FROM": "/runs/a/checkpoints"}).init_from == "/runs/a/checkpoints"
    assert config.JobConfig().init_from == ""


def test_objective_settings_override_every_stage():
    cfg = config.load(env={"DOWNPOUR_CONSTRAINT": "unit_encoder"}, overrides={"training": "layerwise"})
    spec = cfg.network_spec()
    assert spec.training == "layerwise"
    assert {st.constraint for st in spec.stages} == {"unit_encoder"}
    assert config.from_yaml(cfg.to_yaml()).network_spec() == spec  # it travels with the job
    with pytest.raises(ValueError, match="constraint='unit'.*allowed: free, unit_decoder"):
        config.load(env={}, overrides={"constraint": "unit"})
    with pytest.raises(ValueError, match="training='greedy'.*allowed: joint, layerwise"):
        config.load(env={}, overrides={"training": "greedy"})
