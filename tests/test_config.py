"""Config loading and validation: typed fields, overrides, and errors that say what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_rft.config import describe, load_config
from qlora_rft.errors import ConfigError

ROOT = Path(__file__).parents[1]
CONFIG_DIR = ROOT / "configs"
LAUNCH_CONFIGS = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p not in LAUNCH_CONFIGS)


def test_defaults_are_valid_and_overrides_are_typed():
    cfg = load_config(None, ["train.max_steps=7", "grpo.beta=0", "lora.target_modules=q_proj,v_proj"])
    assert cfg.train.max_steps == 7
    assert cfg.grpo.beta == 0.0 and isinstance(cfg.grpo.beta, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    for required in ("output_dir", "max_steps", "save_steps", "seed"):
        assert hasattr(cfg.train, required)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "qlora").glob("*.yaml")), ids=lambda p: p.name)
def test_qlora_configs_train_as_long_as_their_paper_twin_and_sample_alike(path):
    """Each one-GPU config keeps the paper config's passes over the data (or steps) and its top_k."""
    task = path.stem.split("_", 1)[1] if path.stem[:2] in ("2b", "7b") else path.stem.split("b_", 1)[1]
    cfg, paper = load_config(path), load_config(ROOT / "configs" / "paper" / f"2b_{task}.yaml")
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.grpo.top_k) == \
           (paper.train.epochs, paper.train.max_steps, paper.grpo.top_k)
    assert " Length: " in path.read_text() and "~200 steps" not in path.read_text()


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_every_launch_config_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    launch = ClusterConfig.from_yaml_file(str(path))
    assert launch.num_processes >= 1
    if launch.distributed_type == "DEEPSPEED":
        ds = launch.deepspeed_config
        if "deepspeed_config_file" in ds:  # a DeepSpeed file (relative to the repository root) holds the stage
            ds = {"zero_stage": json.loads((ROOT / ds["deepspeed_config_file"]).read_text())["zero_optimization"]
                  ["stage"]}
        assert ds["zero_stage"] in (2, 3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("grpo.num_generations=1", "grpo.num_generations must be >= 2"),
        ("grpo.backward_chunk=3", "grpo.backward_chunk=3 must divide grpo.num_generations=8"),
        ("grpo.generation_chunk=5", "grpo.generation_chunk=5 must divide"),
        ("grpo.temperature=0", "grpo.temperature must be > 0"),
        ("train.max_step=3", "did you mean 'max_steps'"),
        ("trian.max_steps=3", "unknown config section 'trian'"),
        ("train.max_steps=ten", "train.max_steps must be a int"),
        ("model.mode=int8", "model.mode must be one of qlora, lora"),
        ("rewards.weights={iuo: 1.0}", "unknown reward 'iuo': did you mean 'iou'"),
        ("rewards.weights={format: 0}", "at least one reward needs a non-zero weight"),
        ("data.max_pixels=1000", "data.max_pixels=1000 must be >= data.min_pixels=3136"),
        ("train_max_steps", "must look like section.key=value"),
        ("train.epochs=2", "train.max_steps=200 and train.epochs=2 both set the training length: set one and the "
                           "other to 0 .train.max_steps=0 train.epochs=2, or train.epochs=0 train.max_steps=200."),
        ("train.epochs=-1", "train.epochs=-1 must be >= 1 .or 0 when train.max_steps sets the length."),
        ("train.max_steps=0", "no training length: set train.max_steps .steps. or train.epochs"),
        ("grpo.epsilon_high=0.1", "grpo.epsilon_high=0.1 is below grpo.epsilon=0.2"),
        ("grpo.loss_type=ppo", "grpo.loss_type must be one of grpo, bnpo, dr_grpo, dapo, cispo, sapo"),
        ("grpo.sapo_temperature_neg=0", "grpo.sapo_temperature_pos and grpo.sapo_temperature_neg must be > 0"),
        ("grpo.loss_aggregation=token", "use grpo.loss_type (loss_aggregation=sequence is loss_type=grpo, token is"),
        ("grpo.scale_rewards=std", "grpo.scale_rewards must be one of group, batch, none"),
    ],
)
def test_validation_names_the_problem_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.seed=-1", "invalid config: train.seed=-1 must be in [0, 4294967295] (the seeds numpy takes)"),
        (f"train.seed={2**32}", f"train.seed={2**32} must be in [0, 4294967295]"),
        ("data.max_pixels=1000000000000", "data.max_pixels=1000000000000 is over 16777216, the largest image area"),
        ("train.output_dir=\"runs/a\\0b\"", "train.output_dir holds a NUL character, which no path or name can"),
        ("data.train=\"a\\0b\"", "data.train holds a NUL character"),
        ("eval.adapter=\"runs/x\\0/adapter\"", "eval.adapter holds a NUL character"),
    ],
)
def test_bounds_no_model_or_numpy_can_take_are_one_line(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_largest_seed_loads():
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_epochs_alone_set_the_training_length():
    cfg = load_config(None, ["train.max_steps=0", "train.epochs=2"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (0, 2)
    with pytest.raises(ConfigError, match="no training length"):
        load_config(None, ["train.max_steps=0", "train.epochs=0"])


def test_loss_settings_resolve_and_older_reward_scaling_values_still_load():
    g = load_config(None, []).grpo
    assert (g.loss_type, g.scale_rewards, g.epsilon_high, g.clip_high) == ("grpo", "group", 0.0, 0.2)
    assert load_config(None, ["grpo.epsilon_high=0.28"]).grpo.clip_high == 0.28
    assert load_config(None, ["grpo.loss_type=cispo"]).grpo.clip_high == 5.0  # ScaleRL's cap, not epsilon's 0.2
    assert load_config(None, ["grpo.loss_type=cispo", "grpo.epsilon_high=2"]).grpo.clip_high == 2.0
    assert load_config(None, ["grpo.scale_rewards=true"]).grpo.scale_rewards == "group"  # a config of before
    assert load_config(None, ["grpo.scale_rewards=false"]).grpo.scale_rewards == "none"
    with pytest.raises(ConfigError, match="cispo caps the importance weight at grpo.epsilon_high itself"):
        load_config(None, ["grpo.loss_type=cispo", "grpo.epsilon_high=0.5"])
    with pytest.raises(ConfigError, match="grpo.dynamic_sampling needs grpo.max_extra_groups >= 1"):
        load_config(None, ["grpo.dynamic_sampling=true", "grpo.max_extra_groups=0"])


def test_floats_in_exponent_form_without_a_dot():
    cfg = load_config(None, ["train.learning_rate=1e-05", "grpo.beta=4e-2"])
    assert cfg.train.learning_rate == 1e-5 and cfg.grpo.beta == 0.04


def test_generation_chunk_may_pack_whole_prompts():
    cfg = load_config(None, ["grpo.num_generations=4", "train.prompts_per_step=4", "grpo.generation_chunk=8"])
    assert cfg.grpo.generation_chunk == 8
    with pytest.raises(ConfigError, match="generation_chunk=12"):
        load_config(None, ["grpo.num_generations=4", "train.prompts_per_step=4", "grpo.generation_chunk=12"])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["grpo.num_generations=1", "train.max_steps=0"])
    assert "num_generations" in str(info.value) and "max_steps" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    text = describe()
    assert "grpo:" in text and "num_generations: 8  # G:" in text
    assert all("#" in line for line in text.splitlines() if line.startswith("  "))


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs' in one field: each list holds 9 aliases of the one before, 9**levels strings expanded."""
    lists = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"lora:\n  target_modules: [{', '.join(lists)}]\n"


def test_alias_bombs_and_self_references_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    with pytest.raises(ConfigError, match="expands through its aliases"):
        load_config(bomb)
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("lora:\n  target_modules: &a [q_proj, *a]\n")
    with pytest.raises(ConfigError, match="or into itself"):
        load_config(cycle)
    with pytest.raises(ConfigError, match="override 'lora.target_modules=.*expands"):
        load_config(None, ["lora.target_modules=" + "[&a [x, x, x, x], &b [*a, *a, *a, *a], &c [*b, *b, *b, *b], "
                           "&d [*c, *c, *c, *c], &e [*d, *d, *d, *d], &f [*e, *e, *e, *e], [*f, *f, *f, *f]]"])


def test_a_few_anchors_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("lora:\n  target_modules: &lin [q_proj, v_proj]\n  r: &rank 8\n  alpha: *rank\n"
                    "model:\n  quantize_skip_modules: *lin\n")
    cfg = load_config(path)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] == cfg.model.quantize_skip_modules
    assert cfg.lora.r == cfg.lora.alpha == 8


def test_binary_file_bad_override_and_odd_keys_are_config_errors(tmp_path):
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
    control = tmp_path / "nul.yaml"
    control.write_text("model:\n  name\x00: x\n")
    with pytest.raises(ConfigError, match="not valid YAML: unacceptable character"):
        load_config(control)
    with pytest.raises(ConfigError, match=r"override 'train.output_dir=\[oops' is not valid YAML: expected"):
        load_config(None, ["train.output_dir=[oops"])
    numbered = tmp_path / "numbers.yaml"
    numbered.write_text("model: {1: x}\n")
    with pytest.raises(ConfigError, match="key 1 of section 'model' is not a name"):
        load_config(numbered)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learning_rate=inf", "train.learning_rate must be a finite number, got inf"),
        ("train.learning_rate=1e400", "train.learning_rate must be a finite number, got inf"),
        ("train.learning_rate=1" + "0" * 400, "train.learning_rate must be a finite number, got inf"),
        ("grpo.temperature=.inf", "grpo.temperature must be a finite number, got inf"),
        ("grpo.beta=nan", "grpo.beta must be a finite number, got nan"),
        ("grpo.advantage_eps=-.inf", "grpo.advantage_eps must be a finite number, got -inf"),
        ("rewards.weights={format: .nan, classification: 1}", "rewards.weights.format must be a finite number"),
        ("rewards.weights={format: 1, classification: .inf}", "rewards.weights.classification must be a finite number"),
        ("train.learning_rate=1e39", "train.learning_rate must be > 0 and < 3.4e38"),
        ("warmup.learning_rate=0", "warmup.learning_rate must be > 0"),
    ],
)
def test_non_finite_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: .inf\n")
    with pytest.raises(ConfigError, match="train.learning_rate must be a finite number, got inf"):
        load_config(path)
    path.write_text("grpo:\n  beta: .NaN\n")
    with pytest.raises(ConfigError, match="grpo.beta must be a finite number, got nan"):
        load_config(path)
