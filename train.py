"""Train a long-context LM: `python train.py fit --config configs/quickstart.yaml`."""
from longctx.cli import main

if __name__ == "__main__":
    main()
