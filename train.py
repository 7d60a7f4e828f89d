"""Continual fine-tuning with CRMA: ``python train.py fit --config configs/tiny.yaml``.

Every subcommand (fit/validate/test, predict/route/export, ``test --run``, plan) is a row of
:data:`crma_lightning.cli.SUBCOMMANDS`; ``python train.py fit --help`` lists every option.
"""

from crma_lightning.cli import main

if __name__ == "__main__":
    main()
