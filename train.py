"""Train a long-context LM: `python train.py fit --config configs/quickstart.yaml`."""
from longctx.cli import cli_main

if __name__ == "__main__":
    cli_main()
