"""The CLI explains itself: every option's description in --help, --print_config prints the
config that runs (and runs again as given), only working subcommands are offered, LightningCLI's
optimizer switch is refused, a validation from a checkpoint reads the data it was trained on,
and runs of other data, tasks or subcommands get names of their own."""
import os
import re

import pytest
import torch
import yaml

from longctx.cli import cli_main, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def test_help_describes_every_model_and_data_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps descriptions
    for option, words in [("--model.d_model D_MODEL", "the model width."),
                          ("--model.skip_nonfinite {true,false}", "on a NaN or inf loss skip the step"),
                          ("--model.mlp_chunk_tokens MLP_CHUNK_TOKENS", "run each SwiGLU over chunks of this many tokens"),
                          ("--data.seq_len SEQ_LEN", "tokens per training window"),
                          ("--data.data_dir DATA_DIR", "a folder of your own text, .jsonl or .parquet files"),
                          ("--data.tokenizer TOKENIZER", "a tokenizer.json, a folder holding one, or a SentencePiece .model")]:
        assert f"{option} {words}" in text, option
    options = re.findall(r"--(?:model|data)\.(\w+) [A-Z_{},a-z]+ (\S+)", text)
    undescribed = [name for name, first in options if first.startswith("(type:")]
    assert options and not undescribed, undescribed


def test_print_config_prints_what_runs_and_runs_again(tmp_path, capsys):
    args = ["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", "--data.seq_len=64",
            "--model.segment_lengths=[16,32,64]", "--trainer.max_steps=2", f"--data.cache_dir={tmp_path}/data"]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer = printed["trainer"]
    assert trainer["precision"] == "32-true"  # no GPU here
    assert trainer["plugins"] == [{"class_path": "longctx.checkpoint.AtomicCheckpointIO"}]
    assert trainer["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert trainer["logger"]["init_args"]["name"] == "improved_dilated-64"
    config = tmp_path / "printed.yaml"
    config.write_text(yaml.safe_dump(printed))
    cli = cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "32-true"
    assert type(cli.trainer.logger).__name__ == "TensorBoardLogger" and cli.trainer.logger.name == "improved_dilated-64"


def test_only_working_subcommands_are_offered(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    usage = capsys.readouterr().out
    assert "{fit,validate}" in usage and "predict" not in usage and " test " not in usage


def test_lightningclis_optimizer_switch_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", TINY, "--optimizer=SGD"])
    assert exit_.value.code != 0
    assert "unrecognized arguments: --optimizer=SGD" in capsys.readouterr().err


def test_validate_from_a_checkpoint_reads_the_data_it_was_trained_on(tmp_path):
    cli = cli_main(["fit", "--config", TINY, f"--data.cache_dir={tmp_path}/data", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_checkpointing=true", "--data.seq_len=32", "--model.segment_lengths=[8,16,32]",
                    "--trainer.max_steps=2"])
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    trained = cli.datamodule.hparams
    validated = cli_main(["validate", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
                          "--trainer.enable_progress_bar=false", f"--ckpt_path={path}"])
    assert validated.datamodule.hparams.seq_len == 32 and validated.model.hparams.seq_len == 32
    assert validated.datamodule.hparams.cache_dir == trained.cache_dir
    assert validated.model.hparams.segment_lengths == [8, 16, 32]
    assert validated.trainer.logger.name == "improved_dilated-32-validate"
    assert torch.isfinite(validated.trainer.callback_metrics["val/loss"])


def test_runs_of_other_data_tasks_and_subcommands_get_their_own_names():
    assert run_name(None, 32768) == "improved_dilated-32k"
    assert run_name({"class_path": "ring_dilated"}, 2**20, data_dir="/data/books/") == "ring_dilated-1m-books"
    assert run_name(None, 4096, task="passkey") == "improved_dilated-4k-passkey"
    assert run_name(None, 4096, subcommand="validate") == "improved_dilated-4k-validate"
    assert run_name(None, 4096, tokenizer="/t/llama3/tokenizer.json") == "improved_dilated-4k-llama3"
    assert run_name(None, 4096, data_dir="/d/web", tokenizer="/t/spm32k.model") == "improved_dilated-4k-web-spm32k"


def test_fast_dev_run_writes_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", QUICKSTART, "--data.seq_len=64", "--model.segment_lengths=[16,32,64]",
              f"--data.cache_dir={tmp_path}/data", "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])
    assert not list(tmp_path.rglob("*.ckpt"))
