"""TrainConfig: precedence (defaults < preset < config file < flags), the flags generated from the fields
with the old short aliases, typed reads that name the field, and the old import paths."""

import json
from dataclasses import asdict

import pytest

from flashmoba.cli.train import build_parser, parse_config
from flashmoba.training.config import TrainConfig, train_config_from_dict


def test_config_file_and_flags(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(
            {
                "preset": "tiny",
                "model": {"kconv_size": 5, "rope_base": 500.0},
                "data": {"task_fraction": 0.25},
                "lr": 1e-3,
            }
        )
    )
    config = parse_config(
        ["--config", str(config_file), "--attn", "dense", "--lr", "2e-3", "--block-size", "16"]
    )
    assert (config.model.kconv_size, config.model.rope_base, config.model.global_attention) == (
        5,
        500.0,
        "dense",
    )
    assert (config.model.moba_block_size, config.lr, config.data.task_fraction) == (16, 2e-3, 0.25)
    config_file.write_text(json.dumps({"model": {"kconv": 3}}))
    with pytest.raises(ValueError, match="kconv"):
        parse_config(["--config", str(config_file)])


# Every flag the train command had before its flags were generated, with a value and where it lands.
OLD_FLAGS = [
    (["--preset", "small"], "preset", "small"),
    (["--attn", "dense"], "model.global_attention", "dense"),
    (["--block-size", "64"], "model.moba_block_size", 64),
    (["--topk", "3"], "model.moba_topk", 3),
    (["--kconv", "5"], "model.kconv_size", 5),
    (["--backend", "reference"], "model.backend", "reference"),
    (["--seq-len", "256"], "seq_len", 256),
    (["--batch-size", "3"], "batch_size", 3),
    (["--grad-accum-steps", "2"], "grad_accum_steps", 2),
    (["--max-steps", "7"], "max_steps", 7),
    (["--lr", "1e-3"], "lr", 1e-3),
    (["--warmup-steps", "4"], "warmup_steps", 4),
    (["--corpus", "data/*.txt"], "data.corpus", "data/*.txt"),
    (["--task-fraction", "0.5"], "data.task_fraction", 0.5),
    (["--device", "cpu"], "device", "cpu"),
    (["--precision", "fp32"], "precision", "fp32"),
    (["--distributed", "fsdp"], "distributed", "fsdp"),
    (["--activation-checkpointing"], "activation_checkpointing", True),
    (["--seed", "5"], "seed", 5),
    (["--log-every", "10"], "log_every", 10),
    (["--eval-every", "20"], "eval_every", 20),
    (["--save-every", "30"], "save_every", 30),
    (["--out", "runs/x"], "out", "runs/x"),
    (["--resume", "auto"], "resume", "auto"),
    (["--no-progress"], "progress", False),
]


def setting(config: TrainConfig, dotted: str):
    value = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("argv, dotted, expected", OLD_FLAGS, ids=[argv[0] for argv, _, _ in OLD_FLAGS])
def test_every_old_flag_keeps_its_meaning(argv, dotted, expected):
    config = parse_config(argv)
    assert setting(config, dotted) == expected
    assert setting(TrainConfig(), dotted) != expected or dotted == "preset"


def test_every_field_has_a_generated_flag():
    config = parse_config(
        [
            "--model.num-layers",
            "6",
            "--model.moba-topk",
            "2",
            "--model.tie-embeddings",
            "--data.answer-loss-weight",
            "8",
            "--data.tasks",
            "niah1,passkey",
            "--keep-checkpoints",
            "5",
            "--beta2",
            "0.99",
            "--no-activation-checkpointing",
        ]
    )
    assert (config.model.num_layers, config.model.moba_topk, config.model.tie_embeddings) == (6, 2, True)
    assert (config.data.answer_loss_weight, config.data.tasks) == (8.0, ["niah1", "passkey"])
    assert (config.keep_checkpoints, config.beta2, config.activation_checkpointing) == (5, 0.99, False)
    help_text = build_parser().format_help()
    assert "--model.moba-topk" in help_text and "MoBA blocks per query" in help_text
    assert "1% of max steps" in help_text


def test_preset_then_file_then_flags(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"preset": "small", "seq_len": 1024, "batch_size": 3}))
    config = parse_config(["--config", str(config_file), "--batch-size", "5"])
    assert (config.preset, config.model.num_layers) == ("small", 8)  # the file's preset
    assert (config.seq_len, config.batch_size, config.max_steps) == (1024, 5, 5000)
    assert parse_config(["--config", str(config_file), "--preset", "tiny"]).model.num_layers == 4


@pytest.mark.parametrize(
    "values, error, message",
    [
        ({"model": {"moba_topk": "8"}}, TypeError, "model.moba_topk must be an int, got str"),
        ({"data": {"tasks": "niah1"}}, TypeError, "data.tasks must be a list, got str"),
        ({"data": {"tasks": ["niah1", 2]}}, TypeError, r"data.tasks\[1\] must be a str"),
        ({"progress": "false"}, TypeError, "progress must be a bool, got str"),
        ({"lr": True}, TypeError, "lr must be a real number"),
        ({"model": 3}, ValueError, "setting 'model' must be an object"),
        ({"data": {"corpora": "x"}}, ValueError, "unknown setting data.'corpora'"),
        ({"seq_len": 0}, ValueError, "seq_len must be >= 1"),
        ({"precision": "fp16"}, ValueError, "precision must be one of"),
    ],
)
def test_config_files_are_read_typed(tmp_path, values, error, message):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(values))
    with pytest.raises(error, match=message):
        parse_config(["--config", str(config_file)])


def test_a_stored_config_reads_back_into_the_same_train_config():
    config = parse_config(["--kconv", "3", "--lr", "1e-3", "--resume", "auto"])
    stored = json.loads(json.dumps(asdict(config)))  # as config.json and checkpoints hold it
    assert train_config_from_dict(stored) == config
    stored["model"]["moba_topk"] = 2.5
    with pytest.raises(TypeError, match="model.moba_topk must be an int, got float"):
        train_config_from_dict(stored)


def test_old_import_paths_re_export_the_new_homes():
    from flashmoba import evaluate, model, train
    from flashmoba.cli import eval as eval_command
    from flashmoba.cli import train as train_command
    from flashmoba.evaluation import evaluate_retrieval
    from flashmoba.models import HybridLM, find_checkpoint, latest_checkpoint, load_model
    from flashmoba.training import TrainConfig as NewTrainConfig
    from flashmoba.training import learning_rate

    assert (train.main, train.parse_config, train.TrainConfig) == (
        train_command.main,
        train_command.parse_config,
        NewTrainConfig,
    )
    assert (train.learning_rate, train.latest_checkpoint) == (learning_rate, latest_checkpoint)
    assert (evaluate.main, evaluate.load_model, evaluate.find_checkpoint) == (
        eval_command.main,
        load_model,
        find_checkpoint,
    )
    assert evaluate.evaluate_retrieval is evaluate_retrieval and model.HybridLM is HybridLM
