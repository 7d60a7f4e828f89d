"""Continual fine-tuning with CRMA: ``python train.py fit --config configs/tiny.yaml``.

See README.md; ``python train.py fit --help`` lists every option.
"""

from crma_lightning.cli import main

if __name__ == "__main__":
    main()
